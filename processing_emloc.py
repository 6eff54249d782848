# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
Emloc processor: demonstrations and queries (design §6) → model inputs with chunk and answer spans.

`EmlocProcessor` wraps the base model's processor (vision-language models) or tokenizer (text models). It parses
demonstrations (`demonstrations_emloc`), renders and tokenises them as one text (`rendering_emloc.Renderer`), and cuts
the tokens into a template prefix, one span per demonstration (with its answer span) and, for queries, the final user
turn plus the generation prompt; each image or video placeholder is expanded into its visual tokens by the base
processor. A builder streams: `stream_context` checks every demonstration and tokenises the whole text up front, and
decodes a demonstration's images and video frames only when its span is read.
"""

from __future__ import annotations

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

try:  # loaded as remote code: transformers makes a package of the repository's modules
    from .demonstrations_emloc import Example, ExampleError, decode_media, examples_sha256, load_examples, read_video
    from .rendering_emloc import (ANSWER, IMAGE, PREFIX_OWNER, STAND_IN, TEMPLATE, TEMPLATES, TOKENIZATION, VIDEO,
                                  RenderedText, Renderer, Token, TokenizationError)
except ImportError:  # imported from the repository root as flat modules
    from demonstrations_emloc import Example, ExampleError, decode_media, examples_sha256, load_examples, read_video
    from rendering_emloc import (ANSWER, IMAGE, PREFIX_OWNER, STAND_IN, TEMPLATE, TEMPLATES, TOKENIZATION, VIDEO,
                                 RenderedText, Renderer, Token, TokenizationError)


# The settings of an image or video processor that decide which frames are taken and how many visual tokens they
# become (a memory records those a processor sets: `EmlocProcessor.rendering()`).
VISION_SAMPLING_KEYS = ("do_sample_frames", "fps", "num_frames", "min_frames", "max_frames", "size", "min_pixels",
                        "max_pixels", "cap_pixels_per_frame", "max_video_tokens", "patch_size", "temporal_patch_size",
                        "merge_size")

PROCESSOR_CONFIG_NAME = "processor_config.json"
EMLOC_KEY = "emloc"  # our settings live under this key of processor_config.json


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
        self.renderer = Renderer(base_processor, template, instruction)  # the text: rendering and tokenising it
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
        return self.renderer.tokenizer

    @property
    def is_multimodal(self) -> bool:
        return self.renderer.is_multimodal

    def _chat_template(self):
        return getattr(self.base_processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)

    def __repr__(self):
        return f"EmlocProcessor(template={self.template!r}, base={type(self.base_processor).__name__})"

    # -- rendering ------------------------------------------------------------------------------------------------------











    # -- plain rendering ------------------------------------------------------------------------------------------------





    # -- tokenising -----------------------------------------------------------------------------------------------------


    def _spans(self, tokens: list[Token], examples: dict[int, Example]) -> dict[int, EncodedSpan]:
        """Groups tokens by owner into spans; expands every image/video placeholder into its visual tokens with the
        owner's next image or video (the base processor on that placeholder alone)."""
        return {owner: self._encode_tokens(ids, types, examples.get(owner)) for owner, (ids, types) in self._group(tokens).items()}

    @staticmethod
    def _group(tokens: list[Token]) -> dict[int, tuple[list[int], list[int]]]:
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
        sample any frames it is given), or for a video file: its frames decoded and sampled here (`read_video`),
        with the metadata that times them."""
        if not isinstance(video, (str, os.PathLike)):
            return {"videos": [video]}
        frames, metadata = read_video(Path(video), self.base_processor.video_processor)
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
        rendered, end = self.renderer.render_context(examples)
        spans = self._spans(self.renderer.tokenize(rendered, 0, end), dict(enumerate(examples)))
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
        rendered, end = self.renderer.render_context(examples)
        grouped = self._group(self.renderer.tokenize(rendered, 0, end))
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
        before, pieces = self.renderer.query_turn(query, history)
        rendered = RenderedText()
        rendered.add(before, TEMPLATE, PREFIX_OWNER)
        self.renderer.add_query(rendered, pieces, query, 0)
        tokens = self.renderer.tokenize(rendered, len(before), rendered.length)
        return self._spans(tokens, {0: query}).get(0, _empty_span())

    def encode_prefix(self) -> EncodedSpan:
        """The template prefix alone (system turn, BOS): what precedes the first turn of any conversation. A query
        answered without a memory (zero-shot) follows it, exactly as in a full context."""
        prefix = self.renderer.prefix_text()
        rendered = RenderedText()
        rendered.add(prefix, TEMPLATE, PREFIX_OWNER)
        _, pieces = self.renderer.query_turn(STAND_IN, None)
        self.renderer.add_query(rendered, pieces, STAND_IN, 0)
        return self._spans(self.renderer.tokenize(rendered, 0, len(prefix)), {}).get(PREFIX_OWNER, _empty_span())

    def _encode_zero_shot(self, query: Example) -> EncodedSpan:
        """Template prefix + query, tokenised as one text: the input of the base model without any memory."""
        _, pieces = self.renderer.query_turn(query, None)
        rendered = RenderedText()
        rendered.add(self.renderer.prefix_text(), TEMPLATE, PREFIX_OWNER)
        self.renderer.add_query(rendered, pieces, query, 0)
        spans = self._spans(self.renderer.tokenize(rendered, 0, rendered.length), {0: query})
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
