"""Memory that grows with what is kept (issue 10): growth in place equals concatenation, and builds give the memory
bytes of the implementation before the change, which concatenated the whole memory per chunk and decoded every
demonstration up front."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, demos_for
from demo_files import write_jsonl
from memory_emloc import MemoryLayer, TaskMemory


# the last commit before issue 10: `MemoryLayer.append` per chunk, `encode_context` of every demonstration up front
REFERENCE_COMMIT = "dbc0a6d98ff6c0509579ef2432caa90a5f789d99"


def _random_chunk(num_layers, heads, dim, length, generator):
    """One chunk's kept tokens per layer; layer `l` keeps `length + l` (layers keep different counts)."""
    return [
        MemoryLayer(torch.randn(heads, length + layer, dim, generator=generator),
                    torch.randn(heads, length + layer, dim, generator=generator),
                    torch.randint(0, 1000, (heads, length + layer), generator=generator),
                    torch.randint(0, 4, (heads, length + layer), generator=generator))
        for layer in range(num_layers)
    ]


def _assert_layers_equal(got: MemoryLayer, expected: MemoryLayer):
    for name, tensor in expected.tensors().items():
        assert torch.equal(getattr(got, name), tensor), name
        assert getattr(got, name).dtype == tensor.dtype


def test_growth_in_place_equals_concatenation():
    generator = torch.Generator().manual_seed(0)
    memory = TaskMemory.empty(3, 2, 8)
    expected = list(memory.layers)
    for step, length in enumerate([5, 1, 0, 7, 3, 12, 2, 30]):
        chunk = _random_chunk(3, 2, 8, length, generator)
        handed_out = list(memory.layers)
        snapshots = [MemoryLayer(**{k: v.clone() for k, v in layer.tensors().items()}) for layer in handed_out]
        memory.extend(chunk, next_position=100 + step)
        expected = [layer.append(new) for layer, new in zip(expected, chunk)]
        for got, want in zip(memory.layers, expected):
            _assert_layers_equal(got, want)
        for layer, snapshot in zip(handed_out, snapshots):  # what was handed out before is never written to
            _assert_layers_equal(layer, snapshot)
        for layer in memory.layers:  # the capacity doubles: at most twice what is filled (amortised appends)
            assert layer.keys.untyped_storage().nbytes() <= 2 * layer.keys.numel() * layer.keys.element_size()
    assert memory.next_position == 107
    memory.compact()
    for got, want in zip(memory.layers, expected):
        _assert_layers_equal(got, want)
        assert all(t.is_contiguous() for t in got.tensors().values())
        assert got.keys.untyped_storage().nbytes() == got.keys.numel() * got.keys.element_size()


def test_growth_never_writes_into_tensors_it_did_not_allocate():
    generator = torch.Generator().manual_seed(1)
    given = TaskMemory.empty(2, 1, 4)
    given.extend(_random_chunk(2, 1, 4, 6, generator), next_position=6)
    given.compact()
    kept = [MemoryLayer(**{k: v.clone() for k, v in layer.tensors().items()}) for layer in given.layers]
    # a memory over the same tensors (as a build appending to `given` makes), then a layer replaced from outside
    grown = TaskMemory(list(given.layers), given.next_position)
    grown.extend(_random_chunk(2, 1, 4, 3, generator), next_position=9)
    replaced = MemoryLayer(*(t.clone() for t in _random_chunk(1, 1, 4, 2, generator)[0].tensors().values()))
    grown.layers[1] = replaced
    before = MemoryLayer(**{k: v.clone() for k, v in replaced.tensors().items()})
    chunk = _random_chunk(2, 1, 4, 2, generator)
    grown.extend(chunk, next_position=11)
    _assert_layers_equal(grown.layers[1], before.append(chunk[1]))
    _assert_layers_equal(replaced, before)
    for layer, copy in zip(given.layers, kept):
        _assert_layers_equal(layer, copy)
    with pytest.raises(ValueError, match="a chunk of 1 layers cannot extend a memory of 2"):
        grown.extend(chunk[:1], next_position=12)


