"""The options that repair the paper's rule at small scale (issue 9), each against what it promises, on tiny models."""

import math

import pytest
import torch

from conftest import demos_for
from modeling_emloc import EmlocMethod, top_tokens
from processing_emloc import ANSWER


def _build(model, processor, family="llama", count=6, **kwargs):
    kwargs.setdefault("chunk_size", 2)
    kwargs.setdefault("method", "emloc")
    return model.build_memory(demos_for(family, count), processor=processor, **kwargs)


def _same_bytes(a, b):
    """The two memories hold the same tokens per layer and the same keys and values, bit for bit."""
    assert a.tokens_per_layer() == b.tokens_per_layer()
    for x, y in zip(a.layers, b.layers):
        torch.testing.assert_close(x.keys, y.keys, atol=0, rtol=0)
        torch.testing.assert_close(x.values, y.values, atol=0, rtol=0)


def _chunks(processor, family, count, chunk_size):
    context = processor.encode_context(demos_for(family, count))
    chunks = [context.demos[i:i + chunk_size] for i in range(0, len(context.demos), chunk_size)]
    chunks[0] = [context.prefix, *chunks[0]]
    return chunks


def _first_chunk_and_probe_rows(model, processor, family, count):
    """A builder over `count` demonstrations, the empty memory, the first chunk (prefix + two demonstrations) prefilled on
    it, and the remaining demonstrations as probe rows."""
    from modeling_emloc import MemoryBuilder
    from processing_emloc import EncodedSpan

    builder = MemoryBuilder(model, processor, EmlocMethod(), chunk_size=2, pool_width=5)
    builder.context = processor.encode_context(demos_for(family, count))
    memory = model._empty_memory()
    chunk = model._prefill_chunk(memory, EncodedSpan.concat([builder.context.prefix, *builder.context.demos[:2]]))
    return builder, memory, chunk, builder.context.demos[2:count]


def test_protected_extra_counts_the_ratio_over_the_other_tokens():
    importance = torch.rand(2, 50)
    must_keep = torch.zeros(50, dtype=torch.bool)
    must_keep[[3, 4, 20, 21, 40]] = True
    # the paper: max(ceil(0.1 * 50), 5) = 5 — the answers fill the ratio alone
    assert top_tokens(importance, 0.1, must_keep).shape == (2, 5)
    # extra: ceil(0.1 * 45) = 5 other tokens on top of the 5 answers
    index = top_tokens(importance, 0.1, must_keep, protected_extra=True)
    assert index.shape == (2, 10)
    for head in range(2):
        assert {3, 4, 20, 21, 40} <= set(index[head].tolist())


def test_protect_extra_keeps_answers_plus_the_ratio_of_the_rest(tiny):
    model, processor, _ = tiny("llama")
    memory = _build(model, processor, delta=1e9, ratios=(0.2,), protect="extra")
    expected = 0
    for spans in _chunks(processor, "llama", 6, 2):
        length = sum(len(s) for s in spans)
        answers = sum(int((s.token_types == ANSWER).sum()) for s in spans)
        expected += math.ceil(0.2 * (length - answers)) + answers
    assert memory.tokens_per_layer() == [expected] * model.family.num_layers
    assert memory.stats["method"]["params"]["protect"] == "extra"


def test_future_probe_uses_demonstrations_no_memory_has_seen():
    method = EmlocMethod(probe="future", probe_size=3)
    assert method.probe_demos(10, [0, 1]) == [2, 3, 4]
    assert method.probe_demos(10, [4, 5]) == [6, 7, 8]
    # the last chunk has no successors: it borrows the first demonstrations
    assert method.probe_demos(10, [8, 9]) == [0, 1, 2]
    assert method.probe_demos(10, [6, 7]) == [8, 9, 0]
    assert EmlocMethod(probe="self").probe_demos(10, [4, 5]) == [4, 5]
    for chunk in ([0, 1], [8, 9]):
        assert not set(EmlocMethod(probe="heldout", probe_size=3).probe_demos(10, chunk)) & set(chunk)


def test_self_and_future_probe_takes_the_chunks_rows_then_the_future_rows():
    method = EmlocMethod(probe="self+future", probe_size=2)
    assert method.probe_demos(10, [4, 5]) == [4, 5, 6, 7]
    assert method.probe_demos(10, [8, 9]) == [8, 9, 0, 1]
    assert EmlocMethod(probe="self+future", probe_size=3).params()["probe_size"] == 3


def test_grouped_probe_rows_diverge_by_the_larger_of_the_groups_means(tiny):
    """`row_groups` judges groups of rows apart: a variant's divergence is the larger group mean, the same as each
    group's rows probed alone (packed rows are independent segments), not the mean over all rows."""
    from modeling_emloc import Probe

    model, processor, _ = tiny("llama")
    builder, memory, chunk, rows = _first_chunk_and_probe_rows(model, processor, "llama", 5)
    grouped = Probe(builder, memory, chunk, rows, positions="answer", row_groups=[0, 1, 1])
    pooled = Probe(builder, memory, chunk, rows, positions="answer")
    alone = [Probe(builder, memory, chunk, rows[:1], positions="answer"),
             Probe(builder, memory, chunk, rows[1:], positions="answer")]
    assert grouped.scored_groups.tolist() == [0] * int(alone[0].predicting.sum()) + [1] * int(alone[1].predicting.sum())
    answers = chunk.token_types == ANSWER
    found_uneven = False
    for ratio in (0.1, 0.3, 0.6):
        for start in (0, 1):
            # one set of kept tokens for all four probes (each probe's own importance would choose others)
            kept = {layer: top_tokens(pooled.importance[layer], ratio, answers) for layer in range(start, 2)}
            groups = [probe.divergence(start, kept) for probe in alone]
            assert grouped.divergence(start, kept) == pytest.approx(max(groups), rel=1e-4, abs=1e-7)
            found_uneven |= abs(groups[0] - groups[1]) > 1e-4 * max(groups)
            assert grouped.divergence(start, kept) >= pooled.divergence(start, kept) - 1e-7
    assert found_uneven  # the groups differed somewhere, so the maximum was not also the mean


