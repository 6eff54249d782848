# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
Running the base model against a task memory: passes of its decoder layers over an `EmlocCache` that starts with the
memory.

`run_layers` runs the base model's own decoder layers (any slice of them) on a `Segment` of embedded tokens, with the
masks the cache builds; `MemoryRunner` wraps the passes every caller needs — prefilling a span on top of a memory
(how a memory is built, and how the full context is), a batch of queries after a memory (how it is read), and
retrieval inside the memory (each query attends to its nearest demonstrations only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

try:  # loaded as remote code: transformers makes a package of the repository's modules
    from .cache_emloc import AttentionObserver, EmlocCache, MemorySelector, attention_implementation
    from .memory_emloc import MemoryLayer, MemoryLoadError, RetrievalIndex, TaskMemory
    from .processing_emloc import EncodedSpan, EmlocProcessor
except ImportError:  # imported from the repository root as flat modules
    from cache_emloc import AttentionObserver, EmlocCache, MemorySelector, attention_implementation
    from memory_emloc import MemoryLayer, MemoryLoadError, RetrievalIndex, TaskMemory
    from processing_emloc import EncodedSpan, EmlocProcessor


# ---------------------------------------------------------------------------------------------------------------------
# Passes over the decoder layers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """Tokens fed in one forward pass.

    Attributes:
        hidden: `[batch, seq, hidden]` embeddings (or hidden states entering `start_layer`).
        rope_positions: `[batch, seq]` or `[3, batch, seq]` (M-RoPE) absolute positions.
        text_positions: `[batch, seq]`.
        valid: `[batch, seq]` bool, False at padding.
        branches: `[batch, seq]` long or None: 0 for the trunk, `b > 0` for the tokens of continuation `b`, which see
            the trunk and their own branch only (`EmlocCache`).
        segments: `[batch, seq]` long or None: which of the sequences packed into a row a token belongs to; it sees
            the new tokens of its own segment only.
    """

    hidden: torch.Tensor
    rope_positions: torch.Tensor
    text_positions: torch.Tensor
    valid: torch.Tensor
    branches: torch.Tensor | None = None
    segments: torch.Tensor | None = None

    @property
    def next_position(self) -> torch.Tensor:
        """Per row, one past the largest position used: `[batch]`."""
        rope = self.rope_positions if self.rope_positions.dim() == 3 else self.rope_positions[None]
        masked = rope.masked_fill(~self.valid[None], -1)
        return masked.amax(dim=(0, 2)) + 1


def run_layers(family, segment: Segment, cache: EmlocCache, start: int = 0, stop: int | None = None,
               observer: AttentionObserver | None = None, keep_hidden: bool = False,
               selector: MemorySelector | None = None) -> tuple[torch.Tensor, list]:
    """Runs decoder layers `start … stop-1` of a base model (`family`, `modeling_emloc.TextFamily`) on `segment`
    against `cache`.

    Returns the hidden state after the last layer `[batch, seq, hidden]` and, with `keep_hidden`, the hidden state that
    entered each layer run (the restart points of layer-wise pruning).
    """
    stop = family.num_layers if stop is None else stop
    cache.add_tokens(segment.text_positions, segment.valid, segment.branches, segment.segments)
    if segment.branches is None and segment.segments is None:  # scoring layouts do not move a row on
        cache.advance(segment.next_position, segment.valid)
    position_embeddings = family.position_embeddings(segment.hidden, segment.rope_positions)
    hidden, entering = segment.hidden, []
    num_new = hidden.shape[1]
    groups = family.num_heads // family.num_kv_heads
    extra, attention = {}, "sdpa"
    if observer is not None:
        extra, attention = {"emloc_observer": observer}, "emloc_observed"
    elif selector is not None:
        extra, attention = {"emloc_selector": selector}, "emloc_selecting"
    with attention_implementation(family.model, attention):
        for layer in range(start, stop):
            if keep_hidden:
                entering.append(hidden)
            device = family.layer_device(layer)
            mask = cache.attention_mask(layer, num_new, groups, family.sliding_window(layer)).to(device)
            cos, sin = position_embeddings[layer]
            hidden = family.layers[layer](
                hidden.to(device), attention_mask=mask, position_embeddings=(cos.to(device), sin.to(device)),
                past_key_values=cache, use_cache=True, **extra,
            )
            if isinstance(hidden, tuple):
                hidden = hidden[0]
    return hidden, entering


def memory_prefix(memory: TaskMemory, from_layer: int = 0, family=None) -> list:
    """Per layer `(keys, values, positions)` of `memory`, None below `from_layer`; on each layer's device when `family`
    is given."""
    prefix = []
    for index, layer in enumerate(memory.layers):
        if index < from_layer:
            prefix.append(None)
            continue
        entry = (layer.keys, layer.values, layer.positions)
        if family is not None:
            device = family.layer_device(index)
            entry = tuple(t.to(device) for t in entry)
        prefix.append(entry)
    return prefix


def rows_prefix(memories: Sequence[TaskMemory], family=None) -> tuple[list, list, torch.Tensor]:
    """Each row its own memory (`generate(memory=[...])`): per layer `(keys, values, positions)` with keys and values
    `[batch, kv_heads, m, head_dim]` and positions `[batch, kv_heads, m]`, `m` the most tokens any row's memory holds in
    that layer; the mask of each row's real tokens among them (`[batch, kv_heads, m]`, or None when no row is padded);
    and where each row's queries start (`[batch]`, its memory's `next_position`). The padding is masked out, so a row
    attends to exactly the tokens its memory alone would give it."""
    prefix, keeps = [], []
    for index in range(memories[0].num_layers):
        layers = [memory.layers[index] for memory in memories]
        width = max(layer.num_tokens for layer in layers)
        device = family.layer_device(index) if family is not None else layers[0].keys.device

        def padded(tensor):  # [kv_heads, n, ...] -> [kv_heads, width, ...], zeros after the real tokens
            tensor = tensor.to(device)
            return F.pad(tensor, [0, 0] * (tensor.dim() - 2) + [0, width - tensor.shape[1]])

        prefix.append((torch.stack([padded(layer.keys) for layer in layers]),
                       torch.stack([padded(layer.values) for layer in layers]),
                       torch.stack([padded(layer.positions) for layer in layers])))
        real = torch.arange(width, device=device)[None] < torch.tensor([layer.num_tokens for layer in layers],
                                                                         device=device)[:, None]
        keeps.append(None if bool(real.all()) else real[:, None, :].expand(-1, memories[0].num_kv_heads, -1))
    return prefix, keeps, torch.tensor([memory.next_position for memory in memories], dtype=torch.long)


def js_divergence(logits_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log) between next-token distributions, computed in float32.

    `logits_p [..., vocab]` (any dtype), `log_q [..., vocab]` log-probabilities; returns `[...]`.
    JS(p, q) = ½ KL(p‖m) + ½ KL(q‖m), m = (p + q) / 2; written with log-sum-exp so it is never NaN.
    """
    log_p = torch.log_softmax(logits_p.float(), dim=-1)
    log_q = log_q.float()
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp(min=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# The memory runner: prefills, query passes, retrieval
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ChunkState:
    """A span prefilled on top of a memory (a chunk being built, or a whole context): what its compression needs.

    Attributes:
        keys / values: per layer `[kv_heads, chunk_len, head_dim]`, the chunk's KV computed on top of the memory.
        positions: `[chunk_len]` text positions; token_types: `[chunk_len]`.
        next_position: position of the first token after the chunk.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor
    token_types: torch.Tensor
    next_position: int

    @property
    def length(self) -> int:
        return self.positions.shape[0]

    def kept(self, layer: int, index: torch.Tensor | None) -> MemoryLayer:
        """The chunk's layer restricted to `index` `[kv_heads, k]` (None = all tokens)."""
        heads = self.keys[layer].shape[0]
        if index is None:
            index = torch.arange(self.length, device=self.positions.device).expand(heads, -1)
        gather = index[..., None].expand(-1, -1, self.keys[layer].shape[-1])
        return MemoryLayer(
            keys=self.keys[layer].gather(1, gather),
            values=self.values[layer].gather(1, gather),
            positions=self.positions[index],
            token_types=self.token_types[index],
        )


class MemoryRunner:
    """The passes of a base model (its `family`, `modeling_emloc.TextFamily`) against task memories.

    `pool_width` is the smoothing of per-query selection (`select=`), as EMLoC smooths token importance.
    """

    def __init__(self, family, pool_width: int = 5):
        self.family, self.pool_width = family, pool_width

    @property
    def device(self) -> torch.device:
        return self.family.model.device

    def empty_memory(self) -> TaskMemory:
        family = self.family
        return TaskMemory.empty(family.num_layers, family.num_kv_heads, family.head_dim, dtype=family.model.dtype,
                                device=self.device)

    def check_fits(self, memory: TaskMemory) -> None:
        """Raises `MemoryLoadError` unless `memory` has this model's layers, KV heads and head size."""
        family = self.family
        if memory.num_layers != family.num_layers:
            raise MemoryLoadError(f"memory has {memory.num_layers} layers, the model {family.num_layers}")
        layer = memory.layers[0]
        if layer.keys.shape[0] != family.num_kv_heads or layer.keys.shape[2] != family.head_dim:
            raise MemoryLoadError(
                f"memory layers are [{layer.keys.shape[0]} heads, {layer.keys.shape[2]} dims], the model needs "
                f"[{family.num_kv_heads}, {family.head_dim}]"
            )

    def segment(self, inputs: dict, start_position: int | torch.Tensor) -> Segment:
        """Embeds a batch and gives it positions starting at `start_position` (per row `[batch]`, or shared)."""
        family = self.family
        device = self.device
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        valid = inputs["attention_mask"].bool()
        hidden = family.embed(inputs)
        rope = family.relative_positions(inputs)
        start = torch.as_tensor(start_position, device=device).reshape(-1, 1)
        rope = torch.where(valid, rope + start, torch.zeros_like(rope))
        return Segment(hidden, rope, family.text_positions(rope), valid)

    # -- prefilling ------------------------------------------------------------------------------------------------

    def prefill(self, memory: TaskMemory, span: EncodedSpan, in_place: bool = False) -> ChunkState:
        """Feeds a span (batch 1) on top of `memory`; returns its per-layer KV, positions and types.

        With `in_place` the span's keys and values are written after the memory in its growth buffers
        (`TaskMemory.scratch`) instead of a copy of the memory: they are views there, valid until the next write."""
        inputs = {"input_ids": span.input_ids[None], "attention_mask": torch.ones_like(span.input_ids)[None], **span.media}
        segment = self.segment(inputs, start_position=memory.next_position)
        length = span.input_ids.shape[0]
        if in_place:
            prefix = [((), (), layer.positions) for layer in memory.layers]
            cache = EmlocCache(prefix, batch_size=1, scratch=memory.scratch(length))
        else:
            cache = EmlocCache(memory_prefix(memory), batch_size=1, headroom=length)
        run_layers(self.family, segment, cache)
        keys, values = zip(*(cache.new_kv(layer) for layer in range(self.family.num_layers)))
        return ChunkState(
            keys=[k[0] for k in keys], values=[v[0] for v in values],
            positions=segment.text_positions[0], token_types=span.token_types.to(segment.hidden.device),
            next_position=int(segment.next_position[0]),
        )

    def uncompressed(self, span: EncodedSpan) -> TaskMemory:
        """The memory of `span` with nothing pruned: the prefix cache of the full context (the template prefix alone
        for zero-shot answering)."""
        memory = self.empty_memory()
        if len(span) == 0:
            return memory
        chunk = self.prefill(memory, span)
        return TaskMemory([layer.append(chunk.kept(i, None)) for i, layer in enumerate(memory.layers)],
                          chunk.next_position)

    # -- reading a memory ------------------------------------------------------------------------------------------

    def query_pass(self, memory: TaskMemory | None, inputs: dict, select: float | None = None,
                   logits_to_keep: int = 0, retrieve: int | None = None) -> tuple[torch.Tensor, EmlocCache, Segment]:
        """Prefills a batch of queries against one shared memory; returns logits `[batch, seq | logits_to_keep,
        vocab]`, the cache and the segment (for decoding on). `select` turns on per-query selection over the memory
        (`MemorySelector`), `retrieve` retrieval of each query's nearest demonstrations (`retrieved_prefix`)."""
        if isinstance(memory, list) and (select is not None or retrieve is not None):
            raise ValueError("select= and retrieve= take one memory for the whole batch, not a memory per row")
        _, cache = self.memory_cache(memory, inputs["input_ids"].shape[0], inputs, retrieve)
        segment = self.segment(inputs, start_position=cache.next_position)
        hidden, _ = run_layers(self.family, segment, cache, selector=self.selector(select, cache, segment.valid))
        return self.family.logits(hidden[:, -logits_to_keep:] if logits_to_keep else hidden), cache, segment

    def memory_cache(self, memory: TaskMemory | list[TaskMemory] | None, batch_size: int, queries: dict | None = None,
                     retrieve: int | None = None, exclude: torch.Tensor | None = None) -> tuple[TaskMemory, EmlocCache]:
        """The memory (empty if None) on the model's device and dtype, and a cache of `batch_size` rows starting with it
        — with `retrieve`, each row of `queries` starting with its own view of it (`retrieved_prefix`; `exclude`
        `[batch]`: a demonstration each row may not retrieve, -1 for none); with a list of memories, each row with its
        own memory (`rows_prefix`)."""
        if isinstance(memory, list):
            if len(memory) != batch_size:
                raise ValueError(f"a list of memories takes one per row: got {len(memory)} for {batch_size} rows")
            for each in memory:
                self.check_fits(each)
            memories = [each.to(device=self.device, dtype=self.family.model.dtype) for each in memory]
            prefix, keep, start = rows_prefix(memories, family=self.family)
            cache = EmlocCache(prefix, batch_size=batch_size, start_position=start)
            cache.prefix_keep = keep
            return memories, cache
        memory = memory if memory is not None else self.empty_memory()
        self.check_fits(memory)
        memory = memory.to(device=self.device, dtype=self.family.model.dtype)
        prefix, keep = memory_prefix(memory, family=self.family), None
        if retrieve is not None:
            prefix, keep = self.retrieved_prefix(memory, prefix, queries, retrieve, exclude)
        cache = EmlocCache(prefix, batch_size=batch_size, start_position=memory.next_position)
        if keep is not None:
            cache.prefix_keep = keep
        return memory, cache

    def selector(self, select: float | None, cache: EmlocCache, valid: torch.Tensor) -> MemorySelector | None:
        """`MemorySelector` for `select=` (None or 1.0: the whole memory); `valid` `[batch, seq]` marks the positions
        whose attention chooses."""
        if select is not None and not 0 < select:
            raise ValueError(f"select must be a fraction in (0, 1] or a token count, got {select}")
        if select is None or select == 1.0:
            return None
        return MemorySelector(float(select), cache, valid, self.pool_width)

    # -- retrieval inside the memory -------------------------------------------------------------------------------

    def retrieval_keys(self, inputs: dict, layer: int) -> torch.Tensor:
        """Each row of `inputs` (a processor batch), run alone — no memory, positions from 0 — through the decoder
        layers below `layer` (none for 0: the input embeddings), mean-pooled over its real tokens: `[batch, hidden]`
        float32. Demonstrations (rendered as queries) and queries get their retrieval keys this one way."""
        inputs = {key: value for key, value in inputs.items() if key != "token_types"}
        segment = self.segment(inputs, start_position=0)
        hidden = segment.hidden
        if layer > 0:
            cache = EmlocCache(memory_prefix(self.empty_memory(), family=self.family), hidden.shape[0])
            hidden, _ = run_layers(self.family, segment, cache, stop=min(layer, self.family.num_layers))
        valid = segment.valid[..., None].to(hidden.device, hidden.dtype)
        return ((hidden * valid).sum(1) / valid.sum(1).clamp(min=1)).float()

    @torch.no_grad()
    def retrieval_index(self, context, processor: EmlocProcessor, layer: int, start_position: int,
                        with_prefix: bool, batch_size: int = 8) -> RetrievalIndex:
        """Where each demonstration of `context` sits once its tokens follow `start_position` (after the template
        prefix when `with_prefix`), and its key (`retrieval_keys` of the demonstration rendered as a query)."""
        family = self.family

        def positions(span: EncodedSpan, start: int) -> torch.Tensor:
            inputs = {"input_ids": span.input_ids[None], "attention_mask": torch.ones_like(span.input_ids)[None],
                      **span.media}
            return family.text_positions(family.relative_positions(inputs))[0] + start

        cursor = start_position
        if with_prefix and len(context.prefix):
            cursor = int(positions(context.prefix, cursor).max()) + 1
        starts, ends, keys = [], [], []
        for begin in range(0, len(context), batch_size):
            group = range(begin, min(begin + batch_size, len(context)))
            for index in group:
                demo = positions(context.demos[index], cursor)
                starts.append(cursor)
                cursor = int(demo.max()) + 1 if demo.numel() else cursor
                ends.append(cursor)
            batch = processor.collate([processor.encode_query(context.examples[i]) for i in group])
            keys.append(self.retrieval_keys(batch, layer).cpu())
        hidden_size = family.text_config.hidden_size
        return RetrievalIndex(torch.tensor(starts, dtype=torch.long), torch.tensor(ends, dtype=torch.long),
                              torch.cat(keys) if keys else torch.zeros(0, hidden_size), int(layer))

    def retrieved_prefix(self, memory: TaskMemory, prefix: list, queries: dict, retrieve: int,
                         exclude: torch.Tensor | None = None) -> tuple[list, list]:
        """`retrieve=k`: per layer, each row of `queries` gets its own prefix — the memory tokens of its `k` nearest
        demonstrations and of the template prefix, gathered (keys and values `[batch, kv_heads, m, head_dim]`,
        positions `[batch, kv_heads, m]`, `m` the most any row and head sees) — and the mask of the real ones among
        them (`[batch, kv_heads, m]`, or None when none is padding). Attention then costs what those tokens cost, not
        what the whole memory does."""
        if isinstance(retrieve, bool) or not isinstance(retrieve, int) or retrieve < 1:
            raise ValueError(f"retrieve must be a positive number of demonstrations, got {retrieve!r}")
        index = memory.retrieval
        if index is None:
            raise ValueError(
                "this memory has no retrieval index (saved in memory format 1, made by another tool, or built with "
                "retrieval=False): add one with model.index_memory(memory, demos, processor=processor)"
            )
        chosen = index.nearest(self.retrieval_keys(queries, index.layer), retrieve, exclude)
        gathered, keeps = [], []
        for entry in prefix:
            if entry is None:
                gathered.append(None)
                keeps.append(None)
                continue
            keys, values, positions = entry
            visible = index.visible(positions, chosen)  # [batch, kv_heads, n]
            width = int(visible.sum(-1).max()) if visible.numel() else 0
            # per row and head, its visible tokens first, in memory order
            order = torch.sort((~visible).to(torch.uint8), dim=-1, stable=True).indices[..., :width]

            def pick(tensor):  # [kv_heads, n, head_dim] -> [batch, kv_heads, width, head_dim]
                expanded = tensor.unsqueeze(0).expand(order.shape[0], -1, -1, -1)
                return expanded.gather(2, order[..., None].to(tensor.device).expand(-1, -1, -1, tensor.shape[-1]))

            rows_positions = positions.unsqueeze(0).expand(order.shape[0], -1, -1).gather(2, order.to(positions.device))
            gathered.append((pick(keys), pick(values), rows_positions))
            keep = visible.gather(2, order)
            keeps.append(None if bool(keep.all()) else keep)
        return gathered, keeps


__all__ = ["ChunkState", "MemoryRunner", "Segment", "js_divergence", "memory_prefix", "rows_prefix", "run_layers"]