def test_a_chunks_working_state_is_let_go_before_the_next_chunk(tiny, monkeypatch):
    """After each chunk nothing of it is alive but what the memory keeps: its state and the probe are freed (by
    reference counting, no collection). The prefill wrote the chunk after the memory in its own growth buffer, so no
    copy of the memory was made for it."""
    import weakref

    import modeling_emloc

    model, processor, _ = tiny("llama")
    alive = []
    prefill = type(model)._prefill_chunk

    def recording_prefill(self, memory, span, **kwargs):
        chunk = prefill(self, memory, span, **kwargs)
        assert chunk.keys[0]._base is memory._buffers[0].keys
        alive.append(weakref.ref(chunk))
        return chunk

    class RecordingProbe(modeling_emloc.Probe):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            alive.append(weakref.ref(self))

    monkeypatch.setattr(type(model), "_prefill_chunk", recording_prefill)
    monkeypatch.setattr(modeling_emloc, "Probe", RecordingProbe)
    checked = []

    def progress(done, total):
        assert len(alive) == 2 * done and all(ref() is None for ref in alive)
        checked.append(done)

    model.build_memory(demos_for("llama", 6), processor=processor, chunk_size=2, progress=progress, **PAPER)
    assert checked == [1, 2, 3]


def test_scratch_gives_room_after_each_layer_and_leaves_the_memory_as_it_was():
    """A build's passes write after the memory in its growth buffers (`TaskMemory.scratch`): the memory, and what it
    handed out, keep their values, and the next `extend` writes over the scratch as concatenation would."""
    from modeling_emloc import PrefixedLayer

    generator = torch.Generator().manual_seed(2)
    memory = TaskMemory.empty(3, 2, 8)
    memory.extend(_random_chunk(3, 2, 8, 5, generator), next_position=5)
    handed_out = list(memory.layers)
    snapshots = [MemoryLayer(**{k: v.clone() for k, v in layer.tensors().items()}) for layer in handed_out]
    room = memory.scratch(40)
    for layer, (keys, values, filled), snapshot in zip(memory.layers, room, snapshots):
        assert filled == layer.num_tokens and keys.shape[0] == 1 and keys.shape[2] >= filled + 40
        assert torch.equal(keys[0, :, :filled], layer.keys) and torch.equal(values[0, :, :filled], layer.values)
        keys[0, :, filled:] = 7.0  # what a pass writes there
        values[0, :, filled:] = 7.0
        _assert_layers_equal(layer, snapshot)
    for layer, snapshot in zip(handed_out, snapshots):
        _assert_layers_equal(layer, snapshot)
    # a cache layer over the scratch holds the memory, then the pieces after it; it refuses what does not fit
    piece = torch.randn(2, 3, 8, generator=generator)
    cache_layer = PrefixedLayer((piece,), (piece,), 1, scratch=room[0])
    assert torch.equal(cache_layer.keys[0], torch.cat([memory.layers[0].keys, piece], dim=1))
    with pytest.raises(ValueError, match="cannot hold 1 rows"):
        PrefixedLayer((torch.zeros(2, 1000, 8),), (torch.zeros(2, 1000, 8),), 1, scratch=room[0])
    chunk = _random_chunk(3, 2, 8, 3, generator)
    memory.extend(chunk, next_position=8)
    for got, snapshot, new in zip(memory.layers, snapshots, chunk):
        _assert_layers_equal(got, snapshot.append(new))


# -- the same bytes as the implementation before issue 10 -----------------------------------------------------------

REFERENCE_BUILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from emloc_reference.modeling_emloc import EmlocForConditionalGeneration
from emloc_reference.processing_emloc import EmlocProcessor
base, demos, out, builds = sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
model = EmlocForConditionalGeneration.from_base(base)
processor = EmlocProcessor.from_base(base, trust_remote_code=True)
for name, kwargs in builds.items():
    try:
        memory = model.build_memory(demos, processor=processor, **kwargs)
    except (TypeError, ValueError) as error:  # a method or option the implementation before did not have
        print(json.dumps({name: str(error)}), flush=True)
        continue
    memory.save_pretrained(f"{out}/{name}")