def test_one_group_of_rows_can_rank_the_chunk_alone(tiny):
    """`rank_group`: the chunk's tokens are ranked by that group's attention only — the ranking of those rows probing
    alone — while every row still judges the divergence."""
    from modeling_emloc import Probe

    model, processor, _ = tiny("llama")
    builder, memory, chunk, rows = _first_chunk_and_probe_rows(model, processor, "llama", 5)
    ranked = Probe(builder, memory, chunk, rows, positions="answer", row_groups=[0, 1, 1], rank_group=1)
    future_alone = Probe(builder, memory, chunk, rows[1:], positions="answer")
    every_row = Probe(builder, memory, chunk, rows, positions="answer")
    for layer in range(len(ranked.importance)):
        torch.testing.assert_close(ranked.importance[layer], future_alone.importance[layer], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(ranked.importance[l], every_row.importance[l]) for l in range(len(ranked.importance)))
    torch.testing.assert_close(ranked.reference, every_row.reference)
    with pytest.raises(ValueError, match="importance='future'"):
        EmlocMethod(probe="future", importance="future")
    assert EmlocMethod(probe="self+future", importance="future").params()["importance"] == "future"


def test_every_token_of_the_rows_can_rank_the_chunk(tiny):
    """`rank_tokens="rows"` (`importance="rows"`): the chunk's tokens are ranked by the attention of every token of the
    rows, a sum over more positions than the scored ones; each row is its own segment, so a group's rows rank as they
    would probing alone; the divergence is judged as before."""
    from modeling_emloc import Probe

    model, processor, _ = tiny("llama")
    builder, memory, chunk, rows = _first_chunk_and_probe_rows(model, processor, "llama", 5)
    with torch.no_grad():
        scored = Probe(builder, memory, chunk, rows, positions="first")
        every_token = Probe(builder, memory, chunk, rows, positions="first", rank_tokens="rows")
    for layer in range(len(scored.importance)):
        # non-negative probabilities summed over a superset of positions, then the same (linear) smoothing
        assert bool((every_token.importance[layer] >= scored.importance[layer] - 1e-6).all())
        assert float(every_token.importance[layer].sum()) > float(scored.importance[layer].sum()) + 1e-3
    torch.testing.assert_close(every_token.reference, scored.reference)
    grouped = Probe(builder, memory, chunk, rows, positions="first", row_groups=[0, 1, 1], rank_group=1,
                    rank_tokens="rows")
    alone = Probe(builder, memory, chunk, rows[1:], positions="first", rank_tokens="rows")
    for layer in range(len(grouped.importance)):
        torch.testing.assert_close(grouped.importance[layer], alone.importance[layer], rtol=1e-4, atol=1e-6)
    built = _build(model, processor, "llama", 6, method="emloc-query", importance="rows")
    assert built.stats["method"]["params"]["importance"] == "rows"
    answers_only = _build(model, processor, "llama", 6, method="emloc-query")
    assert any(not torch.equal(a.positions, b.positions) for a, b in zip(built.layers, answers_only.layers))


def test_a_self_and_future_build_records_the_option_and_judges_both_sets_of_rows(tiny, monkeypatch):
    import modeling_emloc

    built = []

    class RecordingProbe(modeling_emloc.Probe):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(modeling_emloc, "Probe", RecordingProbe)
    model, processor, _ = tiny("llama")
    memory = _build(model, processor, "llama", 6, method="emloc-query", probe="self+future", probe_size=1,
                    importance="future")
    assert memory.stats["method"]["params"]["probe"] == "self+future"
    assert memory.stats["method"]["params"]["importance"] == "future"
    # three chunks of two demonstrations: each probe has the chunk's two rows (group 0) and the next one (group 1)
    assert len(built) == 3
    for probe in built:
        assert probe.segment.segments.unique().tolist() == [0, 1, 2]
        assert sorted(probe.scored_groups.unique().tolist()) == [0, 1]
    for chunk in memory.stats["build"]["chunks"]:
        assert max(chunk["js"]) <= chunk["bound"] + 1e-9


def test_distinct_answers_probe_takes_rows_of_other_answers_first():
    answers = ["a", "a", "a", "a", "b", "a", "c", "a", "a", "b"]
    method = EmlocMethod(probe="future", probe_size=3, distinct_answers=True)
    # after demonstrations 0-1: row 2 (a), then the next rows of another answer, 4 (b) and 6 (c)
    assert method.probe_demos(10, [0, 1], answers) == [2, 4, 6]
    # after 6-7 come 8 (a), 9 (b), then 0-5 (a and b only: c, row 6, is in the chunk): the third row is the next in order
    assert method.probe_demos(10, [6, 7], answers) == [8, 9, 0]
    # one answer everywhere: the plain future rows
    assert method.probe_demos(10, [0, 1], ["a"] * 10) == EmlocMethod(probe="future", probe_size=3).probe_demos(10, [0, 1])
    heldout = EmlocMethod(probe="heldout", probe_size=2, distinct_answers=True).probe_demos(10, [0, 1], answers)
    assert len(heldout) == 2 and len({answers[i] for i in heldout}) == 2 and not set(heldout) & {0, 1}
    assert "distinct_answers" not in EmlocMethod().params()
    assert EmlocMethod(probe="future", distinct_answers=True).params()["distinct_answers"] is True
    with pytest.raises(ValueError, match="answers"):
        method.probe_demos(10, [0, 1])
    with pytest.raises(ValueError, match="probe='self'"):
        EmlocMethod(distinct_answers=True)


