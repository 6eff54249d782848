"""Retrieval inside the memory (issue 12): each query attends to its nearest demonstrations' kept tokens only."""

import json

import pytest
import torch

from conftest import FAMILIES, demos_for, queries_for
from memory_emloc import MemoryLayer, TaskMemory
from rendering_emloc import TEMPLATE


def _batch(processor, queries):
    batch = processor(queries)
    batch.pop("token_types")
    return batch


def _restricted(memory, demos):
    """The memory with only the template prefix and the tokens of `demos` (a memory whose heads all keep the same
    tokens, e.g. `full`)."""
    layers = []
    for layer in memory.layers:
        owner = memory.retrieval.demo_of(layer.positions[0])
        keep = (owner == -1) | torch.isin(owner, torch.as_tensor(demos))
        layers.append(MemoryLayer(**{name: tensor[:, keep] for name, tensor in layer.tensors().items()}))
    return TaskMemory(layers, memory.next_position, dict(memory.stats))


def _chosen(model, memory, processor, queries, k):
    keys = model.runner.retrieval_keys(_batch(processor, queries), memory.retrieval.layer)
    return memory.retrieval.nearest(keys, k)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_index_places_every_demonstration_and_keys_it_as_a_query(tiny, family):
    model, processor, _ = tiny(family)
    demos = demos_for(family, 5)
    # every token kept, also those a sliding-window layer could no longer read, so that layer 0 shows every demonstration
    memory = model.build_memory(demos, processor=processor, method="full", chunk_size=2, drop_unreadable=False)
    index = memory.retrieval
    context = processor.encode_context(demos)
    count = len(demos)  # the image families add a demonstration with two images
    assert index.num_demos == count and index.layer == model.family.num_layers // 2  # the default: half the layers
    assert torch.all(index.starts < index.ends) and torch.all(index.ends[:-1] <= index.starts[1:])
    assert int(index.ends[-1]) == memory.next_position
    # every token of the full memory belongs to its own demonstration, the template prefix to none
    owner = index.demo_of(memory.layers[0].positions[0])
    counts = [int((owner == i).sum()) for i in range(count)]
    assert counts == [len(span) for span in context.demos]
    assert torch.all(memory.layers[0].token_types[0][owner == -1] == TEMPLATE)
    # a demonstration's key is its rendering as a query: asking exactly its question retrieves it first
    question = {key: value for key, value in demos[3].items() if key != "answer"}
    assert _chosen(model, memory, processor, [question], 1).tolist() == [[3]]