"""

PAPER = {"method": "emloc", "delta": 0.005, "ratios": [0.1, 0.2, 0.5], "probe": "self", "protect": "count",
         "positions": "answer", "over": "vocab", "layer_group": 1, "search": "grid"}
BUILDS = {
    "full": {"method": "full", "chunk_size": 2},
    "random": {"method": "random", "ratio": 0.3, "seed": 3, "chunk_size": 2},
    "emloc": {**PAPER, "chunk_size": 2},
    "emloc-heldout": {**PAPER, "probe": "heldout", "probe_size": 3, "chunk_size": 3},
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


def _build_before(tmp_path, base_dir, demos, builds) -> dict[str, str]:
    """Builds each of `builds` with the implementation before, into `tmp_path/before/{name}`; returns the builds it
    could not make (a method or option it did not have) with the reason."""
    reference = _reference_modules(tmp_path / "reference")
    done = subprocess.run([sys.executable, "-c", REFERENCE_BUILD, str(reference), str(base_dir), str(demos),
                           str(tmp_path / "before"), json.dumps(builds)], check=True, timeout=600, capture_output=True,
                          text=True)
    refused = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            refused.update(json.loads(line))
    return refused


def _assert_same_memory(memory, before, tmp_path, name):
    """`memory` has every tensor of the saved memory `before`, bit for bit, and its decisions."""
    from safetensors.torch import load_file

    expected = load_file(str(before / "memory.safetensors"))
    now = load_file(str(memory.save_pretrained(tmp_path / "now" / name) / "memory.safetensors"))
    assert set(expected) <= set(now)
    for key, tensor in expected.items():
        assert now[key].dtype == tensor.dtype and torch.equal(now[key], tensor), f"{name}: {key}"
    recorded = json.loads((before / "memory_config.json").read_text())
    assert memory.next_position == recorded["next_position"]
    assert len(memory.stats["build"]["chunks"]) == len(recorded["build"]["chunks"])
    for chunk, chunk_before in zip(memory.stats["build"]["chunks"], recorded["build"]["chunks"]):
        assert chunk.get("ratios") == chunk_before.get("ratios")
        assert chunk.get("js") == pytest.approx(chunk_before.get("js"), abs=2e-6)
    totals = dict(memory.stats["totals"])
    # the implementation before did not count what a query can read; without sliding windows it is the whole context
    assert totals.pop("readable_kv_bytes") == totals["full_kv_bytes"]
    assert totals == recorded["totals"]


@pytest.mark.parametrize("family", ["llama", "qwen2-vl"])
def test_builds_give_the_memory_bytes_of_the_implementation_before(tiny, tmp_path, family):
    """Full, random and the paper's rule (self and held-out probes) from a JSONL file (images as files for Qwen2-VL):
    the same decisions and the same tensors, bit for bit, as the implementation before growth in place and
    streaming."""
    model, processor, base_dir = tiny(family)
    demos = write_jsonl(tmp_path / "demos", demos_for(family, 7))
    assert _build_before(tmp_path, base_dir, demos, BUILDS) == {}
    for name, kwargs in BUILDS.items():
        memory = model.build_memory(demos, processor=processor, **kwargs)
        _assert_same_memory(memory, tmp_path / "before" / name, tmp_path, name)


def test_the_default_build_gives_the_memory_bytes_of_the_implementation_before(tiny, tmp_path):
    """`build_memory` with no method arguments but the fixed bound (`relative=None`: the implementation before had no
    relative bound), against the implementation before given the same rule (the options the default records in its
    `method.params`), where that implementation has them."""
    model, processor, base_dir = tiny("llama")
    demos = write_jsonl(tmp_path / "demos", demos_for("llama", 9))
    memory = model.build_memory(demos, processor=processor, relative=None)
    method = memory.stats["method"]
    assert method["name"] == "emloc-query"
    # the default is the paper's rule with options the implementation before already had as `method="emloc"` options
    params = dict(method["params"])
    assert params.pop("reuse") == "none"  # the implementation before had no reuse option: it searched every chunk
    assert params.pop("rerun") == "rows"  # nor a rerun option: it reran whole probe rows
    assert params.pop("probe_at") == "chunk"  # nor probe placement: rows right after the chunk
    params.pop("sliding")  # nor a sliding-window option, which changes nothing on a model without sliding windows
    assert params.pop("distinct_answers") is False  # nor a choice of probe rows by answer: rows in order
    assert params.pop("relative") is None  # nor a relative bound (the default's 0.5, set aside above): delta alone
    assert params.pop("importance") == "probe"  # nor another ranking than the probe rows' attention
    assert params.pop("reference") == "memory"  # nor another reference than the memory and the chunk unpruned
    refused = _build_before(tmp_path, base_dir, demos, {"default": {"method": "emloc", **params}})
    assert refused == {}
    _assert_same_memory(memory, tmp_path / "before" / "default", tmp_path, "default")
