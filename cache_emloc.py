# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
The cache a base model runs with when it reads a task memory, and the attention functions that look inside it.

`EmlocCache` is a transformers `DynamicCache` whose layers start with a prefix — a memory, possibly with a chunk or
another context appended — where each layer and KV head may hold its own tokens at their own positions. It builds the
boolean mask a stock attention function needs (`attention_mask`), so the base model's own decoder layers run
unchanged. Two attention functions are registered with transformers' `AttentionInterface` for the passes that need
more than the output: `emloc_observed` (the stock `sdpa`, plus the probabilities at chosen positions, EMLoC's
importance) and `emloc_selecting` (per-query selection over the memory, `select=`). `attention_implementation` scopes
the choice of function to one pass and undoes it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface


# ---------------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------------

class PrefixedLayer(DynamicLayer):
    """A cache layer that starts with a prefix and writes new tokens into a buffer that grows by doubling, so feeding
    a token does not copy the whole memory as concatenation would.

    The prefix comes as pieces laid end to end along the token axis, each `[batch, kv_heads, len, head_dim]` or
    `[kv_heads, len, head_dim]` (shared by every row): they are copied once, straight into the buffer, with room for
    `headroom` more tokens (what a caller knows it will feed).

    `scratch=(keys, values, filled)` lends the layer buffers `[batch, kv_heads, capacity, head_dim]` whose first
    `filled` tokens already hold the start of the prefix; the pieces follow them. A caller that runs many passes over
    one prefix (a build's probe) copies its memory once, not once per pass, and allocates nothing per pass."""

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], batch_size: int, headroom: int = 64,
                 scratch: tuple[torch.Tensor, torch.Tensor, int] | None = None):
        super().__init__()
        template = keys[0] if scratch is None else scratch[0]
        heads, dim = template.shape[-3], template.shape[-1]
        filled = 0 if scratch is None else scratch[2]
        length = filled + sum(piece.shape[-2] for piece in keys)
        if scratch is None:
            self._keys = keys[0].new_empty(batch_size, heads, length + headroom, dim)
            self._values = values[0].new_empty(batch_size, heads, length + headroom, dim)
        else:
            self._keys, self._values = scratch[0], scratch[1]
            if self._keys.shape[0] != batch_size or self._keys.shape[2] < length:
                raise ValueError(f"a scratch buffer of {tuple(self._keys.shape)} cannot hold {batch_size} rows of {length} tokens")
        start = filled
        for key_piece, value_piece in zip(keys, values):
            end = start + key_piece.shape[-2]
            self._keys[:, :, start:end] = key_piece  # a shared piece broadcasts over the rows
            self._values[:, :, start:end] = value_piece
            start = end
        self.length = self.prefix_length = length
        self.dtype, self.device, self.is_initialized = template.dtype, template.device, True
        self._expose()

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    # Batch surgery for generation (beam search, `num_return_sequences`, scoring continuations). Every row holds the
    # same prefix (one memory), so reordering rows only has to move the tokens fed after it.

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        index = beam_idx.to(self._keys.device)
        fed = slice(self.prefix_length, self.length)
        self._keys[:, :, fed] = self._keys[index, :, fed]
        self._values[:, :, fed] = self._values[index, :, fed]
        self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps (or repeats) the rows `indices` in this order."""
        index = torch.as_tensor(indices, device=self._keys.device)
        self._keys, self._values = self._keys[index], self._values[index]
        self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._keys = self._keys.repeat_interleave(repeats, dim=0)
        self._values = self._values.repeat_interleave(repeats, dim=0)
        self._expose()

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last `-tokens_to_remove` fed tokens (never the prefix)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self.length = max(self.prefix_length, self.length + tokens_to_remove)
        self._expose()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        needed = self.length + key_states.shape[2]
        if needed > self._keys.shape[2]:
            capacity = max(needed, 2 * self._keys.shape[2])
            for name in ("_keys", "_values"):
                old = getattr(self, name)
                grown = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
                grown[:, :, : self.length] = old[:, :, : self.length]
                setattr(self, name, grown)
        self._keys[:, :, self.length:needed] = key_states
        self._values[:, :, self.length:needed] = value_states
        self.length = needed
        self._expose()
        return self.keys, self.values


class EmlocCache(DynamicCache):
    """A `DynamicCache` whose layers start with a fixed prefix (a task memory, possibly with a chunk appended).

    A prefix entry is `(keys, values, positions)`, keys and values a tensor or a tuple of pieces laid end to end
    (`memory_prefix`); `headroom` is how many tokens the caller will feed (more only costs a larger copy later);
    `scratch` lends each layer buffers that already hold the start of its prefix (`PrefixedLayer`).
    Each layer may hold a different number of prefix tokens and each KV head its own tokens, so the cache also keeps
    the prefix tokens' positions (`[kv_heads, tokens]` per layer; `[batch, kv_heads, tokens]` with keys and values
    `[batch, kv_heads, tokens, head_dim]` when each row has its own prefix, as with retrieval) and, for the tokens fed
    afterwards, their positions,
    padding and branch (`[batch, tokens]`); `attention_mask(layer, ...)` builds the mask a stock attention function
    needs, and `next_position` (`[batch]`) is where each row's next token goes.

    The prefix is visible to every new token (it precedes them all), except outside a sliding window; new tokens see
    each other causally. That is exactly what each token sees in the full context when nothing is pruned. Two ids
    restrict that further, for scoring many sequences in one pass: new tokens see only the new tokens of their own
    segment (several queries packed into one row, sharing one copy of the prefix), and tokens of a branch `b > 0`
    (continuations of a query) see the trunk (branch 0) and their own branch only.

    For `generate` it behaves as a transformers cache of the tokens fed after the memory: `get_seq_length()` counts
    those (the memory is not part of `input_ids`), and `reorder_cache` / `batch_repeat_interleave` /
    `batch_select_indices` / `crop` move rows and tokens for beam search and `num_return_sequences`.
    """

    def __init__(self, prefix: Sequence[tuple | None], batch_size: int, start_position: int | torch.Tensor = 0,
                 window_shift: int = 0,
                 headroom: int = 64, scratch: Sequence[tuple[torch.Tensor, torch.Tensor, int] | None] | None = None):
        layers = []
        # sliding windows cut the prefix as for tokens `window_shift` positions further on (a build's probe rows see
        # a chunk the way the queries after the whole context will); 0 everywhere else
        self.window_shift = int(window_shift)
        self.prefix_positions: list[torch.Tensor | None] = []
        for index, entry in enumerate(prefix):
            if entry is None:  # a layer the pass does not run
                layers.append(DynamicLayer())
                self.prefix_positions.append(None)
                continue
            keys, values, positions = entry
            keys = tuple(keys) if isinstance(keys, (tuple, list)) else (keys,)
            values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
            layers.append(PrefixedLayer(keys, values, batch_size, headroom, scratch[index] if scratch is not None else None))
            self.prefix_positions.append(positions)
        super().__init__()
        self.layers = layers
        self.prefix_lengths = [p.shape[-1] if p is not None else 0 for p in self.prefix_positions]
        self.rows = batch_size
        device = next((p.device for p in self.prefix_positions if p is not None), torch.device("cpu"))
        self.new_positions = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.new_valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        self.new_branches = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.new_segments = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        # one start for every row, or each row's own (`[batch]`: rows of different memories)
        self.next_position = torch.as_tensor(start_position, dtype=torch.long, device=device).expand(batch_size).clone()
        # per-query selection over the prefix (`select=`): per layer None or bool [batch, kv_heads, prefix_len]
        self.prefix_keep: list[torch.Tensor | None] = [None] * len(self.prefix_positions)

    def add_tokens(self, text_positions: torch.Tensor, valid: torch.Tensor, branches: torch.Tensor | None = None,
                   segments: torch.Tensor | None = None) -> None:
        """Registers the positions `[batch, seq]`, padding and (optionally) branches and segments of the tokens about
        to be fed."""
        device = self.new_positions.device
        zeros = torch.zeros_like(text_positions, device=device)
        self.new_positions = torch.cat([self.new_positions, text_positions.to(device)], dim=1)
        self.new_valid = torch.cat([self.new_valid, valid.to(device).bool()], dim=1)
        self.new_branches = torch.cat([self.new_branches, zeros if branches is None else branches.to(device).long()], dim=1)
        self.new_segments = torch.cat([self.new_segments, zeros if segments is None else segments.to(device).long()], dim=1)

    def advance(self, next_position: torch.Tensor, valid: torch.Tensor) -> None:
        """After a pass: rows that fed a real token continue at `next_position` `[batch]` (one past their largest
        position on any M-RoPE axis); the others stay where they were."""
        device = self.next_position.device
        self.next_position = torch.where(valid.to(device).any(-1), next_position.to(device), self.next_position)

    def attention_mask(self, layer: int, num_new: int, num_groups: int, sliding_window: int | None) -> torch.Tensor:
        """Boolean mask `[batch, 1 | heads, num_new, prefix + all new tokens]` (True = attend) for the last `num_new`
        registered tokens in `layer`."""
        total = self.new_positions.shape[1]
        query_positions = self.new_positions[:, total - num_new:]
        query_index = torch.arange(total - num_new, total, device=query_positions.device)
        key_index = torch.arange(total, device=query_positions.device)
        new_part = (key_index[None, :] <= query_index[:, None])[None] & self.new_valid[:, None, :]
        if bool(self.new_segments.any()):
            new_part &= self.new_segments[:, None, :] == self.new_segments[:, total - num_new:, None]
        if bool(self.new_branches.any()):
            query_branches = self.new_branches[:, total - num_new:, None]
            key_branches = self.new_branches[:, None, :]
            new_part &= (key_branches == 0) | (key_branches == query_branches)
        new_part |= key_index[None, None, :] == query_index[None, :, None]  # padding rows attend to themselves
        if sliding_window is not None:
            new_part &= self.new_positions[:, None, :] > query_positions[:, :, None] - sliding_window
        new_part = new_part[:, None]  # [batch, 1, q, new]
        positions = self.prefix_positions[layer]
        if positions is None or positions.shape[-1] == 0:
            return new_part
        positions = positions.to(new_part.device)
        positions = positions if positions.dim() == 3 else positions[None]  # [1 | batch, kv_heads, prefix]
        keep = self.prefix_keep[layer]
        keep = keep.to(new_part.device) if keep is not None else None
        if sliding_window is None and keep is None:
            prefix_part = torch.ones(self.rows, 1, num_new, positions.shape[2], dtype=torch.bool, device=new_part.device)
            return torch.cat([prefix_part, new_part], dim=-1)
        # per KV head: each head kept its own tokens, so the window (and a selection) cuts each head differently
        prefix_part = torch.ones(self.rows, positions.shape[1], num_new, positions.shape[2], dtype=torch.bool, device=new_part.device)
        if sliding_window is not None:
            prefix_part = prefix_part & (positions[:, :, None, :] > query_positions[:, None, :, None] + self.window_shift - sliding_window)
        if keep is not None:
            prefix_part = prefix_part & keep[:, :, None, :]
        prefix_part = prefix_part.repeat_interleave(num_groups, dim=1)
        return torch.cat([prefix_part, new_part.expand(-1, prefix_part.shape[1], -1, -1)], dim=-1)

    # -- as a transformers cache during `generate` ----------------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens fed after the prefix: what `generate` counts as already processed of `input_ids`."""
        return self.new_positions.shape[1]

    def _rows(self, pick) -> None:
        """Applies `pick` (a function of a `[batch, ...]` tensor) to every per-row record."""
        for name in ("new_positions", "new_valid", "new_branches", "new_segments", "next_position"):
            setattr(self, name, pick(getattr(self, name)))
        self.prefix_keep = [pick(keep) if keep is not None else None for keep in self.prefix_keep]
        self.prefix_positions = [pick(p) if p is not None and p.dim() == 3 else p for p in self.prefix_positions]
        self.rows = self.next_position.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the rows `indices` in this order; an index may repeat (one row per continuation to score)."""
        super().batch_select_indices(indices)
        self._rows(lambda t: t[torch.as_tensor(indices, device=t.device)])

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last `-tokens_to_remove` tokens fed after the prefix (`generate` undoing a step)."""
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0:
            removed = self.new_valid[:, tokens_to_remove:].sum(-1)
            self.next_position = self.next_position - removed.to(self.next_position.device)
            self.new_positions = self.new_positions[:, :tokens_to_remove]
            self.new_valid = self.new_valid[:, :tokens_to_remove]
            self.new_branches = self.new_branches[:, :tokens_to_remove]
            self.new_segments = self.new_segments[:, :tokens_to_remove]

    def new_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the tokens fed after the prefix: `[batch, kv_heads, new, head_dim]` each."""
        start = self.prefix_lengths[layer]
        return self.layers[layer].keys[:, :, start:], self.layers[layer].values[:, :, start:]


# ---------------------------------------------------------------------------------------------------------------------
# Attention functions that look inside the cache
# ---------------------------------------------------------------------------------------------------------------------


def smooth(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Average pool `[heads, seq]` along the sequence with an odd `width`, same length out."""
    if width <= 1 or scores.shape[-1] == 0:
        return scores
    return F.avg_pool1d(scores[:, None], kernel_size=width, stride=1, padding=width // 2, count_include_pad=False)[:, 0, : scores.shape[-1]]


class AttentionObserver:
    """Collects attention probabilities from chosen query positions during a forward pass (EMLoC importance, §3.2).

    `rows` is a bool `[batch, seq]` of the query positions to observe; `keys` a `slice` of the key axis to keep. For each
    layer it stores the probabilities summed over observed positions, batch rows and the query heads of each KV group:
    `[kv_heads, len(keys)]`. Only the observed positions' probabilities are computed (`observe`): a few rows of the
    attention matrix, while the pass itself runs the stock attention.
    """

    def __init__(self, rows: torch.Tensor, keys: slice, num_groups: int):
        self.rows, self.keys, self.num_groups = rows, keys, num_groups
        self.per_layer: dict[int, torch.Tensor] = {}
        # the query positions observed in some row; the others need no probabilities
        self.positions = rows.any(dim=0).nonzero().flatten()

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                scaling: float | None = None, softcap: float | None = None) -> None:
        """Records layer `layer`'s probabilities at the observed positions, in float32 whatever the model dtype.

        query `[batch, heads, q, head_dim]`, key `[batch, kv_heads, k, head_dim]`, attention_mask bool
        `[batch, 1 | heads, q, k]`."""
        positions = self.positions.to(query.device)
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query[:, :, positions].float(), key.float().transpose(2, 3)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask[:, :, positions], float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)[..., self.keys]  # [batch, heads, observed, k]
        weights = self.rows[:, positions].to(probabilities.device, probabilities.dtype)
        summed = torch.einsum("bhqk,bq->hk", probabilities, weights)
        self.per_layer[layer] = summed.view(-1, self.num_groups, summed.shape[-1]).sum(dim=1)


