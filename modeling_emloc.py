# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
Emloc: a base language or vision-language model that answers queries from a compressed task memory.

EMLoC (Ma, Zhang, Wei, Tian, "Efficient Multi-Modal Long Context Learning for Training-free Adaptation", ICML 2025,
arXiv 2505.19812) compresses the KV cache of many demonstrations chunk by chunk with layer-wise adaptive pruning held
under a Jensen-Shannon divergence bound. The file reads in pipeline order:

1. model families — what differs between Llama-style, Gemma 3 and Qwen2(.5)-VL bases (embeddings, RoPE);
2. running the base model against a memory — a cache whose layers start with the memory, masks, attention capture;
3. building a memory — compression methods (registered by name) and the chunk-wise builder;
4. `EmlocForConditionalGeneration` and its public methods.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    DynamicCache,
    PreTrainedModel,
)
from transformers.modeling_utils import AttentionInterface


try:  # loaded as remote code: transformers makes a package of the repository's modules
    from .configuration_emloc import EmlocConfig
    from .memory_emloc import MemoryLayer, MemoryLoadError, TaskMemory, base_model_fingerprint, check_rendering
    from .processing_emloc import (ANSWER, TOKEN_TYPE_NAMES, EncodedSpan, EmlocProcessor, _copy_remote_code,
                                   load_examples)
except ImportError:  # imported from the repository root as flat modules
    from configuration_emloc import EmlocConfig
    from memory_emloc import MemoryLayer, MemoryLoadError, TaskMemory, base_model_fingerprint, check_rendering
    from processing_emloc import (ANSWER, TOKEN_TYPE_NAMES, EncodedSpan, EmlocProcessor, _copy_remote_code,
                                  load_examples)




# =====================================================================================================================
# 1. Model families
# =====================================================================================================================


class TextFamily:
    """Llama-style decoder-only models (Llama, SmolLM2, Qwen2, Mistral, Gemma 3 text, ...): `model.model` holds
    `embed_tokens`, `layers`, `norm`, `rotary_emb`; `model.lm_head` the output projection."""

    def __init__(self, model: PreTrainedModel, decoder: torch.nn.Module | None = None):
        self.model = model
        self.decoder = decoder if decoder is not None else model.model
        self.text_config = model.config.get_text_config()
        self.layer_types = getattr(self.text_config, "layer_types", None) or ["full_attention"] * self.num_layers
        self._rotary_takes_layer_type = "layer_type" in _parameters(self.decoder.rotary_emb.forward)

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.decoder.layers

    def layer_device(self, layer: int) -> torch.device:
        """Where a decoder layer's weights live (layers differ when `device_map` shards the base model)."""
        return next(self.layers[layer].parameters()).device

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.text_config.hidden_size // self.num_heads

    def sliding_window(self, layer: int) -> int | None:
        if self.layer_types[layer] == "sliding_attention":
            return self.text_config.sliding_window
        if getattr(self.text_config, "use_sliding_window", False) and self.text_config.sliding_window:
            return self.text_config.sliding_window  # Mistral-style: every layer slides
        return None

    def embed(self, inputs: dict) -> torch.Tensor:
        """`input_ids [batch, seq]` → `[batch, seq, hidden]`."""
        return self.decoder.embed_tokens(inputs["input_ids"])

    def relative_positions(self, inputs: dict) -> torch.Tensor:
        """RoPE positions counted from 0 at each row's first real token: `[batch, seq]`."""
        mask = inputs["attention_mask"]
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def text_positions(self, rope_positions: torch.Tensor) -> torch.Tensor:
        return rope_positions

    def position_embeddings(self, hidden: torch.Tensor, rope_positions: torch.Tensor) -> list:
        """One `(cos, sin)` per layer (Gemma 3 has separate local and global RoPE)."""
        if self._rotary_takes_layer_type:
            by_type = {t: self.decoder.rotary_emb(hidden, rope_positions, t) for t in set(self.layer_types)}
            return [by_type[t] for t in self.layer_types]
        shared = self.decoder.rotary_emb(hidden, rope_positions)
        return [shared] * self.num_layers

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.model.lm_head.weight.device)
        logits = self.model.lm_head(self.decoder.norm(hidden.to(self.decoder.norm.weight.device)).to(hidden.device))
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


class QwenVLFamily(TextFamily):
    """Qwen2-VL and Qwen2.5-VL: a vision tower whose outputs replace the image/video placeholder embeddings, and
    3-D multimodal RoPE (temporal, height, width) from the model's own `get_rope_index`."""

    def __init__(self, model: PreTrainedModel):
        super().__init__(model, decoder=model.model.language_model)
        self.vl_model = model.model

    def embed(self, inputs: dict) -> torch.Tensor:
        embeds = self.decoder.embed_tokens(inputs["input_ids"])
        for pixels, grid, getter, pick in (
            ("pixel_values", "image_grid_thw", self.vl_model.get_image_features, 0),
            ("pixel_values_videos", "video_grid_thw", self.vl_model.get_video_features, 1),
        ):
            if inputs.get(pixels) is None:
                continue
            features = getter(inputs[pixels], inputs[grid], return_dict=True).pooler_output
            features = torch.cat(features, dim=0).to(embeds.device, embeds.dtype)
            masks = self.vl_model.get_placeholder_mask(inputs["input_ids"], inputs_embeds=embeds,
                                                       **{("image_features" if pick == 0 else "video_features"): features})
            embeds = embeds.masked_scatter(masks[pick], features)
        return embeds

    def relative_positions(self, inputs: dict) -> torch.Tensor:
        """`[3, batch, seq]` M-RoPE positions from `get_rope_index`, starting at 0 for each row."""
        if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
            return super().relative_positions(inputs).unsqueeze(0).expand(3, -1, -1)
        config = self.vl_model.config
        ids = inputs["input_ids"]
        mm_token_type_ids = torch.zeros_like(ids, dtype=torch.int)
        mm_token_type_ids[ids == config.image_token_id] = 1
        mm_token_type_ids[ids == config.video_token_id] = 2
        extra = {}
        if "second_per_grid_ts" in _parameters(self.vl_model.get_rope_index) and inputs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        positions, _ = self.vl_model.get_rope_index(
            ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"), attention_mask=inputs["attention_mask"], **extra,
        )
        return positions

    def text_positions(self, rope_positions: torch.Tensor) -> torch.Tensor:
        return rope_positions[0]

    def position_embeddings(self, hidden: torch.Tensor, rope_positions: torch.Tensor) -> list:
        return [self.decoder.rotary_emb(hidden, rope_positions)] * self.num_layers


def model_family(model: PreTrainedModel) -> TextFamily:
    """The family adapter for a loaded base model."""
    if hasattr(model.config, "vision_config") and hasattr(model.model, "language_model"):
        if not hasattr(model.model, "get_rope_index"):
            raise NotImplementedError(f"{type(model).__name__}: only Qwen2-VL-style vision-language models are supported")
        return QwenVLFamily(model)
    return TextFamily(model)


def _parameters(function) -> set[str]:
    import inspect

    return set(inspect.signature(function).parameters)


# =====================================================================================================================
# 2. Running the base model against a memory
# =====================================================================================================================