def test_first_position_scores_one_position_per_probe_row(tiny):
    from modeling_emloc import Probe

    model, processor, _ = tiny("llama")
    builder, memory, chunk, rows = _first_chunk_and_probe_rows(model, processor, "llama", 4)
    every = Probe(builder, memory, chunk, rows, positions="answer")
    first = Probe(builder, memory, chunk, rows, positions="first")
    # the rows are packed into one, each its own segment: count the scored positions per segment
    def scored_rows(probe):
        return probe.segment.segments[probe.predicting]

    assert scored_rows(first).tolist() == [0, 1]
    assert every.predicting.sum() > first.predicting.sum()
    # the first scored position of each row is the same under both rules, and so is its reference distribution
    # (positions within the row: "first" trims each row after that position, so the packed rows start elsewhere)
    for row in range(2):
        every_first = every.segment.text_positions[every.predicting][scored_rows(every) == row][0]
        assert every_first == first.segment.text_positions[first.predicting][row]
    torch.testing.assert_close(first.reference[0], every.reference[0])
    # over choices: the reference is a distribution over the choices' first tokens
    choice_ids = torch.tensor([5, 9, 17])
    over = Probe(builder, memory, chunk, rows, positions="first", choice_ids=choice_ids)
    assert over.reference.shape == (2, 3)
    # the head is applied to those tokens only: the same distribution as the whole vocabulary's, renormalised
    torch.testing.assert_close(over.reference, torch.log_softmax(first.reference[:, choice_ids], dim=-1))
    torch.testing.assert_close(over.reference.exp().sum(-1), torch.ones(2))
    assert over.divergence(0, {}) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2-vl"])
def test_packed_probe_rows_answer_as_each_row_alone(tiny, family):
    """The probe packs its rows into one (each its own segment, at its own positions): each row's reference
    distributions are those of the row fed alone after the memory and the whole chunk, and a pass with nothing pruned
    diverges by nothing."""
    from memory_emloc import TaskMemory
    from modeling_emloc import EmlocCache, Probe, answer_rows, memory_prefix, run_layers

    model, processor, _ = tiny(family)
    builder, memory, chunk, rows = _first_chunk_and_probe_rows(model, processor, family, 5)
    probe = Probe(builder, memory, chunk, rows, positions="answer")
    assert probe.segment.hidden.shape[0] == 1 and probe.segment.segments.unique().tolist() == [0, 1, 2]
    whole = TaskMemory([layer.append(chunk.kept(index, None)) for index, layer in enumerate(memory.layers)],
                       chunk.next_position)
    alone = []
    for row in rows:
        batch, predicting = answer_rows(processor, [row])
        segment = model._segment(batch, start_position=chunk.next_position)
        hidden, _ = run_layers(model.family, segment, EmlocCache(memory_prefix(whole), 1))
        alone.append(torch.log_softmax(model.family.logits(hidden[predicting.to(hidden.device)]).float(), dim=-1))
    torch.testing.assert_close(probe.reference, torch.cat(alone), atol=1e-4, rtol=1e-4)
    assert probe.divergence(0, {}) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2-vl"])
