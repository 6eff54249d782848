"""The library's reorganisation changed no memory: the default's and the paper's rule's memories (and the full and
random ones) on a fixed split are, bit for bit, those of the implementation before it (`REFERENCE_COMMIT`, the last
commit with every build option the benchmark later rejected), built in a fresh process from that commit's modules."""

import json
import subprocess
import sys

import pytest
import torch

from building_emloc import RETIRED_AT
from conftest import ROOT, demos_for
from demo_files import write_jsonl


REFERENCE_COMMIT = RETIRED_AT

REFERENCE_BUILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from emloc_reference.modeling_emloc import EmlocForConditionalGeneration
from emloc_reference.processing_emloc import EmlocProcessor
base, demos, out, builds = sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
model = EmlocForConditionalGeneration.from_base(base)
processor = EmlocProcessor.from_base(base, trust_remote_code=True)
for name, kwargs in builds.items():
    model.build_memory(demos, processor=processor, calibration_rows=0, **kwargs).save_pretrained(f"{out}/{name}")
"""

BUILDS = {
    "default": {"chunk_size": 2},
    "paper": {"method": "emloc", "chunk_size": 2},
    "paper-delta": {"method": "emloc", "delta": 0.0005, "ratios": [0.1, 0.3], "chunk_size": 3},
    "full": {"method": "full", "chunk_size": 2},
    "random": {"method": "random", "ratio": 0.3, "seed": 3, "chunk_size": 2},
}


def _reference_modules(directory):
    """The modules at REFERENCE_COMMIT as the package `emloc_reference` in `directory` (its relative imports keep it
    from importing today's modules)."""
    package = directory / "emloc_reference"
    package.mkdir(parents=True)
    for name in ("configuration_emloc.py", "memory_emloc.py", "modeling_emloc.py", "processing_emloc.py"):
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{REFERENCE_COMMIT}:{name}"], capture_output=True)
        if shown.returncode != 0:
            pytest.skip(f"the reference implementation comes from the repository's history ({REFERENCE_COMMIT[:7]})")
        (package / name).write_bytes(shown.stdout)
    (package / "__init__.py").write_text("")
    return directory


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2-vl"])
def test_memories_are_the_bytes_of_the_implementation_before(tiny, tmp_path, family):
    """Llama (no sliding window), Gemma 3 (sliding windows: the default windows its probe as a query, and the build
    drops what no query reads) and Qwen2-VL (images read from files, M-RoPE): every tensor of every memory, bit for
    bit, and every chunk's decisions."""
    from safetensors.torch import load_file

    model, processor, base_dir = tiny(family)
    demos = write_jsonl(tmp_path / "demos", demos_for(family, 7))
    reference = _reference_modules(tmp_path / "reference")
    subprocess.run([sys.executable, "-c", REFERENCE_BUILD, str(reference), str(base_dir), str(demos),
                    str(tmp_path / "before"), json.dumps(BUILDS)], check=True, timeout=600, capture_output=True)
    for name, kwargs in BUILDS.items():
        memory = model.build_memory(demos, processor=processor, calibration_rows=0, validation=0, **kwargs)
        before = tmp_path / "before" / name
        expected = load_file(str(before / "memory.safetensors"))
        now = load_file(str(memory.save_pretrained(tmp_path / "now" / name) / "memory.safetensors"))
        assert set(now) == set(expected), name
        for key, tensor in expected.items():
            assert now[key].dtype == tensor.dtype and torch.equal(now[key], tensor), f"{name}: {key}"
        recorded = json.loads((before / "memory_config.json").read_text())
        assert memory.next_position == recorded["next_position"]
        assert memory.stats["totals"] == recorded["totals"], name
        chunks, chunks_before = memory.stats["build"]["chunks"], recorded["build"]["chunks"]
        assert [c.get("ratios") for c in chunks] == [c.get("ratios") for c in chunks_before], name
        for chunk, chunk_before in zip(chunks, chunks_before):
            assert chunk.get("js") == pytest.approx(chunk_before.get("js"), abs=1e-9)
