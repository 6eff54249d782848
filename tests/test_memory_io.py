"""Memories on disk, like adapters: round trips, crash safety, refusals, named memories."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, demos_for, queries_for
from memory_emloc import MEMORY_CONFIG_NAME, MEMORY_WEIGHTS_NAME, MemoryLoadError, TaskMemory


@pytest.fixture
def llama_memory(tiny):
    model, processor, _ = tiny("llama")
    return model, processor, model.build_memory(demos_for("llama", 6), processor=processor, chunk_size=2)


def test_round_trip_gives_identical_tensors_and_answers(llama_memory, tmp_path):
    model, processor, memory = llama_memory
    path = memory.save_pretrained(tmp_path / "memory")
    assert sorted(p.name for p in path.iterdir()) == sorted(["README.md", MEMORY_CONFIG_NAME, MEMORY_WEIGHTS_NAME])
    loaded = model.load_memory(path, name="iris")
    for a, b in zip(memory.layers, loaded.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert torch.equal(a.positions, b.positions) and torch.equal(a.token_types, b.token_types)
    assert loaded.next_position == memory.next_position
    assert loaded.stats == json.loads(json.dumps(memory.stats))
    batch = processor(queries_for("llama", 2))
    assert torch.equal(model.generate(**batch, memory=memory, max_new_tokens=5),
                       model.generate(**batch, memory="iris", max_new_tokens=5))
    model.delete_memory("iris")


def test_a_memory_built_with_a_retired_option_still_loads_and_answers(llama_memory, tmp_path):
    """Loading reads no build option: a memory whose config records options the library has since retired (as memories
    built before a3ff755's options left it do) loads, is checked as any other, and answers as it did."""
    model, processor, memory = llama_memory
    path = memory.save_pretrained(tmp_path / "old")
    config = json.loads((path / MEMORY_CONFIG_NAME).read_text())
    config["method"] = {"name": "emloc-query", "params": {**config["method"]["params"], "rerun": "scored",
                                                          "reuse": "floor", "probe": "self+future", "layer_group": 3}}
    (path / MEMORY_CONFIG_NAME).write_text(json.dumps(config))
    loaded = model.load_memory(path, name="old", processor=processor)
    assert loaded.stats["method"]["params"]["rerun"] == "scored"
    queries = queries_for("llama", 2)
    assert model.score_choices(queries, memory="old", processor=processor) == \
        model.score_choices(queries, memory=memory, processor=processor)
    model.delete_memory("old")


def test_memory_config_and_card(llama_memory, tmp_path):
    model, _, memory = llama_memory
    path = memory.save_pretrained(tmp_path / "memory")
    config = json.loads((path / MEMORY_CONFIG_NAME).read_text())
    for key in ("format_version", "base_model", "method", "num_demos", "next_position", "totals", "token_types", "layers", "build"):
        assert key in config
    assert config["base_model"]["fingerprint"] == model.fingerprint()
    card = (path / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "- emloc" in card
    assert "load_memory" in card and "emloc" in card
    assert config["format_version"] == 2 and config["retrieval"]["num_demos"] == memory.retrieval.num_demos
    assert "retrieve=8" in card  # the memory has a retrieval index: the card shows how to use it
    # demonstrations with choices: the memory recorded its label prior, and the card shows calibrated ranking
    assert config["calibration"]["priors"][0]["choices"] == demos_for("llama", 1)[0]["choices"]
    assert 'choices=["setosa", "versicolor", "virginica"]' in card and "calibrate=True" in card
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "card", "exec")  # the card's code is Python
    # nothing in a memory directory is a pickle
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in path.iterdir())


def test_named_memories_and_the_active_one(tiny, tmp_path):
    model, processor, _ = tiny("llama")
    first = model.build_memory(demos_for("llama", 4), processor=processor, method="full")
    second = model.build_memory(demos_for("llama", 4, offset=4), processor=processor, method="full")
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    model.load_memory(tmp_path / "a", name="a")
    model.load_memory(tmp_path / "b", name="b", activate=False)
    assert model.active_memory == "a" and set(model.memories) >= {"a", "b"}
    batch = processor(queries_for("llama", 1))
    assert torch.equal(model.generate(**batch, max_new_tokens=4), model.generate(**batch, memory=first, max_new_tokens=4))
    model.set_memory("b")
    assert torch.equal(model.generate(**batch, max_new_tokens=4), model.generate(**batch, memory=second, max_new_tokens=4))
    scores = model.score_choices(queries_for("llama", 1), processor=processor)
    assert scores == model.score_choices(queries_for("llama", 1), memory=second, processor=processor)
    model.delete_memory("b")
    assert model.active_memory is None
    model.delete_memory("a")
    with pytest.raises(KeyError, match="no memory named 'zzz'"):
        model.set_memory("zzz")


