"""Video demonstrations and queries on the tiny Qwen2-VL and Qwen2.5-VL: video files (decoded with PyAV), frame
directories and frame lists, mixed with images and text in one memory; exactness against the full context; the video
processor's sampling recorded in the memory and checked against the processor's.

The clips are real photographs (scikit-image's sample images, `examples/clips.py`): a window panning across each, 56x56
frames, encoded with a real codec (H.264 or MPEG-4 Part 2) in an MP4 container.
"""

import json

import numpy as np
import pytest
import torch

from clips import photo_frames, write_clip
from conftest import VL_FAMILIES, digit_image
from memory_emloc import MemoryLoadError, memory_card
from processing_emloc import ExampleError, load_examples
from rendering_emloc import IMAGE, VIDEO
from reference import full_inputs, reference_logits

# a 56x56 frame is 4x4 patches of 14, merged 2x2; frames go in pairs (temporal patch 2): 4 frames -> 8 tokens
TOKENS_PER_FRAME_PAIR = 4
LOG_PROB_ATOL = 2e-3  # the bound; measured here: ~2e-6


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Video files, a frame directory and frame lists made from real photographs; `clips["dir"]` holds the files."""
    root = tmp_path_factory.mktemp("clips")
    made = {"dir": root}
    for name, codec in (("astronaut", "libx264"), ("coffee", "mpeg4"), ("chelsea", "libx264"), ("rocket", "libx264")):
        made[name] = write_clip(root / f"{name}.mp4", photo_frames(name), codec=codec)
    made["long"] = write_clip(root / "long.mp4", photo_frames("immunohistochemistry", 8))  # 8 frames at 4 fps: 2 s
    (root / "cat_frames").mkdir()
    for index, frame in enumerate(photo_frames("cat")):
        frame.save(root / "cat_frames" / f"{index:03d}.png")
    return made


def mixed_demos(clips) -> list[dict]:
    """Video files (two codecs), a frame directory, a list of frames, an image, text only, and video + image together."""
    question = "What is in the clip?"
    return [
        {"video": str(clips["astronaut"]), "question": question, "answer": "astronaut"},
        {"video": str(clips["dir"] / "cat_frames"), "question": question, "answer": "cat"},
        {"image": digit_image(3)[0], "question": "Which digit is this?", "answer": "3"},
        {"frames": photo_frames("chelsea"), "question": question, "answer": "cat"},
        {"question": "Say hello.", "answer": "hello"},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": digit_image(5)[0]},
                                                   {"type": "video", "video": str(clips["coffee"])},
                                                   {"type": "text", "text": "The digit, then what is in the clip?"}]}],
         "answer": "5 coffee"},
    ]


def video_query(clips) -> dict:
    return {"video": str(clips["rocket"]), "question": "What is in the clip?", "choices": ["rocket", "cat", "coffee"]}


def _logits_with_memory(model, processor, memory, query):
    batch = processor([query])
    batch.pop("token_types")
    with torch.no_grad():
        return model(**batch, memory=memory).logits[0]


@pytest.mark.parametrize("family", VL_FAMILIES)
@pytest.mark.parametrize("chunk_size", [1, 100])
def test_full_memory_with_video_equals_full_context(tiny, clips, family, chunk_size):
    """Exactness with video: a memory with nothing pruned, built chunk by chunk from image, video and text
    demonstrations, gives a video query the log-probabilities of the whole conversation fed to the stock model."""
    model, processor, _ = tiny(family)
    demos, query = mixed_demos(clips), video_query(clips)
    memory = model.build_memory(demos, processor=processor, method="full", chunk_size=chunk_size)
    expected = reference_logits(model, processor, demos, query)
    logits = _logits_with_memory(model, processor, memory, query)
    difference = (logits.log_softmax(-1) - expected.log_softmax(-1)).abs().max().item()
    assert difference <= LOG_PROB_ATOL, difference
    # the same holds with the query's video left out: the memory's video tokens carry the difference
    text_query = {"question": "What is in the clip?"}
    without_video = reference_logits(model, processor, demos, text_query)
    torch.testing.assert_close(_logits_with_memory(model, processor, memory, text_query), without_video, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_the_memory_counts_video_tokens(tiny, clips, family):
    """`token_types` counts video tokens apart from image tokens: 5 clips of 4 frames (8 tokens each), 2 images
    (4 tokens each); the full context holds exactly as many of the model's video and image placeholders."""
    model, processor, _ = tiny(family)
    demos = mixed_demos(clips)
    memory = model.build_memory(demos, processor=processor, method="full", chunk_size=2)
    types = memory.stats["token_types"]
    assert types["video"] == {"full": 4 * 2 * TOKENS_PER_FRAME_PAIR, "kept": 4 * 2 * TOKENS_PER_FRAME_PAIR}
    assert types["image"] == {"full": 2 * 4, "kept": 2 * 4}
    config = model.model.config
    reference = full_inputs(processor, demos)["input_ids"][0]
    assert int((reference == config.video_token_id).sum()) == types["video"]["full"]
    assert int((reference == config.image_token_id).sum()) == types["image"]["full"]
    context = processor.encode_context(demos)
    assert int((context.demos[0].token_types == VIDEO).sum()) == 8 and int((context.demos[0].token_types == IMAGE).sum()) == 0
    # the memory's card shows a query in the form its demonstrations took
    assert '{"video": "query.mp4"' in memory_card(memory.stats)