def emloc_observed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                             emloc_observer: AttentionObserver | None = None, **kwargs):
    """The stock `sdpa` attention, which also lets an `AttentionObserver` see the probabilities at the query positions
    it observes (registered as `"emloc_observed"`). Shapes as `sdpa`; attention_mask bool `[batch, 1 | heads, q, k]`."""
    if softcap is not None:
        kwargs["softcap"] = softcap  # `sdpa` refuses it, as every other pass of ours would
    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if emloc_observer is not None:
        emloc_observer.observe(module.layer_idx, query, key, attention_mask, scaling, softcap)
    return output, None


class MemorySelector:
    """Per-query selection over a memory at answer time (`select=`).

    In each layer, every query row scores the memory's tokens (per KV head) by the attention its tokens pay them —
    summed over the row's real (non-padding) positions and the query heads of the group, then average-pooled along the
    memory (width `pool_width`, as EMLoC scores tokens) — keeps the top `amount` (a fraction, or a count if > 1), and
    attends over that subset only. One pass: the layer's attention is computed twice (to score, then over the subset),
    the rest of the layer once, and the memory is never re-prefilled. The kept set is stored in the cache, so the
    generated tokens see the same subset.
    """

    def __init__(self, amount: float, cache: "EmlocCache", valid: torch.Tensor, pool_width: int = 5):
        self.amount, self.cache, self.valid, self.pool_width = amount, cache, valid, pool_width

    def count(self, length: int) -> int:
        return min(length, int(self.amount) if self.amount > 1 else max(1, math.ceil(self.amount * length)))

    def choose(self, layer: int, probabilities: torch.Tensor, num_groups: int) -> torch.Tensor:
        """probabilities `[batch, heads, q, k]` → bool keep mask `[batch, kv_heads, prefix_len]`."""
        length = self.cache.prefix_lengths[layer]
        scores = (probabilities[..., :length] * self.valid[:, None, :, None]).sum(dim=2)  # [batch, heads, prefix]
        scores = scores.view(scores.shape[0], -1, num_groups, length).sum(dim=2)
        scores = smooth(scores.flatten(0, 1), self.pool_width).view_as(scores)
        index = scores.topk(self.count(length), dim=-1).indices
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)


