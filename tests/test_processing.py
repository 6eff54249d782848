"""The processor: spans from the model's own template, token for token, and clear errors for bad input."""

import json

import pytest
import torch

from conftest import FAMILIES, TEXT_FAMILIES, demos_for, queries_for, digit_image
from processing_emloc import EmlocProcessor, EncodedSpan, ExampleError, load_examples
from rendering_emloc import ANSWER, IMAGE
from reference import full_inputs


CASES = [(family, "chat") for family in FAMILIES] + [(family, "plain") for family in TEXT_FAMILIES]


@pytest.mark.parametrize("family,template", CASES)
def test_spans_concatenate_to_the_full_rendering(tiny, family, template):
    _, processor, _ = tiny(family, template)
    demos = demos_for(family, 5)
    context = processor.encode_context(demos)
    joined = EncodedSpan.concat([context.prefix, *context.demos])
    expected = full_inputs(processor, demos)
    if template == "chat":  # a plain context ends in "\n\n", which tokenises differently once a query follows
        assert joined.input_ids.tolist() == expected["input_ids"][0].tolist()
    if "pixel_values" in expected:
        torch.testing.assert_close(joined.media["pixel_values"], expected["pixel_values"])
        assert torch.equal(joined.media["image_grid_thw"], expected["image_grid_thw"])

    query = queries_for(family, 1)[0]
    query_span = processor.encode_query(load_examples([query], require_answer=False)[0])
    with_query = full_inputs(processor, demos, query)
    assert torch.cat([joined.input_ids, query_span.input_ids]).tolist() == with_query["input_ids"][0].tolist()


@pytest.mark.parametrize("family,template", CASES)
def test_answer_spans_decode_to_the_answers(tiny, family, template):
    _, processor, _ = tiny(family, template)
    demos = demos_for(family, 4)
    context = processor.encode_context(demos)
    for demo, span in zip(demos, context.demos):
        answer_ids = span.input_ids[span.token_types == ANSWER]
        decoded = processor.tokenizer.decode(answer_ids[:-1])  # the last answer token ends the turn
        assert decoded == demo["answer"]
        # the answer span is the tail of the demonstration's assistant content, contiguous
        positions = (span.token_types == ANSWER).nonzero().flatten()
        assert (positions.diff() == 1).all()
    if processor.is_multimodal:
        assert int((context.demos[0].token_types == IMAGE).sum()) == 4  # a 56x56 image is 4 visual tokens


def test_template_prefix_is_the_system_turn(tiny):
    _, processor, base_dir = tiny("llama")
    from processing_emloc import EmlocProcessor
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    tokenizer.chat_template = (
        "{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}"
        "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    processor = EmlocProcessor(tokenizer)
    context = processor.encode_context([{"question": "a?", "answer": "b"}, {"question": "c?", "answer": "d"}])
    assert tokenizer.decode(context.prefix.input_ids) == "<|im_start|>system\nBe brief.<|im_end|>\n"
    assert tokenizer.decode(context.demos[0].input_ids) == "<|im_start|>user\na?<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"


def test_processor_round_trip(tiny, tmp_path):
    for family in ("llama", "qwen2-vl"):
        _, processor, _ = tiny(family, "plain" if family == "llama" else "chat")
        processor.save_pretrained(tmp_path / family)
        loaded = EmlocProcessor.from_pretrained(tmp_path / family)
        assert loaded.template == processor.template and type(loaded.base_processor).__name__ == type(processor.base_processor).__name__
        demos = demos_for(family, 2)
        assert torch.equal(EncodedSpan.concat(loaded.encode_context(demos).demos).input_ids,
                           EncodedSpan.concat(processor.encode_context(demos).demos).input_ids)


def _write(tmp_path, lines):
    path = tmp_path / "demos.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("line,message", [
    ('{"question": "q"', "invalid JSON"),
    ('{"question": "q"}', "needs an 'answer'"),
    ('{"image": "missing.png", "question": "q", "answer": "a"}', "image file not found"),
    ('{"image": "broken.png", "question": "q", "answer": "a"}', "cannot decode image"),
    ('{"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "answer": "a"}', "unknown content type 'audio'"),
    ('{"messages": [], "answer": "a"}', "non-empty list"),
    ('[1, 2]', "expected a JSON object"),
    ('{"question": "q", "answer": 3}', "'answer' must be a string"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    path = _write(tmp_path, ['{"question": "fine", "answer": "ok"}', line])
    with pytest.raises(ExampleError, match=rf"demos\.jsonl:2: .*{message}"):
        load_examples(path)


def test_empty_and_missing_input(tmp_path):
    with pytest.raises(ExampleError, match="no examples"):
        load_examples(_write(tmp_path, [""]))
    with pytest.raises(ExampleError, match="file not found"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(ExampleError, match="no examples"):
        load_examples([])


def test_paths_are_relative_to_the_jsonl_file(tmp_path):
    image, label = digit_image(3)
    (tmp_path / "img").mkdir()
    image.save(tmp_path / "img" / "3.png")
    path = _write(tmp_path, [json.dumps({"image": "img/3.png", "question": "Which digit?", "answer": label})])
    example = load_examples(path)[0]
    assert example.content[0]["type"] == "image" and example.content[0]["image"].size == (56, 56)
    assert example.where.endswith("demos.jsonl:1")


def test_images_for_a_text_model_are_refused(tiny):
    _, processor, _ = tiny("llama")
    image, label = digit_image(0)
    with pytest.raises(ExampleError, match=r"<list>\[0\]: images or video given, but the base model is text-only"):
        processor.encode_context([{"image": image, "question": "q", "answer": label}])


def test_build_memory_refuses_bad_demos_before_computing(tiny, tmp_path):
    model, processor, _ = tiny("llama")
    path = _write(tmp_path, ['{"question": "fine", "answer": "ok"}', '{"question": "no answer"}'])
    with pytest.raises(ExampleError, match="demos.jsonl:2"):
        model.build_memory(path, processor=processor)
