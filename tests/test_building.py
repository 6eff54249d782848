"""build_memory(): invariants of every compression method (EMLoC, §3.2 of the paper) on tiny models of every family."""

import math

import pytest
import torch

from conftest import FAMILIES, VL_FAMILIES, demos_for, queries_for
from building_emloc import COMPRESSION_METHODS, EmlocMethod, MemoryBuilder, Probe, top_tokens
from cache_emloc import smooth
from processing_emloc import EncodedSpan
from rendering_emloc import ANSWER
from running_emloc import js_divergence


def _build(model, processor, family, **kwargs):
    kwargs.setdefault("chunk_size", 2)
    kwargs.setdefault("method", "emloc")  # the paper's rule: these are its invariants
    kwargs.setdefault("calibration_rows", 0)
    kwargs.setdefault("validation", 0)  # the rule's invariants; the certificate has its own tests
    return model.build_memory(demos_for(family, 6), processor=processor, **kwargs)


def _logits(model, processor, memory, family):
    batch = processor(queries_for(family, 2))
    batch.pop("token_types")
    return model(**batch, memory=memory).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_huge_delta_keeps_the_smallest_ratio_in_every_layer(tiny, family):
    model, processor, _ = tiny(family)
    # the rule's own counts: nothing dropped afterwards from Gemma 3's sliding layers (tests/test_memory_unreadable.py)
    memory = _build(model, processor, family, delta=1e9, ratios=(0.1, 0.2, 0.5), drop_unreadable=False)
    for chunk in memory.stats["build"]["chunks"]:
        assert chunk["ratios"] == [0.1] * model.family.num_layers
    # each layer keeps max(ceil(0.1 * chunk), answers) tokens per chunk, answers included
    context = processor.encode_context(demos_for(family, 6))
    chunks = [context.demos[i:i + 2] for i in range(0, len(context.demos), 2)]
    chunks[0] = [context.prefix, *chunks[0]]
    expected = 0
    for spans in chunks:
        length = sum(len(s) for s in spans)
        answers = sum(int((s.token_types == ANSWER).sum()) for s in spans)
        expected += min(length, max(math.ceil(0.1 * length), answers))
    assert memory.tokens_per_layer() == [expected] * model.family.num_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_delta_keeps_every_token_and_method_full_is_the_unpruned_memory(tiny, family):
    model, processor, _ = tiny(family)
    full = _build(model, processor, family, method="full")
    strict = _build(model, processor, family, delta=0.0, ratios=(0.1, 0.5))
    # with delta=0 a candidate passes only if it changes nothing: almost every layer keeps its whole chunk
    assert full.stats["totals"]["kept_ratio"] == 1.0
    for a, b in zip(full.layers, strict.layers):
        if a.num_tokens == b.num_tokens:
            torch.testing.assert_close(a.keys, b.keys)
    assert full.next_position == strict.next_position


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_tokens_are_kept_in_every_layer_and_head(tiny, family):
    model, processor, _ = tiny(family)
    memory = _build(model, processor, family, delta=1e9, drop_unreadable=False)
    answers = memory.stats["token_types"]["answer"]["full"]
    for layer in memory.layers:
        for head in range(layer.keys.shape[0]):
            assert int((layer.token_types[head] == ANSWER).sum()) == answers
    # dropping what no query reads (Gemma 3's sliding layers) keeps every answer token a query can read
    trimmed = _build(model, processor, family, delta=1e9)
    for layer, whole, window in zip(trimmed.layers, memory.layers, model.family.sliding_windows):
        readable, still = whole.readable(memory.next_position, window), layer.readable(trimmed.next_position, window)
        for head in range(layer.keys.shape[0]):
            assert int(((layer.token_types[head] == ANSWER) & still[head]).sum()) == \
                int(((whole.token_types[head] == ANSWER) & readable[head]).sum())


