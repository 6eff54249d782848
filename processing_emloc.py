# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
Emloc processor: demonstrations and queries (design §6) → model inputs with chunk and answer spans.

A demonstration is a user turn (text, images, video frames) and the assistant's answer. The processor renders a list
of them with the base model's own chat template (or the `plain` few-shot rendering for small text models) and splits
the rendering into a template prefix, one span per demonstration (with its answer span) and, for queries, the final
user turn plus the generation prompt. Spans come from the template itself — the rendering of the first `k` turns is a
prefix of the rendering of `k+1` turns, and the generation prompt is what the template adds before an assistant reply —
never from hard-coded token ids or character counts.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from transformers import AutoTokenizer, BatchFeature
from transformers.processing_utils import ProcessorMixin


# Token types, recorded per token so that memory statistics can say what was kept (paper, Fig. 5).
TEMPLATE, TEXT, IMAGE, ANSWER = 0, 1, 2, 3
TOKEN_TYPE_NAMES = {TEMPLATE: "template", TEXT: "text", IMAGE: "image", ANSWER: "answer"}

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
    PIL.Image}` or `{"type": "video", "video": list[PIL.Image]}`; `where` names its origin (`file.jsonl:7`).
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


def _open_image(path_or_image: Any, base_dir: Path, where: str):
    from PIL import Image

    if isinstance(path_or_image, Image.Image):
        return path_or_image.convert("RGB")
    if not isinstance(path_or_image, (str, os.PathLike)):
        raise ExampleError(f"{where}: an image must be a file path or a PIL image, got {type(path_or_image).__name__}")
    path = Path(path_or_image)
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise ExampleError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except Exception as error:  # PIL raises several types for undecodable files
        raise ExampleError(f"{where}: cannot decode image {path}: {error}") from None


def _open_video(video: Any, base_dir: Path, where: str) -> list:
    if isinstance(video, (list, tuple)):
        if not video:
            raise ExampleError(f"{where}: a video needs at least one frame")
        return [_open_image(frame, base_dir, where) for frame in video]
    path = Path(video)
    path = path if path.is_absolute() else base_dir / path
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp"})
        if not frames:
            raise ExampleError(f"{where}: video directory has no frames: {path}")
        return [_open_image(frame, base_dir, where) for frame in frames]
    if not path.is_file():
        raise ExampleError(f"{where}: video file not found: {path}")
    try:
        from transformers.video_utils import load_video

        frames, _ = load_video(str(path))
    except Exception as error:
        raise ExampleError(f"{where}: cannot decode video {path} ({error}); pass its frames as a list instead") from None
    from PIL import Image

    return [Image.fromarray(frame) for frame in frames]


def _parse_content(raw: Any, base_dir: Path, where: str) -> list[dict]:
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
            parts.append({"type": "image", "image": _open_image(image, base_dir, where)})
        elif kind == "video":
            video = part.get("video", part.get("frames", part.get("path")))
            if video is None:
                raise ExampleError(f"{where}: a video part needs 'video' (a file or a list of frames)")
            parts.append({"type": "video", "video": _open_video(video, base_dir, where)})
        else:
            raise ExampleError(f"{where}: unknown content type {kind!r} (expected 'text', 'image' or 'video')")
    return parts


def parse_example(record: Any, base_dir: Path, where: str, require_answer: bool) -> Example:
    """Parses one record in the messages format or the shorthand of design §6."""
    if not isinstance(record, dict):
        raise ExampleError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ExampleError(f"{where}: 'messages' must be a non-empty list")
        user_turns = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if len(user_turns) != 1 or len(messages) != 1:
            raise ExampleError(f"{where}: 'messages' must hold exactly one user message (the answer goes in 'answer')")
        content = _parse_content(user_turns[0].get("content"), base_dir, where)
    else:
        content = []
        if "image" in record:
            content.append({"type": "image", "image": _open_image(record["image"], base_dir, where)})
        for image in record.get("images", []):
            content.append({"type": "image", "image": _open_image(image, base_dir, where)})
        if "video" in record or "frames" in record:
            content.append({"type": "video", "video": _open_video(record.get("video", record.get("frames")), base_dir, where)})
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


def load_examples(source: str | os.PathLike | Iterable[dict | Example], require_answer: bool = True) -> list[Example]:
    """Reads demonstrations or queries from a JSONL file or a list of dicts; bad input raises `ExampleError`.

    Every line is checked before anything is returned, so a bad line never yields a partial list.
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
                examples.append(parse_example(record, path.parent, where, require_answer))
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
            examples.append(parse_example(record, Path.cwd(), f"<list>[{index}]", require_answer))
    if not examples:
        raise ExampleError("<list>: no examples given")
    return examples


# ---------------------------------------------------------------------------------------------------------------------
# Encoded spans
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EncodedSpan:
    """Tokens of a piece of the rendering, with their media.

    Attributes:
        input_ids: `[seq_len]` token ids.
        token_types: `[seq_len]` one of TEMPLATE, TEXT, IMAGE, ANSWER.
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
    and answer. `EncodedSpan.concat([prefix, *demos])` is, token for token, the full rendered conversation.
    """

    prefix: EncodedSpan
    demos: list[EncodedSpan]
    examples: list[Example]


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

    # -- tokenising spans -----------------------------------------------------------------------------------------------

    def _tokenize_text(self, text: str, token_type: int) -> EncodedSpan:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids = torch.tensor(ids, dtype=torch.long)
        return EncodedSpan(ids, torch.full_like(ids, token_type))

    def _tokenize_user_turn(self, text: str, example: Example) -> EncodedSpan:
        """A rendered user turn: template markup, the user's text and its images/videos, each token typed."""
        media = iter([part for part in example.content if part["type"] in ("image", "video")])
        pieces: list[EncodedSpan] = []
        rest = text
        for part in example.content:
            if part["type"] != "text" or not part["text"]:
                continue
            at = rest.find(part["text"])
            if at < 0:  # the template rewrote the text (e.g. stripped it); its tokens count as template
                continue
            pieces.append(self._tokenize_with_media(rest[:at], media, example.where, TEMPLATE))
            pieces.append(self._tokenize_with_media(part["text"], media, example.where, TEXT))
            rest = rest[at + len(part["text"]):]
        pieces.append(self._tokenize_with_media(rest, media, example.where, TEMPLATE))
        if next(media, None) is not None:
            raise ExampleError(f"{example.where}: the chat template rendered fewer image/video placeholders than given")
        return EncodedSpan.concat(pieces)

    def _tokenize_with_media(self, text: str, media: Iterator[dict], where: str, token_type: int) -> EncodedSpan:
        """Tokenises `text`; for each image/video placeholder in it takes the next part of `media`, and lets the base
        processor expand the placeholder into the right number of visual tokens."""
        if not self.is_multimodal:
            return self._tokenize_text(text, token_type)
        processor = self.base_processor
        image_token, video_token = getattr(processor, "image_token", None), getattr(processor, "video_token", None)
        placeholders = sorted(
            (match.start(), kind)
            for kind, token in (("image", image_token), ("video", video_token)) if token
            for match in re.finditer(re.escape(token), text)
        )
        if not placeholders:
            return self._tokenize_text(text, token_type)
        images, videos = [], []
        for _, kind in placeholders:
            part = next(media, None)
            if part is None or part["type"] != kind:
                raise ExampleError(f"{where}: the chat template's image/video placeholders do not match the content")
            (images if kind == "image" else videos).append(part[kind])
        outputs = processor(
            text=[text], images=images or None, videos=videos or None, add_special_tokens=False, return_tensors="pt"
        )
        ids = outputs["input_ids"][0]
        types = torch.full_like(ids, token_type)
        media_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in (image_token, video_token) if t]
        types[torch.isin(ids, torch.tensor(media_ids))] = IMAGE
        tensors = {
            key: value
            for key, value in outputs.items()
            if key not in ("input_ids", "attention_mask", "mm_token_type_ids") and isinstance(value, torch.Tensor)
        }
        return EncodedSpan(ids, types, tensors)

    # -- public encoding ------------------------------------------------------------------------------------------------

    def encode_context(self, demos: str | os.PathLike | Iterable[dict | Example]) -> EncodedContext:
        """Renders demonstrations as one context and splits it into the template prefix and per-demo spans."""
        examples = load_examples(demos, require_answer=True)
        if self.template == "plain":
            prefix = self._plain_prefix()
            spans = [self._plain_demo(example) for example in examples]
            return EncodedContext(prefix, spans, examples)

        messages: list[dict] = []
        rendered = ""
        spans: list[EncodedSpan] = []
        prefix = self._tokenize_text("", TEMPLATE)
        for index, example in enumerate(examples):
            messages.append(self._message(example))
            user_text = self._delta(rendered, messages)
            rendered += user_text
            if index == 0:
                user_text, prefix = self._split_template_prefix(user_text, example)
            generation_prompt = self._delta(rendered, messages, add_generation_prompt=True)
            messages.append({"role": "assistant", "content": example.answer})
            assistant_text = self._delta(rendered, messages)
            rendered += assistant_text
            spans.append(EncodedSpan.concat([
                self._tokenize_user_turn(user_text, example),
                self._encode_answer(assistant_text, generation_prompt, example),
            ]))
        return EncodedContext(prefix, spans, examples)

    def _split_template_prefix(self, first_turn: str, example: Example) -> tuple[str, EncodedSpan]:
        """Separates what the template puts before the first user turn (system prompt, BOS).

        The same user turn rendered later in a conversation shows what the turn itself looks like; what the first
        rendering has in front of it is the prefix. Templates that fold the system prompt into the first turn give no
        such split: then the prefix is empty and the whole first turn belongs to the first demonstration.
        """
        stand_in = [self._message(example), {"role": "assistant", "content": example.answer}]
        later_turn = self._delta(self._render(stand_in), stand_in + [self._message(example)])
        if later_turn and first_turn.endswith(later_turn):
            return later_turn, self._tokenize_text(first_turn[: -len(later_turn)], TEMPLATE)
        return first_turn, self._tokenize_text("", TEMPLATE)

    def _encode_answer(self, assistant_text: str, generation_prompt: str, example: Example) -> EncodedSpan:
        """`generation_prompt` (template) + answer (+ the end-of-turn token: the first token after the answer)."""
        if not assistant_text.startswith(generation_prompt):
            raise ValueError("the chat template's generation prompt is not the start of the assistant turn")
        reply = assistant_text[len(generation_prompt):]
        at = reply.find(example.answer)
        if at < 0:
            raise ExampleError(f"{example.where}: the chat template dropped or rewrote the answer {example.answer!r}")
        lead = self._tokenize_text(generation_prompt + reply[:at], TEMPLATE)
        answer = self._tokenize_text(example.answer, ANSWER)
        tail = self._tokenize_text(reply[at + len(example.answer):], TEMPLATE)
        if len(tail):
            tail.token_types[0] = ANSWER  # the end-of-turn token is part of the answer span
        return EncodedSpan.concat([lead, answer, tail])

    # -- plain rendering ------------------------------------------------------------------------------------------------

    def _plain_prefix(self) -> EncodedSpan:
        bos = self.tokenizer.bos_token if getattr(self.tokenizer, "add_bos_token", False) else None
        text = (bos or "") + (self.instruction + "\n\n" if self.instruction else "")
        return self._tokenize_text(text, TEMPLATE)

    def _plain_user(self, example: Example) -> str:
        if example.has_media:
            raise ExampleError(f"{example.where}: template='plain' renders text only")
        return example.text + "\n"

    def _plain_demo(self, example: Example) -> EncodedSpan:
        # The answer's line break ends the answer, as an end-of-turn token does in a chat rendering. Segments end where
        # the tokenizer splits anyway when text follows (byte-level BPE splits "\n\n" before a word into "\n", "\n"),
        # so the spans equal the tokenisation of the context followed by a query.
        return EncodedSpan.concat([
            self._tokenize_text(self._plain_user(example), TEXT),
            self._tokenize_text(example.answer + "\n", ANSWER),
            self._tokenize_text("\n", TEMPLATE),
        ])

    # -- queries --------------------------------------------------------------------------------------------------------

    def encode_query(self, query: Example, history: Sequence[Example] | None = None) -> EncodedSpan:
        """The query's user turn plus the generation prompt, as it follows the demonstrations in the full context.

        `history` (the demonstrations) only matters for templates that render a turn differently depending on what
        came before; by default the query itself, answered, stands in for it.
        """
        if self.template == "plain":
            return self._tokenize_text(self._plain_user(query), TEXT)
        stand_in = list(history[-1:]) if history else [Example(content=query.content, answer=query.answer or "", where=query.where)]
        messages = []
        for example in stand_in:
            messages += [self._message(example), {"role": "assistant", "content": example.answer or ""}]
        rendered = self._render(messages)
        messages.append(self._message(query))
        user_text = self._delta(rendered, messages)
        generation_prompt = self._delta(rendered + user_text, messages, add_generation_prompt=True)
        return EncodedSpan.concat([
            self._tokenize_user_turn(user_text, query),
            self._tokenize_text(generation_prompt, TEMPLATE),
        ])

    def encode_prefix(self) -> EncodedSpan:
        """The template prefix alone (system turn, BOS): what precedes the first turn of any conversation. A query
        answered without a memory (zero-shot) follows it, exactly as in a full context."""
        if self.template == "plain":
            return self._plain_prefix()
        stand_in = Example(content=[{"type": "text", "text": "Hello."}], answer="Hi.", where="<template prefix>")
        _, prefix = self._split_template_prefix(self._render([self._message(stand_in)]), stand_in)
        return prefix

    def encode_choice(self, choice: str) -> torch.Tensor:
        """`tokenizer(choice, add_special_tokens=False)` — the tokens scored as the start of the reply."""
        return torch.tensor(self.tokenizer(choice, add_special_tokens=False)["input_ids"], dtype=torch.long)

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
        of each query, for the base model without any memory (zero-shot `generate`)."""
        if queries is None:
            raise ValueError("EmlocProcessor needs queries")
        if isinstance(queries, dict):
            queries = [queries]
        examples = load_examples(queries, require_answer=False)
        history = load_examples(history, require_answer=True) if history is not None else None
        spans = [self.encode_query(q, history) for q in examples]
        if add_template_prefix:
            prefix = self.encode_prefix()
            spans = [EncodedSpan.concat([prefix, span]) for span in spans]
        return self.collate(spans)

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


__all__ = ["EmlocProcessor", "Example", "ExampleError", "EncodedSpan", "EncodedContext", "load_examples"]