class PrefixedLayer(DynamicLayer):
    """A cache layer that starts with a prefix `[batch, kv_heads, prefix_len, head_dim]` and writes new tokens into a
    buffer that grows by doubling, so feeding a token does not copy the whole memory as concatenation would."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, headroom: int = 64):
        super().__init__()
        batch, heads, length, dim = keys.shape
        self._keys = keys.new_empty(batch, heads, length + headroom, dim)
        self._values = values.new_empty(batch, heads, length + headroom, dim)
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self.length = length
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._expose()

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

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

    Each layer may hold a different number of prefix tokens and each KV head its own tokens, so the cache also keeps
    the prefix tokens' positions (`[kv_heads, tokens]` per layer) and, for the tokens fed afterwards, their positions and
    padding (`[batch, tokens]`); `attention_mask(layer, ...)` builds the mask a stock attention function needs.

    The prefix is visible to every new token (it precedes them all), except outside a sliding window; new tokens see
    each other causally. That is exactly what each token sees in the full context when nothing is pruned.
    """

    def __init__(self, prefix: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None], batch_size: int):
        layers = []
        self.prefix_positions: list[torch.Tensor | None] = []
        for entry in prefix:
            if entry is None:  # a layer the pass does not run
                layers.append(DynamicLayer())
                self.prefix_positions.append(None)
                continue
            keys, values, positions = entry
            layers.append(PrefixedLayer(keys.unsqueeze(0).expand(batch_size, -1, -1, -1),
                                        values.unsqueeze(0).expand(batch_size, -1, -1, -1)))
            self.prefix_positions.append(positions)
        super().__init__()
        self.layers = layers
        self.prefix_lengths = [p.shape[1] if p is not None else 0 for p in self.prefix_positions]
        self.rows = batch_size
        device = next((p.device for p in self.prefix_positions if p is not None), torch.device("cpu"))
        self.new_positions = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.new_valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        # per-query selection over the prefix (`select=`): per layer None or bool [batch, kv_heads, prefix_len]
        self.prefix_keep: list[torch.Tensor | None] = [None] * len(self.prefix_positions)

    def add_tokens(self, text_positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Registers the positions `[batch, seq]` and padding of the tokens about to be fed."""
        self.new_positions = torch.cat([self.new_positions, text_positions.to(self.new_positions.device)], dim=1)
        self.new_valid = torch.cat([self.new_valid, valid.to(self.new_valid.device).bool()], dim=1)

    def attention_mask(self, layer: int, num_new: int, num_groups: int, sliding_window: int | None) -> torch.Tensor:
        """Boolean mask `[batch, 1 | heads, num_new, prefix + all new tokens]` (True = attend) for the last `num_new`
        registered tokens in `layer`."""
        total = self.new_positions.shape[1]
        query_positions = self.new_positions[:, total - num_new:]
        query_index = torch.arange(total - num_new, total, device=query_positions.device)
        key_index = torch.arange(total, device=query_positions.device)
        new_part = (key_index[None, :] <= query_index[:, None])[None] & self.new_valid[:, None, :]
        new_part |= key_index[None, None, :] == query_index[None, :, None]  # padding rows attend to themselves
        if sliding_window is not None:
            new_part &= self.new_positions[:, None, :] > query_positions[:, :, None] - sliding_window
        new_part = new_part[:, None]  # [batch, 1, q, new]
        positions = self.prefix_positions[layer]
        if positions is None or positions.shape[1] == 0:
            return new_part
        positions = positions.to(new_part.device)
        keep = self.prefix_keep[layer]
        keep = keep.to(new_part.device) if keep is not None else None
        if sliding_window is None and keep is None:
            prefix_part = torch.ones(self.rows, 1, num_new, positions.shape[1], dtype=torch.bool, device=new_part.device)
            return torch.cat([prefix_part, new_part], dim=-1)
        # per KV head: each head kept its own tokens, so the window (and a selection) cuts each head differently
        prefix_part = torch.ones(self.rows, positions.shape[0], num_new, positions.shape[1], dtype=torch.bool, device=new_part.device)
        if sliding_window is not None:
            prefix_part = prefix_part & (positions[None, :, None, :] > query_positions[:, None, :, None] - sliding_window)
        if keep is not None:
            prefix_part = prefix_part & keep[:, :, None, :]
        prefix_part = prefix_part.repeat_interleave(num_groups, dim=1)
        return torch.cat([prefix_part, new_part.expand(-1, prefix_part.shape[1], -1, -1)], dim=-1)

    def new_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the tokens fed after the prefix: `[batch, kv_heads, new, head_dim]` each."""
        start = self.prefix_lengths[layer]
        return self.layers[layer].keys[:, :, start:], self.layers[layer].values[:, :, start:]


class AttentionObserver:
    """Collects attention probabilities from chosen query positions during a forward pass (EMLoC importance, §3.2).

    `rows` is a bool `[batch, seq]` of the query positions to observe; `keys` a `slice` of the key axis to keep. For each
    layer it stores the probabilities summed over observed positions, batch rows and the query heads of each KV group:
    `[kv_heads, len(keys)]`.
    """

    def __init__(self, rows: torch.Tensor, keys: slice, num_groups: int):
        self.rows, self.keys, self.num_groups = rows, keys, num_groups
        self.per_layer: dict[int, torch.Tensor] = {}

    def record(self, layer: int, probabilities: torch.Tensor) -> None:
        # probabilities: [batch, heads, q, k] float32
        observed = probabilities[..., self.keys] * self.rows[:, None, :, None]
        summed = observed.sum(dim=(0, 2))  # [heads, k]
        self.per_layer[layer] = summed.view(-1, self.num_groups, summed.shape[-1]).sum(dim=1)


def emloc_observed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                             emloc_observer: AttentionObserver | None = None, **kwargs):
    """Eager attention that hands its probabilities to an `AttentionObserver` (registered as `"emloc_observed"`).

    query `[batch, heads, q, head_dim]`, key/value `[batch, kv_heads, k, head_dim]`, attention_mask bool
    `[batch, 1 | heads, q, k]`. Probabilities are computed in float32 whatever the model dtype.
    """
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    if emloc_observer is not None:
        emloc_observer.record(module.layer_idx, probabilities)
    output = torch.matmul(probabilities.to(value.dtype), value)
    return output.transpose(1, 2).contiguous(), None


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


@dataclass
class Segment:
    """Tokens fed in one forward pass.

    Attributes:
        hidden: `[batch, seq, hidden]` embeddings (or hidden states entering `start_layer`).
        rope_positions: `[batch, seq]` or `[3, batch, seq]` (M-RoPE) absolute positions.
        text_positions: `[batch, seq]`.
        valid: `[batch, seq]` bool, False at padding.
    """

    hidden: torch.Tensor
    rope_positions: torch.Tensor
    text_positions: torch.Tensor
    valid: torch.Tensor

    @property
    def next_position(self) -> torch.Tensor:
        """Per row, one past the largest position used: `[batch]`."""
        rope = self.rope_positions if self.rope_positions.dim() == 3 else self.rope_positions[None]
        masked = rope.masked_fill(~self.valid[None], -1)
        return masked.amax(dim=(0, 2)) + 1


