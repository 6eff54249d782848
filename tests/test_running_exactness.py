"""Exactness: a memory with nothing pruned answers exactly as the full rendered conversation (float32, atol 1e-4)."""

import pytest
import torch

from conftest import FAMILIES, demos_for, queries_for
from cache_emloc import EmlocCache
from running_emloc import Segment, memory_prefix, run_layers
from reference import full_inputs, reference_logits

ATOL = 1e-4


def _query_batch(processor, queries):
    batch = processor(queries)
    batch.pop("token_types")
    return batch


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_full_memory_equals_full_context(tiny, family, chunk_size):
    """(a) the whole context as one chunk, (b) chunk by chunk; (d) with images for the Qwen VL families."""
    model, processor, _ = tiny(family)
    demos, query = demos_for(family, 6), queries_for(family, 1)[0]
    memory = model.build_memory(demos, processor=processor, method="full", chunk_size=chunk_size)
    expected = reference_logits(model, processor, demos, query)
    logits = model(**_query_batch(processor, [query]), memory=memory).logits[0]
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    assert memory.next_position == int(full_inputs(processor, demos)["input_ids"].shape[1]) or family.startswith("qwen")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_plain_rendering_is_exact(tiny, family):
    model, processor, _ = tiny(family, "plain")
    demos, query = demos_for(family, 5), queries_for(family, 1)[0]
    memory = model.build_memory(demos, processor=processor, method="full", chunk_size=2)
    expected = reference_logits(model, processor, demos, query)
    torch.testing.assert_close(model(**_query_batch(processor, [query]), memory=memory).logits[0], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_restart_from_any_layer_reproduces_the_logits(tiny, family):
    """(c) running layers l … L-1 from the cached hidden state entering layer l gives the same final logits."""
    model, processor, _ = tiny(family)
    memory = model.build_memory(demos_for(family, 4), processor=processor, method="full", chunk_size=2)
    batch = _query_batch(processor, queries_for(family, 1))
    segment = model.runner.segment(dict(batch), start_position=memory.next_position)
    family_ = model.family
    with torch.no_grad():
        final, entering = run_layers(family_, segment, EmlocCache(memory_prefix(memory), 1), keep_hidden=True)
        for layer in range(family_.num_layers):
            restarted = Segment(entering[layer], segment.rope_positions, segment.text_positions, segment.valid)
            cache = EmlocCache(memory_prefix(memory, from_layer=layer), 1)
            hidden, _ = run_layers(family_, restarted, cache, start=layer)
            torch.testing.assert_close(family_.logits(hidden), family_.logits(final), atol=ATOL, rtol=0)


def test_gemma3_sliding_window_keeps_full_context_semantics(tiny):
    """(e) a context several times longer than the sliding window (16): chunks and queries see what the full context
    shows each of their tokens, no more (out-of-window memory tokens are masked by position)."""
    model, processor, _ = tiny("gemma3")
    assert 16 in {model.family.sliding_window(l) for l in range(model.family.num_layers)}
    demos, query = demos_for("gemma3", 8), queries_for("gemma3", 1)[0]
    assert full_inputs(processor, demos)["input_ids"].shape[1] > 10 * 16
    expected = reference_logits(model, processor, demos, query)
    for chunk_size in (1, 3):
        memory = model.build_memory(demos, processor=processor, method="full", chunk_size=chunk_size)
        torch.testing.assert_close(model(**_query_batch(processor, [query]), memory=memory).logits[0], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_different_lengths_equals_one_by_one(tiny, family):
    """(f) left-padded queries of different lengths sharing one memory."""
    model, processor, _ = tiny(family)
    memory = model.build_memory(demos_for(family, 4), processor=processor, method="full", chunk_size=2)
    queries = queries_for(family, 3)
    if family in ("llama", "gemma3"):
        queries[1] = dict(queries[1], question="short?")
    batch = _query_batch(processor, queries)
    assert (batch["attention_mask"] == 0).any(), "the queries should differ in length"
    together = model(**batch, memory=memory).logits
    for row, query in enumerate(queries):
        alone = model(**_query_batch(processor, [query]), memory=memory).logits[0]
        length = alone.shape[0]
        torch.testing.assert_close(together[row, -length:], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_memory_equals_generate_on_full_context(tiny, family):
    """(h) greedy generation from a full memory equals the base model's own `generate` on the whole conversation."""
    model, processor, _ = tiny(family)
    demos, queries = demos_for(family, 4), queries_for(family, 2)
    memory = model.build_memory(demos, processor=processor, method="full", chunk_size=2)
    batch = processor(queries)
    generated = model.generate(**batch, memory=memory, max_new_tokens=6)
    assert torch.equal(generated[:, : batch["input_ids"].shape[1]], batch["input_ids"]), "the prompt comes first"
    generated = generated[:, batch["input_ids"].shape[1]:]
    eos = model.model.generation_config.eos_token_id
    for row, query in enumerate(queries):
        inputs = full_inputs(processor, demos, query)
        expected = model.model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        ours = generated[row, : len(expected)]
        assert ours.tolist() == expected.tolist(), f"row {row}"
        if len(expected) < generated.shape[1]:  # the base stopped at end of sequence; we pad after it
            assert expected[-1].item() in ([eos] if isinstance(eos, int) else eos)


def test_zero_shot_is_the_base_model(tiny):
    model, processor, _ = tiny("llama")
    query = queries_for("llama", 1)[0]
    batch = _query_batch(processor, [query])
    with torch.no_grad():
        expected = model.model(input_ids=batch["input_ids"]).logits[0]
    torch.testing.assert_close(model(**batch).logits[0], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2-vl"])
def test_score_choices_equals_full_context_log_probabilities(tiny, family):
    model, processor, _ = tiny(family)
    demos = demos_for(family, 3)
    query = dict(queries_for(family, 1)[0], choices=["7", "12", "setosa", "versicolor"])
    memory = model.build_memory(demos, processor=processor, method="full")
    scores = model.score_choices([query], memory=memory, processor=processor)[0]
    for choice, score in zip(query["choices"], scores):
        inputs = full_inputs(processor, demos, query)
        choice_ids = processor.encode_choice(choice)
        start = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], choice_ids[None]], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(choice_ids)[None]], dim=1)
        with torch.no_grad():
            log_probs = torch.log_softmax(model.model(**inputs).logits[0].float(), dim=-1)
        expected = sum(log_probs[start - 1 + i, token].item() for i, token in enumerate(choice_ids))
        assert score == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen2-vl"])
