"""Answers through transformers' own generation: `GenerationMixin.generate`, streamers, processors and criteria, the
pipelines — all from a memory, exact against the full context when nothing is pruned."""

import threading

import pytest
import torch
from transformers import (DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList,
                          TextIteratorStreamer, pipeline)
from transformers.generation import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

from conftest import FAMILIES, VL_FAMILIES, demos_for, queries_for
from memory_emloc import MemoryLoadError
from reference import full_inputs

SYSTEM = "{{ '<|im_start|>system\\nAnswer briefly.<|im_end|>\\n' }}"


def _full_memory(tiny, family, template="chat", count=4):
    model, processor, base_dir = tiny(family, template)
    memory = model.build_memory(demos_for(family, count), processor=processor, method="full", chunk_size=2)
    return model, processor, memory


def _new(out, batch):
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_with_memory_equals_beam_search_on_full_context(tiny, family):
    model, processor, memory = _full_memory(tiny, family)
    demos, queries = demos_for(family, 4), queries_for(family, 2)
    together = _new(model.generate(**processor(queries), memory=memory, max_new_tokens=5, num_beams=2), processor(queries))
    for row, query in enumerate(queries):
        inputs = full_inputs(processor, demos, query)
        expected = model.model.generate(**inputs, max_new_tokens=5, num_beams=2, do_sample=False)
        expected = expected[0, inputs["input_ids"].shape[1]:]
        alone = _new(model.generate(**processor([query]), memory=memory, max_new_tokens=5, num_beams=2), processor([query]))
        assert alone[0].tolist() == expected.tolist()
        assert together[row, : len(expected)].tolist() == expected.tolist(), f"row {row} in a left-padded batch"


@pytest.mark.parametrize("family", ["llama", "qwen2-vl"])
def test_return_dict_scores_and_num_return_sequences(tiny, family):
    model, processor, memory = _full_memory(tiny, family)
    batch = processor(queries_for(family, 2))
    plain = model.generate(**batch, memory=memory, max_new_tokens=4)
    out = model.generate(**batch, memory=memory, max_new_tokens=4, return_dict_in_generate=True, output_scores=True,
                         output_logits=True)
    assert isinstance(out, GenerateDecoderOnlyOutput) and torch.equal(out.sequences, plain)
    assert len(out.scores) == 4 and out.scores[0].shape[0] == 2
    # the first step's logits are the forward pass's last-position logits
    first = model(**{k: v for k, v in batch.items() if k != "token_types"}, memory=memory).logits[:, -1]
    torch.testing.assert_close(out.logits[0], first.float(), atol=1e-4, rtol=0)
    beams = model.generate(**batch, memory=memory, max_new_tokens=4, num_beams=3, num_return_sequences=2,
                           return_dict_in_generate=True, output_scores=True)
    assert isinstance(beams, GenerateBeamDecoderOnlyOutput)
    assert beams.sequences.shape[0] == 4 and beams.sequences_scores.shape == (4,)
    # every returned sequence starts with its own query (images repeated per row, not per patch)
    prompt = batch["input_ids"].repeat_interleave(2, dim=0)
    assert torch.equal(beams.sequences[:, : prompt.shape[1]], prompt)
    assert beams.sequences[0].tolist() == model.generate(**batch, memory=memory, max_new_tokens=4, num_beams=3)[0].tolist()


def test_sampling_is_seeded_and_top_p_zero_like_is_greedy(tiny):
    model, processor, memory = _full_memory(tiny, "gemma3")
    batch = processor(queries_for("gemma3", 2))
    torch.manual_seed(3)
    first = model.generate(**batch, memory=memory, max_new_tokens=6, do_sample=True, temperature=1.5)
    torch.manual_seed(3)
    second = model.generate(**batch, memory=memory, max_new_tokens=6, do_sample=True, temperature=1.5)
    assert torch.equal(first, second)
    greedy = model.generate(**batch, memory=memory, max_new_tokens=6)
    assert torch.equal(model.generate(**batch, memory=memory, max_new_tokens=6, do_sample=True, top_k=1), greedy)
    assert torch.equal(model.generate(**batch, memory=memory, max_new_tokens=6, use_cache=False), greedy)


