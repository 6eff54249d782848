# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
Building a task memory: compression methods (registered by name), the probe that judges them, and the chunk-wise
builder with its on-disk checkpoints.

EMLoC (Ma, Zhang, Wei, Tian, ICML 2025, arXiv 2505.19812, §3) builds a memory chunk by chunk: a chunk of
demonstrations is prefilled on top of the memory built so far, a compression method decides which of its tokens each
layer and KV head keeps, and the kept tokens are appended. The paper's method (`"emloc"`) prunes layer by layer, top
layer first, keeping the smallest candidate ratio whose Jensen-Shannon divergence on a probe stays within a bound.
The file reads in that order: the probe, the methods, the builder, the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

try:  # loaded as remote code: transformers makes a package of the repository's modules
    from .cache_emloc import AttentionObserver, EmlocCache, smooth
    from .memory_emloc import MemoryLayer, RetrievalIndex, TaskMemory, differing, readable_share, release_freed_memory
    from .processing_emloc import EmlocProcessor, EncodedSpan
    from .rendering_emloc import ANSWER, TOKEN_TYPE_NAMES
    from .running_emloc import ChunkState, MemoryRunner, Segment, js_divergence, run_layers
except ImportError:  # imported from the repository root as flat modules
    from cache_emloc import AttentionObserver, EmlocCache, smooth
    from memory_emloc import MemoryLayer, RetrievalIndex, TaskMemory, differing, readable_share, release_freed_memory
    from processing_emloc import EmlocProcessor, EncodedSpan
    from rendering_emloc import ANSWER, TOKEN_TYPE_NAMES
    from running_emloc import ChunkState, MemoryRunner, Segment, js_divergence, run_layers


# ---------------------------------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------------------------------