def run_layers(family: TextFamily, segment: Segment, cache: EmlocCache, start: int = 0, stop: int | None = None,
               observer: AttentionObserver | None = None, keep_hidden: bool = False,
               selector: MemorySelector | None = None) -> tuple[torch.Tensor, list]:
    """Runs decoder layers `start … stop-1` on `segment` against `cache`.

    Returns the hidden state after the last layer `[batch, seq, hidden]` and, with `keep_hidden`, the hidden state that
    entered each layer run (the restart points of layer-wise pruning).
    """
    stop = family.num_layers if stop is None else stop
    cache.add_tokens(segment.text_positions, segment.valid)
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


def memory_prefix(memory: TaskMemory, extra: Sequence[MemoryLayer | None] | None = None, from_layer: int = 0,
                  family: TextFamily | None = None) -> list:
    """Per layer `(keys, values, positions)` of `memory` (with `extra[l]` appended), None below `from_layer`; on each
    layer's device when `family` is given."""
    prefix = []
    for index, layer in enumerate(memory.layers):
        if index < from_layer:
            prefix.append(None)
            continue
        if extra is not None and extra[index] is not None:
            layer = layer.append(extra[index])
        entry = (layer.keys, layer.values, layer.positions)
        if family is not None:
            device = family.layer_device(index)
            entry = tuple(t.to(device) for t in entry)
        prefix.append(entry)
    return prefix


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


# =====================================================================================================================
# 3. Building a memory
# =====================================================================================================================


@dataclass
class ChunkState:
    """Everything the compression of one chunk needs.

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


class Probe:
    """Probe rows after `memory ⊕ chunk`: reference distributions, attention importance, and JS of pruned variants.

    The probe is a batch of demonstrations, one per row (user turn + answer). The paper scores every answer-predicting
    position, i.e. every position whose next token belongs to the answer span (§3.2, Eq. 3-5); `positions="first"`
    scores only the position predicting each row's first answer token (the one that decides the class when labels
    span several tokens). `choice_ids` (`[num_choices]`) restricts the compared distributions to those tokens (the
    first token of each choice, renormalised): the decision itself rather than the whole vocabulary.
    """

    def __init__(self, builder: "MemoryBuilder", memory: TaskMemory, chunk: ChunkState, rows: list[EncodedSpan],
                 positions: str = "answer", choice_ids: torch.Tensor | None = None):
        self.builder, self.memory, self.chunk = builder, memory, chunk
        family = builder.family
        # a row ends at its last scored position + 1: later tokens cannot change it (attention is causal)
        rows = [_trim_after_last_answer(row, first_only=positions == "first") for row in rows]
        batch = builder.processor.collate(rows, padding_side="right")
        answer_next = (batch["token_types"][:, 1:] == ANSWER) & batch["attention_mask"][:, 1:].bool()
        if positions == "first":  # only the first answer token of each row
            answer_next = answer_next & (answer_next.long().cumsum(dim=1) == 1)
        self.predicting = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        self.predicting[:, :-1] = answer_next
        self.choice_ids = None if choice_ids is None else choice_ids.to(builder.model.model.device)
        self.segment = builder.model._segment(batch, start_position=chunk.next_position)
        observer = AttentionObserver(self.predicting, slice(None), family.num_heads // family.num_kv_heads)
        cache = EmlocCache(memory_prefix(memory, [chunk.kept(l, None) for l in range(family.num_layers)]), batch["input_ids"].shape[0])
        hidden, self.entering = run_layers(family, self.segment, cache, observer=observer, keep_hidden=True)
        self.reference = torch.log_softmax(self._logits(hidden).float(), dim=-1)
        # importance of each chunk token: attention from the scored positions, summed over them and over the query
        # heads of each KV group, then smoothed along the sequence (paper §3.2)
        importance = []
        for layer in range(family.num_layers):
            start = memory.layers[layer].num_tokens
            scores = observer.per_layer[layer][:, start:start + chunk.length]
            importance.append(smooth(scores, builder.pool_width))
        self.importance = importance
        self.passes = self.evaluations = 0  # layer passes of the probe, and candidate evaluations

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits at the scored positions `[num_scored, vocab or num_choices]`."""
        logits = self.builder.family.logits(hidden[self.predicting])
        return logits if self.choice_ids is None else logits[:, self.choice_ids]

    def divergence(self, start_layer: int, kept: dict[int, torch.Tensor | None]) -> float:
        """Mean JS between the probe's answer distributions with layers `start_layer…` pruned as `kept` and the
        unpruned reference. Runs only layers `start_layer … L-1` from the cached hidden states."""
        family = self.builder.family
        extra = [self.chunk.kept(l, kept.get(l)) if l >= start_layer else None for l in range(family.num_layers)]
        cache = EmlocCache(memory_prefix(self.memory, extra, from_layer=start_layer), self.segment.hidden.shape[0])
        segment = Segment(self.entering[start_layer], self.segment.rope_positions, self.segment.text_positions, self.segment.valid)
        hidden, _ = run_layers(family, segment, cache, start=start_layer)
        self.passes += family.num_layers - start_layer
        self.evaluations += 1
        return js_divergence(self._logits(hidden), self.reference).mean().item()


def _trim_after_last_answer(row: EncodedSpan, first_only: bool = False) -> EncodedSpan:
    """The row up to its last (or, with `first_only`, its first) answer token."""
    answers = (row.token_types == ANSWER).nonzero().flatten()
    if len(answers) == 0:
        return row
    end = int(answers[0 if first_only else -1]) + 1  # keep that answer token: its type marks the position predicting it
    return EncodedSpan(row.input_ids[:end], row.token_types[:end], row.media)


