# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
Demonstrations and queries (design §6): JSON Lines or dicts, in the messages format or the shorthand, normalised to
`Example`s. Every bad line raises one `ExampleError` naming `file:line` before anything is returned; images and videos
can be checked without being decoded (`decode=False`), to be decoded when their demonstration is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


@dataclass
class Example:
    """One demonstration or query, normalised.

    `content` is the user turn as a list of parts `{"type": "text", "text": str}`, `{"type": "image", "image":
    PIL.Image}` or `{"type": "video", "video": list[PIL.Image] | Path}` (a video file's frames are decoded when the
    processor expands it, sampled as the base model's video processor samples); `where` names its origin
    (`file.jsonl:7`).
    """

    content: list[dict]
    answer: str | None = None
    choices: list[str] | None = None
    id: str | None = None
    where: str = "<input>"

    @property
    def text(self) -> str:
        return "\n".join(part["text"] for part in self.content if part["type"] == "text")

    @property
    def has_media(self) -> bool:
        return any(part["type"] != "text" for part in self.content)


class ExampleError(ValueError):
    """A demonstration or query the user gave is malformed; the message starts with `file:line:`."""


def _open_image(path_or_image: Any, base_dir: Path, where: str, decode: bool = True):
    """A PIL image in RGB; with `decode=False`, only checked: the file's path (or the PIL image given)."""
    from PIL import Image

    if isinstance(path_or_image, Image.Image):
        return path_or_image.convert("RGB") if decode else path_or_image
    if not isinstance(path_or_image, (str, os.PathLike)):
        raise ExampleError(f"{where}: an image must be a file path or a PIL image, got {type(path_or_image).__name__}")
    path = Path(path_or_image)
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise ExampleError(f"{where}: image file not found: {path}")
    if not decode:
        return path
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except Exception as error:  # PIL raises several types for undecodable files
        raise ExampleError(f"{where}: cannot decode image {path}: {error}") from None


def _open_video(video: Any, base_dir: Path, where: str, decode: bool = True) -> list | Path:
    """The frames of a video given as a list of frames or a directory of frame images, as PIL images; a video file's
    path, checked with PyAV (its frames are decoded when the processor expands it: `read_video`). With
    `decode=False`, only checked that the files exist: the frames' paths (or PIL images), or the video file's path."""
    if isinstance(video, (list, tuple)):
        if not video:
            raise ExampleError(f"{where}: a video needs at least one frame")
        return [_open_image(frame, base_dir, where, decode) for frame in video]
    path = Path(video)
    path = path if path.is_absolute() else base_dir / path
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp"})
        if not frames:
            raise ExampleError(f"{where}: video directory has no frames: {path}")
        return [_open_image(frame, base_dir, where, decode) for frame in frames]
    if not path.is_file():
        raise ExampleError(f"{where}: video file not found: {path}")
    if decode:
        _check_video_file(path, where)
    return path


def _check_video_file(path: Path, where: str) -> None:
    """Raises `ExampleError` unless PyAV opens `path` as a video whose header counts its frames (what sampling by
    `fps` or `num_frames` needs)."""
    try:
        import av
    except ImportError:
        raise ExampleError(f"{where}: video files are decoded with PyAV (pip install av); pass the frames as a list "
                           f"or a directory instead: {path}") from None
    try:
        with av.open(str(path)) as container:
            frames = container.streams.video[0].frames if container.streams.video else None
    except Exception as error:  # PyAV raises its own error types (InvalidDataError, ...) for unreadable files
        raise ExampleError(f"{where}: cannot decode video {path} ({error}); pass its frames as a list instead") from None
    if not frames:
        reason = "has no video stream" if frames is None else "does not count its frames in its header"
        raise ExampleError(f"{where}: video {path} {reason}; pass its frames as a list or a directory instead")


def read_video(path: Path, video_processor) -> tuple[Any, Any]:
    """`(frames [num_frames, height, width, 3] uint8, VideoMetadata)` of a video file decoded with PyAV: only the frames
    `video_processor` samples (its `fps` or `num_frames`) where it samples (`do_sample_frames`), else every frame. The
    metadata records the sampled indices, from which Qwen2.5-VL times its temporal positions."""
    from transformers.video_utils import load_video

    sample = video_processor.sample_frames if getattr(video_processor, "do_sample_frames", False) else None
    return load_video(str(path), backend="pyav", sample_indices_fn=sample)


def _parse_content(raw: Any, base_dir: Path, where: str, decode: bool = True) -> list[dict]:
    if isinstance(raw, str):
        return [{"type": "text", "text": raw}]
    if not isinstance(raw, list) or not raw:
        raise ExampleError(f"{where}: message content must be a string or a non-empty list of parts")
    parts = []
    for part in raw:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise ExampleError(f"{where}: a text part needs a string 'text'")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            image = part.get("image", part.get("url", part.get("path")))
            if image is None:
                raise ExampleError(f"{where}: an image part needs 'image'")
            parts.append({"type": "image", "image": _open_image(image, base_dir, where, decode)})
        elif kind == "video":
            video = part.get("video", part.get("frames", part.get("path")))
            if video is None:
                raise ExampleError(f"{where}: a video part needs 'video' (a file or a list of frames)")
            parts.append({"type": "video", "video": _open_video(video, base_dir, where, decode)})
        else:
            raise ExampleError(f"{where}: unknown content type {kind!r} (expected 'text', 'image' or 'video')")
    return parts