def test_a_frame_directory_a_frame_list_and_a_video_file_give_the_same_clip(tiny, clips, tmp_path):
    """A directory of PNG frames and the list of the same frames are one clip, pixel for pixel; the clip encoded with
    H.264 and decoded with PyAV gives the same visual tokens and grid, its pixels within the codec's loss."""
    _, processor, _ = tiny("qwen2-vl")
    frames = photo_frames("cat")
    file = write_clip(tmp_path / "cat.mp4", frames)
    spans = {}
    for name, video in (("list", frames), ("dir", str(clips["dir"] / "cat_frames")), ("file", str(file))):
        [query] = load_examples([{"video": video, "question": "What is it?"}], require_answer=False)
        spans[name] = processor.encode_query(query)
    assert torch.equal(spans["dir"].input_ids, spans["list"].input_ids)
    torch.testing.assert_close(spans["dir"].media["pixel_values_videos"], spans["list"].media["pixel_values_videos"])
    assert torch.equal(spans["file"].input_ids, spans["list"].input_ids)
    assert spans["file"].media["video_grid_thw"].tolist() == [[2, 4, 4]]
    lossy = (spans["file"].media["pixel_values_videos"] - spans["list"].media["pixel_values_videos"]).abs().mean()
    assert lossy < 0.1, f"mean pixel difference {lossy:.3f} (normalised units): not the same clip"
    other = processor.encode_query(load_examples([{"video": str(clips["astronaut"]), "question": "What is it?"}],
                                                 require_answer=False)[0])
    assert (other.media["pixel_values_videos"] - spans["list"].media["pixel_values_videos"]).abs().mean() > 5 * lossy


def _sampling_processor(tiny, family, **settings):
    _, processor, _ = tiny(family)
    video_processor = processor.base_processor.video_processor
    for key, value in settings.items():
        setattr(video_processor, key, value)
    return processor


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_sampling_follows_the_video_processor(tiny, clips, family):
    """An 8-frame clip at 4 fps: every frame (16 tokens) without sampling, 4 frames (8 tokens) at fps=2 or
    num_frames=4; the memory of the sampled clip still equals the full context, where the stock processor samples."""
    model, _, _ = tiny(family)
    demos = [{"video": str(clips["long"]), "question": "What is in the clip?", "answer": "tissue"}]
    query = {"video": str(clips["long"]), "question": "And this one?"}
    counts = {}
    for label, settings in (("all", {}), ("fps", {"do_sample_frames": True, "fps": 2}),
                            ("num_frames", {"do_sample_frames": True, "num_frames": 4})):
        processor = _sampling_processor(tiny, family, **settings)
        memory = model.build_memory(demos, processor=processor, method="full")
        counts[label] = memory.stats["token_types"]["video"]["full"]
        expected = reference_logits(model, processor, demos, query)
        logits = _logits_with_memory(model, processor, memory, query)
        assert (logits.log_softmax(-1) - expected.log_softmax(-1)).abs().max().item() <= LOG_PROB_ATOL, label
    assert counts == {"all": 16, "fps": 8, "num_frames": 8}


def test_a_memory_refuses_a_processor_that_samples_otherwise(tiny, clips, tmp_path):
    """The video processor's sampling and pixel caps are part of the memory's rendering: a processor sampling at
    another frame rate, or with another pixel cap, is refused with the setting named; the same settings, saved and
    reloaded with the processor, are accepted."""
    model, _, _ = tiny("qwen2-vl")
    demos = [{"video": str(clips["long"]), "question": "What is in the clip?", "answer": "tissue"}]
    query = {"video": str(clips["rocket"]), "question": "What is in the clip?", "choices": ["tissue", "rocket"]}
    at_2_fps = _sampling_processor(tiny, "qwen2-vl", do_sample_frames=True, fps=2)
    memory = model.build_memory(demos, processor=at_2_fps, method="full")
    assert memory.stats["rendering"]["vision"]["video"]["fps"] == 2
    memory.save_pretrained(tmp_path / "memory")

    at_4_fps = _sampling_processor(tiny, "qwen2-vl", do_sample_frames=True, fps=4)
    with pytest.raises(MemoryLoadError, match=r"rendered with vision\.video\.fps=2; this processor renders vision\.video\.fps=4"):
        model.score_choices([query], memory=memory, processor=at_4_fps)
    larger = _sampling_processor(tiny, "qwen2-vl", do_sample_frames=True, fps=2)
    larger.base_processor.video_processor.size = {"shortest_edge": 112 * 112, "longest_edge": 112 * 112}
    with pytest.raises(MemoryLoadError, match=r"vision\.video\.size\.longest_edge=3136.*vision\.video\.size\.longest_edge=12544"):
        model.load_memory(tmp_path / "memory", processor=larger)

    at_2_fps.save_pretrained(tmp_path / "processor")
    reloaded = type(at_2_fps).from_pretrained(tmp_path / "processor")
    assert reloaded.rendering() == at_2_fps.rendering()
    model.load_memory(tmp_path / "memory", processor=reloaded)
    assert model.score_choices([query], memory=memory, processor=reloaded)[0] == pytest.approx(
        model.score_choices([query], memory=memory, processor=at_2_fps)[0])


