# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
Emloc processor: demonstrations and queries (design §6) → model inputs with chunk and answer spans.

A demonstration is a user turn (text, images, video frames) and the assistant's answer. The processor renders a list
of them with the base model's own chat template (or the `plain` few-shot rendering for small text models) and splits
the rendering into a template prefix, one span per demonstration (with its answer span) and, for queries, the final
user turn plus the generation prompt.

Render first, tokenise once: the rendering is one text annotated per character (token type, and which piece owns it:
the template prefix, demonstration `i`, the query), found from the template itself — the rendering of the first `k`
turns is a prefix of the rendering of `k+1` turns, and the generation prompt is what the template adds before an
assistant reply — never from hard-coded token ids or character counts. The whole text is then tokenised in one call
and every span is read off the tokenizer's character offsets, so the memory holds exactly the tokens the model would
see in the whole conversation (Gemma 3 reads "\n\n" as one token, not two). A token that straddles two pieces
belongs to the piece of its first character.

Rendering and tokenising need only the demonstrations' text, so a builder streams: `stream_context` checks every
demonstration and tokenises the whole text up front, and decodes a demonstration's images and video frames only when
its span is read.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from transformers import AutoTokenizer, BatchFeature
from transformers.processing_utils import ProcessorMixin


# Token types, recorded per token so that memory statistics can say what was kept (paper, Fig. 5). VIDEO came last:
# memories built before it count their (image-only) visual tokens as IMAGE.
TEMPLATE, TEXT, IMAGE, ANSWER, VIDEO = 0, 1, 2, 3, 4
TOKEN_TYPE_NAMES = {TEMPLATE: "template", TEXT: "text", IMAGE: "image", ANSWER: "answer", VIDEO: "video"}

# The settings of an image or video processor that decide which frames are taken and how many visual tokens they
# become (a memory records those a processor sets: `EmlocProcessor.rendering()`).
VISION_SAMPLING_KEYS = ("do_sample_frames", "fps", "num_frames", "min_frames", "max_frames", "size", "min_pixels",
                        "max_pixels", "cap_pixels_per_frame", "max_video_tokens", "patch_size", "temporal_patch_size",
                        "merge_size")

PROCESSOR_CONFIG_NAME = "processor_config.json"
EMLOC_KEY = "emloc"  # our settings live under this key of processor_config.json
TEMPLATES = ("chat", "plain")


# ---------------------------------------------------------------------------------------------------------------------
# Examples: parsing demonstrations and queries
# ---------------------------------------------------------------------------------------------------------------------


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
    path, checked with PyAV (its frames are decoded when the processor expands it: `_read_video`). With
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


def _read_video(path: Path, video_processor) -> tuple[Any, Any]:
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


# ---------------------------------------------------------------------------------------------------------------------
# Encoded spans
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EncodedSpan:
    """Tokens of a piece of the rendering, with their media.

    Attributes:
        input_ids: `[seq_len]` token ids.
        token_types: `[seq_len]` one of TEMPLATE, TEXT, IMAGE, VIDEO, ANSWER.
        media: processor outputs for the span's images / video frames (`pixel_values`, `image_grid_thw`, ...),
            concatenated along dim 0 when spans are joined.
    """

    input_ids: torch.Tensor
    token_types: torch.Tensor
    media: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @staticmethod
    def concat(spans: Sequence["EncodedSpan"]) -> "EncodedSpan":
        spans = [s for s in spans if s is not None]
        media: dict[str, list[torch.Tensor]] = {}
        for span in spans:
            for key, value in span.media.items():
                media.setdefault(key, []).append(value)
        return EncodedSpan(
            input_ids=torch.cat([s.input_ids for s in spans]),
            token_types=torch.cat([s.token_types for s in spans]),
            media={key: torch.cat(values) for key, values in media.items()},
        )

    @property
    def answer_mask(self) -> torch.Tensor:
        return self.token_types == ANSWER


@dataclass
class EncodedContext:
    """A demonstration context split as the memory builder needs it.

    `prefix` is the template prefix (system turn, BOS; possibly empty), `demos[i]` the i-th demonstration's user turn
    and answer. `EncodedSpan.concat([prefix, *demos])` is, token for token, the tokenisation of the whole rendered
    conversation (as it is followed by a query).
    """

    prefix: EncodedSpan
    demos: list[EncodedSpan]
    examples: list[Example]


