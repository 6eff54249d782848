# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
Rendering demonstrations and queries as text, annotated per character, and tokenising it once.

A demonstration is a user turn (text, images, video frames) and the assistant's answer. `Renderer` renders a list of
them with the base model's own chat template (or the `plain` few-shot rendering for small text models) and annotates
every character with its token type and its owner: the template prefix, demonstration `i`, the query. The pieces come
from the template itself — the rendering of the first `k` turns is a prefix of the rendering of `k+1` turns, and the
generation prompt is what the template adds before an assistant reply — never from hard-coded token ids or character
counts. The whole text is then tokenised in one call and every token is typed and owned by its first character
(`Renderer.tokenize`), so a memory holds exactly the tokens the model would see in the whole conversation (Gemma 3
reads "\n\n" as one token, not two).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

try:  # loaded as remote code: transformers makes a package of the repository's modules
    from .demonstrations_emloc import Example, ExampleError
except ImportError:  # imported from the repository root as flat modules
    from demonstrations_emloc import Example, ExampleError


# Token types, recorded per token so that memory statistics can say what was kept (paper, Fig. 5). VIDEO came last:
# memories built before it count their (image-only) visual tokens as IMAGE.
TEMPLATE, TEXT, IMAGE, ANSWER, VIDEO = 0, 1, 2, 3, 4
TOKEN_TYPE_NAMES = {TEMPLATE: "template", TEXT: "text", IMAGE: "image", ANSWER: "answer", VIDEO: "video"}
TEMPLATES = ("chat", "plain")
PREFIX_OWNER = -1  # owner of the template prefix; demonstration `i` owns its characters as `i`
TOKENIZATION = "whole-text"  # recorded in memories: how rendered text became tokens (design §7)

# a conversation that stands in for one not known yet (the template prefix is what precedes any first turn)
STAND_IN = Example(content=[{"type": "text", "text": "Hello."}], answer="Hi.", where="<template prefix>")


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
class Token:
    id: int
    start: int  # first character (see `EmlocProcessor._tokenize`)
    end: int
    token_type: int
    owner: int


class Renderer:
    """Renders demonstrations and queries for one base processor (or tokenizer) and template.

    Args:
        base_processor: the base model's `ProcessorMixin` (e.g. `Qwen2VLProcessor`) or tokenizer.
        template: `"chat"` (the base model's chat template, demonstrations as alternating user/assistant turns) or
            `"plain"` (an optional instruction line, each demonstration's text, its answer on the next line, a blank
            line between them).
        instruction: first line of the `plain` rendering.
    """

    def __init__(self, base_processor, template: str = "chat", instruction: str | None = None):
        self.base_processor, self.template, self.instruction = base_processor, template, instruction

    @property
    def tokenizer(self):
        return getattr(self.base_processor, "tokenizer", self.base_processor)

    @property
    def is_multimodal(self) -> bool:
        return hasattr(self.base_processor, "image_processor")

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

    def render_context(self, examples: Sequence[Example]) -> tuple[RenderedText, int]:
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

    def prefix_text(self) -> str:
        """The template prefix alone (system turn, BOS): what precedes the first turn of any conversation."""
        if self.template == "plain":
            return self._plain_prefix_text()
        prefix, _ = self._split_template_prefix(self._render([self._message(STAND_IN)]), STAND_IN)
        return prefix

    def query_turn(self, query: Example, history: Sequence[Example] | None) -> tuple[str, list[tuple[str, int | None]]]:
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

    def add_query(self, rendered: RenderedText, pieces: list[tuple[str, int | None]], query: Example, owner: int) -> None:
        for text, token_type in pieces:
            if token_type is None:  # a chat user turn: typed part by part
                self._add_user_turn(rendered, text, query, owner)
            else:
                rendered.add(text, token_type, owner)

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

    def tokenize(self, rendered: RenderedText, begin: int, end: int) -> list[Token]:
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
                tokens.append(Token(token_id, start, stop, *rendered.at(start)))
        # a chat answer's end-of-turn token is part of the answer span (design §4)
        starts = [token.start for token in tokens]
        for char, owner in rendered.answer_ends:
            after = bisect.bisect_left(starts, char)
            if after < len(tokens) and tokens[after].owner == owner:
                tokens[after].token_type = ANSWER
        return tokens


__all__ = ["ANSWER", "IMAGE", "TEMPLATE", "TEXT", "TOKEN_TYPE_NAMES", "VIDEO", "RenderedText", "Renderer",
           "TokenizationError"]