def test_a_memory_saved_before_video_was_counted_still_loads(tiny, tmp_path):
    """A memory whose config has no `video` token type and no `vision` rendering entry (built by an older emloc)
    loads and answers as before."""
    from conftest import image_demos, image_queries

    model, processor, _ = tiny("qwen2-vl")
    memory = model.build_memory(image_demos(3), processor=processor, method="full")
    memory.save_pretrained(tmp_path / "memory")
    config_path = tmp_path / "memory" / "memory_config.json"
    config = json.loads(config_path.read_text())
    del config["token_types"]["video"], config["rendering"]["vision"]
    config_path.write_text(json.dumps(config))

    query = image_queries(1)[0]
    model.load_memory(tmp_path / "memory", name="old", processor=processor)
    old = model.memories["old"]
    assert "video" not in old.stats["token_types"]
    assert model.score_choices([query], memory=old, processor=processor) == model.score_choices(
        [query], memory=memory, processor=processor)
    appended = model.build_memory(image_demos(2, offset=10), processor=processor, method="full", append_to=old)
    assert appended.stats["token_types"]["video"]["full"] == 0
    # image_demos(2) is 2 one-image demonstrations and one of two images: 4 images of 4 tokens
    assert appended.stats["token_types"]["image"]["full"] == memory.stats["token_types"]["image"]["full"] + 4 * 4


def test_bad_videos_name_file_and_line(tiny, clips, tmp_path):
    _, processor, _ = tiny("qwen2-vl")
    (tmp_path / "broken.mp4").write_bytes(b"not a video at all" * 20)
    (tmp_path / "empty").mkdir()
    cases = [
        ({"video": "missing.mp4", "question": "q", "answer": "a"}, "demos.jsonl:1: video file not found"),
        ({"video": "broken.mp4", "question": "q", "answer": "a"}, "demos.jsonl:1: cannot decode video"),
        ({"video": "empty", "question": "q", "answer": "a"}, "demos.jsonl:1: video directory has no frames"),
    ]
    for record, message in cases:
        path = tmp_path / "demos.jsonl"
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(ExampleError, match=message):
            processor.encode_context(path)

    # sampling by frame rate needs one: a list of frames has none
    at_2_fps = _sampling_processor(tiny, "qwen2-vl", do_sample_frames=True, fps=2)
    with pytest.raises(ExampleError, match=r"<list>\[0\]: the base processor refused this video: .*`fps`"):
        at_2_fps.encode_context([{"frames": photo_frames("cat"), "question": "q", "answer": "a"}])



def test_a_processor_without_a_video_processor_refuses_videos_up_front(clips, tmp_path, monkeypatch):
    """Where torchvision does not load, the tiny repos carry an image-only processor (remote code); a video given to
    it is refused before any work, naming the demonstration."""
    import tiny_models
    from processing_emloc import EmlocProcessor

    monkeypatch.setattr(tiny_models, "torchvision_loads", lambda: False)
    base = tiny_models.build_tiny_base("qwen2-vl", tmp_path / "base")
    image_only = EmlocProcessor.from_base(str(base), trust_remote_code=True)
    assert type(image_only.base_processor).__name__ == "TinyQwen2VLProcessor"
    assert image_only.rendering()["vision"]["video"] is None
    image_only.encode_context([{"image": digit_image(1)[0], "question": "Which digit?", "answer": "1"}])
    with pytest.raises(ExampleError, match=r"<list>\[1\]: a video was given, but the base processor has no video"):
        image_only.stream_context([{"question": "q", "answer": "a"}, {"video": str(clips["rocket"]), "question": "q", "answer": "a"}])


@pytest.mark.parametrize("family", VL_FAMILIES)
def test_generate_and_score_with_a_video_query(tiny, clips, family):
    """Greedy generation with beams from a memory of video demonstrations equals the stock model's on the whole
    conversation; `score_choices` answers a video query."""
    model, processor, _ = tiny(family)
    demos = mixed_demos(clips)[:2]
    query = video_query(clips)
    memory = model.build_memory(demos, processor=processor, method="full")
    batch = processor([query])
    generated = model.generate(**batch, memory=memory, max_new_tokens=4, num_beams=2)[0, batch["input_ids"].shape[1]:]
    inputs = full_inputs(processor, demos, query)
    expected = model.model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert generated[: len(expected)].tolist() == expected.tolist()
    scores = model.score_choices([query], memory=memory, processor=processor)[0]
    assert len(scores) == 3 and all(np.isfinite(scores))