def test_zero_shot_scores_follow_the_template_prefix(tiny, family):
    """Without a memory, a query is scored after the template prefix alone — the full context with no demos."""

    model, processor, base_dir = tiny(family)
    tokenizer = processor.tokenizer
    system = "{{ '<|im_start|>system\\nAnswer briefly.<|im_end|>\\n' }}"
    processor.base_processor.chat_template = system + processor.base_processor.chat_template
    if hasattr(processor.base_processor, "tokenizer"):
        processor.base_processor.tokenizer.chat_template = processor.base_processor.chat_template
    assert tokenizer.decode(processor.encode_prefix().input_ids) == "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
    query = dict(queries_for(family, 1)[0], choices=["3", "setosa"])
    scores = model.score_choices([query], processor=processor)[0]
    inputs = processor([query], add_template_prefix=True)
    inputs.pop("token_types")
    with torch.no_grad():
        first = torch.log_softmax(model.model(**{k: v for k, v in inputs.items()}, **_mm_types(model, inputs)).logits[0, -1].float(), -1)
    assert scores[0] == pytest.approx(first[processor.encode_choice("3")[0]].item(), abs=1e-4)


def _mm_types(model, inputs):
    if "pixel_values" not in inputs:
        return {}
    ids = inputs["input_ids"]
    types = torch.zeros_like(ids, dtype=torch.int)
    types[ids == model.model.config.image_token_id] = 1
    return {"mm_token_type_ids": types}
