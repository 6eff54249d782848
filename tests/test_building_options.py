"""The build options that repair the paper's rule at small scale, each against what it promises, on tiny models; the
options the benchmark rejected are refused by name."""

import pytest
import torch

from building_emloc import COMPRESSION_METHODS, EmlocMethod, EmlocQueryMethod, MemoryBuilder, Probe, top_tokens
from conftest import demos_for
from processing_emloc import EncodedSpan
from rendering_emloc import ANSWER


def _build(model, processor, family="llama", count=6, **kwargs):
    kwargs.setdefault("chunk_size", 2)
    kwargs.setdefault("method", "emloc")
    kwargs.setdefault("calibration_rows", 0)
    kwargs.setdefault("validation", 0)
    return model.build_memory(demos_for(family, count), processor=processor, **kwargs)


def _same_bytes(a, b):
    """The two memories hold the same tokens per layer and the same keys and values, bit for bit."""
    assert a.tokens_per_layer() == b.tokens_per_layer()
    for x, y in zip(a.layers, b.layers):
        torch.testing.assert_close(x.keys, y.keys, atol=0, rtol=0)
        torch.testing.assert_close(x.values, y.values, atol=0, rtol=0)


def _first_chunk_and_probe_rows(model, processor, family, count):
    """A builder over `count` demonstrations, the empty memory, the first chunk (prefix + two demonstrations) prefilled on
    it, and the remaining demonstrations as probe rows."""
    builder = MemoryBuilder(model.runner, processor, EmlocMethod(), chunk_size=2, pool_width=5)
    builder.context = processor.encode_context(demos_for(family, count))
    memory = model.runner.empty_memory()
    chunk = model.runner.prefill(memory, EncodedSpan.concat([builder.context.prefix, *builder.context.demos[:2]]))
    return builder, memory, chunk, builder.context.demos[2:count]


def test_future_probe_uses_demonstrations_no_memory_has_seen():
    method = EmlocMethod(probe="future", probe_size=3)
    assert method.probe_demos(10, [0, 1]) == [2, 3, 4]
    assert method.probe_demos(10, [4, 5]) == [6, 7, 8]
    # the last chunk has no successors: it borrows the first demonstrations
    assert method.probe_demos(10, [8, 9]) == [0, 1, 2]
    assert method.probe_demos(10, [6, 7]) == [8, 9, 0]
    assert method.probe_demos(2, [0, 1]) == [0, 1]  # no other demonstration: the chunk's own
    assert EmlocMethod(probe="self").probe_demos(10, [4, 5]) == [4, 5]


def test_a_choices_probe_scores_each_rows_first_answer_position_over_the_choices(tiny):
    """With `choice_ids` the probe scores one position per row — the one predicting its first answer token, where the
    paper's probe scores it too — over those tokens only: the whole vocabulary's distribution there, renormalised."""
    model, processor, _ = tiny("llama")
    builder, memory, chunk, rows = _first_chunk_and_probe_rows(model, processor, "llama", 4)
    every = Probe(builder, memory, chunk, rows)
    choice_ids = torch.tensor([5, 9, 17])
    over = Probe(builder, memory, chunk, rows, choice_ids=choice_ids)
    # the rows are packed into one, each its own segment: one scored position per segment
    assert over.segment.segments[over.predicting].tolist() == [0, 1]
    assert every.predicting.sum() > over.predicting.sum()
    every_rows = every.segment.segments[every.predicting]
    firsts = torch.stack([(every_rows == row).nonzero()[0, 0] for row in range(2)])
    for row in range(2):  # the same first position, at the same place in the text
        assert every.segment.text_positions[every.predicting][firsts[row]] == over.segment.text_positions[over.predicting][row]
    assert over.reference.shape == (2, 3)
    torch.testing.assert_close(over.reference, torch.log_softmax(every.reference[firsts][:, choice_ids], dim=-1))
    assert over.divergence(0, {}) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2-vl"])