class Probe:
    """Probe rows after `memory ⊕ chunk`: reference distributions, attention importance, and the JS of pruned variants
    (paper §3.2).

    The probe is a batch of demonstrations, one per row (user turn + answer), packed into one row in which each is its
    own segment: every row reads the same memory with no copy of it per row. The paper scores every answer-predicting
    position (Eq. 3-5). `choice_ids` (`[num_choices]`, the first token of each choice) scores only the position
    predicting each row's first answer token, over those tokens renormalised: the decision itself rather than the whole
    vocabulary. `window_position` windows the rows in sliding-window layers as a query at that position would be
    (`sliding="query"`), while they keep their own positions for everything else.

    Attributes:
        reference: `[num_scored, vocab | num_choices]` log-probabilities with the chunk unpruned.
        importance: per layer `[kv_heads, chunk_len]`: attention from the scored positions to each chunk token, summed
            over them and over the query heads of each KV group, smoothed along the sequence (paper §3.2).
        entering: per layer the hidden state `[1, tokens, hidden]` entering it — where a variant's evaluation restarts.
    """

    def __init__(self, builder: "MemoryBuilder", memory: TaskMemory, chunk: ChunkState, rows: list[EncodedSpan],
                 choice_ids: torch.Tensor | None = None, window_position: int | None = None):
        self.builder, self.memory, self.chunk = builder, memory, chunk
        family, runner = builder.family, builder.runner
        batch, predicting = answer_rows(builder.processor, rows, first_only=choice_ids is not None)
        self.choice_ids = None if choice_ids is None else choice_ids.to(runner.device)
        start_position = chunk.next_position  # right after the chunk (the paper)
        self.segment, self.predicting = pack_rows(runner.segment(batch, start_position=start_position),
                                                  predicting.to(runner.device))
        self.window_shift = 0 if window_position is None else max(0, window_position - start_position)
        # every pass writes what it keeps of the chunk, then the rows, after the memory in its own growth buffers: the
        # memory is never copied for the probe
        self.scratch = memory.scratch(chunk.length + self.segment.hidden.shape[1])
        observer = AttentionObserver(self.predicting, slice(None), family.num_heads // family.num_kv_heads)
        hidden, self.entering = run_layers(family, self.segment, self._cache({}, start_layer=0), observer=observer,
                                           keep_hidden=True)
        self.reference = torch.log_softmax(self._logits(hidden[self.predicting]).float(), dim=-1)
        self.importance = []
        for layer in range(family.num_layers):
            start = memory.layers[layer].num_tokens
            self.importance.append(smooth(observer.per_layer[layer][:, start:start + chunk.length], builder.pool_width))
        self.passes = self.evaluations = 0  # layer passes of the probe, and candidate evaluations

    def _logits(self, scored_hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[num_scored, vocab | num_choices]` from the hidden states at the scored positions."""
        return self.builder.family.logits(scored_hidden, self.choice_ids)

    def sees_chunk(self, layer: int) -> bool:
        """Whether any probe row reads any of the chunk's tokens in `layer`. In a sliding-window layer a row token at
        position `q` reads prefix positions after `q + window_shift − window` (`EmlocCache.attention_mask`); rows
        windowed as a query far after the chunk read none of it there, and pruning the chunk in such a layer cannot
        change their answers."""
        window = self.builder.family.sliding_window(layer)
        if window is None or self.chunk.length == 0:
            return True
        earliest_row_token = int(self.segment.text_positions.min())
        return int(self.chunk.positions.max()) > earliest_row_token + self.window_shift - window

    def _cache(self, kept: dict[int, torch.Tensor | None], start_layer: int) -> EmlocCache:
        """A cache (batch 1) over the memory plus the chunk tokens `kept[l]` (absent or None: all) in layers
        `start_layer…`, in the probe's scratch buffers."""
        prefix = [None] * start_layer
        for layer in range(start_layer, self.builder.family.num_layers):
            added = self.chunk.kept(layer, kept.get(layer))
            positions = torch.cat([self.memory.layers[layer].positions, added.positions], dim=1)
            prefix.append((added.keys, added.values, positions))
        return EmlocCache(prefix, 1, window_shift=self.window_shift, scratch=self.scratch)

    def divergence(self, start_layer: int, kept: dict[int, torch.Tensor | None]) -> float:
        """Mean JS between the probe's answer distributions with layers `start_layer…` pruned as `kept` and the
        unpruned reference. Runs only layers `start_layer … L-1`, from the hidden states cached at `start_layer`."""
        family = self.builder.family
        segment = dataclasses.replace(self.segment, hidden=self.entering[start_layer])
        hidden, _ = run_layers(family, segment, self._cache(kept, start_layer), start=start_layer)
        self.passes += family.num_layers - start_layer
        self.evaluations += 1
        return js_divergence(self._logits(hidden[self.predicting]), self.reference).mean().item()


def pack_rows(segment: Segment, predicting: torch.Tensor) -> tuple[Segment, torch.Tensor]:
    """A right-padded batch of rows as one row without padding, each former row its own segment (it sees the prefix
    and its own tokens, at the positions it had). `predicting` `[batch, seq]` → `[1, tokens]`, in the same order."""
    valid = segment.valid
    rows = torch.arange(valid.shape[0], device=valid.device)[:, None].expand_as(valid)
    rope = segment.rope_positions
    packed_rope = rope[valid][None] if rope.dim() == 2 else rope[:, valid][:, None]
    packed = Segment(segment.hidden[valid][None], packed_rope, segment.text_positions[valid][None],
                     torch.ones_like(valid[valid])[None], segments=rows[valid][None])
    return packed, predicting[valid][None]


def answer_rows(processor: EmlocProcessor, rows: list[EncodedSpan], first_only: bool = False) -> tuple[dict, torch.Tensor]:
    """Demonstration rows as a right-padded batch, and the positions scored on them `[batch, seq]` (bool): those whose
    next token is an answer token (the paper), or with `first_only` each row's first one.

    A row ends at its last scored position + 1: later tokens cannot change it (attention is causal).
    """
    rows = [_trim_after_answer(row, first_only) for row in rows]
    batch = processor.collate(rows, padding_side="right")
    answer_next = (batch["token_types"][:, 1:] == ANSWER) & batch["attention_mask"][:, 1:].bool()
    if first_only:
        answer_next = answer_next & (answer_next.long().cumsum(dim=1) == 1)
    predicting = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    predicting[:, :-1] = answer_next
    return batch, predicting


def _trim_after_answer(row: EncodedSpan, first_only: bool = False) -> EncodedSpan:
    """The row up to its last (or, with `first_only`, its first) answer token."""
    answers = (row.token_types == ANSWER).nonzero().flatten()
    if len(answers) == 0:
        return row
    end = int(answers[0 if first_only else -1]) + 1  # keep that answer token: its type marks the position predicting it
    return EncodedSpan(row.input_ids[:end], row.token_types[:end], row.media)


def top_tokens(importance: torch.Tensor, ratio: float, must_keep: torch.Tensor) -> torch.Tensor:
    """Per KV head, the indices `[kv_heads, k]` (ascending) of the `k = max(ceil(ratio·len), #must_keep)` most
    important tokens (`importance` `[kv_heads, len]`), `must_keep` (`[len]` bool, the answer tokens) always among them:
    protected tokens count toward the ratio, as in the paper."""
    length = importance.shape[-1]
    k = min(length, max(math.ceil(ratio * length), int(must_keep.sum())))
    scores = importance.float().masked_fill(must_keep[None], float("inf"))
    index = scores.topk(k, dim=-1, sorted=False).indices
    return index.sort(dim=-1).values


# ---------------------------------------------------------------------------------------------------------------------
# Compression methods
# ---------------------------------------------------------------------------------------------------------------------

COMPRESSION_METHODS: dict[str, type["CompressionMethod"]] = {}


def register_method(cls):
    COMPRESSION_METHODS[cls.name] = cls
    return cls


@dataclass
class CompressionMethod:
    """Decides, for one chunk, which tokens each layer and KV head keeps."""

    name: ClassVar[str] = "base"

    def compress(self, builder: "MemoryBuilder", memory: TaskMemory, chunk: ChunkState,
                 chunk_demos: list[int]) -> tuple[list, dict]:
        """Returns per layer the kept indices `[kv_heads, k]` (None = keep the whole chunk) and per-chunk stats."""
        raise NotImplementedError

    def params(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@register_method
@dataclass
class FullMethod(CompressionMethod):
    """Keeps every token: the memory is the full context's KV cache (the exactness anchor)."""

    name: ClassVar[str] = "full"

    def compress(self, builder, memory, chunk, chunk_demos):
        return [None] * builder.family.num_layers, {}


@register_method
@dataclass
class RandomMethod(CompressionMethod):
    """Keeps a seeded random `ratio` of each chunk in every layer and KV head (a floor for any selection rule)."""

    name: ClassVar[str] = "random"
    ratio: float = 0.2
    seed: int = 0

    def compress(self, builder, memory, chunk, chunk_demos):
        generator = torch.Generator().manual_seed(self.seed + len(chunk_demos) * 7919 + (chunk_demos[0] if chunk_demos else 0))
        keep = max(1, math.ceil(self.ratio * chunk.length))
        kept = []
        for layer in range(builder.family.num_layers):
            scores = torch.rand(builder.family.num_kv_heads, chunk.length, generator=generator)
            kept.append(scores.topk(keep, dim=-1).indices.sort(dim=-1).values.to(chunk.positions.device))
        return kept, {"ratios": [self.ratio] * builder.family.num_layers}


@register_method
@dataclass
class EmlocMethod(CompressionMethod):
    """EMLoC layer-wise adaptive pruning (paper §3.2): top layer first, the smallest candidate ratio whose probe
    divergence stays within `delta`; layers where none passes keep the whole chunk. The defaults are the paper's.

    Args:
        delta: JS bound per layer decision (paper: 0.005).
        ratios: candidate keep ratios, tried in ascending order (paper: 0.1, 0.2, 0.5). A longer tuple is a finer grid.
        probe: which demonstrations probe a chunk. `"self"`: the chunk's own (the paper; a row finds its verbatim copy
            in the chunk, which rewards recall of that copy); `"future"`: the `probe_size` demonstrations that follow
            the chunk, which no part of the memory has seen yet — they are answered the way a new query is (the last
            chunk borrows the first demonstrations).
        probe_size: rows of a `"future"` probe.
        over: `"vocab"` (the paper): JS between full next-token distributions at every answer position; `"choices"`:
            between the distributions renormalised over the first tokens of the probe rows' `choices`, at the first
            answer position (the decision itself; falls back to `"vocab"` where a row has no choices or the choices
            share a first token).
        sliding: in sliding-window layers, what the probe rows see of the memory and the chunk. `"probe"` (the
            paper): what their own positions let them see; `"query"`: what a query after the whole context will see
            (estimated from the demonstrations' mean length so far). Rows right after a chunk read it through the
            sliding layers, which no later query does. No effect on a model without sliding windows.
        relative: a bound relative to what the chunk does to the probe: a chunk's bound becomes the smaller of `delta`
            and `relative` × the JS of removing the whole chunk (one more probe run per chunk). Under the fixed bound a
            chunk the rows barely need passes at the floor in every layer, and a memory of such chunks can drift.
        budget: a target fraction of the chunk's KV to keep instead of a fixed bound: each layer, top first, may use
            what the layers above left of the budget (spread over the layers still to decide); it takes the smallest
            ratio within its allowance that meets the bound, else the largest one within it. The chunk never exceeds
            the budget beyond the always-kept answer tokens.
        skip_unseen: decide without a probe run the layers where no probe row can read any of the chunk's tokens (a
            sliding window that, for rows windowed as a query, ends before the chunk): pruning there cannot change the
            rows' answers, so the smallest candidate passes whenever the layers above met the bound. The same
            decisions and memory for fewer probe runs; False evaluates them anyway (for checking).
    """

    name: ClassVar[str] = "emloc"
    delta: float = 0.005
    ratios: tuple[float, ...] = (0.1, 0.2, 0.5)
    probe: str = "self"
    probe_size: int = 4
    over: str = "vocab"
    sliding: str = "probe"
    relative: float | None = None
    budget: float | None = None
    skip_unseen: bool = True

    # the options whose value is the paper's rule; `params()` records every one that differs, so a memory names its rule
    PAPER: ClassVar[dict] = {"probe": "self", "over": "vocab", "sliding": "probe", "relative": None, "budget": None}

    def __post_init__(self):
        ratios = (self.ratios,) if isinstance(self.ratios, (int, float)) else self.ratios  # one candidate, or a grid
        self.ratios = tuple(sorted(float(r) for r in ratios))
        check_not_retired(dataclasses.asdict(self))
        choices = {"probe": ("self", "future"), "over": ("vocab", "choices"), "sliding": ("probe", "query")}
        for option, allowed in choices.items():
            if getattr(self, option) not in allowed:
                raise ValueError(f"{option} must be one of {allowed}, got {getattr(self, option)!r}")
        if not self.ratios or not all(0.0 < r <= 1.0 for r in self.ratios):
            raise ValueError(f"ratios must lie in (0, 1], got {self.ratios}")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must lie in (0, 1], got {self.budget}")
        if self.relative is not None and not self.relative > 0.0:
            raise ValueError(f"relative must be positive, got {self.relative}")
        if not isinstance(self.probe_size, int) or self.probe_size < 1:
            raise ValueError(f"probe_size must be a positive integer, got {self.probe_size!r}")
        self.skip_unseen = bool(self.skip_unseen)

    def params(self) -> dict:
        params = {"delta": self.delta, "ratios": list(self.ratios), "probe": self.probe}
        if self.probe != "self":
            params["probe_size"] = self.probe_size
        params.update({option: getattr(self, option) for option, paper in self.PAPER.items()
                       if option != "probe" and getattr(self, option) != paper})
        if not self.skip_unseen:
            params["skip_unseen"] = False
        return params

    def probe_demos(self, num_demos: int, chunk_demos: list[int]) -> list[int]:
        """Indices of the demonstrations that probe the chunk `chunk_demos`: its own (`"self"`), or the `probe_size`
        that follow it, then for the last chunks the first ones (`"future"`; the chunk's own when there are no
        others)."""
        chunk = set(chunk_demos)
        if self.probe == "self" or len(chunk) == num_demos:
            return list(chunk_demos)
        after = max(chunk_demos) + 1 if chunk_demos else 0
        ordered = list(range(after, num_demos)) + [i for i in range(after) if i not in chunk]
        return ordered[: self.probe_size]

    def choice_ids(self, builder: "MemoryBuilder", probe_demos: list[int]) -> torch.Tensor | None:
        """First tokens of the probe rows' choices (`over="choices"`), or None to compare whole distributions."""
        if self.over != "choices":
            return None
        examples = [builder.context.examples[i] for i in probe_demos]
        if not all(example.choices for example in examples):
            return None
        first = {int(builder.processor.encode_choice(c)[0]) for example in examples for c in example.choices if c}
        return torch.tensor(sorted(first), dtype=torch.long) if len(first) > 1 else None

    def compress(self, builder, memory, chunk, chunk_demos):
        num_layers = builder.family.num_layers
        demos = self.probe_demos(len(builder.context.demos), chunk_demos)
        window_position = builder.query_position(chunk, chunk_demos) if self.sliding == "query" else None
        probe = Probe(builder, memory, chunk, [builder.context.demos[i] for i in demos],
                      choice_ids=self.choice_ids(builder, demos), window_position=window_position)
        answers = chunk.token_types == ANSWER
        bound, bound_stats = self.delta, {}
        if self.relative is not None:
            # the JS of the rows with the chunk removed from every layer: its whole effect on them
            nothing = torch.zeros(builder.family.num_kv_heads, 0, dtype=torch.long, device=chunk.positions.device)
            removed = probe.divergence(0, {layer: nothing for layer in range(num_layers)})
            bound = min(self.delta, self.relative * removed)
            bound_stats = {"removed_js": round(removed, 9), "bound": round(bound, 9)}
        # layers where no probe row reads the chunk: pruning them leaves the JS of the layers decided so far
        unseen = {layer for layer in range(num_layers) if self.skip_unseen and not probe.sees_chunk(layer)}
        kept: dict[int, torch.Tensor | None] = {}
        chosen, divergences = {}, {}
        decided_js = 0.0  # the divergence of `kept` as it stands
        budget_left = None if self.budget is None else self.budget * num_layers
        for layer in reversed(range(num_layers)):  # top layer first (paper §3.2)
            grid = self.ratios
            if budget_left is not None:
                allowance = budget_left / (layer + 1)  # per layer, over this one and those below
                grid = [r for r in self.ratios if r <= allowance + 1e-9] or [self.ratios[0]]
            decision = None
            for ratio in grid:
                index = top_tokens(probe.importance[layer], ratio, answers)
                js = decided_js if layer in unseen else probe.divergence(layer, {**kept, layer: index})
                decision = (index, ratio, js)
                if js <= bound:
                    break
            else:  # none passes: the paper keeps the whole chunk; a budget keeps its largest affordable ratio
                if budget_left is None:
                    decision = (None, 1.0, 0.0)
            index, ratio, js = decision
            kept[layer], chosen[layer], divergences[layer] = index, ratio, js
            if index is not None:  # a layer kept whole leaves the variant, and its divergence, as they were
                decided_js = js
            if budget_left is not None:
                budget_left -= ratio
        stats = {
            "ratios": [round(chosen[l], 4) for l in range(num_layers)],
            "js": [round(divergences[l], 6) for l in range(num_layers)],
            **bound_stats,
            "probe_layer_passes": probe.passes,
            "probe_evaluations": probe.evaluations,  # restarting each from layer 0 would cost evaluations x L passes
        }
        return [kept[l] for l in range(num_layers)], stats


@register_method
@dataclass
class EmlocQueryMethod(EmlocMethod):
    """The default of `build_memory`: the paper's layer-wise rule, probed the way a query uses the memory.

    Repairs of the paper's rule at small scale, chosen on selection splits and reported on others (docs/method.md):
    the probe rows are demonstrations no part of the memory has seen yet (`probe="future"`: a chunk is judged on how
    it answers new rows, not on recalling its own copy), two of them (`probe_size=2`); the divergence is taken over
    the choices at the position that decides the answer (`over="choices"`: deterministic continuation tokens no
    longer dilute it); in sliding-window layers the rows see what a query after the whole context will see
    (`sliding="query"`); and a chunk's bound is the smaller of `delta` and half the divergence of removing the whole
    chunk (`relative=0.5`), so a chunk the rows barely need is not dropped to the floor in every layer.
    """

    name: ClassVar[str] = "emloc-query"
    probe: str = "future"
    probe_size: int = 2
    over: str = "choices"
    sliding: str = "query"
    relative: float | None = 0.5

    def params(self) -> dict:
        """Every option, in field order, so that a memory says exactly which rule made it (`skip_unseen` only when
        off: it changes the cost, not the memory)."""
        params = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                  if not (field.name == "skip_unseen" and self.skip_unseen)}
        return {**params, "ratios": list(self.ratios)}


# -- options the benchmark rejected ------------------------------------------------------------------------------------

# Build options measured and rejected (docs/experiments.md has each one's numbers); their code last lived at this commit.
RETIRED_AT = "a3ff75521c4a0cb0d6efae5923df5a3f428cea2b"
RETIRED_OPTIONS = {"rerun", "reuse", "layer_group", "refine", "probe_dtype", "importance", "recent", "distinct_answers",
                   "probe_at", "protect", "positions", "reference", "search", "bisect_steps"}
RETIRED_VALUES = {"probe": {"heldout", "self+future"}}


def check_not_retired(options: dict) -> None:
    """Raises `ValueError` naming the first build option of `options` (name → value) that the benchmark rejected."""
    for name, value in options.items():
        if name in RETIRED_OPTIONS or value in RETIRED_VALUES.get(name, ()):
            raise ValueError(
                f"build option {name}={value!r} was retired: the benchmark rejected it (docs/experiments.md, "
                f"'{name}'); its code last lived at commit {RETIRED_AT[:10]}"
            )


def method_params_for(method: str, params: dict, config) -> dict:
    """`params` checked for `method` (an unknown or retired option refused), with the model config's `delta`, `ratios`
    and `probe` as the defaults of the paper's rule (other methods bring their own)."""
    if method not in COMPRESSION_METHODS:
        raise ValueError(f"unknown method {method!r}; available: {sorted(COMPRESSION_METHODS)}")
    check_not_retired(params)
    accepted = set(COMPRESSION_METHODS[method].__dataclass_fields__)
    unknown = set(params) - accepted
    if unknown:
        raise TypeError(f"method {method!r} does not take {sorted(unknown)}; it takes {sorted(accepted)}")
    defaults = {"delta": config.delta, "ratios": tuple(config.ratios), "probe": config.probe} \
        if method == EmlocMethod.name else {}
    return {**defaults, **params}


# ---------------------------------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------------------------------


class MemoryBuilder:
    """Builds a task memory chunk by chunk (paper §3.1): prefill a chunk on top of the memory, let the method choose
    what each layer keeps, append it.

    What a build holds grows with what it keeps: the memory grows in place (`TaskMemory.extend`), a chunk's prefill and
    every probe pass run after the memory in its own growth buffers (`TaskMemory.scratch`: the memory is never copied
    for them), demonstrations are read as their chunk needs them (`StreamedContext`: images decoded per chunk) and a
    chunk's working state (its KV, the probe) is let go before the next chunk. With `checkpoint_dir` each completed
    chunk is recorded on disk (`BuildCheckpoint`), and a rerun with the same arguments continues after the last
    recorded chunk, to the same bytes.

    `progress` is True for a progress bar, or a callable `progress(chunks_done, chunks_total)` called after each chunk
    (once it is recorded in `checkpoint_dir`).
    """

    def __init__(self, runner: MemoryRunner, processor: EmlocProcessor, method: CompressionMethod, chunk_size: int,
                 pool_width: int, progress: bool | Callable[[int, int], None] = False,
                 checkpoint_dir: str | os.PathLike | None = None, retrieval_layer: int | None = None,
                 drop_unreadable: bool = True, base_model: dict | None = None):
        self.runner, self.family, self.processor, self.method = runner, runner.family, processor, method
        self.drop_unreadable = drop_unreadable
        self.chunk_size, self.pool_width, self.progress = chunk_size, pool_width, progress
        self.checkpoint_dir, self.retrieval_layer = checkpoint_dir, retrieval_layer
        self.base_model = base_model or {}  # `memory_config.json`'s record of the base model (with its fingerprint)
        self.context = None
        self.start_position = 0  # the memory's next position when the build began

    @torch.no_grad()
    def build(self, demos, append_to: TaskMemory | None = None) -> TaskMemory:
        started = time.perf_counter()
        # probes read demonstrations of other chunks (`future`: often the next chunk's): keep a few encoded
        self.context = self.processor.stream_context(demos, cache_size=2 * self.chunk_size)
        num_demos = len(self.context)
        chunks = [list(range(i, min(i + self.chunk_size, num_demos))) for i in range(0, num_demos, self.chunk_size)]
        # a memory of its own over `append_to`'s tensors: growing it never writes into the memory the user gave
        memory = TaskMemory(list(append_to.layers), append_to.next_position) if append_to is not None \
            else self.runner.empty_memory()
        self.start_position = memory.next_position
        chunk_stats, full_types, spent_before = [], [], 0.0
        checkpoint = None
        if self.checkpoint_dir is not None:
            checkpoint = BuildCheckpoint(self.checkpoint_dir, self._arguments(append_to))
            for number in range(checkpoint.resume()):
                layers, types = checkpoint.load_chunk(number)
                memory.extend(layers, checkpoint.chunks[number]["next_position"])
                full_types.append(types)
                chunk_stats.append(checkpoint.chunks[number]["stats"])
            spent_before = checkpoint.seconds
        bar = None
        if self.progress and not callable(self.progress):
            from tqdm.auto import tqdm

            bar = tqdm(total=len(chunks), initial=len(chunk_stats), desc=f"building {self.method.name} memory", unit="chunk")
        try:
            for number in range(len(chunk_stats), len(chunks)):
                kept, types, stats, next_position = self._build_chunk(memory, chunks[number], first=number == 0 and append_to is None)
                memory.extend(kept, next_position)
                if checkpoint is not None:
                    checkpoint.add_chunk(kept, types, next_position, stats, spent_before + time.perf_counter() - started)
                del kept
                release_freed_memory()  # the chunk's working state, and a buffer the memory outgrew
                full_types.append(types)
                chunk_stats.append(stats)
                if bar is not None:
                    bar.update()
                elif callable(self.progress):
                    self.progress(number + 1, len(chunks))
        finally:
            if bar is not None:
                bar.close()
        memory.compact()
        if self.drop_unreadable:
            memory.drop_unreadable(self.family.sliding_windows)
        memory.retrieval = self._retrieval(append_to)
        previous = append_to.stats if append_to is not None else None
        memory.stats = self.memory_stats(memory, num_demos, torch.cat(full_types), chunk_stats,
                                         spent_before + time.perf_counter() - started, previous)
        return memory

    def query_position(self, chunk: ChunkState, chunk_demos: list[int]) -> int:
        """Where the queries will start, estimated after `chunk`: the demonstrations still to come, at the mean
        length (in positions) of those built so far."""
        done = max(chunk_demos) + 1
        per_demo = (chunk.next_position - self.start_position) / done
        return chunk.next_position + round(per_demo * (len(self.context) - done))

    def _build_chunk(self, memory: TaskMemory, demo_indices: list[int],
                     first: bool) -> tuple[list[MemoryLayer], torch.Tensor, dict, int]:
        """Prefills the demonstrations `demo_indices` (after the template prefix if `first`) on top of `memory` and
        lets the method prune them.

        Returns per layer the kept tokens, the chunk's token types before pruning `[chunk_len]`, the method's statistics
        and the memory's `next_position` after the chunk. The rest of the chunk's state goes when this returns.
        """
        spans = [self.context.demos[i] for i in demo_indices]
        if first:
            spans = [self.context.prefix, *spans]  # the template prefix belongs to the first chunk
        chunk = self.runner.prefill(memory, EncodedSpan.concat(spans), in_place=True)
        # the chunk's keys and values are views of the memory's growth buffers, where the probe's passes write next
        chunk.keys, chunk.values = [k.clone() for k in chunk.keys], [v.clone() for v in chunk.values]
        kept, stats = self.method.compress(self, memory, chunk, demo_indices)
        layers = [chunk.kept(index, kept[index]) for index in range(self.family.num_layers)]
        return layers, chunk.token_types.cpu(), stats, chunk.next_position

    def _retrieval(self, append_to: TaskMemory | None) -> RetrievalIndex | None:
        """The retrieval index of the demonstrations just built (joined to `append_to`'s), or None without
        `retrieval_layer` or when `append_to` has none."""
        if self.retrieval_layer is None or (append_to is not None and append_to.retrieval is None):
            return None
        start = append_to.next_position if append_to is not None else 0
        index = self.runner.retrieval_index(self.context, self.processor, self.retrieval_layer, start,
                                            with_prefix=append_to is None, batch_size=self.chunk_size)
        return append_to.retrieval.append(index) if append_to is not None else index

    def _arguments(self, append_to: TaskMemory | None) -> dict:
        """Everything that decides the memory's bytes: a checkpoint recorded under other arguments is not resumed."""
        import transformers

        method = {field.name: getattr(self.method, field.name) for field in dataclasses.fields(self.method)}
        base = self.family.model
        return {
            "demonstrations": {"count": len(self.context), "sha256": self.context.sha256()},
            "method": {"name": self.method.name, "params": method},
            "chunk_size": self.chunk_size,
            "pool_width": self.pool_width,
            "base_model": {"fingerprint": self.base_model.get("fingerprint"), "dtype": str(base.dtype),
                           "device": base.device.type},
            "rendering": self.processor.rendering(),
            "append_to": append_to.digest() if append_to is not None else None,
            # another version of the code or of the libraries may decide or compute differently
            "software": {"emloc_sha256": _source_sha256(), "torch": torch.__version__, "transformers": transformers.__version__},
        }

    def memory_stats(self, memory: TaskMemory, num_demos: int, full_types: torch.Tensor, chunk_stats: list,
                     seconds: float, previous: dict | None) -> dict:
        """`memory_config.json` content (design §7); `previous` is the stats of the memory this build extends."""
        previous = previous or {}
        family = self.family
        full_tokens = int(full_types.shape[0]) + previous.get("totals", {}).get("full_tokens", 0)
        bytes_per_token = 2 * family.num_kv_heads * family.head_dim * family.model.dtype.itemsize
        layers = [{"full": full_tokens, "kept": layer.num_tokens} for layer in memory.layers]
        kept_by_type = {name: 0.0 for name in TOKEN_TYPE_NAMES.values()}
        for layer in memory.layers:
            for type_id, name in TOKEN_TYPE_NAMES.items():
                kept_by_type[name] += float((layer.token_types == type_id).sum()) / layer.keys.shape[0]
        full_by_type = {name: int((full_types == type_id).sum()) + previous.get("token_types", {}).get(name, {}).get("full", 0)
                        for type_id, name in TOKEN_TYPE_NAMES.items()}
        kept_tokens = sum(entry["kept"] for entry in layers) / max(1, len(layers))
        # the kept share counts what a query can read, of what the full context gives it: in a sliding-window layer
        # only the last window of the context (`MemoryLayer.readable`), whether or not the rest was dropped
        share = readable_share(memory, layers, family.sliding_windows, bytes_per_token)
        return {
            "base_model": self.base_model,
            "method": {"name": self.method.name, "params": {**self.method.params(), "chunk_size": self.chunk_size}},
            "num_demos": num_demos + previous.get("num_demos", 0),
            "totals": {
                "full_tokens": full_tokens, "kept_tokens": round(kept_tokens, 2),
                "full_kv_bytes": full_tokens * bytes_per_token * family.num_layers, "kept_kv_bytes": memory.kv_bytes(),
                **share,
            },
            "token_types": {name: {"full": full_by_type[name], "kept": round(kept_by_type[name] / max(1, len(layers)), 2)}
                            for name in TOKEN_TYPE_NAMES.values()},
            "layers": layers,
            "build": {"seconds": round(seconds + previous.get("build", {}).get("seconds", 0.0), 3),
                      "chunks": previous.get("build", {}).get("chunks", []) + chunk_stats},
        }


def _source_sha256() -> str:
    """SHA-256 of the Emloc modules' source (this file and its siblings, also when loaded as remote code)."""
    digest = hashlib.sha256()
    for module in sorted(Path(__file__).resolve().parent.glob("*_emloc.py")):
        digest.update(module.name.encode() + b"\0" + module.read_bytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# A build that can be stopped and resumed
# ---------------------------------------------------------------------------------------------------------------------

CHECKPOINT_STATE_NAME = "build_state.json"
CHECKPOINT_VERSION = 1
_CHUNK_FILE = re.compile(r"chunk-(\d+)\.safetensors")
_STAGING_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A `checkpoint_dir` cannot be resumed: it holds a build with other arguments, or is not a build checkpoint."""


class BuildCheckpoint:
    """The state of a memory build on disk, chunk by chunk, so that a build stopped at any moment resumes there.

    The directory holds one `chunk-{k:05d}.safetensors` per completed chunk — per layer the kept tokens
    (`layers.{l}.keys`, `.values`, `.positions`, `.token_types`, as `MemoryLayer` holds them) and the chunk's token types
    before pruning (`full_token_types`, `[chunk_len]`) — and `build_state.json`: the build's arguments and, per completed
    chunk, its `next_position` and statistics. Every file is written under a temporary name, synced and renamed, the
    state last, so a crash at any moment leaves the last complete state whole (a chunk file beyond it is recomputed).
    Only the new chunk is written each time: rewriting the whole partial memory after every chunk would make a build's
    disk traffic grow with the square of its length.

    Args:
        directory: where the state lives; created with the first chunk.
        arguments: everything that decides the memory's bytes, as JSON. A state recorded under other arguments is
            refused with the differences named; the user deletes the directory to start over.
    """

    def __init__(self, directory: str | os.PathLike, arguments: dict):
        self.directory = Path(directory)
        self.arguments = json.loads(json.dumps(arguments))  # as it reads back (tuples become lists)
        self.chunks: list[dict] = []  # per completed chunk: {"next_position": int, "stats": dict}
        self.seconds = 0.0  # build time spent in the runs that wrote the completed chunks

    def resume(self) -> int:
        """Reads the recorded state, if any, and returns how many chunks it completed (0 for a new directory).

        Raises `CheckpointError` when the directory holds anything but a build state, a state of another build (naming
        each argument that differs) or an unreadable one. Leftovers of an interrupted write are removed.
        """
        if not self.directory.exists():
            return 0
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: checkpoint_dir is not a directory")
        foreign = sorted(p.name for p in self.directory.iterdir() if not self._is_ours(p.name))
        if foreign:
            raise CheckpointError(
                f"{self.directory}: not a build checkpoint (it holds {foreign[0]!r}); give a new or empty directory"
            )
        state_path = self.directory / CHECKPOINT_STATE_NAME
        done = 0
        if state_path.is_file():
            try:
                state = json.loads(state_path.read_text())
                version, recorded, chunks = state["version"], state["arguments"], state["chunks"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"{state_path}: unreadable build state ({error}); delete the directory to start over") from None
            if version != CHECKPOINT_VERSION:
                raise CheckpointError(f"{state_path}: unknown build state version {version!r} (this code writes {CHECKPOINT_VERSION})")
            differing = _differences(recorded, self.arguments)
            if differing:
                raise CheckpointError(
                    f"{self.directory}: holds a build with other arguments ({'; '.join(differing)}); resume with the same "
                    f"arguments, or delete the directory (or give another checkpoint_dir) to start over"
                )
            missing = [k for k in range(len(chunks)) if not self._chunk_path(k).is_file()]
            if missing:
                raise CheckpointError(f"{self.directory}: {self._chunk_path(missing[0]).name} is missing; delete the directory to start over")
            self.chunks, self.seconds, done = chunks, float(state.get("seconds", 0.0)), len(chunks)
        for path in self.directory.iterdir():  # an interrupted write, or chunks the state never recorded
            match = _CHUNK_FILE.fullmatch(path.name)
            if path.name.startswith(_STAGING_PREFIX) or (match and int(match.group(1)) >= done):
                path.unlink()
        return done

    def load_chunk(self, number: int) -> tuple[list[MemoryLayer], torch.Tensor]:
        """Completed chunk `number`: per layer its kept tokens, and its token types before pruning `[chunk_len]`."""
        from safetensors import safe_open

        path = self._chunk_path(number)
        try:
            with safe_open(str(path), framework="pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # safetensors raises its own error type for truncated headers and data
            raise CheckpointError(f"{path}: unreadable chunk ({error}); delete the directory to start over") from None
        names = [field.name for field in dataclasses.fields(MemoryLayer)]
        layers = []
        while f"layers.{len(layers)}.keys" in tensors:
            index = len(layers)
            missing = [name for name in names if f"layers.{index}.{name}" not in tensors]
            if missing:
                raise CheckpointError(f"{path}: unreadable chunk (no tensor layers.{index}.{missing[0]}); delete the directory to start over")
            layers.append(MemoryLayer(**{name: tensors[f"layers.{index}.{name}"] for name in names}))
        if not layers or "full_token_types" not in tensors:
            raise CheckpointError(f"{path}: unreadable chunk (no layers or token types); delete the directory to start over")
        return layers, tensors["full_token_types"]

    def add_chunk(self, layers: list[MemoryLayer], full_token_types: torch.Tensor, next_position: int, stats: dict,
                  seconds: float) -> None:
        """Records the next chunk: its kept tokens per layer, its token types before pruning `[chunk_len]`, the memory's
        `next_position` after it, its statistics, and the build time spent so far (all runs)."""
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"layers.{index}.{name}": tensor.contiguous()
            for index, layer in enumerate(layers) for name, tensor in layer.tensors().items()
        }
        tensors["full_token_types"] = full_token_types.contiguous()
        _write_atomically(self._chunk_path(len(self.chunks)), lambda path: save_file(tensors, path, metadata={"format": "pt"}))
        self.chunks.append({"next_position": int(next_position), "stats": stats})
        self.seconds = float(seconds)
        state = {"version": CHECKPOINT_VERSION, "arguments": self.arguments, "seconds": round(self.seconds, 3),
                 "chunks": self.chunks}
        _write_atomically(self.directory / CHECKPOINT_STATE_NAME,
                          lambda path: Path(path).write_text(json.dumps(state, indent=1) + "\n"))

    def _chunk_path(self, number: int) -> Path:
        return self.directory / f"chunk-{number:05d}.safetensors"

    @staticmethod
    def _is_ours(name: str) -> bool:
        return name == CHECKPOINT_STATE_NAME or name.startswith(_STAGING_PREFIX) or _CHUNK_FILE.fullmatch(name) is not None


def _differences(recorded: Any, current: Any) -> list[str]:
    """`"key: recorded then, current now"` for every (dotted) key whose value differs."""
    return [f"{key or 'arguments'}: {then!r} then, {now!r} now" for key, then, now in differing(recorded, current)]


def _write_atomically(target: Path, write) -> None:
    """Calls `write(path)` on a temporary sibling of `target`, syncs it and renames it to `target`: readers see the old
    file or the new one, never a part (nor, after a power loss, an empty file under the new name)."""
    handle, staging = tempfile.mkstemp(prefix=_STAGING_PREFIX, dir=target.parent)
    os.close(handle)
    try:
        write(staging)
        with open(staging, "rb") as written:
            os.fsync(written.fileno())
        os.replace(staging, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise
    with contextlib.suppress(OSError):  # the rename itself lasts once the directory is synced (POSIX)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


__all__ = ["COMPRESSION_METHODS", "BuildCheckpoint", "CheckpointError", "CompressionMethod", "EmlocMethod",
           "EmlocQueryMethod", "FullMethod", "MemoryBuilder", "Probe", "RandomMethod", "method_params_for",
           "register_method"]
