"""Memory that grows with what is kept (issue 10): growth in place equals concatenation, never writes into what it did
not allocate, and a build lets each chunk's working state go before the next."""

import pytest
import torch

from conftest import demos_for
from memory_emloc import MemoryLayer, TaskMemory


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

    import building_emloc
    from running_emloc import MemoryRunner

    model, processor, _ = tiny("llama")
    alive = []
    prefill = MemoryRunner.prefill

    def recording_prefill(self, memory, span, **kwargs):
        chunk = prefill(self, memory, span, **kwargs)
        assert chunk.keys[0]._base is memory._buffers[0].keys
        alive.append(weakref.ref(chunk))
        return chunk

    class RecordingProbe(building_emloc.Probe):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            alive.append(weakref.ref(self))

    monkeypatch.setattr(MemoryRunner, "prefill", recording_prefill)
    monkeypatch.setattr(building_emloc, "Probe", RecordingProbe)
    checked = []

    def progress(done, total):
        assert len(alive) == 2 * done and all(ref() is None for ref in alive)
        checked.append(done)

    model.build_memory(demos_for("llama", 6), processor=processor, chunk_size=2, progress=progress, method="emloc",
                       calibration_rows=0)
    assert checked == [1, 2, 3]


def test_scratch_gives_room_after_each_layer_and_leaves_the_memory_as_it_was():
    """A build's passes write after the memory in its growth buffers (`TaskMemory.scratch`): the memory, and what it
    handed out, keep their values, and the next `extend` writes over the scratch as concatenation would."""
    from cache_emloc import PrefixedLayer

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