def test_packed_probe_rows_answer_as_each_row_alone(tiny, family):
    """The probe packs its rows into one (each its own segment, at its own positions): each row's reference
    distributions are those of the row fed alone after the memory and the whole chunk, and a pass with nothing pruned
    diverges by nothing."""
    from building_emloc import Probe, answer_rows
    from memory_emloc import TaskMemory
    from running_emloc import EmlocCache, memory_prefix, run_layers

    model, processor, _ = tiny(family)
    builder, memory, chunk, rows = _first_chunk_and_probe_rows(model, processor, family, 5)
    probe = Probe(builder, memory, chunk, rows)
    assert probe.segment.hidden.shape[0] == 1 and probe.segment.segments.unique().tolist() == [0, 1, 2]
    whole = TaskMemory([layer.append(chunk.kept(index, None)) for index, layer in enumerate(memory.layers)],
                       chunk.next_position)
    alone = []
    for row in rows:
        batch, predicting = answer_rows(processor, [row])
        segment = model.runner.segment(batch, start_position=chunk.next_position)
        hidden, _ = run_layers(model.family, segment, EmlocCache(memory_prefix(whole), 1))
        alone.append(torch.log_softmax(model.family.logits(hidden[predicting.to(hidden.device)]).float(), dim=-1))
    torch.testing.assert_close(probe.reference, torch.cat(alone), atol=1e-4, rtol=1e-4)
    assert probe.divergence(0, {}) == pytest.approx(0.0, abs=1e-6)


def test_choices_divergence_uses_the_first_tokens_of_the_choices(tiny):
    model, processor, _ = tiny("llama")
    demos = demos_for("llama", 4)
    builder = MemoryBuilder(model.runner, processor, EmlocMethod(over="choices"), chunk_size=2, pool_width=5)
    builder.context = processor.encode_context(demos)
    ids = builder.method.choice_ids(builder, [0, 1])
    choices = builder.context.examples[0].choices  # iris: setosa, versicolor, virginica
    assert ids.tolist() == sorted({int(processor.encode_choice(c)[0]) for c in choices})
    # a row without choices: compare whole distributions
    builder.context.examples[1].choices = None
    assert builder.method.choice_ids(builder, [0, 1]) is None
    memory = _build(model, processor, over="choices", delta=0.001)
    assert memory.stats["method"]["params"]["over"] == "choices"


def test_probe_rows_windowed_as_a_query_see_a_distant_chunk_only_through_the_global_layers(tiny):
    """Rows right after the chunk but windowed as from far after it (`sliding="query"`) cannot see it in the sliding
    layers: pruning those leaves their answers unchanged, while rows windowed as themselves (the paper) can; pruning a
    global layer still changes them."""
    model, processor, _ = tiny("gemma3")
    sliding = [layer for layer in range(model.family.num_layers) if model.family.sliding_window(layer) is not None]
    global_layers = [layer for layer in range(model.family.num_layers) if layer not in sliding]
    assert sliding and global_layers
    builder, memory, chunk, rows = _first_chunk_and_probe_rows(model, processor, "gemma3", 5)
    far = chunk.next_position + 4 * model.family.sliding_window(sliding[0])
    near_probe = Probe(builder, memory, chunk, rows)
    far_probe = Probe(builder, memory, chunk, rows, window_position=far)
    assert int(far_probe.segment.text_positions[far_probe.segment.valid].min()) == chunk.next_position
    answers = chunk.token_types == ANSWER

    def prune(probe, layers):
        return probe.divergence(0, {layer: top_tokens(probe.importance[layer], 0.1, answers) for layer in layers})

    hidden_from_far, seen_near, global_far = prune(far_probe, sliding), prune(near_probe, sliding), prune(far_probe, global_layers)
    assert hidden_from_far < 1e-6  # float rounding only: the masked keys change the reduction, not the result
    assert seen_near > 10 * hidden_from_far and global_far > 10 * hidden_from_far


def test_a_build_probing_as_a_query_records_the_option_and_keeps_every_decision_within_delta(tiny):
    model, processor, _ = tiny("gemma3")
    memory = _build(model, processor, family="gemma3", count=8, delta=0.002, probe="future", sliding="query")
    name = "sliding"
    assert memory.stats["method"]["params"][name] == "query"
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


