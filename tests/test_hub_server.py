"""Run the real huggingface_hub / transformers clients (in subprocesses) against tests/hub_server.py."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

try:
    from hub_server import LocalHub
except ImportError:  # tests/ imported as a package
    from tests.hub_server import LocalHub

REPO = "user/emloc-test"


def run_client(code: str, env: dict, **args) -> dict:
    """Run ``code`` in a fresh interpreter (so HF_* env vars are read at import time).

    ``args`` is available to the code as the dict ``ARGS``; the code must assign a JSON-serialisable
    ``RESULT``, which is returned.
    """
    script = "import json, sys\nARGS = json.loads(sys.argv[1])\n" + textwrap.dedent(code)
    script += "\nprint('@@RESULT@@' + json.dumps(RESULT))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(args)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    line = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("@@RESULT@@"))
    return json.loads(line[len("@@RESULT@@") :])


def make_folder(path: Path) -> dict[str, bytes]:
    files = {
        "config.json": json.dumps({"model_type": "emloc", "dim": 8}).encode(),
        "README.md": b"---\nlicense: mit\n---\n# emloc test repo\n",
        "memory.safetensors": os.urandom(1024 * 1024),
    }
    path.mkdir(parents=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


UPLOAD_AND_DOWNLOAD = """
import os
from huggingface_hub import (create_repo, file_exists, hf_hub_download, list_repo_files, model_info,
                             repo_exists, snapshot_download, upload_folder)

repo = ARGS["repo"]
url = create_repo(repo, private=True)
again = create_repo(repo, exist_ok=True)
commit = upload_folder(repo_id=repo, folder_path=ARGS["folder"], commit_message="add files")
info = model_info(repo)
snapshot = snapshot_download(repo)
RESULT = {
    "url": str(url), "again": str(again), "commit": commit.oid,
    "info_sha": info.sha, "private": info.private, "siblings": sorted(s.rfilename for s in info.siblings),
    "files": sorted(list_repo_files(repo)),
    "exists": [repo_exists(repo), repo_exists("user/missing"), file_exists(repo, "config.json"),
               file_exists(repo, "missing.json")],
    "snapshot": snapshot,
    "downloads": {name: hf_hub_download(repo, name) for name in ARGS["names"]},
    "by_sha": hf_hub_download(repo, "config.json", revision=commit.oid),
}
"""


def test_upload_folder_and_download(local_hub, tmp_path):
    hub, env = local_hub
    files = make_folder(tmp_path / "folder")
    res = run_client(UPLOAD_AND_DOWNLOAD, env, repo=REPO, folder=str(tmp_path / "folder"), names=sorted(files))

    assert res["url"] == res["again"] == f"{hub.url}/{REPO}"
    assert res["commit"] == res["info_sha"] == hub.branch_head(REPO)
    assert res["private"] is True
    expected = sorted([".gitattributes", *files])
    assert res["siblings"] == res["files"] == expected
    assert res["exists"] == [True, False, True, False]
    assert Path(res["snapshot"]).name == res["commit"]
    for name, data in files.items():
        assert (Path(res["snapshot"]) / name).read_bytes() == data
        assert Path(res["downloads"][name]).read_bytes() == data
    assert Path(res["by_sha"]).read_bytes() == files["config.json"]
    # Default mode: everything inline in the commit, no LFS / xet traffic.
    assert not [p for _, p in hub.requests if "lfs" in p or "xet" in p]


BRANCH = """
from huggingface_hub import HfApi, create_branch, hf_hub_download, snapshot_download, upload_file

