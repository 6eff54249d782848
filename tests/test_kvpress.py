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
              str(path), metadata={"num_demos": str(len(context.demos))})
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
