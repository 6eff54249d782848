"""`emloc serve --ray`: the same application on Ray Serve, on a local Ray cluster that the server process starts
(loopback only), with two model replicas; memories load through `serve.multiplexed`, so requests for one memory keep
going to the replica that holds it."""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ROOT
from test_serve import _alone, _answers, _free_port, client, served, wait_for  # noqa: F401 - `served` is a fixture

if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
    pytest.skip("Ray Serve is not installed (pip install 'emloc[ray]', part of the test extra)", allow_module_level=True)
openai = pytest.importorskip("openai")


def test_ray_serve_deployment_two_replicas_routes_by_memory(served, tmp_path):
    queries = served["queries"]
    references = {name: _alone(served, name, queries[0], 5, logprobs=True) for name in ("iris-a", "iris-b")}
    expected = {name: text for name, (text, _) in references.items()}
    keys_file = tmp_path / "keys.json"
    import emloc_serve

    admin = emloc_serve.add_api_key(keys_file, "admin", "*")
    alice = emloc_serve.add_api_key(keys_file, "alice", ["iris-a"])
    port = _free_port()
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # Ray's single-machine mode: every port on 127.0.0.1
               RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=ray_dir)
    log = open(tmp_path / "server.log", "w")
    command = [sys.executable, str(ROOT / "emloc_cli.py"), "serve", "--ray", "--replicas", "2", "--replica-cpus", "0.5",
               "--threads", "1", "--model", str(served["base_dir"]), "--api-keys", str(keys_file), "--port", str(port)]
    for name, directory in served["dirs"].items():
        command += ["--memory", f"{name}={directory}"]
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_for(lambda: server.poll() is not None or _answers(f"{url}/../health"), 150)
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
        api = client(url, admin)
        assert [m.id for m in api.models.list()] == ["iris-a", "iris-b"]
        with pytest.raises(openai.AuthenticationError):
            client(url, "sk-wrong").models.list()
        with pytest.raises(openai.NotFoundError):
            client(url, alice).completions.create(model="iris-b", prompt="x", max_tokens=1)

        replicas = {}
        for name in ("iris-a", "iris-b", "iris-a", "iris-b", "iris-a", "iris-b"):
            raw = api.completions.with_raw_response.create(model=name, prompt=queries[0]["question"], max_tokens=5,
                                                           temperature=0, logprobs=0)
            answer = raw.parse().choices[0]
            assert answer.text == expected[name]
            assert answer.logprobs.token_logprobs == pytest.approx(references[name][1], abs=1e-4)
            replicas.setdefault(name, set()).add(raw.headers["x-emloc-replica"])
        # each memory stays on the replica that loaded it (serve.multiplexed routing)
        assert all(len(seen) == 1 for seen in replicas.values()), replicas
        chunks = api.chat.completions.create(model="iris-b", messages=[{"role": "user", "content": queries[0]["question"]}],
                                             max_tokens=5, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["iris-b"]
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            returncode = server.wait(90)
        except subprocess.TimeoutExpired:
            server.kill()
            returncode = server.wait()
        log.close()
        shutil.rmtree(ray_dir, ignore_errors=True)
    # SIGTERM shuts the deployment and the Ray cluster down, and the process exits cleanly
    assert returncode == 0, (tmp_path / "server.log").read_text()[-4000:]
    assert not _answers(f"{url}/models")