def test_layers_no_probe_row_can_read_are_decided_without_a_run_and_the_memory_is_the_same(tiny):
    """`skip_unseen` (on by default): rows windowed as a query cannot read an early chunk in the sliding-window layers,
    so those layers are decided without a probe run, with the JS of the layers above. The decisions and the memory
    bytes are those of evaluating every candidate; only the probe's work shrinks. Rows right after the chunk (the
    paper's) read it everywhere, so nothing is skipped for them."""
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




def test_options_are_checked():
    for option, value in (("over", "labels"), ("probe", "next"), ("sliding", "elsewhere")):
        with pytest.raises(ValueError, match=f"{option} must be one of"):
            EmlocMethod(**{option: value})
    for options, message in (({"ratios": (0.0, 0.5)}, "ratios"), ({"budget": 1.5}, "budget"),
                             ({"relative": 0.0}, "relative"), ({"probe_size": 0}, "probe_size")):
        with pytest.raises(ValueError, match=message):
            EmlocMethod(**options)


@pytest.mark.parametrize("option", [{"rerun": "scored"}, {"reuse": "verify"}, {"layer_group": 3}, {"refine": True},
                                    {"probe_dtype": "bfloat16"}, {"importance": "rows"}, {"recent": 4},
                                    {"distinct_answers": True}, {"probe": "heldout"}, {"probe": "self+future"},
                                    {"probe_at": "end"}, {"protect": "extra"}, {"positions": "first"},
                                    {"reference": "full"}, {"search": "bisect"}])
def test_a_build_naming_a_retired_option_fails_with_one_line_naming_it(tiny, option):
    """Options the benchmark rejected left the library: naming one (even at what was its paper value) fails before any
    work, in one line that names it and points to the ablation log."""
    model, processor, _ = tiny("llama")
    [(name, value)] = option.items()
    with pytest.raises(ValueError) as raised:
        model.build_memory(demos_for("llama", 3), processor=processor, method="emloc", **option)
    message = str(raised.value)
    assert "\n" not in message and f"{name}={value!r}" in message and "docs/experiments.md" in message
    if name != "probe":  # a retired field is no field any more
        assert name not in EmlocMethod.__dataclass_fields__


def test_the_default_method_is_the_chosen_preset_and_records_every_option(tiny):
    model, processor, _ = tiny("llama")
    assert model.config.method == "emloc-query" and COMPRESSION_METHODS["emloc-query"] is EmlocQueryMethod
    memory = model.build_memory(demos_for("llama", 6), processor=processor, chunk_size=2, calibration_rows=0)
    method = memory.stats["method"]
    assert method["name"] == "emloc-query"
    assert method["params"] == {**EmlocQueryMethod().params(), "chunk_size": 2}
    assert set(method["params"]) == {"delta", "ratios", "probe", "probe_size", "over", "sliding", "relative", "budget",
                                     "chunk_size"}
    assert (method["params"]["probe"], method["params"]["over"], method["params"]["sliding"]) == ("future", "choices", "query")
    # the default's bound is relative to what removing each chunk does to its probe rows
    assert method["params"]["relative"] == 0.5
    for chunk in memory.stats["build"]["chunks"]:
        assert chunk["bound"] == pytest.approx(min(method["params"]["delta"], 0.5 * chunk["removed_js"]), rel=1e-3,
                                               abs=1e-9)
    # the config's delta / ratios / probe set the paper rule only
    paper = model.build_memory(demos_for("llama", 4), processor=processor, method="emloc", chunk_size=2, calibration_rows=0)
    assert paper.stats["method"]["params"] == {"delta": model.config.delta, "ratios": list(model.config.ratios),
                                               "probe": model.config.probe, "chunk_size": 2}
    # a preset option can be overridden like any other
    override = model.build_memory(demos_for("llama", 4), processor=processor, chunk_size=2, relative=None,
                                  calibration_rows=0)
    assert override.stats["method"]["params"]["relative"] is None