def test_the_head_on_a_few_tokens_gives_their_columns_of_the_whole_vocabulary(tiny, family, monkeypatch):
    """`family.logits(hidden, vocab_ids)` reads only those rows of the head (final norm and soft-capping included)."""
    model, _, _ = tiny(family)
    if family == "gemma3":  # Gemma 2's soft-capping, which a Gemma 3 config may also set
        monkeypatch.setattr(model.family.text_config, "final_logit_softcapping", 1.0)
    hidden = torch.randn(2, 5, model.family.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([7, 3, 11])
    some = model.family.logits(hidden, ids)
    assert some.shape == (2, 5, 3)
    torch.testing.assert_close(some, model.family.logits(hidden)[..., ids])

    class WrappedHead(torch.nn.Module):  # e.g. an adapter around the head: its rows are not the head's output
        def __init__(self, inner):
            super().__init__()
            self.inner, self.weight = inner, inner.weight

        def forward(self, x):
            return 2.0 * self.inner(x)

    base, head = model.family.model, model.family.model.lm_head
    base.lm_head = WrappedHead(head)  # by hand: monkeypatch would delete a submodule it cannot find in __dict__
    try:
        torch.testing.assert_close(model.family.logits(hidden, ids), model.family.logits(hidden)[..., ids])
        assert not torch.allclose(model.family.logits(hidden, ids), some)
    finally:
        base.lm_head = head


def test_choices_divergence_uses_the_first_tokens_of_the_choices(tiny):
    from modeling_emloc import MemoryBuilder

    model, processor, _ = tiny("llama")
    demos = demos_for("llama", 4)
    builder = MemoryBuilder(model, processor, EmlocMethod(over="choices"), chunk_size=2, pool_width=5)
    builder.context = processor.encode_context(demos)
    ids = builder.method.choice_ids(builder, [0, 1])
    choices = builder.context.examples[0].choices  # iris: setosa, versicolor, virginica
    assert ids.tolist() == sorted({int(processor.encode_choice(c)[0]) for c in choices})
    # a row without choices: compare whole distributions
    builder.context.examples[1].choices = None
    assert builder.method.choice_ids(builder, [0, 1]) is None
    memory = _build(model, processor, over="choices", delta=0.001)
    assert memory.stats["method"]["params"]["over"] == "choices"


@pytest.mark.parametrize("group", [2, 3])
def test_layer_groups_share_one_decision_and_cost_fewer_evaluations(tiny, group):
    model, processor, _ = tiny("llama")
    layers = model.family.num_layers
    each = _build(model, processor, delta=0.002)
    grouped = _build(model, processor, delta=0.002, layer_group=group)
    for chunk in grouped.stats["build"]["chunks"]:
        top = layers - 1
        while top >= 0:
            bottom = max(0, top - group + 1)
            assert len(set(chunk["ratios"][bottom:top + 1])) == 1
            top = bottom - 1
    assert sum(c["probe_evaluations"] for c in grouped.stats["build"]["chunks"]) <= \
        sum(c["probe_evaluations"] for c in each.stats["build"]["chunks"])
    assert grouped.stats["method"]["params"]["layer_group"] == group


def test_layer_group_of_one_is_the_paper(tiny):
    model, processor, _ = tiny("llama")
    paper = _build(model, processor, delta=0.002)
    same = _build(model, processor, delta=0.002, layer_group=1)
    assert paper.tokens_per_layer() == same.tokens_per_layer()
    for a, b in zip(paper.layers, same.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=0, rtol=0)
    assert paper.stats["method"] == same.stats["method"]


def test_a_refined_group_at_the_floor_costs_one_run_and_a_failing_group_is_decided_layer_by_layer(tiny):
    model, processor, _ = tiny("llama")
    layers = model.family.num_layers
    groups = [list(range(max(0, top - 1), top + 1)) for top in range(layers - 1, -1, -2)]  # top first, as decided
    # a bound everything meets: the paper's rule ends at the floor everywhere, a group of two in one run from its bottom
    loose = _build(model, processor, delta=1e9, layer_group=2, refine=True)
    searched = _build(model, processor, delta=1e9)
    _same_bytes(loose, searched)
    assert all(c["probe_evaluations"] == len(groups) for c in loose.stats["build"]["chunks"])
    assert loose.stats["method"]["params"]["refine"] is True and "refine" not in searched.stats["method"]["params"]
    # a bound nothing meets: each group fails at the floor, then its layers are searched one by one and kept whole,
    # as the paper's rule keeps them, at one run more per group than the paper's search
    strict = _build(model, processor, delta=-1.0, layer_group=2, refine=True)
    paper_strict = _build(model, processor, delta=-1.0)
    _same_bytes(strict, paper_strict)
    for a, b in zip(strict.stats["build"]["chunks"], paper_strict.stats["build"]["chunks"]):
        assert a["ratios"] == b["ratios"] == [1.0] * layers
        assert a["probe_evaluations"] == b["probe_evaluations"] + sum(len(group) > 1 for group in groups)
    # in between: a group is either accepted at the floor in one run (both layers share its JS, within the bound) or
    # refined, one run more than the paper's per-layer search of its layers (each layer's JS within the bound, or kept)
    grid = (0.1, 0.2, 0.5)
    bound = 2e-5  # on this tiny model: where some groups fail at the floor and others pass
    middle = _build(model, processor, count=8, delta=bound, layer_group=2, refine=True)
    refined = 0
    for chunk in middle.stats["build"]["chunks"]:
        runs = 0
        for group in groups:
            ratios, js = [chunk["ratios"][l] for l in group], [chunk["js"][l] for l in group]
            if len(group) == 1:  # a lone layer is searched as the paper does
                runs += grid.index(ratios[0]) + 1 if ratios[0] in grid else len(grid)
                continue
            if ratios == [0.1, 0.1] and js[0] == js[1] and js[0] <= bound:
                runs += 1
                continue
            refined += 1
            runs += 1 + sum(grid.index(r) + 1 if r in grid else len(grid) for r in ratios)
            assert all(j <= bound or r == 1.0 for r, j in zip(ratios, js))
        assert chunk["probe_evaluations"] == runs
    pairs = sum(len(group) > 1 for group in groups) * len(middle.stats["build"]["chunks"])
    assert 0 < refined < pairs  # both kinds of group occur


def test_options_are_checked():
    for option, value in (("protect", "all"), ("positions", "last"), ("over", "labels"), ("probe", "next"),
                          ("reuse", "always")):
        with pytest.raises(ValueError, match=f"{option} must be one of"):
            EmlocMethod(**{option: value})
    with pytest.raises(ValueError, match="layer_group"):
        EmlocMethod(layer_group=0)
    for options in ({"refine": True}, {"refine": True, "layer_group": 2, "budget": 0.2},
                    {"refine": True, "layer_group": 2, "search": "bisect"}):
        with pytest.raises(ValueError, match="refine"):
            EmlocMethod(**options)


def test_the_default_method_is_the_chosen_preset_and_records_every_option(tiny):
    from modeling_emloc import COMPRESSION_METHODS, EmlocQueryMethod

    model, processor, _ = tiny("llama")
    assert model.config.method == "emloc-query" and COMPRESSION_METHODS["emloc-query"] is EmlocQueryMethod
    memory = model.build_memory(demos_for("llama", 6), processor=processor, chunk_size=2)
    method = memory.stats["method"]
    assert method["name"] == "emloc-query"
    assert method["params"] == {**EmlocQueryMethod().params(), "chunk_size": 2}
    assert {"probe", "over", "layer_group", "protect", "positions", "delta", "ratios"} <= set(method["params"])
    # the default's bound is relative to what removing each chunk does to its probe rows
    assert method["params"]["relative"] == 0.5
    for chunk in memory.stats["build"]["chunks"]:
        assert chunk["bound"] == pytest.approx(min(method["params"]["delta"], 0.5 * chunk["removed_js"]), rel=1e-3,
                                               abs=1e-9)
    # the config's delta / ratios / probe set the paper rule only
    paper = model.build_memory(demos_for("llama", 4), processor=processor, method="emloc", chunk_size=2)
    assert paper.stats["method"]["params"] == {"delta": model.config.delta, "ratios": list(model.config.ratios),
                                               "probe": model.config.probe, "chunk_size": 2}
    # a preset option can be overridden like any other
    override = model.build_memory(demos_for("llama", 4), processor=processor, chunk_size=2, layer_group=1)
    assert override.stats["method"]["params"]["layer_group"] == 1


def test_reuse_verify_keeps_the_previous_decisions_when_they_pass_and_searches_when_they_fail(tiny):
    model, processor, _ = tiny("llama")
    layers = model.family.num_layers
    # a bound everything meets: the first chunk searches (ratios[0] everywhere), every later one reuses it in one run
    loose = _build(model, processor, count=8, delta=1e9, reuse="verify")
    chunks = loose.stats["build"]["chunks"]
    assert [c["reused"] for c in chunks] == [False, True, True, True]
    assert all(c["probe_evaluations"] == 1 and c["probe_layer_passes"] == layers for c in chunks[1:])
    assert all(c["ratios"] == chunks[0]["ratios"] for c in chunks)
    searched = _build(model, processor, count=8, delta=1e9)
    for a, b in zip(loose.layers, searched.layers):  # the same ratios on the same importance: the same tokens
        torch.testing.assert_close(a.keys, b.keys, atol=0, rtol=0)
    assert loose.stats["method"]["params"]["reuse"] == "verify" and "reuse" not in searched.stats["method"]["params"]
    # a bound nothing meets: every chunk is searched (and keeps everything, as the paper's rule does)
    strict = _build(model, processor, count=8, delta=-1.0, reuse="verify")
    assert [c["reused"] for c in strict.stats["build"]["chunks"]] == [False] * 4
    # in between, a reused chunk met the bound with every layer pruned at once
    middle = _build(model, processor, count=8, delta=0.002, reuse="verify")
    for chunk in middle.stats["build"]["chunks"]:
        assert not chunk["reused"] or max(chunk["js"]) <= 0.002


def test_reuse_floor_tries_the_floor_everywhere_first_and_searches_when_it_fails(tiny):
    model, processor, _ = tiny("llama")
    layers = model.family.num_layers

    # a bound everything meets: the search ends at the floor everywhere, which the first run already is
    loose = _build(model, processor, count=8, delta=1e9, reuse="floor")
    chunks = loose.stats["build"]["chunks"]
    assert [c["reused"] for c in chunks] == [True] * 4
    assert all(c["probe_evaluations"] == 1 and c["probe_layer_passes"] == layers for c in chunks)
    assert all(c["ratios"] == [0.1] * layers for c in chunks)
    searched = _build(model, processor, count=8, delta=1e9)
    _same_bytes(loose, searched)
    assert sum(c["probe_evaluations"] for c in searched.stats["build"]["chunks"]) == 4 * layers
    assert loose.stats["method"]["params"]["reuse"] == "floor"
    # a bound nothing meets: the floor fails, and the chunk gets the search's decisions (here: kept whole)
    strict = _build(model, processor, count=8, delta=-1.0, reuse="floor")
    assert [c["reused"] for c in strict.stats["build"]["chunks"]] == [False] * 4
    _same_bytes(strict, _build(model, processor, count=8, delta=-1.0))
    # in between, an accepted floor met the bound with every layer pruned at once, and no chunk searched twice
    middle = _build(model, processor, count=8, delta=0.002, reuse="floor", ratios=(0.2, 0.5))
    for chunk in middle.stats["build"]["chunks"]:
        if chunk["reused"]:
            assert chunk["ratios"] == [0.2] * layers and chunk["js"][0] <= 0.002
        else:
            assert chunk["probe_evaluations"] <= 1 + 2 * layers


def test_reference_full_compares_with_the_uncompressed_context(tiny, tmp_path):
    """`reference="full"`: the rows' reference is the context so far unpruned. Where the memory is that context (one
    chunk, or a bound nothing meets) it is the paper's reference, to the byte; once chunks are pruned, the memory's
    drift from it shows before the next chunk is pruned, and a resumed build rebuilds the context it compares with."""
    from test_build_checkpoint import Stop, _stop_after as stop_after

    model, processor, _ = tiny("llama")

    one_chunk = _build(model, processor, count=2, delta=0.002, reference="full")
    _same_bytes(one_chunk, _build(model, processor, count=2, delta=0.002))
    assert one_chunk.stats["build"]["chunks"][0]["unpruned_js"] < 1e-6  # the same distributions (float rounding)
    assert one_chunk.stats["method"]["params"]["reference"] == "full"
    # nothing passes: every chunk is kept whole, the memory is the full context and never drifts from it
    strict = _build(model, processor, count=8, delta=-1.0, reference="full")
    _same_bytes(strict, _build(model, processor, count=8, method="full"))
    assert all(c["unpruned_js"] < 1e-6 for c in strict.stats["build"]["chunks"])
    # everything passes at the floor: later chunks see a memory that has drifted from the full context
    loose = _build(model, processor, count=8, delta=1e9, reference="full")
    drift = [c["unpruned_js"] for c in loose.stats["build"]["chunks"]]
    assert drift[0] < 1e-6 and all(d > 5e-6 for d in drift[1:])  # this tiny model's JS are small
    # in between, every pruned layer met the bound against the full context; here the drift makes later chunks keep
    # more than the paper's reference does at the same bound
    middle = _build(model, processor, count=8, delta=3e-5, reference="full")
    for chunk in middle.stats["build"]["chunks"]:
        for ratio, js in zip(chunk["ratios"], chunk["js"]):
            assert ratio == 1.0 or js <= 3e-5
    paper_reference = _build(model, processor, count=8, delta=3e-5)
    assert middle.stats["totals"]["kept_ratio"] > paper_reference.stats["totals"]["kept_ratio"]
    demos, params = demos_for("llama", 8), {"method": "emloc", "delta": 3e-5, "reference": "full", "chunk_size": 2}
    with pytest.raises(Stop):
        model.build_memory(demos, processor=processor, checkpoint_dir=tmp_path / "c", progress=stop_after(2), **params)
    _same_bytes(model.build_memory(demos, processor=processor, checkpoint_dir=tmp_path / "c", **params), middle)


def test_reuse_verify_resumes_to_the_same_bytes(tiny, tmp_path):
    """The previous chunk's decisions come back from the checkpoint, so a resumed build reuses what an unbroken one
    does."""

    from test_build_checkpoint import Stop, _stop_after as stop_after

    model, processor, _ = tiny("llama")
    demos, params = demos_for("llama", 8), {"method": "emloc", "delta": 1e9, "reuse": "verify", "chunk_size": 2}
    with pytest.raises(Stop):
        model.build_memory(demos, processor=processor, checkpoint_dir=tmp_path / "c", progress=stop_after(1), **params)
    resumed = model.build_memory(demos, processor=processor, checkpoint_dir=tmp_path / "c", **params)
    unbroken = model.build_memory(demos, processor=processor, **params)
    assert [c["reused"] for c in resumed.stats["build"]["chunks"]] == [False, True, True, True]
    for a, b in zip(resumed.layers, unbroken.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=0, rtol=0)
        torch.testing.assert_close(a.values, b.values, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2-vl"])
@pytest.mark.parametrize("positions", ["answer", "first"])
def test_rerunning_only_the_scored_positions_is_exact_where_nothing_below_changes(tiny, family, positions):
    """`rerun="scored"` against the paper's whole-row rerun: the same JS at the top layer (a layer's own pruning does not
    change the keys and values it is given), zero JS with nothing pruned from any layer, and a divergence it still sees
    when every layer is pruned (there it leaves out the rows' other tokens, so it may differ from the whole rows')."""
    from modeling_emloc import Probe

    model, processor, _ = tiny(family)
    builder, memory, chunk, rows = _first_chunk_and_probe_rows(model, processor, family, 5)
    whole = Probe(builder, memory, chunk, rows, positions=positions)
    scored = Probe(builder, memory, chunk, rows, positions=positions, rerun="scored")
    torch.testing.assert_close(scored.reference, whole.reference)
    answers = chunk.token_types == ANSWER
    top = model.family.num_layers - 1
    for ratio in (0.1, 0.5):
        kept = {top: top_tokens(whole.importance[top], ratio, answers)}
        assert scored.divergence(top, kept) == pytest.approx(whole.divergence(top, kept), abs=1e-6)
    for layer in range(top + 1):
        assert scored.divergence(layer, {}) == pytest.approx(0.0, abs=1e-6)
    pruned = {layer: top_tokens(whole.importance[layer], 0.1, answers) for layer in range(top + 1)}
    assert scored.divergence(0, pruned) > 0 and whole.divergence(0, pruned) > 0


def test_a_scored_rerun_build_records_the_option_and_decides_the_first_top_layer_as_the_paper(tiny):
    model, processor, _ = tiny("llama")
    paper = _build(model, processor, delta=0.002)
    scored = _build(model, processor, delta=0.002, rerun="scored")
    assert scored.stats["method"]["params"]["rerun"] == "scored" and "rerun" not in paper.stats["method"]["params"]
    first_paper, first_scored = paper.stats["build"]["chunks"][0], scored.stats["build"]["chunks"][0]
    assert first_scored["ratios"][-1] == first_paper["ratios"][-1]
    assert first_scored["js"][-1] == pytest.approx(first_paper["js"][-1], abs=1e-6)
    for chunk in scored.stats["build"]["chunks"]:
        assert all(js <= 0.002 for js, ratio in zip(chunk["js"], chunk["ratios"]) if ratio < 1.0)
    with pytest.raises(ValueError, match="rerun must be one of"):
        EmlocMethod(rerun="some")


@pytest.mark.parametrize("placement", ["probe_at", "sliding"])
def test_probe_rows_placed_as_a_query_see_a_distant_chunk_only_through_the_global_layers(tiny, placement):
    """Rows further than the sliding window from the chunk (`probe_at="end"`: placed there; `sliding="query"`: right
    after the chunk, but windowed as from there) cannot see it in the sliding layers: pruning those leaves their answers
    unchanged, while rows right after the chunk (the paper) can; pruning a global layer still changes them."""
    from modeling_emloc import Probe

    model, processor, _ = tiny("gemma3")
    sliding = [layer for layer in range(model.family.num_layers) if model.family.sliding_window(layer) is not None]
    global_layers = [layer for layer in range(model.family.num_layers) if layer not in sliding]
    assert sliding and global_layers
    builder, memory, chunk, rows = _first_chunk_and_probe_rows(model, processor, "gemma3", 5)
    far = chunk.next_position + 4 * model.family.sliding_window(sliding[0])
    near_probe = Probe(builder, memory, chunk, rows)
    if placement == "probe_at":
        far_probe = Probe(builder, memory, chunk, rows, start_position=far)
    else:
        far_probe = Probe(builder, memory, chunk, rows, window_position=far)
    first_position = int(far_probe.segment.text_positions[far_probe.segment.valid].min())
    assert first_position == (far if placement == "probe_at" else chunk.next_position)
    answers = chunk.token_types == ANSWER

    def prune(probe, layers):
        return probe.divergence(0, {layer: top_tokens(probe.importance[layer], 0.1, answers) for layer in layers})

    hidden_from_far, seen_near, global_far = prune(far_probe, sliding), prune(near_probe, sliding), prune(far_probe, global_layers)
    assert hidden_from_far < 1e-6  # float rounding only: the masked keys change the reduction, not the result
    assert seen_near > 10 * hidden_from_far and global_far > 10 * hidden_from_far


@pytest.mark.parametrize("option", [{"probe_at": "end"}, {"sliding": "query"}])
def test_a_build_probing_as_a_query_records_the_option_and_keeps_every_decision_within_delta(tiny, option):
    model, processor, _ = tiny("gemma3")
    memory = _build(model, processor, family="gemma3", count=8, delta=0.002, probe="future", **option)
    [(name, value)] = option.items()
    assert memory.stats["method"]["params"][name] == value
    for chunk in memory.stats["build"]["chunks"]:
        assert all(js <= 0.002 for js, ratio in zip(chunk["js"], chunk["ratios"]) if ratio < 1.0)
    assert name not in _build(model, processor, family="gemma3", count=4).stats["method"]["params"]
    with pytest.raises(ValueError, match=f"{name} must be one of"):
        EmlocMethod(**{name: "elsewhere"})


def test_windowing_the_probe_as_a_query_changes_nothing_without_sliding_windows(tiny):
    """The default windows its probe rows as a query (`sliding="query"`); on llama, which has no sliding windows, that
    is the same memory, byte for byte, as the paper's windowing."""
    model, processor, _ = tiny("llama")
    assert model.family.sliding_window(0) is None
    default = model.build_memory(demos_for("llama", 6), processor=processor, chunk_size=2)
    assert default.stats["method"]["params"]["sliding"] == "query"
    probe = model.build_memory(demos_for("llama", 6), processor=processor, chunk_size=2, sliding="probe")
    for a, b in zip(default.layers, probe.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=0, rtol=0)
        torch.testing.assert_close(a.positions, b.positions, atol=0, rtol=0)


def test_a_relative_bound_is_the_smaller_of_delta_and_a_share_of_removing_the_chunk(tiny):
    model, processor, _ = tiny("llama")
    memory = _build(model, processor, delta=0.002, probe="future", relative=0.5)
    assert memory.stats["method"]["params"]["relative"] == 0.5
    for chunk in memory.stats["build"]["chunks"]:
        assert chunk["removed_js"] > 0
        assert chunk["bound"] == pytest.approx(min(0.002, 0.5 * chunk["removed_js"]), rel=1e-3, abs=1e-9)
        assert all(js <= chunk["bound"] for js, ratio in zip(chunk["js"], chunk["ratios"]) if ratio < 1.0)
    # a share so large that the bound is always delta: the paper's decisions, byte for byte
    loose = _build(model, processor, delta=0.002, probe="future", relative=1e9)
    fixed = _build(model, processor, delta=0.002, probe="future")
    assert loose.tokens_per_layer() == fixed.tokens_per_layer()
    for a, b in zip(loose.layers, fixed.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=0, rtol=0)
    # a share so small that no pruning passes: every chunk is kept whole
    strict = _build(model, processor, delta=0.002, probe="future", relative=1e-9)
    assert strict.tokens_per_layer() == _build(model, processor, method="full").tokens_per_layer()
    with pytest.raises(ValueError, match="relative"):
        EmlocMethod(relative=0.0)


def test_the_most_recent_chunks_are_kept_whole_after_the_same_earlier_decisions(tiny):
    model, processor, _ = tiny("llama")
    spans = _chunks(processor, "llama", 6, 2)
    last = sum(len(s) for s in spans[-1])
    compressed = _build(model, processor, delta=0.002, probe="future", probe_size=2)
    # `recent=1` reaches into the last chunk only: that chunk is kept whole in every layer, without a probe
    recent = _build(model, processor, delta=0.002, probe="future", probe_size=2, recent=1)
    assert recent.stats["method"]["params"]["recent"] == 1
    chunks = recent.stats["build"]["chunks"]
    assert chunks[-1] == {"ratios": [1.0] * model.family.num_layers, "recent": True}
    assert chunks[:-1] == compressed.stats["build"]["chunks"][:-1]
    assert all(ratio < 1.0 for ratio in compressed.stats["build"]["chunks"][-1]["ratios"])  # it would have been pruned
    # the earlier chunks' bytes are the plain build's; the last chunk follows them whole
    for a, b in zip(recent.layers, compressed.layers):
        before = a.num_tokens - last
        assert a.num_tokens > b.num_tokens
        torch.testing.assert_close(a.keys[:, :before], b.keys[:, :before], atol=0, rtol=0)
        assert (a.token_types[:, before:] == torch.cat([s.token_types for s in spans[-1]])).all()
    # the chunks holding the last `recent` demonstrations: 3 of 6 reach into the middle chunk too
    wider = _build(model, processor, delta=0.002, probe="future", probe_size=2, recent=3)
    assert [c.get("recent", False) for c in wider.stats["build"]["chunks"]] == [False, True, True]
    with pytest.raises(ValueError, match="recent"):
        EmlocMethod(recent=-1)


def test_importance_from_the_chunks_own_demonstrations(tiny):
    model, processor, _ = tiny("llama")
    # with the paper's self-probe the chunk's own rows are the probe rows: the same memory, byte for byte
    paper, own = _build(model, processor), _build(model, processor, importance="chunk")
    assert own.stats["method"]["params"]["importance"] == "chunk" and "importance" not in paper.stats["method"]["params"]
    for a, b in zip(paper.layers, own.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=0, rtol=0)
    # every layer passes at one ratio (delta that large): the kept tokens are then the ranking's top half, and a future
    # probe with the chunk's own importance keeps what the self-probe keeps, not what the future rows attend to
    passing = {"delta": 1e9, "ratios": (0.5,)}
    future_own = _build(model, processor, probe="future", importance="chunk", **passing)
    self_probe = _build(model, processor, probe="self", **passing)
    future = _build(model, processor, probe="future", **passing)
    for a, b in zip(future_own.layers, self_probe.layers):
        torch.testing.assert_close(a.positions, b.positions, atol=0, rtol=0)
        torch.testing.assert_close(a.keys, b.keys, atol=0, rtol=0)
    assert any(not torch.equal(a.positions, b.positions) for a, b in zip(future_own.layers, future.layers))
    with pytest.raises(ValueError, match="importance must be one of"):
        EmlocMethod(importance="keys")


def test_a_bfloat16_probe_judges_in_bfloat16_and_keeps_the_models_own_keys_and_values(tiny):
    model, processor, _ = tiny("llama")
    assert model.model.dtype == torch.float32
    seen = set()
    hook = model.family.layers[0].mlp.register_forward_hook(lambda module, args, output: seen.add(output.dtype))
    try:
        # a bound every candidate meets at the only ratio, 1.0: every chunk is kept whole, so the memory is exactly
        # what the chunks' prefills wrote — in float32, as the full context's
        whole = _build(model, processor, probe_dtype="bfloat16", delta=1e9, ratios=(1.0,))
    finally:
        hook.remove()
    assert seen == {torch.float32, torch.bfloat16}  # the prefills in the model's precision, the probe passes not
    full = _build(model, processor, method="full")
    _same_bytes(whole, full)
    assert whole.stats["method"]["params"]["probe_dtype"] == "bfloat16"
    # a real search: every pruned layer met the bound as the bfloat16 probe measured it, and the first chunk's kept
    # keys and values are float32 rows of its prefill (the full memory's at the kept positions, bit for bit; later
    # chunks are prefilled on the pruned memory)
    pruned = _build(model, processor, probe_dtype="bfloat16", delta=0.002, probe="future", probe_size=2)
    first_chunk = sum(len(span.input_ids) for span in _chunks(processor, "llama", 6, 2)[0])
    assert any(ratio < 1.0 for chunk in pruned.stats["build"]["chunks"] for ratio in chunk["ratios"])
    for chunk in pruned.stats["build"]["chunks"]:
        assert all(js <= 0.002 for js, ratio in zip(chunk["js"], chunk["ratios"]) if ratio < 1.0)
    for kept, all_tokens in zip(pruned.layers, full.layers):
        assert kept.keys.dtype == torch.float32
        for head in range(kept.keys.shape[0]):
            first = kept.positions[head] < first_chunk
            rows = (all_tokens.positions[head][:, None] == kept.positions[head][first][None]).nonzero()[:, 0]
            torch.testing.assert_close(kept.keys[head][first], all_tokens.keys[head, rows], atol=0, rtol=0)
            torch.testing.assert_close(kept.values[head][first], all_tokens.values[head, rows], atol=0, rtol=0)
    # the default's record names no probe precision while it is the model's own
    assert "probe_dtype" not in _build(model, processor, method="emloc-query").stats["method"]["params"]
    with pytest.raises(ValueError, match="probe_dtype"):
        EmlocMethod(probe_dtype="float16")


def test_layers_no_probe_row_can_read_are_decided_without_a_run_and_the_memory_is_the_same(tiny):
    """`skip_unseen` (on by default): rows windowed as a query cannot read an early chunk in the sliding-window layers,
    so those layers are decided without a probe run, with the JS of the layers above. The decisions and the memory
    bytes are those of evaluating every candidate; only the probe's work shrinks. Rows right after the chunk (the
    paper's) read it everywhere, so nothing is skipped for them."""
    from modeling_emloc import Probe

    model, processor, _ = tiny("gemma3")
    sliding = [layer for layer in range(model.family.num_layers) if model.family.sliding_window(layer) is not None]
    builder, memory, chunk, rows = _first_chunk_and_probe_rows(model, processor, "gemma3", 5)
    far = chunk.next_position + 4 * model.family.sliding_window(sliding[0])
    assert all(Probe(builder, memory, chunk, rows).sees_chunk(layer) for layer in range(model.family.num_layers))
    as_query = Probe(builder, memory, chunk, rows, window_position=far)
    assert [layer for layer in range(model.family.num_layers) if not as_query.sees_chunk(layer)] == sliding

    demos = demos_for("gemma3", 12)
    skipped = model.build_memory(demos, processor=processor, chunk_size=2, delta=0.002)
    evaluated = model.build_memory(demos, processor=processor, chunk_size=2, delta=0.002, skip_unseen=False)
    _same_bytes(skipped, evaluated)
    skipped_chunks, evaluated_chunks = skipped.stats["build"]["chunks"], evaluated.stats["build"]["chunks"]
    assert [c["ratios"] for c in skipped_chunks] == [c["ratios"] for c in evaluated_chunks]
    for fast, slow in zip(skipped_chunks, evaluated_chunks):
        assert fast["js"] == pytest.approx(slow["js"], abs=1e-6)
    runs = [(c["probe_evaluations"], c["probe_layer_passes"]) for c in skipped_chunks]
    all_runs = [(c["probe_evaluations"], c["probe_layer_passes"]) for c in evaluated_chunks]
    assert all(fast <= slow for fast, slow in zip(runs, all_runs))
    assert runs[0] < all_runs[0] and runs[-1] == all_runs[-1]  # the first chunk is far from the end, the last is not
    assert "skip_unseen" not in skipped.stats["method"]["params"]
    assert evaluated.stats["method"]["params"]["skip_unseen"] is False

    def evaluations(memory):
        return sum(chunk["probe_evaluations"] for chunk in memory.stats["build"]["chunks"])

    # rows placed where the queries start, and variants judged against the uncompressed context (whose unpruned JS is
    # not 0): the same memory either way, for fewer runs
    for options in ({"probe_at": "end", "sliding": "probe"}, {"reference": "full"}):
        fast = model.build_memory(demos, processor=processor, chunk_size=2, delta=0.002, **options)
        slow = model.build_memory(demos, processor=processor, chunk_size=2, delta=0.002, skip_unseen=False, **options)
        _same_bytes(fast, slow)
        assert evaluations(fast) < evaluations(slow)