def test_logits_processor_stopping_criteria_and_generation_config_fields(tiny):
    model, processor, memory = _full_memory(tiny, "gemma3")
    batch = processor(queries_for("gemma3", 1))
    greedy = _new(model.generate(**batch, memory=memory, max_new_tokens=5), batch)[0]

    class Forbid(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, greedy[0]] = -float("inf")
            return scores

    class AfterTwo(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= batch["input_ids"].shape[1] + 2)

    forbidden = _new(model.generate(**batch, memory=memory, max_new_tokens=5, logits_processor=LogitsProcessorList([Forbid()])), batch)
    assert forbidden[0, 0] != greedy[0]
    assert _new(model.generate(**batch, memory=memory, max_new_tokens=5, bad_words_ids=[[int(greedy[0])]]), batch)[0, 0] != greedy[0]
    stopped = _new(model.generate(**batch, memory=memory, max_new_tokens=5, stopping_criteria=StoppingCriteriaList([AfterTwo()])), batch)
    assert stopped[0].tolist() == greedy[:2].tolist()
    forced = _new(model.generate(**batch, memory=memory, min_new_tokens=5, max_new_tokens=5,
                                 eos_token_id=int(greedy[1])), batch)
    assert forced.shape[1] == 5 and int(forced[0, 1]) != int(greedy[1])
    with pytest.raises(ValueError, match="cache_implementation='static' is not supported"):
        model.generate(**batch, memory=memory, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(TypeError, match="past_key_values must be an EmlocCache"):
        model.generate(**batch, memory=memory, max_new_tokens=2, past_key_values=DynamicCache())


def test_text_iterator_streamer_yields_the_generated_text(tiny):
    model, processor, memory = _full_memory(tiny, "llama")
    batch = processor(queries_for("llama", 1))
    expected = processor.batch_decode(_new(model.generate(**batch, memory=memory, max_new_tokens=8), batch))[0]
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=model.generate, kwargs=dict(**batch, memory=memory, max_new_tokens=8, streamer=streamer))
    worker.start()
    streamed = "".join(streamer)
    worker.join()
    assert streamed == expected and streamed


def test_no_memory_is_the_base_model_and_the_active_memory_is_the_default(tiny):
    model, processor, memory = _full_memory(tiny, "llama")
    batch = processor(queries_for("llama", 2), add_template_prefix=True)
    batch.pop("token_types")
    assert model.active_memory is None
    expected = model.model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**batch, max_new_tokens=5), expected)
    model.load_memory(memory, name="task")
    query = processor(queries_for("llama", 2))
    assert torch.equal(model.generate(**query, max_new_tokens=5), model.generate(**query, memory=memory, max_new_tokens=5))
    model.set_memory(None)
    assert torch.equal(model.generate(**batch, max_new_tokens=5), expected)


def test_generate_refuses_a_processor_that_renders_otherwise(tiny):
    model, processor, memory = _full_memory(tiny, "llama")
    _, plain, _ = tiny("llama", "plain")
    batch = processor(queries_for("llama", 1))
    assert model.generate(**batch, memory=memory, processor=processor, max_new_tokens=2).shape[0] == 1
    with pytest.raises(MemoryLoadError, match="template='chat'.*template='plain'"):
        model.generate(**plain(queries_for("llama", 1)), memory=memory, processor=plain, max_new_tokens=2)


def _with_system_prompt(processor):
    """The tiny chat template with a system turn in front of every conversation (as SmolLM2's and Qwen's have)."""
    template = SYSTEM + processor._chat_template()
    processor.base_processor.chat_template = template
    if processor.tokenizer is not processor.base_processor:
        processor.tokenizer.chat_template = template
    assert len(processor.encode_prefix()) > 0
    return processor