def test_kept_tokens_are_the_top_scored():
    torch.manual_seed(0)
    importance = torch.rand(3, 40)
    must_keep = torch.zeros(40, dtype=torch.bool)
    must_keep[[5, 6, 30]] = True
    index = top_tokens(importance, 0.2, must_keep)
    assert index.shape == (3, 8)
    for head in range(3):
        kept = set(index[head].tolist())
        assert {5, 6, 30} <= kept
        others = [i for i in range(40) if i not in {5, 6, 30}]
        chosen = sorted(kept - {5, 6, 30})
        best = sorted(sorted(others, key=lambda i: -importance[head, i].item())[: len(chosen)])
        assert chosen == best
        assert index[head].tolist() == sorted(index[head].tolist())  # sequence order is kept
    # fewer slots than answers: every answer token is still kept
    assert top_tokens(importance, 0.01, must_keep).shape == (3, 3)


def test_smoothing_is_an_average_pool_of_width_5():
    scores = torch.tensor([[0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0]])
    smoothed = smooth(scores, 5)
    assert smoothed.shape == scores.shape
    torch.testing.assert_close(smoothed, torch.tensor([[10 / 3, 10 / 4, 10 / 5, 10 / 5, 10 / 5, 0.0, 0.0]]))


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2-vl"])
@pytest.mark.parametrize("delta", [0.0005, 0.005])
def test_each_chunk_meets_the_bound_on_its_probe(tiny, family, delta):
    """After each chunk, the probe's mean JS with the pruned chunk (all layers as chosen) vs unpruned is <= delta
    at the bottom layer's decision — the last check the rule makes covers every layer's pruning at once."""
    model, processor, _ = tiny(family)
    memory = _build(model, processor, family, delta=delta)
    for chunk in memory.stats["build"]["chunks"]:
        accepted = [js for js, ratio in zip(chunk["js"], chunk["ratios"]) if ratio < 1.0]
        assert all(js <= delta for js in accepted)


