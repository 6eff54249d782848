"""What no query can read: a sliding-window layer shows a query only the last window of the memory, so a build drops
the rest (`drop_unreadable`, on by default) without changing any answer, and the kept share counts what a query reads."""

import types

import pytest
import torch

from conftest import demos_for, queries_for
from memory_emloc import MemoryLayer, TaskMemory, config_sliding_windows
from reference import reference_logits

ATOL = 1e-4


def _query_batch(processor, queries):
    batch = processor(queries)
    batch.pop("token_types")
    return batch


def test_each_head_keeps_its_latest_tokens_as_many_as_any_head_can_read():
    """Two heads, window 6, queries from position 14: positions 9 … 13 are readable. Head 0 can read three tokens,
    head 1 two; both keep three (head 1 its latest three, one of them unreadable and still masked), in memory order,
    with their keys, values and types; a global layer (window None) keeps everything."""
    positions = torch.tensor([[0, 9, 10, 12], [3, 4, 11, 13]])
    keys = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)
    layer = MemoryLayer(keys, -keys, positions, positions % 4)
    memory = TaskMemory([layer, MemoryLayer(keys, -keys, positions, positions % 4)], next_position=14)
    assert memory.readable_tokens([6, None]) == [2.5, 4.0]
    assert memory.drop_unreadable([6, None]) == [1, 0]
    trimmed, untouched = memory.layers
    assert trimmed.positions.tolist() == [[9, 10, 12], [4, 11, 13]]
    assert torch.equal(trimmed.keys, torch.stack([keys[0, 1:], keys[1, 1:]]))
    assert torch.equal(trimmed.values, -trimmed.keys) and torch.equal(trimmed.token_types, trimmed.positions % 4)
    assert untouched is layer or torch.equal(untouched.keys, keys) and untouched.num_tokens == 4
    assert memory.readable_tokens([6, None]) == [2.5, 4.0]  # nothing a query reads went
    assert memory.drop_unreadable([6, None]) == [0, 0]  # and a second pass has nothing left to drop


def test_layer_types_decide_which_layers_slide():
    """A config that declares its layer types (Gemma 3, Qwen2 with `use_sliding_window`: layers below
    `max_window_layers` stay global) slides only where it says; without them `use_sliding_window` slides everywhere."""
    declared = types.SimpleNamespace(sliding_window=32, use_sliding_window=True, num_hidden_layers=3,
                                     layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    assert config_sliding_windows(declared) == [None, 32, 32]
    mistral = types.SimpleNamespace(sliding_window=32, use_sliding_window=True, num_hidden_layers=3)
    assert config_sliding_windows(mistral) == [32, 32, 32]
    assert config_sliding_windows(types.SimpleNamespace(sliding_window=32, num_hidden_layers=2)) == [None, None]


@pytest.mark.parametrize("method", ["full", "emloc-query"])
def test_dropping_what_no_query_reads_changes_no_answer(tiny, method):
    """Tiny Gemma 3 (window 16), a context more than ten windows long: the memory built with `drop_unreadable` (the
    default) is the one built without it, less the unreadable tokens of the sliding layers — the global layers byte for
    byte — and answers the same (logits, choice scores, greedy generation); its kept share is the same too. The full
    context keeps exactly its last window in every sliding layer."""
    model, processor, _ = tiny("gemma3")
    windows = model.family.sliding_windows
    assert 16 in windows and None in windows
    demos, queries = demos_for("gemma3", 8), queries_for("gemma3", 2)
    kept = model.build_memory(demos, processor=processor, method=method, chunk_size=3, drop_unreadable=False)
    dropped = model.build_memory(demos, processor=processor, method=method, chunk_size=3)
    assert dropped.kv_bytes() < kept.kv_bytes() and dropped.next_position == kept.next_position > 10 * 16
    for index, (before, after) in enumerate(zip(kept.layers, dropped.layers)):
        if windows[index] is None:
            for name, tensor in before.tensors().items():
                assert torch.equal(getattr(after, name), tensor), (index, name)
            continue
        readable = before.readable(kept.next_position, windows[index])
        assert after.num_tokens == int(readable.sum(-1).max()) < before.num_tokens
        for head in range(before.keys.shape[0]):  # every readable token is still there, with its key
            wanted = before.positions[head][readable[head]]
            position_kept = torch.isin(after.positions[head], wanted)
            assert int(position_kept.sum()) == len(wanted)
            assert torch.equal(after.keys[head][position_kept], before.keys[head][readable[head]])
    assert dropped.stats["totals"]["kept_ratio"] == pytest.approx(kept.stats["totals"]["kept_ratio"], abs=1e-6)
    assert dropped.stats["totals"]["kept_kv_bytes"] == dropped.kv_bytes() < kept.stats["totals"]["kept_kv_bytes"]
    for entry, window in zip(dropped.stats["layers"], windows):
        assert ("readable" in entry) == (window is not None)
    if method == "full":
        assert dropped.stats["totals"]["kept_ratio"] == 1.0
        assert dropped.stats["totals"]["readable_kv_bytes"] == dropped.kv_bytes() < dropped.stats["totals"]["full_kv_bytes"]
        for layer, window in zip(dropped.layers, windows):
            if window is not None:
                assert layer.positions[0].tolist() == list(range(dropped.next_position - window + 1, dropped.next_position))
    batch = _query_batch(processor, queries[:1])
    torch.testing.assert_close(model(**batch, memory=dropped).logits, model(**batch, memory=kept).logits, atol=ATOL, rtol=0)
    scores = [model.score_choices(queries, memory=m, processor=processor) for m in (kept, dropped)]
    torch.testing.assert_close(torch.tensor(scores[1]), torch.tensor(scores[0]), atol=ATOL, rtol=0)
    generated = [model.generate(**processor(queries[:1]), memory=m, max_new_tokens=6, do_sample=False) for m in (kept, dropped)]
    assert torch.equal(generated[0], generated[1])


def test_a_memory_without_unreadable_tokens_grows_to_the_full_context(tiny):
    """More demonstrations appended to a memory that dropped its unreadable tokens: the new chunks cannot read them
    either, so the result still answers as the whole context does."""
    model, processor, _ = tiny("gemma3")
    demos, query = demos_for("gemma3", 8), queries_for("gemma3", 1)[0]
    first = model.build_memory(demos[:5], processor=processor, method="full", chunk_size=2)
    assert first.stats["totals"]["kept_kv_bytes"] < first.stats["totals"]["full_kv_bytes"]
    grown = model.build_memory(demos[5:], processor=processor, method="full", chunk_size=2, append_to=first)
    expected = reference_logits(model, processor, demos, query)
    torch.testing.assert_close(model(**_query_batch(processor, [query]), memory=grown).logits[0], expected, atol=ATOL, rtol=0)
    assert grown.stats["totals"]["kept_ratio"] == 1.0


def test_no_sliding_window_no_change(tiny):
    """Llama has no sliding windows: the option changes no byte, and the kept share is kept bytes over full bytes."""
    model, processor, _ = tiny("llama")
    demos = demos_for("llama", 6)
    assert set(model.family.sliding_windows) == {None}
    on = model.build_memory(demos, processor=processor, chunk_size=2)
    off = model.build_memory(demos, processor=processor, chunk_size=2, drop_unreadable=False)
    assert on.digest() == off.digest()
    totals = on.stats["totals"]
    assert totals["readable_kv_bytes"] == totals["full_kv_bytes"]
    assert totals["kept_ratio"] == pytest.approx(totals["kept_kv_bytes"] / totals["full_kv_bytes"], abs=1e-6)