class StreamedContext:
    """A demonstration context whose demonstrations are encoded when they are read (`EmlocProcessor.stream_context`).

    It reads like `EncodedContext` — `prefix`, `demos[i]`, `examples[i]`, `len(context)` — and gives the same spans
    token for token, since the whole rendered text was tokenised once; but it holds only each demonstration's token ids
    before its images are expanded (a few bytes a token) and its text. A demonstration's images and video frames are
    decoded, and their visual tokens expanded, when `demos[i]` or `examples[i]` is read; the `cache_size` most recently
    read demonstrations are kept. The number of demonstrations is then bounded by disk, not by memory.
    """

    def __init__(self, processor: "EmlocProcessor", examples: list[Example], prefix: EncodedSpan,
                 tokens: list[tuple[torch.Tensor, torch.Tensor]], cache_size: int = 8):
        self.processor, self.prefix, self.cache_size = processor, prefix, cache_size
        self._unread, self._tokens = examples, tokens  # examples as `load_examples(..., decode=False)` reads them
        self._cache: OrderedDict[int, tuple[Example, EncodedSpan]] = OrderedDict()
        self.demos = _LazySequence(len(examples), lambda index: self._read(index)[1])
        self.examples = _LazySequence(len(examples), lambda index: self._read(index)[0])

    def __len__(self) -> int:
        return len(self._unread)

    def _read(self, index: int) -> tuple[Example, EncodedSpan]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        example = decode_media(self._unread[index])
        ids, types = self._tokens[index]
        entry = example, self.processor._encode_tokens(ids.tolist(), types.tolist(), example)
        self._cache[index] = entry
        while len(self._cache) > max(1, self.cache_size):
            self._cache.popitem(last=False)
        return entry

    def sha256(self) -> str:
        """`examples_sha256` of the demonstrations (reads image and video files, decodes none)."""
        return examples_sha256(self._unread)


class _LazySequence(Sequence):
    """A read-only sequence of `length` items made by `get(index)` when read."""

    def __init__(self, length: int, get):
        self._length, self._get = length, get

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} demonstrations")
        return self._get(index % self._length)