repo = ARGS["repo"]
create_branch(repo, branch="dev")
create_branch(repo, branch="dev", exist_ok=True)
commit = upload_file(path_or_fileobj=ARGS["new"].encode(), path_in_repo="config.json", repo_id=repo, revision="dev")
read = lambda **kw: open(hf_hub_download(repo, "config.json", **kw)).read()
RESULT = {
    "commit": commit.oid,
    "dev": read(revision="dev"), "main": read(), "main_sha": read(revision=ARGS["main_sha"]),
    "dev_snapshot": snapshot_download(repo, revision="dev"),
    "main_snapshot": snapshot_download(repo),
    "refs": {b.name: b.target_commit for b in HfApi().list_repo_refs(repo).branches},
}
"""

OFFLINE = """
from huggingface_hub import constants, snapshot_download
assert constants.HF_HUB_OFFLINE
RESULT = {"main": snapshot_download(ARGS["repo"]), "dev": snapshot_download(ARGS["repo"], revision="dev")}
"""


def test_branch_revision_and_offline_cache(local_hub, tmp_path):
    hub, env = local_hub
    files = make_folder(tmp_path / "folder")
    run_client(UPLOAD_AND_DOWNLOAD, env, repo=REPO, folder=str(tmp_path / "folder"), names=[])
    main_sha = hub.branch_head(REPO)
    new_config = '{"model_type": "emloc", "dim": 16}'

    res = run_client(BRANCH, env, repo=REPO, new=new_config, main_sha=main_sha)
    assert res["dev"] == new_config
    assert res["main"] == res["main_sha"] == files["config.json"].decode()
    assert res["refs"] == {"main": main_sha, "dev": res["commit"]} and res["commit"] != main_sha
    assert (Path(res["dev_snapshot"]) / "config.json").read_text() == new_config
    assert (Path(res["dev_snapshot"]) / "memory.safetensors").read_bytes() == files["memory.safetensors"]
    assert (Path(res["main_snapshot"]) / "config.json").read_bytes() == files["config.json"]

    # Offline: served from the cache, no request reaches the server.
    n_requests = len(hub.requests)
    offline = run_client(OFFLINE, {**env, "HF_HUB_OFFLINE": "1"}, repo=REPO)
    assert len(hub.requests) == n_requests
    assert offline == {"main": res["main_snapshot"], "dev": res["dev_snapshot"]}
    assert (Path(offline["main"]) / "memory.safetensors").read_bytes() == files["memory.safetensors"]


LFS_UPLOAD = """
from huggingface_hub import HfApi, create_repo, hf_hub_download, upload_file

repo = ARGS["repo"]
create_repo(repo)
commit = upload_file(path_or_fileobj=ARGS["path"], path_in_repo="memory.safetensors", repo_id=repo)
again = upload_file(path_or_fileobj=ARGS["path"], path_in_repo="memory.safetensors", repo_id=repo)  # unchanged
sibling = next(s for s in HfApi().model_info(repo, files_metadata=True).siblings if s.rfilename == "memory.safetensors")
RESULT = {"commit": commit.oid, "again": again.oid, "lfs_sha256": sibling.lfs.sha256,
          "download": hf_hub_download(repo, "memory.safetensors")}
"""


def test_lfs_upload_path(tmp_path):
    """Opt-in LFS mode: the client (with xet disabled) uses the git-LFS batch API + a basic PUT."""
    import hashlib

    data = os.urandom(300_000)
    (tmp_path / "memory.safetensors").write_bytes(data)
    with LocalHub(lfs_threshold=100_000) as hub:
        env = {**hub.client_env(hf_home=tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1"}
        res = run_client(LFS_UPLOAD, env, repo=REPO, path=str(tmp_path / "memory.safetensors"))
        paths = [p for _, p in hub.requests]
    assert res["commit"] == res["again"]  # second upload of identical content makes no commit
    assert res["lfs_sha256"] == hashlib.sha256(data).hexdigest()
    assert Path(res["download"]).read_bytes() == data
    assert f"/{REPO}.git/info/lfs/objects/batch" in paths
    assert paths.count(f"/__lfs/{res['lfs_sha256']}") == 1


PUSH = """
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=100)
model = LlamaForCausalLM(config)
commit = model.push_to_hub(ARGS["repo"])
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ARGS["reference"])
RESULT = {"commit": commit.oid}
"""

PULL = """
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

reference = load_file(ARGS["reference"])
state = AutoModelForCausalLM.from_pretrained(ARGS["repo"]).state_dict()
RESULT = {"same_keys": sorted(state) == sorted(reference),
          "equal": all(torch.equal(state[k], reference[k]) for k in reference)}
"""


def test_transformers_push_to_hub_roundtrip(local_hub, tmp_path):
    hub, env = local_hub
    reference = str(tmp_path / "reference.safetensors")
    pushed = run_client(PUSH, env, repo="user/tiny", reference=reference)
    assert pushed["commit"] == hub.branch_head("user/tiny")
    assert run_client(PULL, env, repo="user/tiny", reference=reference) == {"same_keys": True, "equal": True}