def smooth(scores: torch.Tensor, width: int) -> torch.Tensor:
    """Average pool `[heads, seq]` along the sequence with an odd `width`, same length out."""
    if width <= 1 or scores.shape[-1] == 0:
        return scores
    return F.avg_pool1d(scores[:, None], kernel_size=width, stride=1, padding=width // 2, count_include_pad=False)[:, 0, : scores.shape[-1]]


def top_tokens(importance: torch.Tensor, ratio: float, must_keep: torch.Tensor, protected_extra: bool = False) -> torch.Tensor:
    """Per KV head, the indices `[kv_heads, k]` (ascending) of the most important tokens, `must_keep` (`[seq]` bool,
    the answer tokens) always among them.

    The paper keeps `k = max(ceil(ratio·len), #must_keep)`: protected tokens count toward the ratio, so with short
    demonstrations they can fill it alone. `protected_extra=True` counts the ratio over the unprotected tokens and
    keeps the protected ones on top: `k = ceil(ratio·#unprotected) + #must_keep`.
    """
    length = importance.shape[-1]
    protected = int(must_keep.sum())
    if protected_extra:
        k = min(length, math.ceil(ratio * (length - protected)) + protected)
    else:
        k = min(length, max(math.ceil(ratio * length), protected))
    scores = importance.float().masked_fill(must_keep[None], float("inf"))
    index = scores.topk(k, dim=-1, sorted=False).indices
    return index.sort(dim=-1).values


@torch.no_grad()
def answer_divergence(model: "EmlocForConditionalGeneration", memory: TaskMemory, reference: TaskMemory,
                      rows: list[EncodedSpan], processor: EmlocProcessor) -> float:
    """Mean JS between the answer distributions of demonstration rows placed after `memory` and after `reference`
    (both must share `next_position`)."""
    rows = [_trim_after_last_answer(row) for row in rows]
    batch = processor.collate(rows, padding_side="right")
    predicting = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    predicting[:, :-1] = (batch["token_types"][:, 1:] == ANSWER) & batch["attention_mask"][:, 1:].bool()
    predicting = predicting.to(model.model.device)
    outputs = []
    for mem in (memory, reference):
        segment = model._segment(batch, start_position=mem.next_position)
        hidden, _ = run_layers(model.family, segment, EmlocCache(memory_prefix(mem), len(rows)))
        outputs.append(model.family.logits(hidden[predicting]))
    return js_divergence(outputs[0], torch.log_softmax(outputs[1].float(), dim=-1)).mean().item()


# -- compression methods -----------------------------------------------------------------------------------------------

COMPRESSION_METHODS: dict[str, type["CompressionMethod"]] = {}


def register_method(cls):
    COMPRESSION_METHODS[cls.name] = cls
    return cls


@dataclass
class CompressionMethod:
    """Decides, for one chunk, which tokens each layer and KV head keeps."""

    name: ClassVar[str] = "base"

    def compress(self, builder: "MemoryBuilder", memory: TaskMemory, chunk: ChunkState, chunk_demos: list[int]) -> tuple[list, dict]:
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
        delta: JS bound per layer decision (paper default 0.005).
        ratios: candidate keep ratios, tried in ascending order (paper: 0.1, 0.2, 0.5). A longer tuple is a finer grid.
        probe: which demonstrations probe a chunk. `"self"`: the chunk's own (the paper; a row finds its verbatim copy
            in the chunk, which rewards recall of that copy); `"heldout"`: `probe_size` demonstrations outside the
            chunk, spread over the context (some are already in the memory); `"future"`: the `probe_size`
            demonstrations that follow the chunk, which no part of the memory has seen yet — they are answered the
            way a new query is (the last chunk borrows the first demonstrations).
        probe_size: rows of a `heldout` / `future` probe.
        protect: `"count"` (the paper): the always-kept answer tokens count toward the ratio; `"extra"`: the ratio is
            counted over the other tokens and the answers are kept on top (short demonstrations otherwise spend the
            whole ratio on answers).
        positions: `"answer"` (the paper): JS and importance over every position predicting an answer token;
            `"first"`: only the position predicting each row's first answer token, the one that decides the class.
        over: `"vocab"` (the paper): JS between full next-token distributions; `"choices"`: between the distributions
            renormalised over the first tokens of the probe rows' `choices`, at the first answer position (the
            decision itself; falls back to `"vocab"` where a row has no choices or the choices share a first token).
        layer_group: decide this many consecutive layers at once (one ratio for the group, evaluated from its lowest
            layer); 1 is the paper. Fewer decisions make a cheaper build.
        search: `"grid"` tries `ratios` in order (the paper); `"bisect"` searches the smallest passing ratio in
            `[ratios[0], 1]` by bisection (`bisect_steps` probe runs per layer, assumes JS falls as the ratio grows).
        budget: a target fraction of the chunk's KV to keep (e.g. 0.2) instead of a fixed bound: each layer, top
            first, may use what the layers above left of the budget (spread over the layers still to decide); it
            takes the smallest ratio within its allowance that meets `delta`, else the largest one within it (least
            divergence). Savings of easy layers flow to harder ones; the chunk never exceeds the budget (beyond the
            always-kept answer tokens).
    """

    name: ClassVar[str] = "emloc"
    delta: float = 0.005
    ratios: tuple[float, ...] = (0.1, 0.2, 0.5)
    probe: str = "self"
    probe_size: int = 4
    protect: str = "count"
    positions: str = "answer"
    over: str = "vocab"
    layer_group: int = 1
    search: str = "grid"
    bisect_steps: int = 4
    budget: float | None = None

    # options and their paper values; `params()` records every option that differs, so a memory names its rule
    PAPER = {"probe": "self", "protect": "count", "positions": "answer", "over": "vocab", "layer_group": 1, "search": "grid"}

    def __post_init__(self):
        self.ratios = tuple(sorted(float(r) for r in self.ratios))
        choices = {"probe": ("self", "heldout", "future"), "protect": ("count", "extra"), "positions": ("answer", "first"),
                   "over": ("vocab", "choices"), "search": ("grid", "bisect")}
        for option, allowed in choices.items():
            if getattr(self, option) not in allowed:
                raise ValueError(f"{option} must be one of {allowed}, got {getattr(self, option)!r}")
        if not self.ratios or not all(0.0 < r <= 1.0 for r in self.ratios):
            raise ValueError(f"ratios must lie in (0, 1], got {self.ratios}")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must lie in (0, 1], got {self.budget}")
        self.layer_group = int(self.layer_group)
        if self.layer_group < 1:
            raise ValueError(f"layer_group must be at least 1, got {self.layer_group}")

    def params(self) -> dict:
        params = {"delta": self.delta, "ratios": list(self.ratios), "probe": self.probe}
        if self.probe != "self":
            params["probe_size"] = self.probe_size
        for option in ("protect", "positions", "over", "layer_group"):
            if getattr(self, option) != self.PAPER[option]:
                params[option] = getattr(self, option)
        if self.search != "grid":
            params.update(search=self.search, bisect_steps=self.bisect_steps)
        if self.budget is not None:
            params["budget"] = self.budget
        return params

    def probe_demos(self, num_demos: int, chunk_demos: list[int]) -> list[int]:
        """Indices of the demonstrations that probe the chunk `chunk_demos`."""
        if self.probe == "self":
            return list(chunk_demos)
        chunk = set(chunk_demos)
        others = [i for i in range(num_demos) if i not in chunk]
        if not others:
            return list(chunk_demos)
        if self.probe == "future":  # the next demonstrations, then (for the last chunks) the first ones
            after = max(chunk_demos) + 1 if chunk_demos else 0
            ordered = [i for i in range(after, num_demos)] + [i for i in range(after) if i not in chunk]
            return ordered[: self.probe_size]
        # a deterministic spread over the demonstrations outside the chunk, different for each chunk
        step = max(1, len(others) // self.probe_size)
        offset = chunk_demos[0] % step if chunk_demos else 0
        return others[offset::step][: self.probe_size]

    def probe_rows(self, builder: "MemoryBuilder", chunk_demos: list[int]) -> list[EncodedSpan]:
        return [builder.context.demos[i] for i in self.probe_demos(len(builder.context.demos), chunk_demos)]

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
        demos = self.probe_demos(len(builder.context.demos), chunk_demos)
        choice_ids = self.choice_ids(builder, demos)
        # a distribution over the choices is the decision at the first answer token; later positions continue a choice
        positions = "first" if choice_ids is not None else self.positions
        probe = Probe(builder, memory, chunk, [builder.context.demos[i] for i in demos], positions=positions,
                      choice_ids=choice_ids)
        answers = chunk.token_types == ANSWER
        num_layers = builder.family.num_layers
        budget_left = None if self.budget is None else self.budget * num_layers
        kept: dict[int, torch.Tensor | None] = {}
        chosen, divergences = {}, {}
        extra = self.protect == "extra"

        def evaluate(group, ratio):
            """Keeps `ratio` in every layer of `group` (ascending layer indices); JS from the group's lowest layer."""
            index = {layer: top_tokens(probe.importance[layer], ratio, answers, extra) for layer in group}
            return index, probe.divergence(group[0], {**kept, **index})

        top = num_layers - 1
        while top >= 0:
            group = list(range(max(0, top - self.layer_group + 1), top + 1))
            if budget_left is not None:
                allowance = budget_left / (group[0] + len(group))  # per layer, over this group and those below
                grid = [r for r in self.ratios if r <= allowance + 1e-9] or [self.ratios[0]]
                decision = self._first_passing(evaluate, group, grid, keep_whole=False)
            elif self.search == "bisect":
                decision = self._bisect(evaluate, group)
            else:
                decision = self._first_passing(evaluate, group, self.ratios, keep_whole=True)
            index, ratio, js = decision
            for layer in group:
                kept[layer] = None if index is None else index[layer]
                chosen[layer], divergences[layer] = ratio, js
            if budget_left is not None:
                budget_left -= ratio * len(group)
            top = group[0] - 1
        stats = {
            "ratios": [round(chosen[l], 4) for l in range(num_layers)],
            "js": [round(divergences[l], 6) for l in range(num_layers)],
            "probe_layer_passes": probe.passes,
            "probe_evaluations": probe.evaluations,  # restarting each from layer 0 would cost evaluations x L passes
        }
        return [kept[l] for l in range(num_layers)], stats

    def _first_passing(self, evaluate, group, grid, keep_whole):
        """The smallest ratio of `grid` meeting `delta`; otherwise the whole chunk (faithful rule) or, under a budget,
        the largest ratio of the grid."""
        last = None
        for ratio in grid:
            index, js = evaluate(group, ratio)
            if js <= self.delta:
                return index, ratio, js
            last = (index, ratio, js)
        return (None, 1.0, 0.0) if keep_whole else last

    def _bisect(self, evaluate, group):
        low, high = self.ratios[0], 1.0
        index, js = evaluate(group, low)
        if js <= self.delta:
            return index, low, js
        best = (None, 1.0, 0.0)
        for _ in range(self.bisect_steps):
            middle = (low + high) / 2
            index, js = evaluate(group, middle)
            if js <= self.delta:
                best, high = (index, middle, js), middle
            else:
                low = middle
        return best