def parse_example(record: Any, base_dir: Path, where: str, require_answer: bool, decode: bool = True) -> Example:
    """Parses one record in the messages format or the shorthand of design §6.

    With `decode=False` images and videos are only checked (the file exists), not decoded: each image part holds the
    file's path (or the PIL image given) and each video part its frames' paths or the video file's path, until
    `decode_media` decodes them.
    """
    if not isinstance(record, dict):
        raise ExampleError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ExampleError(f"{where}: 'messages' must be a non-empty list")
        user_turns = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if len(user_turns) != 1 or len(messages) != 1:
            raise ExampleError(f"{where}: 'messages' must hold exactly one user message (the answer goes in 'answer')")
        content = _parse_content(user_turns[0].get("content"), base_dir, where, decode)
    else:
        content = []
        if "image" in record:
            content.append({"type": "image", "image": _open_image(record["image"], base_dir, where, decode)})
        for image in record.get("images", []):
            content.append({"type": "image", "image": _open_image(image, base_dir, where, decode)})
        if "video" in record or "frames" in record:
            video = record.get("video", record.get("frames"))
            content.append({"type": "video", "video": _open_video(video, base_dir, where, decode)})
        question = record.get("question")
        if question is not None and not isinstance(question, str):
            raise ExampleError(f"{where}: 'question' must be a string")
        if question:
            content.append({"type": "text", "text": question})
        if not content:
            raise ExampleError(f"{where}: needs 'messages' or 'question'/'image'/'images'/'video'/'frames'")
    answer = record.get("answer")
    if answer is None and require_answer:
        raise ExampleError(f"{where}: a demonstration needs an 'answer'")
    if answer is not None and not isinstance(answer, str):
        raise ExampleError(f"{where}: 'answer' must be a string")
    choices = record.get("choices")
    if choices is not None and (not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices)):
        raise ExampleError(f"{where}: 'choices' must be a non-empty list of strings")
    return Example(content=content, answer=answer, choices=choices, id=record.get("id"), where=where)


def load_examples(source: str | os.PathLike | Iterable[dict | Example], require_answer: bool = True,
                  decode: bool = True) -> list[Example]:
    """Reads demonstrations or queries from a JSONL file or a list of dicts; bad input raises `ExampleError`.

    Every line is checked before anything is returned, so a bad line never yields a partial list. With `decode=False`
    images and videos are checked but left undecoded (`parse_example`; `decode_media` decodes an example).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ExampleError(f"{path}: file not found")
        examples = []
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ExampleError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
                examples.append(parse_example(record, path.parent, where, require_answer, decode))
        if not examples:
            raise ExampleError(f"{path}: no examples in file")
        return examples
    examples = []
    for index, record in enumerate(source):
        if not isinstance(record, Example) and dataclasses.is_dataclass(record) and type(record).__name__ == "Example":
            # an Example of another copy of this module (the model's and the processor's remote code load apart)
            record = Example(**{f.name: getattr(record, f.name) for f in dataclasses.fields(Example)})
        if isinstance(record, Example):
            if require_answer and record.answer is None:
                raise ExampleError(f"{record.where}: a demonstration needs an 'answer'")
            examples.append(record)
        else:
            examples.append(parse_example(record, Path.cwd(), f"<list>[{index}]", require_answer, decode))
    if not examples:
        raise ExampleError("<list>: no examples given")
    return examples


def decode_media(example: Example) -> Example:
    """An example read with `decode=False`, its images and video frames decoded (as `decode=True` reads them)."""
    if not example.has_media:
        return example
    content = []
    for part in example.content:
        if part["type"] == "image":
            part = {"type": "image", "image": _open_image(part["image"], Path(), example.where)}
        elif part["type"] == "video":
            part = {"type": "video", "video": _open_video(part["video"], Path(), example.where)}
        content.append(part)
    return dataclasses.replace(example, content=content)


def examples_sha256(examples: Sequence[Example]) -> str:
    """SHA-256 of examples as they enter a memory: texts, answers, choices, ids and the bytes of every image and video
    (the files' contents, not their paths), in order. Works on examples read with `decode=False` without decoding."""
    from PIL import Image

    def media(item) -> Any:
        if isinstance(item, (list, tuple)):
            return [media(frame) for frame in item]
        digest = hashlib.sha256()
        if isinstance(item, Image.Image):
            digest.update(f"{item.mode}:{item.size}".encode())
            digest.update(item.tobytes())
        else:
            with open(item, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()

    digest = hashlib.sha256()
    for example in examples:
        content = [part if part["type"] == "text" else {"type": part["type"], "sha256": media(part[part["type"]])}
                   for part in example.content]
        record = {"content": content, "answer": example.answer, "choices": example.choices, "id": example.id}
        digest.update(json.dumps(record, sort_keys=True, default=str).encode() + b"\n")
    return digest.hexdigest()


__all__ = ["Example", "ExampleError", "decode_media", "examples_sha256", "load_examples", "parse_example", "read_video"]
