"""The `emloc` command line, run as a user runs it (a subprocess): build, inspect, ask, push, eval; user errors exit 2
with one line naming what and where."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

QUESTION = "sepal length: 6.1 cm, sepal width: 2.8 cm, petal length: 4.7 cm, petal width: 1.2 cm"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tasks import make_task, write_jsonl
    from tiny_models import build_tiny_emloc

    root = tmp_path_factory.mktemp("cli")
    repo = build_tiny_emloc("llama", root / "repo", template="plain")
    demos, queries = make_task("iris", 8, 4)
    write_jsonl(demos, root / "demos.jsonl")
    write_jsonl(queries, root / "queries.jsonl")
    return root, repo


def emloc(*args, cwd, env=None, expect=0):
    """Runs `emloc ARGS` (the module the console script calls) and returns (stdout, stderr)."""
    environment = dict(env if env is not None else os.environ, OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    environment.pop("EMLOC_DEBUG", None)
    result = subprocess.run([sys.executable, "-m", "emloc_cli", *map(str, args)], cwd=cwd, env=environment,
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == expect, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result.stdout, result.stderr


def _error_line(stderr: str, command: str) -> str:
    """The one line a user error prints (progress bars may precede it), and no traceback."""
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"emloc {command}: error: "), stderr[-2000:]
    return last


def _answer(repo, memory_dir, question, max_new_tokens, retrieve=None):
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(repo, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    model.load_memory(memory_dir, processor=processor)
    inputs = processor([{"question": question}])
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, processor=processor, retrieve=retrieve)
    scores = model.score_choices([{"question": question, "choices": ["setosa", "versicolor", "virginica"]}],
                                 processor=processor, retrieve=retrieve)[0]
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0], scores


def test_help_comes_from_the_docstrings(workspace):
    root, _ = workspace
    out, _ = emloc("--help", cwd=root)
    for command in ("build", "ask", "eval", "push", "inspect"):
        assert f"    {command}" in out
    out, _ = emloc("build", "--help", cwd=root)
    assert "Compress demonstrations into a task memory" in out and "--delta 0.01" in out
    assert "demonstrations per chunk" in out  # the docstring's Args
    out, _ = emloc("ask", "--help", cwd=root)
    assert "comma-separated answers to score" in out
    script = Path(sys.executable).parent / "emloc"
    if script.exists():  # the console script setup.cfg declares, once the package is (re)installed
        result = subprocess.run([str(script), "inspect", "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "memory directory or Hub repo id" in result.stdout


def test_build_inspect_and_ask(workspace):
    from scoring_emloc import calibrated_scores

    root, repo = workspace
    _, err = emloc("build", "demos.jsonl", "--model", repo, "--out", "memory", "--method", "emloc",
                   "--delta", "0.01", "--ratios", "0.1,0.2,0.5", "--chunk-size", "2", cwd=root)
    assert "building emloc memory" in err and "100%" in err  # the progress bar
    config = json.loads((root / "memory" / "memory_config.json").read_text())
    assert config["method"]["params"]["delta"] == 0.01 and config["method"]["params"]["ratios"] == [0.1, 0.2, 0.5]
    assert config["base_model"]["name_or_path"] is None, "a local directory is never written into a memory"
    assert str(root) not in (root / "memory" / "memory_config.json").read_text()
    assert str(root) not in (root / "memory" / "README.md").read_text()

    out, _ = emloc("inspect", "memory", cwd=root)
    assert "emloc (delta=0.01" in out and "kept KV" in out and "token type" in out
    assert "8 demonstrations, keys entering layer 1" in out  # half of the tiny model's 2 layers
    assert f"{config['totals']['kept_ratio'] * 100:.1f} %" in out

    expected, scores = _answer(repo, root / "memory", QUESTION, 4)
    out, _ = emloc("ask", "memory", QUESTION, "--model", repo, "--max-new-tokens", "4", cwd=root)
    assert out.strip() == expected.strip() and out.strip()
    out, _ = emloc("ask", "memory", QUESTION, "--model", repo, "--choices", "setosa,versicolor,virginica", cwd=root)
    ranked = [line.split() for line in out.strip().splitlines()]
    assert [name for name, _ in ranked] == [c for _, c in sorted(zip(scores, ["setosa", "versicolor", "virginica"]), reverse=True)]
    assert float(ranked[0][1]) == pytest.approx(max(scores), abs=1e-3)
    _, retrieved = _answer(repo, root / "memory", QUESTION, 4, retrieve=2)
    out, _ = emloc("ask", "memory", QUESTION, "--model", repo, "--choices", "setosa,versicolor,virginica",
                   "--retrieve", "2", cwd=root)
    assert max(float(line.split()[1]) for line in out.strip().splitlines()) == pytest.approx(max(retrieved), abs=1e-3)
    # calibrated: the label prior the build recorded for these choices, divided out (and shown by inspect)
    out, _ = emloc("ask", "memory", QUESTION, "--model", repo, "--choices", "setosa,versicolor,virginica",
                   "--calibrate", cwd=root)
    (prior,) = config["calibration"]["priors"]
    expected = calibrated_scores(scores, prior["log_prior"])
    assert {name: float(value) for name, value in (line.split() for line in out.strip().splitlines())} == \
        pytest.approx(dict(zip(prior["choices"], expected)), abs=1e-3)
    out, _ = emloc("inspect", "memory", cwd=root)
    assert "label prior" in out and f"(from {prior['rows']} demonstrations' questions" in out
    _, err = emloc("ask", "memory", QUESTION, "--model", repo, "--choices", "red,green", "--calibrate", cwd=root, expect=2)
    assert "records no label prior for the choices ['red', 'green']" in _error_line(err, "ask")

    # the memory names no Hub model (it was built from a directory): ask says so
    _, err = emloc("ask", "memory", QUESTION, cwd=root, expect=2)
    assert "memory: its memory_config.json names no Hub model" in _error_line(err, "ask")


def test_user_errors_exit_2_with_one_line(workspace):
    root, repo = workspace
    (root / "bad.jsonl").write_text('{"question": "a", "answer": "b"}\n{"question": 3, "answer": "c"}\n')
    _, err = emloc("build", "bad.jsonl", "--model", repo, "--out", "never", cwd=root, expect=2)
    assert _error_line(err, "build").endswith("bad.jsonl:2: 'question' must be a string")
    assert not (root / "never").exists()
    _, err = emloc("build", "missing.jsonl", "--model", repo, "--out", "never", cwd=root, expect=2)
    assert _error_line(err, "build") == "emloc build: error: missing.jsonl: demonstrations file not found"
    _, err = emloc("build", "demos.jsonl", "--model", repo, "--out", "never", "--method", "emloc", "--delt", "1",
                   cwd=root, expect=2)
    assert "--delt: method 'emloc' takes no such parameter; it takes" in _error_line(err, "build")
    _, err = emloc("build", "demos.jsonl", "--model", root / "no-model", "--out", "never", cwd=root, expect=2)
    assert f"--model {root / 'no-model'}: cannot load a model from it" in _error_line(err, "build")
    _, err = emloc("inspect", "./nowhere", cwd=root, expect=2)
    assert _error_line(err, "inspect") == "emloc inspect: error: ./nowhere: memory directory not found"
    _, err = emloc("inspect", repo, cwd=root, expect=2)  # a model, not a memory
    assert _error_line(err, "inspect") == f"emloc inspect: error: {repo}: not a task memory, memory_config.json is missing"


def test_a_memory_for_another_model_is_refused(workspace, tmp_path):
    from tiny_models import build_tiny_emloc

    root, repo = workspace
    other = build_tiny_emloc("llama", tmp_path / "other", seed=1, template="plain")
    emloc("build", "demos.jsonl", "--model", repo, "--out", tmp_path / "memory", "--method", "full", cwd=root)
    _, err = emloc("ask", tmp_path / "memory", QUESTION, "--model", other, cwd=root, expect=2)
    assert "memory was made for another base model" in _error_line(err, "ask")


PUSH_MODEL = """
import sys
from transformers import AutoModel, AutoProcessor
AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).push_to_hub("user/tiny-emloc")
AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True).push_to_hub("user/tiny-emloc")
"""

PULL = """
import sys
from huggingface_hub import snapshot_download
print(snapshot_download(sys.argv[1]))
"""


def test_push_and_ask_through_the_hub(workspace, local_hub, tmp_path):
    """Model and memory on a (local) Hub: the memory names the model's Hub id, so `emloc ask REPO_ID` needs nothing
    else; the pushed card shows the code that loads both, and no local path."""
    root, repo = workspace
    hub, env = local_hub
    subprocess.run([sys.executable, "-c", PUSH_MODEL, str(repo)], env=env, check=True, capture_output=True, timeout=300)
    emloc("build", root / "demos.jsonl", "--model", "user/tiny-emloc", "--out", tmp_path / "memory", "--method", "full",
          cwd=tmp_path, env=env)
    assert json.loads((tmp_path / "memory" / "memory_config.json").read_text())["base_model"]["name_or_path"] == "user/tiny-emloc"
    out, _ = emloc("push", tmp_path / "memory", "user/iris-memory", "--private", cwd=tmp_path, env=env)
    assert "user/iris-memory" in out and any(path.endswith("/commit/main") for _, path in hub.requests)

    pulled = Path(subprocess.run([sys.executable, "-c", PULL, "user/iris-memory"], env=env, check=True, text=True,
                                 capture_output=True, timeout=120).stdout.strip().splitlines()[-1])
    card, config = (pulled / "README.md").read_text(), (pulled / "memory_config.json").read_text()
    assert 'AutoModel.from_pretrained("user/tiny-emloc", trust_remote_code=True)' in card
    assert 'model.load_memory("user/iris-memory", processor=processor)' in card
    assert 'template="plain"' in card and "base_model: user/tiny-emloc" in card
    for text in (card, config):
        assert str(tmp_path) not in text and str(root) not in text

    expected, _ = _answer(repo, tmp_path / "memory", QUESTION, 4)
    out, _ = emloc("ask", "user/iris-memory", QUESTION, "--max-new-tokens", "4", cwd=tmp_path, env=env)
    assert out.strip() == expected.strip()

    # a memory written by an older emloc, with the model's local directory in its config: pushed without it
    older = json.loads((tmp_path / "memory" / "memory_config.json").read_text())
    older["base_model"]["name_or_path"] = str(repo)
    (tmp_path / "memory" / "memory_config.json").write_text(json.dumps(older))
    emloc("push", tmp_path / "memory", "user/older-memory", cwd=tmp_path, env=env)
    pulled = Path(subprocess.run([sys.executable, "-c", PULL, "user/older-memory"], env=env, check=True, text=True,
                                 capture_output=True, timeout=120).stdout.strip().splitlines()[-1])
    assert json.loads((pulled / "memory_config.json").read_text())["base_model"]["name_or_path"] is None
    assert str(repo) not in (pulled / "README.md").read_text()


def test_eval_runs_the_evaluation_harness(workspace):
    root, repo = workspace
    out, _ = emloc("eval", "--help", cwd=root)
    assert "--methods" in out and "--queries" in out
    emloc("eval", "--model", repo, "--demos", "demos.jsonl", "--queries", "queries.jsonl", "--methods", "zero-shot,full",
          "--out", "results", cwd=root)
    results = json.loads((root / "results" / "results.json").read_text())
    assert set(results["methods"]) == {"zero-shot", "full"} and results["num_queries"] == 4
    _, err = emloc("eval", "--model", repo, cwd=root, expect=2)  # the harness's own usage error
    assert "--demos" in err