class MemoryBuilder:
    """Builds a task memory chunk by chunk (paper §3.1): prefill a chunk on top of the memory, let the method choose
    what each layer keeps, append it."""

    def __init__(self, model: "EmlocForConditionalGeneration", processor: EmlocProcessor, method: CompressionMethod,
                 chunk_size: int, pool_width: int, progress: bool = False, validate: int = 0):
        self.model, self.processor, self.method = model, processor, method
        self.family = model.family
        self.chunk_size, self.pool_width, self.progress, self.validate = chunk_size, pool_width, progress, validate
        self.context = None

    @torch.no_grad()
    def build(self, demos, append_to: TaskMemory | None = None) -> TaskMemory:
        started = time.perf_counter()
        self.context = self.processor.encode_context(demos)
        memory = append_to.to() if append_to is not None else self.model._empty_memory()
        chunks = [list(range(i, min(i + self.chunk_size, len(self.context.demos)))) for i in range(0, len(self.context.demos), self.chunk_size)]
        chunk_stats, full_types = [], torch.zeros(0, dtype=torch.long)
        iterator = chunks
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(chunks, desc=f"building {self.method.name} memory", unit="chunk")
        for number, demo_indices in enumerate(iterator):
            spans = [self.context.demos[i] for i in demo_indices]
            if number == 0 and append_to is None:
                spans = [self.context.prefix, *spans]  # the template prefix belongs to the first chunk
            chunk_span = EncodedSpan.concat(spans)
            chunk = self.model._prefill_chunk(memory, chunk_span)
            kept, stats = self.method.compress(self, memory, chunk, demo_indices)
            memory = TaskMemory(
                [layer.append(chunk.kept(index, kept[index])) for index, layer in enumerate(memory.layers)],
                next_position=chunk.next_position,
            )
            full_types = torch.cat([full_types, chunk.token_types.cpu()])
            chunk_stats.append(stats)
        previous = append_to.stats if append_to is not None else None
        memory.stats = self.model._memory_stats(
            memory, self.method, len(self.context.demos), full_types, chunk_stats,
            time.perf_counter() - started, self.chunk_size, previous,
        )
        if self.validate and append_to is None:
            memory.stats["validation"] = self._validate(memory)
        return memory

    def _validate(self, memory: TaskMemory) -> dict:
        """Global check: mean JS, on `validate` demonstrations spread over the context (one per row, after the
        memory), between the built memory and the uncompressed full context."""
        started = time.perf_counter()
        full = self.model._empty_memory()
        whole = EncodedSpan.concat([self.context.prefix, *self.context.demos])
        chunk = self.model._prefill_chunk(full, whole)
        full = TaskMemory([layer.append(chunk.kept(i, None)) for i, layer in enumerate(full.layers)], chunk.next_position)
        count = min(self.validate, len(self.context.demos))
        step = len(self.context.demos) / count
        rows = [self.context.demos[int(i * step)] for i in range(count)]
        divergence = answer_divergence(self.model, memory, full, rows, self.processor)
        return {"rows": count, "mean_js": round(divergence, 6), "seconds": round(time.perf_counter() - started, 3)}


# =====================================================================================================================
# 4. The model
# =====================================================================================================================


class EmlocPreTrainedModel(PreTrainedModel):
    config_class = EmlocConfig
    base_model_prefix = "emloc"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        base = getattr(self, "model", None)
        if base is not None and hasattr(base, "_init_weights"):
            base._init_weights(module)


