"""kvpress presses as task memories (design §5), built by examples/kvpress_memories.py in the side venv `.venv-kvpress`
(kvpress pins transformers<5.3; `examples/setup_kvpress.sh` makes it) and loaded here, in the main venv."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import ROOT, text_demos, text_queries

SIDE_PYTHON = ROOT / ".venv-kvpress" / "bin" / "python"
SCRIPT = ROOT / "examples" / "kvpress_memories.py"

pytestmark = pytest.mark.skipif(
    not SIDE_PYTHON.exists(), reason=f"no kvpress side venv at {SIDE_PYTHON} (make it with examples/setup_kvpress.sh)"
)


def _context_file(processor, demos, path: Path) -> int:
    """Writes the whole rendered demonstration context as the script reads it; returns its length."""
    from safetensors.torch import save_file

    from processing_emloc import EncodedSpan

    context = processor.encode_context(demos)
    span = EncodedSpan.concat([context.prefix, *context.demos])
    save_file({"input_ids": span.input_ids[None].contiguous(), "token_types": span.token_types.to(torch.uint8).contiguous()},
              str(path), metadata={"num_demos": str(len(context.demos)), "rendering": json.dumps(processor.rendering())})
    return len(span)


def _run_side(*args: str) -> str:
    result = subprocess.run([str(SIDE_PYTHON), str(SCRIPT), *args], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"kvpress_memories.py failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def kvpress_memories(smollm2, tmp_path_factory):
    """Our own `full` memory of 16 iris demos, and kvpress memories of the same context: nothing removed
    (compression_ratio 0) for two presses, and SnapKV keeping 30 %."""
    model, processor, base_dir = smollm2
    demos = text_demos(16)
    work = tmp_path_factory.mktemp("kvpress")
    length = _context_file(processor, demos, work / "context.safetensors")
    common = ["--base", str(base_dir), "--context", str(work / "context.safetensors"),
              "--fingerprint", model.fingerprint(), "--num-demos", str(len(demos)), "--out", str(work / "memories")]
    _run_side(*common, "--presses", "snapkv,knorm", "--compression-ratios", "0")
    _run_side(*common, "--presses", "snapkv", "--ratios", "0.3")
    ours = model.build_memory(demos, processor=processor, method="full", chunk_size=4)
    return model, processor, ours, work / "memories", length


def _query_batch(processor, count=2):
    batch = processor(text_queries(count))
    batch.pop("token_types")
    return batch


@pytest.mark.parametrize("press", ["snapkv", "knorm"])
def test_kvpress_with_nothing_removed_equals_our_full_memory(kvpress_memories, press):
    model, processor, ours, memories, length = kvpress_memories
    directory = memories / f"{press}-kept100-removed00"
    memory = model.load_memory(directory, name=f"kvpress-{press}", activate=False)  # checks the fingerprint
    assert memory.next_position == ours.next_position == length
    assert memory.tokens_per_layer() == [length] * model.family.num_layers
    config = json.loads((directory / "memory_config.json").read_text())
    assert config["method"]["name"] == f"kvpress:{press}"
    assert config["method"]["params"]["compression_ratio"] == 0 and config["method"]["params"]["kept_ratio"] == 1
    assert config["totals"]["kept_ratio"] == 1.0 and config["totals"]["full_tokens"] == length
    assert config["token_types"] == {k: {"full": v["full"], "kept": float(v["full"])} for k, v in ours.stats["token_types"].items()}
    for mine, theirs in zip(ours.layers, memory.layers):
        assert torch.equal(mine.positions, theirs.positions) and torch.equal(mine.token_types, theirs.token_types)
    batch = _query_batch(processor)
    torch.testing.assert_close(model(**batch, memory=memory).logits, model(**batch, memory=ours).logits, atol=1e-4, rtol=0)


def test_kvpress_snapkv_positions_are_recovered(kvpress_memories):
    """Keeping 30 %: equal counts per head, and each kept key/value is our full memory's at the recovered position
    (ours is built in chunks of 4, kvpress's in one pass: equal up to float rounding, far from any other position)."""
    model, processor, ours, memories, length = kvpress_memories
    directory = memories / "snapkv-kept30-removed70"
    memory = model.load_memory(directory, name="kvpress-snapkv-30", activate=False)
    config = json.loads((directory / "memory_config.json").read_text())
    assert config["method"]["params"]["compression_ratio"] == pytest.approx(0.7)
    assert config["method"]["params"]["kept_ratio"] == pytest.approx(0.3)
    kept = int(length * (1 - 0.7))
    assert abs(memory.tokens_per_layer()[0] - kept) <= 1
    for mine, theirs in zip(ours.layers, memory.layers):
        for head in range(theirs.keys.shape[0]):
            positions = theirs.positions[head]
            assert positions.unique().numel() == positions.numel()
            assert set(range(length - 64, length)) <= set(positions.tolist())  # SnapKV keeps its observation window
            torch.testing.assert_close(theirs.keys[head], mine.keys[head, positions], atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(theirs.values[head], mine.values[head, positions], atol=1e-4, rtol=1e-5)
            assert torch.equal(theirs.token_types[head], mine.token_types[head, positions])
    logits = model(**_query_batch(processor), memory=memory).logits
    assert torch.isfinite(logits).all()


# ---- KVzip (kvpress `KVzipPress`): query-agnostic compression by context reconstruction, on tiny models ----------


@pytest.fixture(scope="module")
def kvzip_memories(tiny, tmp_path_factory):
    """KVzip memories of 16 iris demos (plain rendering) on the tiny Llama: nothing removed, and keeping 30 %; SnapKV
    with nothing removed from the same side-venv prefill; our own `full` memory."""
    model, processor, base_dir = tiny("llama", template="plain")
    demos = text_demos(16)
    work = tmp_path_factory.mktemp("kvzip")
    length = _context_file(processor, demos, work / "context.safetensors")
    common = ["--base", str(base_dir), "--context", str(work / "context.safetensors"),
              "--fingerprint", model.fingerprint(), "--num-demos", str(len(demos)), "--out", str(work / "memories")]
    _run_side(*common, "--presses", "kvzip,snapkv", "--compression-ratios", "0")
    _run_side(*common, "--presses", "kvzip", "--ratios", "0.3")
    ours = model.build_memory(demos, processor=processor, method="full", chunk_size=4)
    return model, processor, ours, work / "memories", length


def test_kvzip_with_nothing_removed_is_the_full_context(kvzip_memories):
    """At compression 0 KVzip masks nothing: bit for bit the uncompressed prefill (the same side-venv cache as SnapKV's
    at 0), and the same answers as our own `full` memory."""
    model, processor, ours, memories, length = kvzip_memories
    kvzip = model.load_memory(memories / "kvzip-kept100-removed00", name="kvzip-0", activate=False)
    snapkv = model.load_memory(memories / "snapkv-kept100-removed00", name="snapkv-0", activate=False)
    assert kvzip.tokens_per_layer() == [length] * model.family.num_layers
    for theirs, reference, mine in zip(kvzip.layers, snapkv.layers, ours.layers):
        assert torch.equal(theirs.keys, reference.keys) and torch.equal(theirs.values, reference.values)
        assert torch.equal(theirs.positions, mine.positions)
    batch = _query_batch(processor)
    torch.testing.assert_close(model(**batch, memory=kvzip).logits, model(**batch, memory=ours).logits, atol=1e-4, rtol=0)


def test_kvzip_keeps_equal_counts_per_head_at_recovered_positions(kvzip_memories):
    """Keeping 30 %: KVzip's global budget gives layers different counts; within a layer every head keeps the same
    number (KVzip's layer total shared equally, by its own scores), at positions whose keys/values are the full
    context's; the attention sinks (first 4 tokens) are always kept."""
    model, processor, ours, memories, length = kvzip_memories
    directory = memories / "kvzip-kept30-removed70"
    memory = model.load_memory(directory, name="kvzip-30", activate=False)
    config = json.loads((directory / "memory_config.json").read_text())
    params = config["method"]["params"]
    assert config["method"]["name"] == "kvpress:kvzip" and params["press"] == "KVzipPress"
    assert params["head_budget"] == "equal-within-layer" and params["template"] == "plain"
    assert config["totals"]["kept_ratio"] == pytest.approx(0.3, abs=0.02)
    counts = config["build"]["kvzip_head_counts"]  # what KVzip chose per layer and head, before equalising
    assert len(counts) == model.family.num_layers and config["build"]["press_seconds"] > 0
    for layer, (mine, theirs) in enumerate(zip(ours.layers, memory.layers)):
        heads = theirs.keys.shape[0]
        assert abs(theirs.num_tokens * heads - sum(counts[layer])) <= heads  # the layer's total, up to rounding
        for head in range(heads):
            positions = theirs.positions[head]
            assert torch.equal(positions, positions.sort().values) and positions.unique().numel() == positions.numel()
            assert set(range(4)) <= set(positions.tolist())
            torch.testing.assert_close(theirs.keys[head], mine.keys[head, positions], atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(theirs.values[head], mine.values[head, positions], atol=1e-4, rtol=1e-5)
            assert torch.equal(theirs.token_types[head], mine.token_types[head, positions])
    assert torch.isfinite(model(**_query_batch(processor), memory=memory).logits).all()


def test_kvzip_on_gemma3_is_reported_as_unsupported(tiny, tmp_path):
    """kvpress 0.5.5 refuses KVzip on Gemma 3; the script says so and writes nothing."""
    model, processor, base_dir = tiny("gemma3", template="plain")
    _context_file(processor, text_demos(4), tmp_path / "context.safetensors")
    result = subprocess.run([str(SIDE_PYTHON), str(SCRIPT), "--base", str(base_dir), "--context",
                             str(tmp_path / "context.safetensors"), "--fingerprint", model.fingerprint(),
                             "--presses", "kvzip", "--ratios", "0.3", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "SKIPPED kvzip-kept30-removed70" in result.stdout and "not supported for Gemma3" in result.stdout
    assert not list((tmp_path / "out").rglob("memory_config.json"))


def test_a_press_memory_indexed_from_its_demonstrations_retrieves_like_ours(kvpress_memories):
    """A press's memory has no retrieval index; `index_memory` gives it ours (same demonstrations, same rendering), and
    with nothing removed it then retrieves exactly as our full memory does."""
    model, processor, ours, memories, length = kvpress_memories
    memory = model.load_memory(memories / "snapkv-kept100-removed00", name="kvpress-retrieve", activate=False)
    assert memory.retrieval is None
    model.index_memory(memory, text_demos(16), processor=processor)
    for name in ("starts", "ends", "keys"):
        torch.testing.assert_close(getattr(memory.retrieval, name), getattr(ours.retrieval, name))
    queries = text_queries(3)
    torch.testing.assert_close(torch.tensor(model.score_choices(queries, memory=memory, processor=processor, retrieve=4)),
                               torch.tensor(model.score_choices(queries, memory=ours, processor=processor, retrieve=4)),
                               atol=1e-3, rtol=0)