def test_a_whole_conversation_prompt_drops_the_prefix_the_memory_holds(tiny):
    model, processor, _ = tiny("llama")
    processor = _with_system_prompt(processor)
    memory = model.build_memory(demos_for("llama", 4), processor=processor, method="full")
    query = queries_for("llama", 1)[0]
    batch = processor([query])
    expected = _new(model.generate(**batch, memory=memory, max_new_tokens=5), batch)
    conversation = processor.tokenizer.apply_chat_template([{"role": "user", "content": query["question"]}],
                                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert conversation["input_ids"].shape[1] == batch["input_ids"].shape[1] + len(processor.encode_prefix())
    out = model.generate(**conversation, memory=memory, processor=processor, max_new_tokens=5)
    assert torch.equal(_new(out, conversation), expected)


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_text_generation_pipeline_answers_from_the_active_memory(tiny, template):
    model, processor, _ = tiny("llama", template)
    if template == "chat":
        processor = _with_system_prompt(processor)
    memory = model.build_memory(demos_for("llama", 4), processor=processor, method="full")
    model.load_memory(memory, name="task")
    query = queries_for("llama", 1)[0]
    batch = processor([query])
    expected = processor.batch_decode(_new(model.generate(**batch, max_new_tokens=6), batch))[0]
    generator = pipeline("text-generation", model=model, tokenizer=processor.tokenizer)
    if template == "chat":  # a chat message: the pipeline renders it with the chat template, system turn included
        answer = generator([{"role": "user", "content": query["question"]}], max_new_tokens=6, do_sample=False,
                           processor=processor)[0]["generated_text"][-1]
        assert answer["role"] == "assistant" and answer["content"] == expected
    else:  # the plain rendering of a query: its text and a line break
        answer = generator(query["question"] + "\n", max_new_tokens=6, do_sample=False, return_full_text=False)
        assert answer[0]["generated_text"] == expected


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_image_text_to_text_pipeline_answers_from_the_active_memory(tiny, family):
    model, processor, memory = _full_memory(tiny, family)
    model.load_memory(memory, name="task")
    query = queries_for(family, 1)[0]
    batch = processor([query])
    expected = processor.batch_decode(_new(model.generate(**batch, max_new_tokens=6), batch))[0]
    answerer = pipeline("image-text-to-text", model=model, processor=processor.base_processor)
    answer = answerer(text=query["messages"], return_full_text=False,
                      generate_kwargs={"max_new_tokens": 6, "do_sample": False, "processor": processor})
    assert answer[0]["generated_text"] == expected


def test_continuing_from_a_returned_cache(tiny):
    """The cache `generate` returns carries the memory and the query: feeding the sequences back continues them."""
    model, processor, memory = _full_memory(tiny, "gemma3")
    batch = processor(queries_for("gemma3", 1))
    whole = model.generate(**batch, memory=memory, max_new_tokens=6)
    first = model.generate(**batch, memory=memory, max_new_tokens=3, return_dict_in_generate=True)
    assert first.past_key_values.get_seq_length() == first.sequences.shape[1] - 1
    rest = model.generate(input_ids=first.sequences, past_key_values=first.past_key_values, max_new_tokens=3)
    assert torch.equal(rest, whole)


def test_generation_config_is_the_base_models(tiny, tmp_path):
    """Saved with the repo; a repo saved without one falls back to the base model's (its eos and pad tokens)."""
    from transformers import AutoModel

    model, processor, _ = tiny("llama")
    assert model.generation_config.eos_token_id == model.model.generation_config.eos_token_id is not None
    model.save_pretrained(tmp_path / "repo")
    assert (tmp_path / "repo" / "generation_config.json").is_file()
    (tmp_path / "repo" / "generation_config.json").unlink()
    loaded = AutoModel.from_pretrained(tmp_path / "repo", trust_remote_code=True)
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    assert loaded.generation_config.pad_token_id == model.generation_config.pad_token_id