def test_probe_divergence_of_the_final_decision_is_recomputable(tiny):
    """Re-run the probe of the first chunk against the memory's first-chunk tokens: its JS equals the recorded one."""
    model, processor, _ = tiny("llama")
    demos = demos_for("llama", 2)
    memory = model.build_memory(demos, processor=processor, method="emloc", chunk_size=2, delta=0.01)
    recorded = memory.stats["build"]["chunks"][0]["js"][0]
    builder_memory = model.runner.empty_memory()
    builder = MemoryBuilder(model.runner, processor, EmlocMethod(delta=0.01), chunk_size=2, pool_width=5)
    builder.context = processor.encode_context(demos)
    chunk = model.runner.prefill(builder_memory, EncodedSpan.concat([builder.context.prefix, *builder.context.demos]))
    probe = Probe(builder, builder_memory, chunk, builder.context.demos)
    # the memory stores, per layer and head, the kept chunk tokens: recover their indices from positions
    kept = {}
    for layer, stored in enumerate(memory.layers):
        kept[layer] = torch.stack([torch.searchsorted(chunk.positions, stored.positions[h]) for h in range(stored.positions.shape[0])])
    assert probe.divergence(0, kept) == pytest.approx(recorded, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2-vl"])
def test_builds_are_deterministic(tiny, family):
    model, processor, _ = tiny(family)
    first, second = _build(model, processor, family), _build(model, processor, family)
    for a, b in zip(first.layers, second.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(a.positions, b.positions)
    assert first.stats["build"]["chunks"] == second.stats["build"]["chunks"]


def test_js_is_float32_and_never_nan():
    logits = torch.tensor([[0.0, 1000.0, -1000.0], [5.0, 5.0, 5.0]], dtype=torch.bfloat16)
    log_q = torch.log_softmax(torch.tensor([[1000.0, 0.0, -1000.0], [5.0, 5.0, 5.0]]), dim=-1)
    js = js_divergence(logits, log_q)
    assert js.dtype == torch.float32 and not torch.isnan(js).any()
    assert js[0].item() == pytest.approx(math.log(2), abs=1e-3)  # disjoint distributions: the maximum, ln 2
    assert js[1].item() == pytest.approx(0.0, abs=1e-7)


def test_bfloat16_build_has_no_nan(tiny):
    import copy

    from modeling_emloc import EmlocForConditionalGeneration

    shared, processor, _ = tiny("llama")
    model = EmlocForConditionalGeneration.from_base(copy.deepcopy(shared.model).to(torch.bfloat16))
    memory = _build(model, processor, "llama", delta=0.005)
    for chunk in memory.stats["build"]["chunks"]:
        assert not any(math.isnan(js) for js in chunk["js"])
    assert memory.layers[0].keys.dtype == torch.bfloat16
    assert not torch.isnan(_logits(model, processor, memory, "llama")).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_follow_the_memory_config_format(tiny, family):
    model, processor, _ = tiny(family)
    memory = _build(model, processor, family, delta=0.005)
    stats = memory.stats
    assert stats["method"] == {"name": "emloc", "params": {"delta": 0.005, "ratios": [0.1, 0.2, 0.5], "probe": "self", "chunk_size": 2}}
    assert stats["num_demos"] == (7 if family in VL_FAMILIES else 6)
    assert len(stats["layers"]) == model.family.num_layers
    assert [l["kept"] for l in stats["layers"]] == memory.tokens_per_layer()
    totals = stats["totals"]
    # the kept share: what a query can read of the memory, over what it can read of the full context
    bytes_per_token = totals["full_kv_bytes"] // (totals["full_tokens"] * model.family.num_layers)
    readable = sum(layer.get("kept_readable", layer["kept"]) for layer in stats["layers"])
    assert totals["kept_ratio"] == pytest.approx(readable * bytes_per_token / totals["readable_kv_bytes"], abs=1e-6)
    assert totals["full_tokens"] == sum(v["full"] for v in stats["token_types"].values())
    if set(model.family.sliding_windows) == {None}:
        assert totals["readable_kv_bytes"] == totals["full_kv_bytes"]
        assert totals["kept_ratio"] == pytest.approx(totals["kept_kv_bytes"] / totals["full_kv_bytes"], abs=1e-6)
        assert stats["token_types"]["answer"]["kept"] == stats["token_types"]["answer"]["full"]
    else:  # Gemma 3: the sliding layers hold only their last window (tests/test_memory_unreadable.py)
        assert totals["readable_kv_bytes"] < totals["full_kv_bytes"]
        assert stats["token_types"]["answer"]["kept"] < stats["token_types"]["answer"]["full"]
    if family in VL_FAMILIES:
        assert stats["token_types"]["image"]["full"] == 4 * 8  # 6 one-image demos + one with two images, 4 tokens each
    assert len(stats["build"]["chunks"]) == math.ceil(stats["num_demos"] / 2) and stats["build"]["seconds"] > 0


@pytest.mark.parametrize("family", ["llama", "qwen2.5-vl"])
def test_append_to_equals_building_at_once(tiny, family):
    model, processor, _ = tiny(family)
    demos = demos_for(family, 6)
    at_once = model.build_memory(demos, processor=processor, method="full", chunk_size=2)
    first = model.build_memory(demos[:4], processor=processor, method="full", chunk_size=2)
    appended = model.build_memory(demos[4:], processor=processor, method="full", chunk_size=2, append_to=first)
    assert appended.next_position == at_once.next_position
    assert appended.stats["num_demos"] == 7 if family in VL_FAMILIES else 6
    for a, b in zip(appended.layers, at_once.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=0)
    # the existing memory is not modified
    assert first.tokens_per_layer()[0] < appended.tokens_per_layer()[0]


def test_budget_caps_the_kept_share(tiny):
    model, processor, _ = tiny("llama")
    for budget in (0.15, 0.3):
        memory = _build(model, processor, "llama", delta=0.0, budget=budget, ratios=(0.05, 0.1, 0.15, 0.2, 0.3, 0.5))
        for chunk in memory.stats["build"]["chunks"]:
            assert sum(chunk["ratios"]) <= budget * model.family.num_layers + 1e-6
        assert memory.stats["method"]["params"]["budget"] == budget


def test_unknown_method_and_parameters_are_refused(tiny):
    model, processor, _ = tiny("llama")
    with pytest.raises(ValueError, match="unknown method 'snap'"):
        _build(model, processor, "llama", method="snap")
    with pytest.raises(TypeError, match="does not take"):
        _build(model, processor, "llama", method="full", delta=0.1)
    with pytest.raises(ValueError, match="probe must be"):
        _build(model, processor, "llama", probe="other")
    with pytest.raises(ValueError, match="was retired"):
        _build(model, processor, "llama", probe="heldout")
    assert {"emloc", "full"} <= set(COMPRESSION_METHODS)