def test_refuses_a_memory_of_another_base_model(tiny, llama_memory, tmp_path):
    _, _, memory = llama_memory
    other, _, _ = tiny("gemma3")
    memory.save_pretrained(tmp_path / "memory")
    with pytest.raises(MemoryLoadError, match="made for another base model"):
        other.load_memory(tmp_path / "memory")


def test_refuses_an_unknown_format_version(llama_memory, tmp_path):
    model, _, memory = llama_memory
    path = memory.save_pretrained(tmp_path / "memory")
    config = json.loads((path / MEMORY_CONFIG_NAME).read_text())
    config["format_version"] = 99
    (path / MEMORY_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(MemoryLoadError, match="unknown memory format version 99"):
        model.load_memory(path)


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_refuses_a_truncated_weights_file(llama_memory, tmp_path, keep):
    model, _, memory = llama_memory
    path = memory.save_pretrained(tmp_path / "memory")
    weights = path / MEMORY_WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(MemoryLoadError, match="truncated or corrupt memory weights"):
        model.load_memory(path)


@pytest.mark.parametrize("missing", [MEMORY_WEIGHTS_NAME, MEMORY_CONFIG_NAME])
def test_refuses_a_missing_file(llama_memory, tmp_path, missing):
    model, _, memory = llama_memory
    path = memory.save_pretrained(tmp_path / "memory")
    (path / missing).unlink()
    with pytest.raises(MemoryLoadError, match=f"{missing} is missing"):
        model.load_memory(path)


def test_refuses_shapes_that_do_not_fit_the_model(llama_memory, tmp_path):
    model, _, memory = llama_memory
    from memory_emloc import MemoryLayer

    wrong = TaskMemory([MemoryLayer(l.keys[:1], l.values[:1], l.positions[:1], l.token_types[:1]) for l in memory.layers],
                       memory.next_position, dict(memory.stats))
    wrong.save_pretrained(tmp_path / "memory")
    with pytest.raises(MemoryLoadError, match=r"memory layers are \[1 heads, 16 dims\], the model needs \[2, 16\]"):
        model.load_memory(tmp_path / "memory")
    fewer = TaskMemory(memory.layers[:2], memory.next_position, dict(memory.stats))
    fewer.stats["layers"] = fewer.stats["layers"][:2]
    fewer.save_pretrained(tmp_path / "fewer")
    with pytest.raises(MemoryLoadError, match="memory has 2 layers, the model 3"):
        model.load_memory(tmp_path / "fewer")


def test_loading_runs_no_pickle(llama_memory, tmp_path, monkeypatch):
    model, _, memory = llama_memory
    path = memory.save_pretrained(tmp_path / "memory")
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model.load_memory(path, name="checked")
    model.delete_memory("checked")


SAVE_FOREVER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from memory_emloc import MemoryLayer, TaskMemory
keys = torch.randn(2, 100_000, 64)  # ~50 MB a tensor: a save takes long enough to be killed half-way
layer = lambda: MemoryLayer(keys, keys, torch.zeros(2, 100_000, dtype=torch.long), torch.zeros(2, 100_000, dtype=torch.long))
memory = TaskMemory([layer() for _ in range(2)], 100_000, {"layers": [{}, {}]})
print("ready", flush=True)
while True:
    memory.save_pretrained(sys.argv[2])
"""


def test_a_save_killed_with_sigkill_leaves_no_loadable_half(tmp_path):
    """Kill repeated saves at random moments: the target directory is always absent or a complete memory."""
    target = tmp_path / "memory"
    for delay in (0.02, 0.1, 0.25, 0.5):
        process = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(ROOT), str(target)], stdout=subprocess.PIPE)
        assert process.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        if target.exists():
            memory = TaskMemory.from_pretrained(target)  # complete, or this raises
            assert memory.layers[0].keys.shape == (2, 100_000, 64)
        leftovers = [p for p in tmp_path.iterdir() if p.name != "memory"]
        for leftover in leftovers:  # staging directories are hidden siblings, never at the target path
            assert leftover.name.startswith(".memory.")
