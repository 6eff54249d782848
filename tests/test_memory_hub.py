"""Push and pull through the real `huggingface_hub` client, pointed (HF_ENDPOINT) at a Hub-compatible server on
loopback: memories like adapters, and a whole Emloc model repo loaded with trust_remote_code in a fresh process."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, demos_for, queries_for

PUSH_MEMORY = """
import sys, torch
sys.path[:0] = [sys.argv[1]]
from memory_emloc import TaskMemory
from modeling_emloc import EmlocForConditionalGeneration
model = EmlocForConditionalGeneration.from_pretrained(sys.argv[2])
memory = TaskMemory.from_pretrained(sys.argv[3])
print(model.push_memory_to_hub("user/iris-memory", memory=memory, private=True, commit_message="iris memory"))
second = TaskMemory.from_pretrained(sys.argv[4])
model.push_memory_to_hub("user/iris-memory", memory=second, revision="v2")
"""

PULL_MEMORY = """
import json, sys, torch
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
queries = torch.load(sys.argv[2], weights_only=False)
out = {}
for name, revision in (("main", None), ("v2", "v2")):
    model.load_memory("user/iris-memory", name=name, revision=revision)
    out[name] = model.generate(**processor(queries), max_new_tokens=5).tolist()
print(json.dumps(out))
"""


def _run(script, *args, env):
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_memory_push_then_pull_in_a_fresh_process(tiny, local_hub, tmp_path):
    hub, env = local_hub
    model, processor, _ = tiny("llama")
    repo = tmp_path / "model"
    model.save_pretrained(repo)
    processor.save_pretrained(repo)
    first = model.build_memory(demos_for("llama", 4), processor=processor, chunk_size=2)
    second = model.build_memory(demos_for("llama", 4, offset=4), processor=processor, method="full")
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")

    _run(PUSH_MEMORY, ROOT, repo, tmp_path / "first", tmp_path / "second", env=env)
    assert any(path.endswith("/commit/main") for _, path in hub.requests)
    assert hub.branch_head("user/iris-memory", "v2") != hub.branch_head("user/iris-memory", "main")

    queries = queries_for("llama", 2)
    torch.save(queries, tmp_path / "queries.pt")
    pulled = json.loads(_run(PULL_MEMORY, repo, tmp_path / "queries.pt", env=env).strip().splitlines()[-1])
    batch = processor(queries)
    assert pulled["main"] == model.generate(**batch, memory=first, max_new_tokens=5).tolist()
    assert pulled["v2"] == model.generate(**batch, memory=second, max_new_tokens=5).tolist()

    # HF_HUB_OFFLINE=1: the client serves the pulled memory from its cache, without a request
    requests_before = len(hub.requests)
    offline = dict(env, HF_HUB_OFFLINE="1")
    again = json.loads(_run(PULL_MEMORY, repo, tmp_path / "queries.pt", env=offline).strip().splitlines()[-1])
    assert again == pulled
    assert len(hub.requests) == requests_before


PUSH_MODEL = """
import sys
sys.path[:0] = [sys.argv[1]]
from modeling_emloc import EmlocForConditionalGeneration
from processing_emloc import EmlocProcessor
model = EmlocForConditionalGeneration.from_pretrained(sys.argv[2])
processor = EmlocProcessor.from_pretrained(sys.argv[2])
model.push_to_hub("user/tiny-emloc")
processor.push_to_hub("user/tiny-emloc")
"""

PULL_MODEL = """
import json, sys, torch
from transformers import AutoModel, AutoProcessor
assert "modeling_emloc" not in sys.modules
model = AutoModel.from_pretrained("user/tiny-emloc", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("user/tiny-emloc", trust_remote_code=True)
queries = torch.load(sys.argv[1], weights_only=False)
print(json.dumps({"class": type(model).__name__, "tokens": model.generate(**processor(queries), max_new_tokens=5).tolist()}))
"""


@pytest.mark.parametrize("family", ["llama", "qwen2-vl"])
def test_whole_emloc_repo_push_to_hub_and_auto_load(tiny, local_hub, tmp_path, family):
    hub, env = local_hub
    model, processor, _ = tiny(family)
    repo = tmp_path / "model"
    model.save_pretrained(repo)
    processor.save_pretrained(repo)
    _run(PUSH_MODEL, ROOT, repo, env=env)
    queries = queries_for(family, 2)
    torch.save(queries, tmp_path / "queries.pt")
    pulled = json.loads(_run(PULL_MODEL, tmp_path / "queries.pt", env=env).strip().splitlines()[-1])
    assert pulled["class"] == "EmlocForConditionalGeneration"
    assert pulled["tokens"] == model.generate(**processor(queries), max_new_tokens=5).tolist()