class EmlocForConditionalGeneration(EmlocPreTrainedModel):
    r"""
    A base causal LM or vision-language model with EMLoC task memories.

    The Emloc repository stores the base weights itself (under `model.`), rather than pointing at a base repo as an
    adapter does: `AutoModel.from_pretrained(repo, trust_remote_code=True)` then needs nothing but that repo, works
    offline once cached and yields exactly the weights the memories' fingerprints were taken on. Memories are the small,
    adapter-like artefacts; see `load_memory` and `push_memory_to_hub`.

    Example:

    ```python
    >>> model = EmlocForConditionalGeneration.from_base("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> processor = EmlocProcessor.from_base("HuggingFaceTB/SmolLM2-135M-Instruct", template="plain")
    >>> memory = model.build_memory("demos.jsonl", processor=processor)
    >>> inputs = processor([{"question": "..."}], return_tensors="pt")
    >>> processor.batch_decode(model.generate(**inputs, memory=memory, max_new_tokens=8))
    ```
    """

    def __init__(self, config: EmlocConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        if base_model is None:
            auto = AutoModelForImageTextToText if config.is_multimodal else AutoModelForCausalLM
            base_model = auto.from_config(config.base_config)
        self.model = base_model
        self._memories: dict[str, TaskMemory] = {}
        self._active_memory: str | None = None
        self._family = None
        self.post_init()

    # -- construction ---------------------------------------------------------------------------------------------------

    @classmethod
    def from_base(cls, base: str | os.PathLike | PreTrainedModel, **load_kwargs) -> "EmlocForConditionalGeneration":
        """Wraps a base model: a Hub id, a local directory, a GGUF file (`gguf_file=` with a directory or repo), or a
        loaded `PreTrainedModel`. Compression defaults may be given as `delta=`, `ratios=`, `chunk_size=`, `probe=`."""
        emloc_kwargs = {k: load_kwargs.pop(k) for k in ("delta", "ratios", "chunk_size", "probe", "pool_width") if k in load_kwargs}
        if not isinstance(base, PreTrainedModel):
            config = AutoConfig.from_pretrained(base, **{k: v for k, v in load_kwargs.items() if k in ("gguf_file", "revision", "token", "trust_remote_code")})
            auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
            load_kwargs.setdefault("dtype", torch.float32)
            base = auto.from_pretrained(base, **load_kwargs)
        # initialising the wrapper resets the attention implementation of its sub-configs: keep the base's own
        base_attention = base.config._attn_implementation or "sdpa"
        config = EmlocConfig(base_config=base.config, **emloc_kwargs)
        config.name_or_path = getattr(base.config, "_name_or_path", "")
        with torch.device("meta"):
            model = cls(config, base_model=torch.nn.Identity())
        model.model = base
        config._attn_implementation = base_attention
        model.eval()
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Writes the weights and config, plus the remote-code modules and an `auto_map`, so that `AutoConfig`,
        `AutoModel` and `AutoProcessor` load the directory with `trust_remote_code=True`."""
        self.config.auto_map = {
            "AutoConfig": "configuration_emloc.EmlocConfig",
            "AutoModel": "modeling_emloc.EmlocForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_emloc.EmlocForConditionalGeneration",
            "AutoProcessor": "processing_emloc.EmlocProcessor",
        }
        self.config.architectures = [type(self).__name__]
        result = super().save_pretrained(save_directory, *args, **kwargs)
        _copy_remote_code(save_directory)
        return result

    @property
    def family(self) -> TextFamily:
        if self._family is None or self._family.model is not self.model:
            try:
                self._family = model_family(self.model)
            except AttributeError as error:  # nn.Module would report it as a missing `family` attribute
                raise NotImplementedError(f"unsupported base model {type(self.model).__name__}: {error}") from error
        return self._family

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, memory: TaskMemory | str | None = None,
                select: float | None = None, **kwargs):
        """Logits `[batch, seq, vocab]` of `input_ids` answered from `memory` (the active memory if None is given and
        one is set; the base model alone if there is none — then pass `processor(..., add_template_prefix=True)`
        inputs for zero-shot answers in the full context's format). Media tensors (`pixel_values`, ...) pass through."""
        memory = self._resolve_memory(memory)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask if attention_mask is not None else torch.ones_like(input_ids), **kwargs}
        inputs.pop("token_types", None)
        logits, _, _ = self._query_pass(memory, inputs, select=select)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(logits=logits)

    # -- running with a memory ------------------------------------------------------------------------------------------

    def _empty_memory(self) -> TaskMemory:
        family = self.family
        return TaskMemory.empty(family.num_layers, family.num_kv_heads, family.head_dim, dtype=self.model.dtype, device=self.model.device)

    def _segment(self, inputs: dict, start_position: int | torch.Tensor) -> Segment:
        """Embeds a batch and gives it positions starting at `start_position` (per row or shared)."""
        family = self.family
        device = self.model.device
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        valid = inputs["attention_mask"].bool()
        hidden = family.embed(inputs)
        rope = family.relative_positions(inputs)
        start = torch.as_tensor(start_position, device=device).reshape(-1, 1)
        rope = torch.where(valid, rope + start, torch.zeros_like(rope))
        return Segment(hidden, rope, family.text_positions(rope), valid)

    def _prefill_chunk(self, memory: TaskMemory, chunk: EncodedSpan) -> ChunkState:
        """Feeds a chunk (batch 1) on top of `memory`; returns its per-layer KV, positions and types."""
        inputs = {"input_ids": chunk.input_ids[None], "attention_mask": torch.ones_like(chunk.input_ids)[None], **chunk.media}
        segment = self._segment(inputs, start_position=memory.next_position)
        cache = EmlocCache(memory_prefix(memory), batch_size=1)
        run_layers(self.family, segment, cache)
        keys, values = zip(*(cache.new_kv(layer) for layer in range(self.family.num_layers)))
        return ChunkState(
            keys=[k[0] for k in keys], values=[v[0] for v in values],
            positions=segment.text_positions[0], token_types=chunk.token_types.to(segment.hidden.device),
            next_position=int(segment.next_position[0]),
        )

    def _query_pass(self, memory: TaskMemory | None, inputs: dict, select: float | None = None) -> tuple[torch.Tensor, EmlocCache, Segment]:
        """Prefills a batch of queries against one shared memory; returns logits `[batch, seq, vocab]`, the cache and
        the segment (for decoding on). `select` turns on per-query selection over the memory (`MemorySelector`)."""
        memory = memory if memory is not None else self._empty_memory()
        self._check_memory_fits(memory)
        memory = memory.to(device=self.model.device, dtype=self.model.dtype)
        segment = self._segment(inputs, start_position=memory.next_position)
        cache = EmlocCache(memory_prefix(memory, family=self.family), batch_size=segment.hidden.shape[0])
        if select is not None and not 0 < select:
            raise ValueError(f"select must be a fraction in (0, 1] or a token count, got {select}")
        selector = None
        if select is not None and select != 1.0:
            selector = MemorySelector(float(select), cache, segment.valid, self.config.pool_width)
        hidden, _ = run_layers(self.family, segment, cache, selector=selector)
        return self.family.logits(hidden), cache, segment

    def _prefix_memory(self, processor: EmlocProcessor) -> TaskMemory:
        """The template prefix alone as a memory (zero-shot answering)."""
        prefix = processor.encode_prefix()
        memory = self._empty_memory()
        if len(prefix) == 0:
            return memory
        chunk = self._prefill_chunk(memory, prefix)
        return TaskMemory([layer.append(chunk.kept(i, None)) for i, layer in enumerate(memory.layers)], chunk.next_position)

    def _resolve_memory(self, memory: TaskMemory | str | None) -> TaskMemory | None:
        if isinstance(memory, str):
            if memory not in self._memories:
                raise KeyError(f"no memory named {memory!r} is loaded (loaded: {sorted(self._memories)})")
            return self._memories[memory]
        if memory is None and self._active_memory is not None:
            return self._memories[self._active_memory]
        return memory

    def _check_memory_fits(self, memory: TaskMemory) -> None:
        family = self.family
        if memory.num_layers != family.num_layers:
            raise MemoryLoadError(f"memory has {memory.num_layers} layers, the model {family.num_layers}")
        layer = memory.layers[0]
        if layer.keys.shape[0] != family.num_kv_heads or layer.keys.shape[2] != family.head_dim:
            raise MemoryLoadError(
                f"memory layers are [{layer.keys.shape[0]} heads, {layer.keys.shape[2]} dims], the model needs "
                f"[{family.num_kv_heads}, {family.head_dim}]"
            )

    # -- generation -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, memory: TaskMemory | str | None = None,
                 max_new_tokens: int = 16, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, select: float | None = None, **media) -> torch.Tensor:
        """Generates continuations of a batch of queries sharing one memory.

        Args:
            input_ids / attention_mask: `[batch, seq]` queries as the processor returns them (left-padded).
            memory: a `TaskMemory`, the name of a loaded one, or None for the active memory (zero-shot if none).
            select: per-query selection over the memory: keep, per layer and KV head, the fraction (or, if > 1, the
                number) of memory tokens each query attends to most, and answer with that subset (`MemorySelector`).
                The stored memory is unchanged; `select=1.0` (or None) uses all of it.
        Returns:
            `[batch, new_tokens]`: only the generated tokens, `pad_token_id` after a row's end of sequence.
        """
        media.pop("token_types", None)
        memory = self._resolve_memory(memory)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generation_config = getattr(self.model, "generation_config", None)
        if eos_token_id is None and generation_config is not None:
            eos_token_id = generation_config.eos_token_id
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=self.model.device)
        if pad_token_id is None:
            pad_token_id = getattr(generation_config, "pad_token_id", None)
            pad_token_id = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        logits, cache, segment = self._query_pass(memory, {"input_ids": input_ids, "attention_mask": attention_mask, **media}, select=select)
        next_position = segment.next_position
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=self.model.device)
        generated = []
        next_logits = logits[:, -1]
        for _ in range(max_new_tokens):
            token = self._pick(next_logits, do_sample, temperature, top_k, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            generated.append(token)
            done |= torch.isin(token, eos)
            if bool(done.all()):
                break
            step = Segment(
                hidden=self.family.decoder.embed_tokens(token[:, None]),
                rope_positions=next_position[:, None] if not isinstance(self.family, QwenVLFamily) else next_position[None, :, None].expand(3, -1, -1),
                text_positions=next_position[:, None], valid=torch.ones_like(token[:, None], dtype=torch.bool),
            )
            hidden, _ = run_layers(self.family, step, cache)
            next_logits = self.family.logits(hidden)[:, -1]
            next_position = next_position + 1
        return torch.stack(generated, dim=1) if generated else input_ids.new_zeros(input_ids.shape[0], 0)

    @staticmethod
    def _pick(logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(dim=-1)
        logits = logits.float() / max(temperature, 1e-5)
        if top_k:
            threshold = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        if top_p is not None and top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) > top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    @torch.no_grad()
    def score_choices(self, queries, memory: TaskMemory | str | None = None, processor: EmlocProcessor | None = None,
                      history=None, select: float | None = None) -> list[list[float]]:
        """Per query, the summed log-probability of each of its `choices` as the start of the assistant reply.

        `tokenizer(choice, add_special_tokens=False)` is scored after the query's generation prompt; each query is
        prefilled once against the memory and its choices run as one batch on top. A memory whose demonstrations were
        rendered otherwise than `processor` renders the queries is refused (`MemoryLoadError`).
        """
        if processor is None:
            raise ValueError("score_choices needs the processor")
        memory = self._resolve_memory(memory)
        if memory is None:  # zero-shot: the query follows the template prefix, as it would in a full context
            memory = self._prefix_memory(processor)
        else:
            check_rendering(memory.stats, processor.rendering())
        examples = load_examples(queries, require_answer=False)
        history_examples = load_examples(history) if history is not None else None
        results = []
        for query in examples:
            if not query.choices:
                raise ValueError(f"{query.where}: score_choices needs 'choices' on every query")
            batch = processor.collate([processor.encode_query(query, history_examples)])
            batch.pop("token_types")
            logits, cache, segment = self._query_pass(memory, batch, select=select)
            first = torch.log_softmax(logits[0, -1].float(), dim=-1)
            choices = [processor.encode_choice(c).to(self.model.device) for c in query.choices]
            scores = [float(first[c[0]]) if len(c) else 0.0 for c in choices]
            longer = [i for i, c in enumerate(choices) if len(c) > 1]
            if longer:
                scores = self._score_continuations(cache, segment, choices, longer, first, scores)
            results.append(scores)
        return results

    def _score_continuations(self, cache: EmlocCache, segment: Segment, choices, longer, first, scores):
        """Runs the multi-token choices as a batch on top of the query's cache (expanded per choice)."""
        rows = [choices[i] for i in longer]
        width = max(len(r) for r in rows) - 1
        tokens = torch.zeros(len(rows), width, dtype=torch.long, device=self.model.device)
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=self.model.device)
        for row, choice in enumerate(rows):
            tokens[row, : len(choice) - 1] = choice[:-1]
            valid[row, : len(choice) - 1] = True
        expanded = _expand_cache(cache, len(rows))
        start = segment.next_position[:1].expand(len(rows))
        positions = start[:, None] + torch.arange(width, device=tokens.device)[None]
        step = Segment(
            hidden=self.family.decoder.embed_tokens(tokens),
            rope_positions=positions if not isinstance(self.family, QwenVLFamily) else positions[None].expand(3, -1, -1),
            text_positions=positions, valid=valid,
        )
        hidden, _ = run_layers(self.family, step, expanded)
        log_probs = torch.log_softmax(self.family.logits(hidden).float(), dim=-1)
        scores = list(scores)
        for row, index in enumerate(longer):
            choice = rows[row]
            continuation = log_probs[row, torch.arange(len(choice) - 1), choice[1:]].sum()
            scores[index] = float(first[choice[0]] + continuation)
        return scores

    # -- building memories ----------------------------------------------------------------------------------------------

    def build_memory(self, demos, processor: EmlocProcessor, method: str = "emloc", chunk_size: int | None = None,
                     append_to: TaskMemory | None = None, progress: bool = False, validate: int = 0,
                     **method_params) -> TaskMemory:
        """Compresses demonstrations into a task memory.

        Args:
            demos: a JSONL path or a list of demonstration dicts (design §6).
            processor: the model's `EmlocProcessor`.
            method: a registered compression method: `"emloc"` (default) or `"full"` (keep everything).
            chunk_size: demonstrations per chunk (default: the config's, 4).
            append_to: an existing memory to extend with new chunks instead of building from scratch.
            progress: show a progress bar over chunks.
            validate: after the build, measure the mean JS between this memory and the uncompressed context on this
                many demonstrations (one per row) and record it as `stats["validation"]` (costs one full prefill).
            **method_params: the method's parameters, e.g. `delta=0.005, ratios=(0.1, 0.2, 0.5), probe="self"`.
        """
        if method not in COMPRESSION_METHODS:
            raise ValueError(f"unknown method {method!r}; available: {sorted(COMPRESSION_METHODS)}")
        method_cls = COMPRESSION_METHODS[method]
        defaults = {"delta": self.config.delta, "ratios": tuple(self.config.ratios), "probe": self.config.probe}
        accepted = {f.name for f in method_cls.__dataclass_fields__.values()}
        unknown = set(method_params) - accepted
        if unknown:
            raise TypeError(f"method {method!r} does not take {sorted(unknown)}; it takes {sorted(accepted)}")
        params = {**{k: v for k, v in defaults.items() if k in accepted}, **method_params}
        if append_to is not None:
            self._check_memory_fits(append_to)
            check_rendering(append_to.stats, processor.rendering())
        builder = MemoryBuilder(self, processor, method_cls(**params), chunk_size or self.config.chunk_size,
                                self.config.pool_width, progress=progress, validate=validate)
        memory = builder.build(demos, append_to=append_to)
        memory.stats["rendering"] = processor.rendering()  # queries must be rendered the same way (design §7)
        return memory

    def _memory_stats(self, memory: TaskMemory, method: CompressionMethod, num_demos: int, full_types: torch.Tensor,
                      chunk_stats: list, seconds: float, chunk_size: int, previous: dict | None) -> dict:
        """`memory_config.json` content (design §7)."""
        family = self.family
        full_tokens = int(full_types.shape[0])
        bytes_per_token = 2 * family.num_kv_heads * family.head_dim * self.model.dtype.itemsize
        layers = []
        kept_by_type = {name: 0.0 for name in TOKEN_TYPE_NAMES.values()}
        for layer in memory.layers:
            layers.append({"full": full_tokens + (previous or {}).get("totals", {}).get("full_tokens", 0), "kept": layer.num_tokens})
            for type_id, name in TOKEN_TYPE_NAMES.items():
                kept_by_type[name] += float((layer.token_types == type_id).sum()) / layer.keys.shape[0]
        if previous:
            full_tokens += previous.get("totals", {}).get("full_tokens", 0)
        full_by_type = {name: int((full_types == type_id).sum()) for type_id, name in TOKEN_TYPE_NAMES.items()}
        if previous:
            for name in full_by_type:
                full_by_type[name] += previous.get("token_types", {}).get(name, {}).get("full", 0)
        kept_tokens = sum(l["kept"] for l in layers) / max(1, len(layers))
        full_kv_bytes = full_tokens * bytes_per_token * family.num_layers
        kept_kv_bytes = memory.kv_bytes()
        return {
            "base_model": {"name_or_path": self.config.name_or_path or getattr(self.model.config, "_name_or_path", ""),
                           "fingerprint": self.fingerprint()},
            "method": {"name": method.name, "params": {**method.params(), "chunk_size": chunk_size}},
            "num_demos": num_demos + ((previous or {}).get("num_demos", 0)),
            "totals": {
                "full_tokens": full_tokens, "kept_tokens": round(kept_tokens, 2),
                "full_kv_bytes": full_kv_bytes, "kept_kv_bytes": kept_kv_bytes,
                "kept_ratio": round(kept_kv_bytes / full_kv_bytes, 6) if full_kv_bytes else 0.0,
            },
            "token_types": {name: {"full": full_by_type[name], "kept": round(kept_by_type[name] / max(1, len(layers)), 2)}
                            for name in TOKEN_TYPE_NAMES.values()},
            "layers": layers,
            "build": {"seconds": round(seconds + ((previous or {}).get("build", {}).get("seconds", 0.0)), 3),
                      "chunks": ((previous or {}).get("build", {}).get("chunks", [])) + chunk_stats},
        }

    def fingerprint(self) -> str:
        """Hash of the base model's config and weights; memories record it and loading checks it. Recomputed at each
        call (a strided sample per tensor, milliseconds), so it follows the weights if they change."""
        return base_model_fingerprint(self.model, self.model.config)

    # -- named memories -------------------------------------------------------------------------------------------------

    def load_memory(self, path_or_repo_id: str | os.PathLike | TaskMemory, name: str = "default", revision: str | None = None,
                    activate: bool = True, processor: EmlocProcessor | None = None, **hub_kwargs) -> TaskMemory:
        """Loads a memory from a directory or Hub repo (or registers a `TaskMemory`) under `name`, checking that it was
        made for this base model and, given the `processor` that will render the queries, that its demonstrations were
        rendered and tokenised the same way (`MemoryLoadError` naming the difference otherwise)."""
        if isinstance(path_or_repo_id, TaskMemory):
            memory = path_or_repo_id
        else:
            directory = Path(path_or_repo_id)
            if not directory.is_dir():
                from huggingface_hub import snapshot_download

                directory = Path(snapshot_download(str(path_or_repo_id), revision=revision, **hub_kwargs))
            memory = TaskMemory.from_pretrained(directory)
            expected = memory.stats.get("base_model", {}).get("fingerprint")
            if expected != self.fingerprint():
                raise MemoryLoadError(
                    f"{path_or_repo_id}: memory was made for another base model "
                    f"({memory.stats.get('base_model', {}).get('name_or_path') or 'unknown'}, fingerprint {expected}); "
                    f"this model's fingerprint is {self.fingerprint()}"
                )
        self._check_memory_fits(memory)
        if processor is not None:
            try:
                check_rendering(memory.stats, processor.rendering())
            except MemoryLoadError as error:
                if isinstance(path_or_repo_id, TaskMemory):
                    raise
                raise MemoryLoadError(f"{path_or_repo_id}: {error}") from None
        self._memories[name] = memory
        if activate:
            self._active_memory = name
        return memory

    def set_memory(self, name: str | None) -> None:
        """Makes a loaded memory the one `generate`/`score_choices` use by default (None: zero-shot)."""
        if name is not None and name not in self._memories:
            raise KeyError(f"no memory named {name!r} is loaded (loaded: {sorted(self._memories)})")
        self._active_memory = name

    def delete_memory(self, name: str) -> None:
        if name not in self._memories:
            raise KeyError(f"no memory named {name!r} is loaded (loaded: {sorted(self._memories)})")
        del self._memories[name]
        if self._active_memory == name:
            self._active_memory = None

    @property
    def memories(self) -> dict[str, TaskMemory]:
        return dict(self._memories)

    @property
    def active_memory(self) -> str | None:
        return self._active_memory

    def push_memory_to_hub(self, repo_id: str, memory: TaskMemory | str | None = None, private: bool | None = None,
                           commit_message: str = "Upload task memory", revision: str | None = None, token: str | None = None,
                           create_pr: bool = False) -> str:
        """Pushes a memory to a Hub repo like an adapter: `memory.safetensors`, `memory_config.json`, `README.md`."""
        import tempfile

        from huggingface_hub import HfApi

        memory = self._resolve_memory(memory)
        if memory is None:
            raise ValueError("no memory given and none is active")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory() as staging:
            folder = memory.save_pretrained(Path(staging) / "memory")
            info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                     revision=revision, create_pr=create_pr)
        return str(info)


def _expand_cache(cache: EmlocCache, batch_size: int) -> EmlocCache:
    """A copy of a batch-1 cache repeated `batch_size` times (its prefix and the tokens fed so far)."""
    prefix = []
    for layer, positions in enumerate(cache.prefix_positions):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]
        start = cache.prefix_lengths[layer]
        prefix.append((keys[:, :start], values[:, :start], positions) if positions is not None else None)
    expanded = EmlocCache(prefix, batch_size)
    for layer in range(len(prefix)):
        new_k, new_v = cache.new_kv(layer)
        expanded.layers[layer].update(new_k.expand(batch_size, -1, -1, -1), new_v.expand(batch_size, -1, -1, -1))
    expanded.add_tokens(cache.new_positions.expand(batch_size, -1), cache.new_valid.expand(batch_size, -1))
    expanded.prefix_keep = [keep.expand(batch_size, -1, -1) if keep is not None else None for keep in cache.prefix_keep]
    return expanded


__all__ = [
    "EmlocForConditionalGeneration",
    "EmlocPreTrainedModel",
    "EmlocCache",
    "TaskMemory",
    "COMPRESSION_METHODS",
    "js_divergence",
]