@pytest.mark.parametrize("family", FAMILIES)
def test_retrieving_every_demonstration_is_the_memory_alone(tiny, family):
    model, processor, _ = tiny(family)
    demos = demos_for(family, 6)
    memory = model.build_memory(demos, processor=processor, method="emloc", chunk_size=3, delta=0.01)
    queries = queries_for(family, 3)
    plain = model.score_choices(queries, memory=memory, processor=processor)
    retrieved = model.score_choices(queries, memory=memory, processor=processor, retrieve=len(demos))
    torch.testing.assert_close(torch.tensor(retrieved), torch.tensor(plain), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2-vl"])
def test_retrieval_equals_the_memory_of_the_chosen_demonstrations_alone(tiny, family):
    """Every layer of a query sees the prefix and its k nearest demonstrations' tokens, nothing else — at the positions
    they have in the context. Batched queries retrieve each for itself."""
    model, processor, _ = tiny(family)
    memory = model.build_memory(demos_for(family, 6), processor=processor, method="full")
    queries = queries_for(family, 3)
    chosen = _chosen(model, memory, processor, queries, 2)
    assert len({tuple(sorted(row)) for row in chosen.tolist()}) > 1 or family != "llama"
    batched = model.score_choices(queries, memory=memory, processor=processor, retrieve=2)
    for row, query in enumerate(queries):
        alone = model.score_choices([query], memory=_restricted(memory, chosen[row]), processor=processor)[0]
        torch.testing.assert_close(torch.tensor(batched[row]), torch.tensor(alone), atol=1e-4, rtol=0)
    unretrieved = model.score_choices(queries, memory=memory, processor=processor)
    assert not torch.allclose(torch.tensor(batched), torch.tensor(unretrieved), atol=1e-4)


def test_generation_keeps_the_retrieved_view(tiny):
    model, processor, _ = tiny("llama")
    memory = model.build_memory(demos_for("llama", 6), processor=processor, method="full")
    query = queries_for("llama", 1)
    chosen = _chosen(model, memory, processor, query, 2)[0]
    batch = processor(query)
    out = model.generate(**batch, memory=memory, retrieve=2, max_new_tokens=5, do_sample=False)
    expected = model.generate(**batch, memory=_restricted(memory, chosen), max_new_tokens=5, do_sample=False)
    assert torch.equal(out, expected)
    # beams reorder and repeat each row's own view of the memory with it
    beams = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    assert torch.equal(model.generate(**batch, memory=memory, retrieve=2, **beams),
                       model.generate(**batch, memory=_restricted(memory, chosen), **beams))


def test_selection_chooses_within_the_retrieved_tokens(tiny):
    model, processor, _ = tiny("llama")
    memory = model.build_memory(demos_for("llama", 6), processor=processor, method="full")
    batch = _batch(processor, queries_for("llama", 2))
    _, cache, _ = model.runner.query_pass(memory, dict(batch), select=0.5, retrieve=2)
    chosen = memory.retrieval.nearest(model.runner.retrieval_keys(batch, memory.retrieval.layer), 2)
    visible_tokens = int(memory.retrieval.visible(memory.layers[0].positions, chosen)[0, 0].sum())
    for keep, positions in zip(cache.prefix_keep, cache.prefix_positions):
        # each row's own prefix holds its retrieved tokens only; selection keeps about half of them
        owner = memory.retrieval.demo_of(positions)  # [batch, kv_heads, m]
        for row in range(2):
            seen = owner[row][keep[row]]
            assert torch.all((seen == -1) | torch.isin(seen, chosen[row]))
        assert keep.any() and int(keep[0, 0].sum()) <= visible_tokens // 2 + 1
    scores = model.score_choices(queries_for("llama", 2), memory=memory, processor=processor, retrieve=2, select=0.5)
    assert len(scores) == 2


def test_the_index_survives_saving_and_appending(tiny, tmp_path):
    model, processor, _ = tiny("llama")
    demos = demos_for("llama", 6)
    memory = model.build_memory(demos, processor=processor, method="full", chunk_size=2)
    loaded = TaskMemory.from_pretrained(memory.save_pretrained(tmp_path / "m"))
    for name in ("starts", "ends", "keys"):
        assert torch.equal(getattr(loaded.retrieval, name), getattr(memory.retrieval, name))
    assert json.loads((tmp_path / "m" / "memory_config.json").read_text())["retrieval"]["num_demos"] == 6
    first = model.build_memory(demos[:4], processor=processor, method="full", chunk_size=2)
    grown = model.build_memory(demos[4:], processor=processor, method="full", chunk_size=2, append_to=first)
    for name in ("starts", "ends", "keys"):
        torch.testing.assert_close(getattr(grown.retrieval, name), getattr(memory.retrieval, name))


def test_a_memory_without_an_index_says_how_to_add_one(tiny, tmp_path):
    """A format-1 memory (or one made by another tool) loads, refuses `retrieve` naming `index_memory`, and once
    indexed from its demonstrations retrieves as a memory built with an index."""
    model, processor, _ = tiny("llama")
    demos = demos_for("llama", 6)
    memory = model.build_memory(demos, processor=processor, method="full")
    saved = memory.save_pretrained(tmp_path / "v1")
    config = json.loads((saved / "memory_config.json").read_text())
    config["format_version"] = 1
    config.pop("retrieval")
    (saved / "memory_config.json").write_text(json.dumps(config))
    old = TaskMemory.from_pretrained(saved)
    assert old.retrieval is None
    queries = queries_for("llama", 2)
    with pytest.raises(ValueError, match="no retrieval index.*index_memory"):
        model.score_choices(queries, memory=old, processor=processor, retrieve=2)
    model.index_memory(old, demos, processor=processor)
    assert model.score_choices(queries, memory=old, processor=processor, retrieve=2) == \
        model.score_choices(queries, memory=memory, processor=processor, retrieve=2)
    with pytest.raises(ValueError, match="not made from them"):
        model.index_memory(old, demos[:5], processor=processor)
    with pytest.raises(ValueError, match="retrieve must be"):
        model.score_choices(queries, memory=memory, processor=processor, retrieve=0)
    unindexed = model.build_memory(demos, processor=processor, method="full", retrieval=False)
    assert unindexed.retrieval is None and "retrieval" not in json.loads(
        (unindexed.save_pretrained(tmp_path / "none") / "memory_config.json").read_text())


def test_keys_from_another_layer(tiny):
    model, processor, _ = tiny("llama")
    demos = demos_for("llama", 5)
    memory = model.build_memory(demos, processor=processor, method="full", retrieval_layer=0)
    assert memory.retrieval.layer == 0
    deeper = model.build_memory(demos, processor=processor, method="full")
    assert not torch.allclose(memory.retrieval.keys, deeper.retrieval.keys)
    # layer 0 is the mean input embedding of the demonstration rendered as a query
    query_span = processor.encode_query(processor.encode_context(demos).examples[2])
    torch.testing.assert_close(memory.retrieval.keys[2], model.family.embed({"input_ids": query_span.input_ids[None]})[0].mean(0))
    with pytest.raises(ValueError, match="retrieval_layer must lie"):
        model.build_memory(demos, processor=processor, method="full", retrieval_layer=model.family.num_layers + 1)
    question = {key: value for key, value in demos[1].items() if key != "answer"}
    assert _chosen(model, memory, processor, [question], 1).tolist() == [[1]]