def _empty_span() -> EncodedSpan:
    return EncodedSpan(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


# a conversation that stands in for one not known yet (the template prefix is what precedes any first turn)
_STAND_IN = Example(content=[{"type": "text", "text": "Hello."}], answer="Hi.", where="<template prefix>")


# ---------------------------------------------------------------------------------------------------------------------
# Rendered text, annotated per character
# ---------------------------------------------------------------------------------------------------------------------

PREFIX_OWNER = -1  # owner of the template prefix; demonstration `i` owns its characters as `i`
TOKENIZATION = "whole-text"  # recorded in memories: how rendered text became tokens (design §7)


class TokenizationError(ValueError):
    """The tokenizer merges text across a boundary the memory has to cut at (the end of the demonstrations)."""


class RenderedText:
    """A rendering with, for every character, the token type and the owner its tokens take.

    The owner is `PREFIX_OWNER` for the template prefix, `i` for the i-th demonstration, and whatever number the caller
    gives the query or a stand-in continuation. Annotations are stored as runs: run `k` covers the characters from
    `starts[k]` to `starts[k + 1]`.
    """

    def __init__(self):
        self._pieces: list[str] = []
        self.length = 0
        self.starts: list[int] = []
        self.types: list[int] = []
        self.owners: list[int] = []
        # (character right after a chat answer, its owner): the first token from there on ends the turn and is marked
        # as part of the answer (an end-of-turn token is what a chat rendering learns answers end with)
        self.answer_ends: list[tuple[int, int]] = []

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def add(self, text: str, token_type: int, owner: int) -> None:
        if not text:
            return
        self._pieces.append(text)
        self.starts.append(self.length)
        self.types.append(token_type)
        self.owners.append(owner)
        self.length += len(text)

    def mark_answer_end(self, owner: int) -> None:
        self.answer_ends.append((self.length, owner))

    def at(self, char: int) -> tuple[int, int]:
        """`(token_type, owner)` of a character."""
        run = max(0, bisect.bisect_right(self.starts, char) - 1)
        return self.types[run], self.owners[run]


@dataclass
class _Token:
    id: int
    start: int  # first character (see `EmlocProcessor._tokenize`)
    end: int
    token_type: int
    owner: int



# ---------------------------------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------------------------------


class EmlocProcessor(ProcessorMixin):
    r"""
    Renders demonstrations and queries for an Emloc model and turns them into model inputs.

    Wraps the base model's processor (vision-language models) or tokenizer (text models).

    Args:
        base_processor: the base model's `ProcessorMixin` (e.g. `Qwen2VLProcessor`) or tokenizer.
        template (`str`, defaults to `"chat"`): `"chat"` uses the base model's chat template, demonstrations as
            alternating user/assistant turns; `"plain"` renders a text few-shot prompt without chat markup (an optional
            instruction line, each demonstration's text, its answer on the next line, a blank line between them).
        instruction (`str`, *optional*): first line of the `plain` rendering.
    """

    def __init__(self, base_processor=None, template: str = "chat", instruction: str | None = None, **kwargs):
        super().__init__()
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        if base_processor is None:
            raise ValueError("EmlocProcessor needs the base model's processor or tokenizer")
        self.base_processor = base_processor
        self.template = template
        self.instruction = instruction
        if self.is_multimodal and template == "plain":
            raise ValueError("template='plain' is for text models; a vision-language base needs template='chat'")
        if template == "chat" and self._chat_template() is None:
            raise ValueError("the base tokenizer has no chat template; use template='plain'")
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                f"EmlocProcessor needs a fast tokenizer (spans come from its character offsets), got "
                f"{type(self.tokenizer).__name__}"
            )

    # -- construction and persistence ---------------------------------------------------------------------------------

    @classmethod
    def from_base(cls, base: str | os.PathLike | Any, template: str = "chat", instruction: str | None = None, **load_kwargs):
        """Wraps the processor (or tokenizer) of a base model: a Hub id, a local directory, a GGUF file
        (`gguf_file=`) or an already loaded processor / tokenizer."""
        if isinstance(base, (str, os.PathLike)):
            base = _load_base_processor(str(base), **load_kwargs)
        return cls(base, template=template, instruction=instruction)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Writes the base processor's files plus our settings under `"emloc"` in `processor_config.json`, with an
        `auto_map` so that `AutoProcessor.from_pretrained(dir, trust_remote_code=True)` loads an `EmlocProcessor`."""
        os.makedirs(save_directory, exist_ok=True)
        self.base_processor.save_pretrained(save_directory)
        config_path = Path(save_directory) / PROCESSOR_CONFIG_NAME
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        base_auto_map = _save_remote_code_class(type(self.base_processor), save_directory)
        config[EMLOC_KEY] = {
            "template": self.template,
            "instruction": self.instruction,
            "base_processor_class": type(self.base_processor).__name__,
            "base_auto_map": base_auto_map,
        }
        config["auto_map"] = {"AutoProcessor": "processing_emloc.EmlocProcessor"}
        config["processor_class"] = "EmlocProcessor"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _copy_remote_code(save_directory)
        if push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(folder_path=save_directory, **kwargs)
        return [str(config_path)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        trust_remote_code = kwargs.pop("trust_remote_code", None)
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
            path = snapshot_download(path, **hub_kwargs)
        config_path = Path(path) / PROCESSOR_CONFIG_NAME
        settings = json.loads(config_path.read_text()).get(EMLOC_KEY, {}) if config_path.is_file() else {}
        if settings.get("base_auto_map"):
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            extra = {"trust_remote_code": trust_remote_code} if trust_remote_code is not None else {}
            base = get_class_from_dynamic_module(settings["base_auto_map"], path).from_pretrained(path, **extra)
        else:
            extra = {"trust_remote_code": trust_remote_code} if trust_remote_code is not None else {}
            base = _load_base_processor(path, class_name=settings.get("base_processor_class"), **extra)
        return cls(base, template=settings.get("template", "chat"), instruction=settings.get("instruction"))

    # -- base model facts -----------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        return getattr(self.base_processor, "tokenizer", self.base_processor)

    @property
    def is_multimodal(self) -> bool:
        return hasattr(self.base_processor, "image_processor")

    def _chat_template(self):
        return getattr(self.base_processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)

    def __repr__(self):
        return f"EmlocProcessor(template={self.template!r}, base={type(self.base_processor).__name__})"

    # -- rendering ------------------------------------------------------------------------------------------------------

    def _message(self, example: Example, role: str = "user") -> dict:
        if self.is_multimodal:
            content = [{"type": p["type"]} if p["type"] != "text" else dict(p) for p in example.content]
            return {"role": role, "content": content}
        if example.has_media:
            raise ExampleError(f"{example.where}: images or video given, but the base model is text-only")
        return {"role": role, "content": example.text}

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return self.base_processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _delta(self, history_text: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """What the template adds to `history_text` (the rendering of `messages[:-k]`) when the rest is rendered."""
        text = self._render(messages, add_generation_prompt)
        if not text.startswith(history_text):
            raise ValueError(
                "the chat template is not prefix-stable (rendering more turns changes earlier text); "
                "Emloc cannot split it into chunks"
            )
        return text[len(history_text):]

    def _render_context(self, examples: Sequence[Example]) -> tuple[RenderedText, int]:
        """The whole demonstration context and where it ends, followed by a stand-in for what follows it in a real
        conversation (the first demonstration asked again as the query), which the caller drops after tokenising:
        the last tokens of a text can differ from the same text followed by more (byte-level BPE reads a final
        "\n\n" as one token, and "\n\nword" as "\n", "\n", "word")."""
        rendered = RenderedText()
        follower = len(examples)
        if self.template == "plain":
            rendered.add(self._plain_prefix_text(), TEMPLATE, PREFIX_OWNER)
            for index, example in enumerate(examples):
                for text, token_type in self._plain_demo(example):
                    rendered.add(text, token_type, index)
            end = rendered.length
            rendered.add(self._plain_user(examples[0]), TEXT, follower)
            return rendered, end
        messages: list[dict] = []
        history = ""
        for index, example in enumerate(examples):
            messages.append(self._message(example))
            user_text = self._delta(history, messages)
            history += user_text
            if index == 0:
                prefix_text, user_text = self._split_template_prefix(user_text, example)
                rendered.add(prefix_text, TEMPLATE, PREFIX_OWNER)
            self._add_user_turn(rendered, user_text, example, index)
            generation_prompt = self._delta(history, messages, add_generation_prompt=True)
            messages.append({"role": "assistant", "content": example.answer})
            assistant_text = self._delta(history, messages)
            history += assistant_text
            self._add_answer(rendered, assistant_text, generation_prompt, example, index)
        end = rendered.length
        messages.append(self._message(examples[0]))
        rendered.add(self._delta(history, messages, add_generation_prompt=True), TEMPLATE, follower)
        return rendered, end

    def _split_template_prefix(self, first_turn: str, example: Example) -> tuple[str, str]:
        """Separates what the template puts before the first user turn (system prompt, BOS): `(prefix, turn)`.

        The same user turn rendered later in a conversation shows what the turn itself looks like; what the first
        rendering has in front of it is the prefix. Templates that fold the system prompt into the first turn give no
        such split: then the prefix is empty and the whole first turn belongs to the first demonstration.
        """
        stand_in = [self._message(example), {"role": "assistant", "content": example.answer}]
        later_turn = self._delta(self._render(stand_in), stand_in + [self._message(example)])
        if later_turn and first_turn.endswith(later_turn):
            return first_turn[: -len(later_turn)], later_turn
        return "", first_turn

    def _add_user_turn(self, rendered: RenderedText, text: str, example: Example, owner: int) -> None:
        """A rendered user turn: the user's text parts are TEXT, the template markup around them (and the image/video
        placeholders, typed IMAGE once expanded) is TEMPLATE."""
        rest = text
        for part in example.content:
            if part["type"] != "text" or not part["text"]:
                continue
            at = rest.find(part["text"])
            if at < 0:  # the template rewrote the text (e.g. stripped it); its tokens count as template
                continue
            rendered.add(rest[:at], TEMPLATE, owner)
            rendered.add(part["text"], TEXT, owner)
            rest = rest[at + len(part["text"]):]
        rendered.add(rest, TEMPLATE, owner)

    def _add_answer(self, rendered: RenderedText, assistant_text: str, generation_prompt: str, example: Example,
                    owner: int) -> None:
        """`generation_prompt` (template) + the answer (+ the end-of-turn token: the first token after the answer)."""
        if not assistant_text.startswith(generation_prompt):
            raise ValueError("the chat template's generation prompt is not the start of the assistant turn")
        reply = assistant_text[len(generation_prompt):]
        at = reply.find(example.answer)
        if at < 0:
            raise ExampleError(f"{example.where}: the chat template dropped or rewrote the answer {example.answer!r}")
        rendered.add(generation_prompt + reply[:at], TEMPLATE, owner)
        rendered.add(example.answer, ANSWER, owner)
        rendered.mark_answer_end(owner)
        rendered.add(reply[at + len(example.answer):], TEMPLATE, owner)

    def _prefix_text(self) -> str:
        """The template prefix alone (system turn, BOS): what precedes the first turn of any conversation."""
        if self.template == "plain":
            return self._plain_prefix_text()
        prefix, _ = self._split_template_prefix(self._render([self._message(_STAND_IN)]), _STAND_IN)
        return prefix

    def _query_turn(self, query: Example, history: Sequence[Example] | None) -> tuple[str, list[tuple[str, int | None]]]:
        """The query as it follows a demonstration: `(stand-in conversation before it, [(text, token_type), ...])`.

        The stand-in is the last demonstration of `history`, or, by default, the query itself answered: it matters
        only for templates that render a turn differently depending on what came before, and for the tokens at the
        seam (which must not merge across it).
        """
        answer = query.answer or (query.choices[0] if query.choices else "")
        stand_in = history[-1] if history else Example(content=query.content, answer=answer, where=query.where)
        if self.template == "plain":
            before = self._plain_prefix_text() + "".join(text for text, _ in self._plain_demo(stand_in))
            return before, [(self._plain_user(query), TEXT)]
        messages = [self._message(stand_in), {"role": "assistant", "content": stand_in.answer or ""}]
        before = self._render(messages)
        messages.append(self._message(query))
        user_text = self._delta(before, messages)
        generation_prompt = self._delta(before + user_text, messages, add_generation_prompt=True)
        return before, [(user_text, None), (generation_prompt, TEMPLATE)]

    def _add_query(self, rendered: RenderedText, pieces: list[tuple[str, int | None]], query: Example, owner: int) -> None:
        for text, token_type in pieces:
            if token_type is None:  # a chat user turn: typed part by part
                self._add_user_turn(rendered, text, query, owner)
            else:
                rendered.add(text, token_type, owner)

    # -- plain rendering ------------------------------------------------------------------------------------------------

    def _plain_prefix_text(self) -> str:
        return self._leading_special_text() + (self.instruction + "\n\n" if self.instruction else "")

    def _leading_special_text(self) -> str:
        """What the tokenizer itself puts in front of every text it encodes (BOS for Gemma and Llama, nothing for
        SmolLM2), as text: a plain prompt starts as `tokenizer(prompt)` starts. Read from the tokenizer's own output,
        since `add_bos_token` does not tell (a Gemma tokenizer loaded from GGUF says False and adds `<bos>`)."""
        sample = "a"
        with_special = self.tokenizer(sample)["input_ids"]
        without = self.tokenizer(sample, add_special_tokens=False)["input_ids"]
        lead = next((k for k in range(len(with_special) - len(without) + 1)
                     if with_special[k:k + len(without)] == without), 0)
        text = "".join(self.tokenizer.convert_ids_to_tokens(with_special[:lead]))
        if self.tokenizer(text, add_special_tokens=False)["input_ids"] != with_special[:lead]:
            return ""  # not special tokens that read back from their text: nothing we could render
        return text

    def _plain_user(self, example: Example) -> str:
        if example.has_media:
            raise ExampleError(f"{example.where}: template='plain' renders text only")
        return example.text + "\n"

    def _plain_demo(self, example: Example) -> list[tuple[str, int]]:
        # The answer's line break ends the answer, as an end-of-turn token does in a chat rendering; the blank line
        # after it is template. A tokenizer that merges "\n\n" gives one token starting in the answer: an answer token.
        return [(self._plain_user(example), TEXT), (example.answer + "\n", ANSWER), ("\n", TEMPLATE)]

    # -- tokenising -----------------------------------------------------------------------------------------------------

    def _tokenize(self, rendered: RenderedText, begin: int, end: int) -> list[_Token]:
        """Tokenises the whole rendered text once and returns the tokens of `text[begin:end]`, typed and owned.

        Rule for a token that straddles two annotated pieces (a merged "\\n\\n" between two demonstrations): it belongs
        to the piece of its FIRST character, owner and type. A token's first character is where its offsets start, or
        earlier where the offsets skip characters (a byte-level tokenizer trims the leading space of " word"; a
        normaliser drops characters): those belong to the token that follows them.

        `begin` and `end` are seams where the caller cuts the text (the end of the demonstrations, the start of the
        query): a token crossing one would belong to both sides, so it raises `TokenizationError`.
        """
        text = rendered.text
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        tokens = []
        covered = 0
        for token_id, (start, stop) in zip(encoding["input_ids"], encoding["offset_mapping"]):
            start = min(start, covered)
            covered = max(covered, stop)
            for seam in (begin, end):
                if 0 < seam < rendered.length and start < seam < stop:
                    raise TokenizationError(
                        f"the tokenizer merges text across the demonstrations/query boundary: token "
                        f"{self.tokenizer.convert_ids_to_tokens(token_id)!r} covers {text[start:stop]!r}, which "
                        f"starts before character {seam} and ends after it, so no memory can be cut there (does a "
                        f"demonstration or query start or end with whitespace?)"
                    )
            if begin <= start < end:
                tokens.append(_Token(token_id, start, stop, *rendered.at(start)))
        # a chat answer's end-of-turn token is part of the answer span (design §4)
        starts = [token.start for token in tokens]
        for char, owner in rendered.answer_ends:
            after = bisect.bisect_left(starts, char)
            if after < len(tokens) and tokens[after].owner == owner:
                tokens[after].token_type = ANSWER
        return tokens

    def _spans(self, tokens: list[_Token], examples: dict[int, Example]) -> dict[int, EncodedSpan]:
        """Groups tokens by owner into spans; expands every image/video placeholder into its visual tokens with the
        owner's next image or video (the base processor on that placeholder alone)."""
        return {owner: self._encode_tokens(ids, types, examples.get(owner)) for owner, (ids, types) in self._group(tokens).items()}

    @staticmethod
    def _group(tokens: list[_Token]) -> dict[int, tuple[list[int], list[int]]]:
        """Token ids and types by owner, in text order."""
        grouped: dict[int, tuple[list[int], list[int]]] = {}
        for token in tokens:
            ids, types = grouped.setdefault(token.owner, ([], []))
            ids.append(token.id)
            types.append(token.token_type)
        return grouped

    def _check_placeholders(self, ids: list[int], example: Example | None) -> None:
        """Raises `ExampleError` unless the image/video placeholders among `ids` are the example's images and videos,
        in number, kind and order. Reads the content's part types only: nothing is decoded."""
        placeholders = self._placeholder_ids() if self.is_multimodal else {}
        media = [part["type"] for part in example.content if part["type"] in ("image", "video")] if example is not None else []
        found = [placeholders[token_id] for token_id in ids if token_id in placeholders]
        where = example.where if example is not None else "<template prefix>"
        if len(found) != len(media):
            raise ExampleError(
                f"{where}: the chat template rendered {len(found)} image/video placeholders for the {len(media)} "
                f"images/videos given"
            )
        if found != media:
            raise ExampleError(f"{where}: the chat template's image/video placeholders do not match the content")
        if "video" in media and getattr(self.base_processor, "video_processor", None) is None:
            raise ExampleError(f"{where}: a video was given, but the base processor has no video processor "
                               f"(transformers builds one only where torchvision loads)")

    def _encode_tokens(self, token_ids: list[int], token_types: list[int], example: Example | None) -> EncodedSpan:
        """A span from token ids and types `[seq_len]`, each image/video placeholder expanded with the example's next
        image or video (decoded)."""
        self._check_placeholders(token_ids, example)
        placeholders = self._placeholder_ids() if self.is_multimodal else {}
        media = iter([part for part in example.content if part["type"] in ("image", "video")] if example is not None else [])
        ids: list[torch.Tensor] = []
        types: list[torch.Tensor] = []
        tensors: dict[str, list[torch.Tensor]] = {}
        plain_ids, plain_types = [], []

        def flush():
            if plain_ids:
                ids.append(torch.tensor(plain_ids, dtype=torch.long))
                types.append(torch.tensor(plain_types, dtype=torch.long))
                plain_ids.clear()
                plain_types.clear()

        for token_id, token_type in zip(token_ids, token_types):
            kind = placeholders.get(token_id)
            if kind is None:
                plain_ids.append(token_id)
                plain_types.append(token_type)
                continue
            part = next(media)
            flush()
            try:
                expanded = self._expand_placeholder(kind, part[kind])
            except ValueError as error:  # e.g. sampling by fps asked of frames that carry no frame rate
                raise ExampleError(f"{example.where}: the base processor refused this {kind}: {error}") from None
            ids.append(expanded.pop("input_ids"))
            types.append(torch.full_like(ids[-1], IMAGE if kind == "image" else VIDEO))
            for key, value in expanded.items():
                tensors.setdefault(key, []).append(value)
        flush()
        if not ids:
            return _empty_span()
        return EncodedSpan(torch.cat(ids), torch.cat(types), {key: torch.cat(values) for key, values in tensors.items()})

    def _placeholder_ids(self) -> dict[int, str]:
        """Token id of the image and video placeholders (`processor.image_token`, `.video_token`) → `"image"`/`"video"`."""
        found = {}
        for kind in ("image", "video"):
            token = getattr(self.base_processor, f"{kind}_token", None)
            if token:
                found[self.tokenizer.convert_tokens_to_ids(token)] = kind
        return found

    def _expand_placeholder(self, kind: str, media: Any) -> dict[str, torch.Tensor]:
        """The base processor on one placeholder with its image (or video): the visual tokens it stands for
        (`input_ids`, `[num_visual_tokens]`) and the vision inputs (`pixel_values`, `image_grid_thw`, ...)."""
        processor = self.base_processor
        token = getattr(processor, f"{kind}_token")
        inputs = {"images": [media]} if kind == "image" else self._video_inputs(media)
        outputs = processor(text=[token], add_special_tokens=False, return_tensors="pt", **inputs)
        expanded = {"input_ids": outputs["input_ids"][0]}
        expanded.update({
            key: value
            for key, value in outputs.items()
            if key not in ("input_ids", "attention_mask", "mm_token_type_ids") and isinstance(value, torch.Tensor)
        })
        return expanded

    def _video_inputs(self, video: list | Path) -> dict:
        """The base processor's video arguments for a list of frames (sampled, or not, as the video processor would
        sample any frames it is given), or for a video file: its frames decoded and sampled here (`_read_video`),
        with the metadata that times them."""
        if not isinstance(video, (str, os.PathLike)):
            return {"videos": [video]}
        frames, metadata = _read_video(Path(video), self.base_processor.video_processor)
        return {"videos": [frames], "video_metadata": [metadata], "do_sample_frames": False}

    def _vision_sampling(self) -> dict | None:
        """The settings of the base image and video processors that decide which frames and how many visual tokens an
        image or video becomes (those of `VISION_SAMPLING_KEYS` they set), None for a text model. Part of
        `rendering()`."""
        if not self.is_multimodal:
            return None
        settings = {}
        for kind in ("image", "video"):
            sub_processor = getattr(self.base_processor, f"{kind}_processor", None)
            if sub_processor is None:
                settings[kind] = None
                continue
            values = {key: getattr(sub_processor, key, None) for key in VISION_SAMPLING_KEYS}
            if values["size"] is not None:  # a dict or transformers' SizeDict: its set entries, as JSON keeps them
                values["size"] = {key: value for key, value in dict(values["size"]).items() if value is not None}
            settings[kind] = {key: value for key, value in values.items() if value is not None}
        return settings

    # -- public encoding ------------------------------------------------------------------------------------------------

    def encode_context(self, demos: str | os.PathLike | Iterable[dict | Example]) -> EncodedContext:
        """Renders demonstrations as one context and splits it into the template prefix and per-demo spans.

        The context is tokenised as one text (followed by a stand-in query, as it will be in use), so
        `EncodedSpan.concat([prefix, *demos])` is the tokenisation of the whole rendered conversation; each token
        belongs to the piece its first character belongs to (`_tokenize`).
        """
        examples = load_examples(demos, require_answer=True)
        rendered, end = self._render_context(examples)
        spans = self._spans(self._tokenize(rendered, 0, end), dict(enumerate(examples)))
        return EncodedContext(
            prefix=spans.get(PREFIX_OWNER, _empty_span()),
            demos=[spans.get(index, _empty_span()) for index in range(len(examples))],
            examples=examples,
        )

    def stream_context(self, demos: str | os.PathLike | Iterable[dict | Example], cache_size: int = 8) -> StreamedContext:
        """`encode_context` for contexts too large to hold decoded: the same spans, each encoded when it is read.

        Every demonstration is checked first — its JSON, required keys, that its image and video files exist, and that
        the template renders a placeholder for each image and video — so a bad line raises `ExampleError` naming
        `file:line` before any work. The whole context is then rendered and tokenised once, as `encode_context` does
        (text only, cheap); images and video frames are decoded when their demonstration is read (`StreamedContext`).
        """
        examples = load_examples(demos, require_answer=True, decode=False)
        rendered, end = self._render_context(examples)
        grouped = self._group(self._tokenize(rendered, 0, end))
        tokens = []
        for index, example in enumerate(examples):
            ids, types = grouped.get(index, ([], []))
            self._check_placeholders(ids, example)
            tokens.append((torch.tensor(ids, dtype=torch.long), torch.tensor(types, dtype=torch.long)))
        prefix = self._encode_tokens(*grouped.get(PREFIX_OWNER, ([], [])), None)
        return StreamedContext(self, examples, prefix, tokens, cache_size=cache_size)

    def encode_query(self, query: Example, history: Sequence[Example] | None = None) -> EncodedSpan:
        """The query's user turn plus the generation prompt, as it follows the demonstrations in the full context.

        It is tokenised after a stand-in demonstration (the last of `history`, by default the query itself answered)
        and keeps only its own tokens; a token crossing into the query raises `TokenizationError`.
        """
        before, pieces = self._query_turn(query, history)
        rendered = RenderedText()
        rendered.add(before, TEMPLATE, PREFIX_OWNER)
        self._add_query(rendered, pieces, query, 0)
        tokens = self._tokenize(rendered, len(before), rendered.length)
        return self._spans(tokens, {0: query}).get(0, _empty_span())

    def encode_prefix(self) -> EncodedSpan:
        """The template prefix alone (system turn, BOS): what precedes the first turn of any conversation. A query
        answered without a memory (zero-shot) follows it, exactly as in a full context."""
        prefix = self._prefix_text()
        rendered = RenderedText()
        rendered.add(prefix, TEMPLATE, PREFIX_OWNER)
        _, pieces = self._query_turn(_STAND_IN, None)
        self._add_query(rendered, pieces, _STAND_IN, 0)
        return self._spans(self._tokenize(rendered, 0, len(prefix)), {}).get(PREFIX_OWNER, _empty_span())

    def _encode_zero_shot(self, query: Example) -> EncodedSpan:
        """Template prefix + query, tokenised as one text: the input of the base model without any memory."""
        _, pieces = self._query_turn(query, None)
        rendered = RenderedText()
        rendered.add(self._prefix_text(), TEMPLATE, PREFIX_OWNER)
        self._add_query(rendered, pieces, query, 0)
        spans = self._spans(self._tokenize(rendered, 0, rendered.length), {0: query})
        return EncodedSpan.concat([spans.get(PREFIX_OWNER, _empty_span()), spans.get(0, _empty_span())])

    def encode_choice(self, choice: str) -> torch.Tensor:
        """`tokenizer(choice, add_special_tokens=False)` — the tokens scored as the start of the reply."""
        return torch.tensor(self.tokenizer(choice, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def rendering(self) -> dict:
        """How this processor turns demonstrations into tokens. Memories record it (`memory_config.json`,
        `"rendering"`) and a processor whose rendering differs is refused (design §7). Holds no filesystem path.

        `chat_template_sha256` is None for the plain rendering, which does not use the chat template;
        `tokenizer_sha256` hashes what decides the tokens: the vocabulary and merges, the added tokens, the normaliser,
        the pre-tokeniser and the post-processor (what it puts in front of a text); `vision` holds, for a
        vision-language base, the image and video processors' sampling: frame rate or count, pixel caps, patch sizes.
        """
        chat_template = self._chat_template() if self.template == "chat" else None
        if chat_template is not None and not isinstance(chat_template, str):
            chat_template = json.dumps(chat_template, sort_keys=True)
        return {
            "template": self.template,
            "instruction": self.instruction,
            "chat_template_sha256": hashlib.sha256(chat_template.encode()).hexdigest() if chat_template is not None else None,
            "tokenizer_sha256": self._tokenizer_sha256(),
            "tokenization": TOKENIZATION,
            "vision": self._vision_sampling(),
        }

    def _tokenizer_sha256(self) -> str:
        # serialising a 256k-token vocabulary takes a while; scoring checks the rendering at every call
        key = (id(self.tokenizer.backend_tokenizer), len(self.tokenizer))
        if getattr(self, "_tokenizer_digest", (None, None))[0] != key:
            backend = json.loads(self.tokenizer.backend_tokenizer.to_str())
            # padding and truncation are per-call settings the tokenizer keeps in the same object and never change which
            # tokens a text gets; the post-processor says what goes in front of a text (the plain rendering's BOS)
            parts = ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor")
            decisive = {part: backend.get(part) for part in parts}
            digest = hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()
            self._tokenizer_digest = (key, digest)
        return self._tokenizer_digest[1]

    def collate(self, spans: Sequence[EncodedSpan], padding_side: str = "left") -> BatchFeature:
        """Pads encoded spans into a batch: `input_ids`/`attention_mask`/`token_types` `[batch, seq_len]` plus the
        concatenated media of all rows."""
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        length = max(len(s) for s in spans)
        input_ids = torch.full((len(spans), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(spans), length), dtype=torch.long)
        token_types = torch.full((len(spans), length), TEMPLATE, dtype=torch.long)
        for row, span in enumerate(spans):
            where = slice(length - len(span), length) if padding_side == "left" else slice(0, len(span))
            input_ids[row, where] = span.input_ids
            attention_mask[row, where] = 1
            token_types[row, where] = span.token_types
        data = {"input_ids": input_ids, "attention_mask": attention_mask, "token_types": token_types}
        data.update(EncodedSpan.concat(spans).media)
        return BatchFeature(data)

    def __call__(self, queries=None, return_tensors: str | None = "pt", history=None, add_template_prefix: bool = False,
                 **kwargs) -> BatchFeature:
        """Queries (dicts in the demonstration format, answer optional, or a JSONL path) → a left-padded batch.

        A memory holds the template prefix, so queries come without it; `add_template_prefix=True` puts it in front
        of each query (the two tokenised as one text), for the base model without any memory (zero-shot `generate`)."""
        if queries is None:
            raise ValueError("EmlocProcessor needs queries")
        if isinstance(queries, dict):
            queries = [queries]
        examples = load_examples(queries, require_answer=False)
        history = load_examples(history, require_answer=True) if history is not None else None
        if add_template_prefix:  # the prefix and the query as one text, as the base model reads a conversation
            return self.collate([self._encode_zero_shot(q) for q in examples])
        return self.collate([self.encode_query(q, history) for q in examples])

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    def decode(self, sequence, skip_special_tokens: bool = True, **kwargs) -> str:
        return self.tokenizer.decode(sequence, skip_special_tokens=skip_special_tokens, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Loading helpers
# ---------------------------------------------------------------------------------------------------------------------


def _load_base_processor(path: str, class_name: str | None = None, **load_kwargs):
    """Loads the base processor from a directory or Hub id: a multimodal processor where one exists, else the
    tokenizer. `class_name` (recorded when saving) avoids `AutoProcessor` resolving back to `EmlocProcessor`."""
    import transformers

    if class_name and hasattr(transformers, class_name) and not class_name.endswith("Fast") and "Tokenizer" not in class_name:
        return getattr(transformers, class_name).from_pretrained(path, **load_kwargs)
    if class_name is None and "gguf_file" not in load_kwargs:
        try:
            processor = transformers.AutoProcessor.from_pretrained(path, **load_kwargs)
            if hasattr(processor, "image_processor"):
                return processor
        except Exception:
            pass  # text-only bases have no processor; their tokenizer is the processor
    return AutoTokenizer.from_pretrained(path, **load_kwargs)


def _save_remote_code_class(cls: type, save_directory) -> str | None:
    """A base processor that is itself remote code (not a transformers class): copies its module next to the saved
    files and returns its `module.Class` reference, which `from_pretrained` loads it by."""
    import inspect
    import shutil

    import transformers

    if getattr(transformers, cls.__name__, None) is cls:
        return None
    source = Path(inspect.getfile(cls))
    target = Path(save_directory) / source.name
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)
    return f"{source.stem}.{cls.__name__}"


def _copy_remote_code(save_directory) -> None:
    """Copies the Emloc modules next to a saved repo so that `trust_remote_code=True` can import them."""
    import shutil

    here = Path(__file__).resolve().parent
    for module in here.glob("*_emloc.py"):
        target = Path(save_directory) / module.name
        if module.resolve() != target.resolve():
            shutil.copyfile(module, target)


__all__ = [
    "EmlocProcessor", "Example", "ExampleError", "EncodedSpan", "EncodedContext", "RenderedText", "StreamedContext",
    "TokenizationError", "decode_media", "examples_sha256", "load_examples",
]