def emloc_selecting_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                              emloc_selector: MemorySelector | None = None, **kwargs):
    """Eager attention that first lets a `MemorySelector` choose the memory subset each query row attends to, then
    attends over it (registered as `"emloc_selecting"`). Shapes as `emloc_observed_attention`."""
    groups = query.shape[1] // key.shape[1]
    key_r, value_r = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5

    def attend(mask):
        scores = torch.matmul(query.float(), key_r.float().transpose(2, 3)) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)

    probabilities = attend(attention_mask)
    layer = module.layer_idx
    if emloc_selector is not None and emloc_selector.cache.prefix_lengths[layer] > 0:
        keep = emloc_selector.choose(layer, probabilities, groups)
        visible = emloc_selector.cache.prefix_keep[layer]  # what retrieval left visible: select within it
        if visible is not None:
            keep = keep & visible.to(keep.device)
        emloc_selector.cache.prefix_keep[layer] = keep
        length = keep.shape[-1]
        mask = attention_mask.expand(query.shape[0], query.shape[1], -1, -1).clone()
        mask[..., :length] &= keep.repeat_interleave(groups, dim=1)[:, :, None, :]
        probabilities = attend(mask)
    output = torch.matmul(probabilities.to(value_r.dtype), value_r)
    return output.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def attention_implementation(model: PreTrainedModel, name: str):
    """Temporarily runs every attention module of `model` with the attention function registered as `name`.

    Our passes build boolean masks per layer, which `sdpa` (and `emloc_observed`) take as they are; scoping the choice
    here keeps a user's `attn_implementation` of the base model (eager, flash) from seeing masks it cannot read."""
    registered = {"emloc_observed": emloc_observed_attention, "emloc_selecting": emloc_selecting_attention}
    if name in registered and name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, registered[name])
    configs = getattr(model, "_emloc_attention_configs", None)
    if configs is None:
        configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
        model._emloc_attention_configs = configs
    saved = {key: config._attn_implementation for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation = name
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = saved[key]


__all__ = ["EmlocCache", "PrefixedLayer", "AttentionObserver", "MemorySelector", "attention_implementation", "smooth"]
