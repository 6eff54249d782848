"""Per-query selection over a memory at answer time (`select=`)."""

import pytest
import torch

from conftest import FAMILIES, demos_for, queries_for
from cache_emloc import AttentionObserver, EmlocCache, MemorySelector, smooth
from running_emloc import memory_prefix, run_layers


def _batch(processor, queries):
    batch = processor(queries)
    batch.pop("token_types")
    return batch


@pytest.mark.parametrize("family", FAMILIES)
def test_select_one_equals_no_selection_and_batches_equal_single_queries(tiny, family):
    model, processor, _ = tiny(family)
    # the paper's rule: the default method keeps so few tokens of these random tiny models that a 30 % selection
    # cuts between near-equal scores, where batch and single rows may break the tie differently
    memory = model.build_memory(demos_for(family, 6), processor=processor, method="emloc", chunk_size=3, delta=0.01)
    queries = queries_for(family, 3)
    if family in ("llama", "gemma3"):
        queries[0] = dict(queries[0], question="short?")
    batch = _batch(processor, queries)
    plain = model(**batch, memory=memory).logits
    assert torch.equal(model(**batch, memory=memory, select=1.0).logits, plain)
    selected = model(**batch, memory=memory, select=0.3).logits
    assert not torch.allclose(selected, plain, atol=1e-3), "selecting 30% should change the answer distribution"
    for row, query in enumerate(queries):
        alone = model(**_batch(processor, [query]), memory=memory, select=0.3).logits[0]
        torch.testing.assert_close(selected[row, -alone.shape[0]:], alone, atol=1e-4, rtol=0)


def test_selected_tokens_are_the_top_scored(tiny):
    """Layer 0: the kept set of each row and KV head is the top of the pooled attention the query pays the memory."""
    model, processor, _ = tiny("llama")
    memory = model.build_memory(demos_for("llama", 6), processor=processor, method="full")
    batch = _batch(processor, queries_for("llama", 2))
    family = model.family
    segment = model.runner.segment(dict(batch), start_position=memory.next_position)
    cache = EmlocCache(memory_prefix(memory), 2)
    selector = MemorySelector(0.25, cache, segment.valid)
    with torch.no_grad():
        run_layers(family, segment, cache, selector=selector)
    # recompute layer 0's scores with the plain observer (unselected attention, as the selector scores it)
    groups = family.num_heads // family.num_kv_heads
    length = memory.layers[0].num_tokens
    observers = []
    for row in range(2):
        single = model.runner.segment({k: v[row:row + 1] for k, v in batch.items()}, start_position=memory.next_position)
        observer = AttentionObserver(single.valid, slice(0, length), groups)
        with torch.no_grad():
            run_layers(family, single, EmlocCache(memory_prefix(memory), 1), stop=1, observer=observer)
        observers.append(smooth(observer.per_layer[0], 5))
    keep = cache.prefix_keep[0]
    assert keep.shape == (2, family.num_kv_heads, length)
    assert int(keep[0, 0].sum()) == selector.count(length)
    for row in range(2):
        for head in range(family.num_kv_heads):
            expected = set(observers[row][head].topk(selector.count(length)).indices.tolist())
            assert set(keep[row, head].nonzero().flatten().tolist()) == expected


def test_select_a_token_count_and_generation_keeps_the_subset(tiny):
    model, processor, _ = tiny("gemma3")
    memory = model.build_memory(demos_for("gemma3", 5), processor=processor, method="full")
    batch = processor(queries_for("gemma3", 2))
    by_count = model.generate(**batch, memory=memory, select=12, max_new_tokens=4)
    assert by_count.shape[0] == 2
    greedy_first = model(**{k: v for k, v in batch.items() if k != "token_types"}, memory=memory, select=12).logits[:, -1].argmax(-1)
    assert torch.equal(by_count[:, batch["input_ids"].shape[1]], greedy_first)
    with pytest.raises(ValueError, match="select must be"):
        model.generate(**batch, memory=memory, select=-1, max_new_tokens=2)


def test_score_choices_with_selection(tiny):
    model, processor, _ = tiny("qwen2.5-vl")
    memory = model.build_memory(demos_for("qwen2.5-vl", 4), processor=processor, method="full")
    query = queries_for("qwen2.5-vl", 1)[0]
    full = model.score_choices([query], memory=memory, processor=processor)[0]
    assert model.score_choices([query], memory=memory, processor=processor, select=1.0)[0] == full
    selected = model.score_choices([query], memory=memory, processor=processor, select=0.2)[0]
    assert len(selected) == len(full) and selected != full
