"""Demonstrations stream from the JSONL file (issue 10): every line is checked up front, images are decoded when their
demonstration is read, and each demonstration's span is exactly its span in the tokenisation of the whole context."""

import json
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES, TEXT_FAMILIES, demos_for, text_demos, text_queries
from demo_files import write_jsonl
from processing_emloc import EncodedSpan, ExampleError, load_examples
from reference import full_inputs
from test_rendering import CASES as REAL_CASES, real_processor  # noqa: F401  (a fixture)


CASES = [(family, "chat") for family in FAMILIES] + [(family, "plain") for family in TEXT_FAMILIES]


def _assert_spans_equal(got: EncodedSpan, expected: EncodedSpan):
    assert got.input_ids.tolist() == expected.input_ids.tolist()
    assert got.token_types.tolist() == expected.token_types.tolist()
    assert sorted(got.media) == sorted(expected.media)
    for key, tensor in expected.media.items():
        assert torch.equal(got.media[key], tensor), key


@pytest.mark.parametrize("family,template", CASES)
def test_streamed_spans_are_the_spans_of_the_whole_context(tiny, tmp_path, family, template):
    _, processor, _ = tiny(family, template)
    path = write_jsonl(tmp_path, demos_for(family, 5))
    whole = processor.encode_context(path)
    streamed = processor.stream_context(path, cache_size=2)
    assert len(streamed) == len(streamed.demos) == len(streamed.examples) == len(whole.demos)
    _assert_spans_equal(streamed.prefix, whole.prefix)
    for index in [3, 0, len(whole.demos) - 1, 1, 3, 2, 4]:  # any order, cached or not
        _assert_spans_equal(streamed.demos[index], whole.demos[index])
        example, expected = streamed.examples[index], whole.examples[index]
        assert (example.text, example.answer, example.choices, example.where) == (
            expected.text, expected.answer, expected.choices, expected.where)
    _assert_spans_equal(streamed.demos[-1], whole.demos[-1])
    assert [span.input_ids.tolist() for span in streamed.demos[1:3]] == [s.input_ids.tolist() for s in whole.demos[1:3]]
    with pytest.raises(IndexError):
        streamed.demos[len(whole.demos)]
    # read one chunk at a time, the spans join into the tokenisation of the whole rendered conversation
    chunks = [EncodedSpan.concat([streamed.demos[i] for i in range(start, min(start + 2, len(streamed)))])
              for start in range(0, len(streamed), 2)]
    joined = EncodedSpan.concat([streamed.prefix, *chunks])
    _assert_spans_equal(joined, EncodedSpan.concat([whole.prefix, *whole.demos]))
    if template == "chat":  # (a plain context's final "\n\n" tokenises differently once a query follows)
        assert joined.input_ids.tolist() == full_inputs(processor, demos_for(family, 5))["input_ids"][0].tolist()


@pytest.mark.parametrize("name,template", REAL_CASES)
def test_streamed_spans_with_real_tokenizers(real_processor, name, template):  # noqa: F811
    """SmolLM2's byte-level BPE and Gemma 3's SentencePiece (which merges "\\n\\n" across demonstrations): each
    streamed demonstration is its span in `tokenizer(whole rendered text)`."""
    processor = real_processor(name, template)
    demos, query = text_demos(9), text_queries(1)[0]
    streamed = processor.stream_context(demos, cache_size=1)
    whole = processor.encode_context(demos)
    for index in reversed(range(len(demos))):
        _assert_spans_equal(streamed.demos[index], whole.demos[index])
    query_span = processor.encode_query(load_examples([query], require_answer=False)[0])
    joined = EncodedSpan.concat([streamed.prefix, *streamed.demos, query_span])
    assert joined.input_ids.tolist() == full_inputs(processor, demos, query)["input_ids"][0].tolist()


def test_images_are_decoded_when_their_demonstration_is_read(tiny, tmp_path, monkeypatch):
    from PIL import Image

    _, processor, _ = tiny("qwen2-vl")
    path = write_jsonl(tmp_path, demos_for("qwen2-vl", 6))
    opened = []
    open_image = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *args, **kwargs: opened.append(Path(fp).name) or open_image(fp, *args, **kwargs))
    context = processor.stream_context(path, cache_size=2)
    assert opened == []  # checked (the files exist), nothing decoded
    context.demos[3]
    assert opened == ["3.png"]
    context.examples[3], context.demos[3]
    assert opened == ["3.png"]  # cached
    context.demos[0], context.demos[1], context.demos[3]
    assert opened == ["3.png", "0.png", "1.png", "3.png"]  # two kept: demonstration 3 was read again
    context.demos[6]  # the last demonstration has two images
    assert opened[-2:] == ["6.png", "7.png"]


def test_a_bad_line_fails_before_any_computation(tiny, tmp_path, monkeypatch):
    model, processor, _ = tiny("qwen2-vl")
    path = write_jsonl(tmp_path, demos_for("qwen2-vl", 4))
    lines = path.read_text().splitlines()
    lines.insert(3, json.dumps({"image": "img/missing.png", "question": "Which digit?", "answer": "1"}))
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(type(model.runner), "prefill", lambda *args: pytest.fail("computed before checking every line"))
    with pytest.raises(ExampleError, match=r"demos\.jsonl:4: image file not found"):
        model.build_memory(path, processor=processor, checkpoint_dir=tmp_path / "checkpoint")
    assert not (tmp_path / "checkpoint").exists()


def test_an_undecodable_image_is_named_when_its_chunk_is_built(tiny, tmp_path):
    model, processor, _ = tiny("qwen2-vl")
    path = write_jsonl(tmp_path, demos_for("qwen2-vl", 4))
    (tmp_path / "img" / "2.png").write_bytes(b"not a png")
    with pytest.raises(ExampleError, match=r"demos\.jsonl:3: cannot decode image"):
        model.build_memory(path, processor=processor, method="full", chunk_size=2)


def test_a_text_model_refuses_images_before_decoding_them(tiny, tmp_path):
    _, processor, _ = tiny("llama")
    path = write_jsonl(tmp_path, demos_for("qwen2-vl", 2))
    (tmp_path / "img" / "0.png").write_bytes(b"not a png")  # never decoded: the rendering refuses first
    with pytest.raises(ExampleError, match=r"demos\.jsonl:1: images or video given, but the base model is text-only"):
        processor.stream_context(path)
