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
import copy
import dataclasses
import functools
import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    DynamicCache,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface


try:  # loaded as remote code: transformers makes a package of the repository's modules
    from .configuration_emloc import EmlocConfig
    from .memory_emloc import (BuildCheckpoint, MemoryLayer, MemoryLoadError, RetrievalIndex, TaskMemory,
                               base_model_fingerprint, check_rendering, hub_name, push_memory_to_hub,
                               config_sliding_windows, readable_share, release_freed_memory)
    from .processing_emloc import (ANSWER, TOKEN_TYPE_NAMES, EncodedSpan, EmlocProcessor, Example, _copy_remote_code,
                                   decode_media, load_examples)
except ImportError:  # imported from the repository root as flat modules
    from configuration_emloc import EmlocConfig
    from memory_emloc import (BuildCheckpoint, MemoryLayer, MemoryLoadError, RetrievalIndex, TaskMemory,
                              base_model_fingerprint, check_rendering, hub_name, push_memory_to_hub,
                              config_sliding_windows, readable_share, release_freed_memory)
    from processing_emloc import (ANSWER, TOKEN_TYPE_NAMES, EncodedSpan, EmlocProcessor, Example, _copy_remote_code,
                                  decode_media, load_examples)




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
        """The window of a sliding-window layer, None for a global one (`memory_emloc.config_sliding_windows`)."""
        return self.sliding_windows[layer]

    @functools.cached_property
    def sliding_windows(self) -> list[int | None]:
        return config_sliding_windows(self.text_config)

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

    def repeat_media(self, input_ids: torch.Tensor, media: dict, times: int) -> dict:
        raise ValueError(f"{type(self.model).__name__} is a text model: it takes no images or videos ({sorted(media)})")

    def logits(self, hidden: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[..., vocab]` from last-layer hidden states `[..., hidden]`; with `vocab_ids` (`[n]`) only those
        columns `[..., n]`. The head is the largest matrix of a small model (Gemma 3 270M: 262k × 640), and reading
        it is most of a probe evaluation's cost when the probe compares a few choices."""
        head = self.model.lm_head
        hidden = hidden.to(head.weight.device)
        normed = self.decoder.norm(hidden.to(self.decoder.norm.weight.device)).to(hidden.device)
        if vocab_ids is not None and type(head) is torch.nn.Linear:
            vocab_ids = vocab_ids.to(head.weight.device)
            bias = None if head.bias is None else head.bias[vocab_ids]
            logits = torch.nn.functional.linear(normed, head.weight[vocab_ids], bias)
        else:  # the whole head (a wrapped or quantised head has no rows to take)
            logits = head(normed)
            if vocab_ids is not None:
                logits = logits[..., vocab_ids.to(logits.device)]
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

    def repeat_media(self, input_ids: torch.Tensor, media: dict, times: int) -> dict:
        """The images and videos of a batch with each row's own repeated `times` times, in row order (what `generate`
        does to the rows for beams and `num_return_sequences`). `pixel_values` `[patches, dim]` and `image_grid_thw`
        `[images, 3]` are not per row, so they are cut by each row's count of placeholder tokens (`input_ids`
        `[batch, seq]`): an image of grid `(t, h, w)` has `t·h·w` patches and `t·h·w / merge²` placeholders."""
        config = self.vl_model.config
        merge = config.vision_config.spatial_merge_size ** 2
        repeated = dict(media)
        kinds = (("pixel_values", "image_grid_thw", config.image_token_id, None),
                 ("pixel_values_videos", "video_grid_thw", config.video_token_id, "second_per_grid_ts"))
        for pixels, grid, token_id, per_item in kinds:
            if media.get(grid) is None:
                continue
            patches = media[grid].prod(-1).tolist()
            items, item = [], 0
            for count in (input_ids == token_id).sum(-1).tolist():
                mine = []
                while count > 0:
                    mine.append(item)
                    count -= patches[item] // merge
                    item += 1
                items.append(mine)
            starts = [0]
            for count in patches:
                starts.append(starts[-1] + count)
            order = [index for mine in items for _ in range(times) for index in mine]
            repeated[grid] = media[grid][order]
            repeated[pixels] = torch.cat([media[pixels][starts[i]:starts[i + 1]] for i in order])
            if per_item is not None and media.get(per_item) is not None:
                values = media[per_item]
                repeated[per_item] = values[order] if isinstance(values, torch.Tensor) else [values[i] for i in order]
        return repeated

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

    def __init__(self, prefix: Sequence[tuple | None], batch_size: int, start_position: int | torch.Tensor = 0, window_shift: int = 0,
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


def run_layers(family: TextFamily, segment: Segment, cache: EmlocCache, start: int = 0, stop: int | None = None,
               observer: AttentionObserver | None = None, keep_hidden: bool = False,
               selector: MemorySelector | None = None) -> tuple[torch.Tensor, list]:
    """Runs decoder layers `start … stop-1` on `segment` against `cache`.

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


def memory_prefix(memory: TaskMemory, from_layer: int = 0, family: TextFamily | None = None) -> list:
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


def rows_prefix(memories: Sequence[TaskMemory], family: TextFamily | None = None) -> tuple[list, list, torch.Tensor]:
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
            pad = [0, 0] * (tensor.dim() - 2) + [0, width - tensor.shape[1]]
            return F.pad(tensor, pad)

        prefix.append((torch.stack([padded(layer.keys) for layer in layers]),
                       torch.stack([padded(layer.values) for layer in layers]),
                       torch.stack([padded(layer.positions) for layer in layers])))
        real = torch.arange(width, device=device)[None] < torch.tensor([layer.num_tokens for layer in layers], device=device)[:, None]
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
    first token of each choice, renormalised): the decision itself rather than the whole vocabulary. `importance`
    (per layer `[kv_heads, chunk_length]`) ranks the chunk's tokens by another probe's attention; this probe's pass
    then captures none. `row_groups` (one int per row) judges groups of rows apart: the divergence of a variant is then
    the largest of the groups' mean JS, so that one group's rows cannot make up for another's; `rank_group` lets only
    that group's scored positions rank the chunk's tokens (None: every scored position); `rank_tokens="rows"` ranks them
    by every token of the rows (of that group's rows with `rank_group`), not only the scored positions, as SnapKV ranks
    a context by the attention of its last window. `reference` (a memory and the
    chunk prefilled on it, e.g. the uncompressed context so far) gives the distributions every variant is compared
    with, from one more pass of the rows; None compares with `memory ⊕ chunk` unpruned (the paper).
    """

    def __init__(self, builder: "MemoryBuilder", memory: TaskMemory, chunk: ChunkState, rows: list[EncodedSpan],
                 positions: str = "answer", choice_ids: torch.Tensor | None = None, rerun: str = "rows",
                 start_position: int | None = None, window_position: int | None = None,
                 importance: list[torch.Tensor] | None = None, row_groups: list[int] | None = None,
                 rank_group: int | None = None, reference: tuple[TaskMemory, ChunkState] | None = None,
                 rank_tokens: str = "scored"):
        if rank_tokens not in ("scored", "rows"):
            raise ValueError(f"rank_tokens must be 'scored' or 'rows', got {rank_tokens!r}")
        self.builder, self.memory, self.chunk, self.rerun = builder, memory, chunk, rerun
        family = builder.family
        batch, self.predicting = answer_rows(builder.processor, rows, positions)
        self.choice_ids = None if choice_ids is None else choice_ids.to(builder.model.model.device)
        # right after the chunk (the paper), or further on (`probe_at="end"`: where the queries will be); the gap
        # between the chunk and the rows is empty, like the gaps a pruned memory leaves
        start_position = chunk.next_position if start_position is None else max(start_position, chunk.next_position)
        # the rows packed into one, each its own segment: every row reads the same memory, with no per-row copy of it
        self.segment, self.predicting = pack_rows(builder.model._segment(batch, start_position=start_position),
                                                  self.predicting.to(builder.model.model.device))
        # the group of each packed token (a packed row's segment is its row), and of each scored position in the order
        # of `hidden[self.predicting]`
        token_groups, self.scored_groups, self.group_masks = None, None, []
        if row_groups is not None:
            rows_of_tokens = self.segment.segments[0]
            token_groups = torch.tensor(row_groups, device=rows_of_tokens.device)[rows_of_tokens]
            self.scored_groups = token_groups[self.predicting[0]]
            self.group_masks = [self.scored_groups == group for group in self.scored_groups.unique()]
        # `sliding="query"`: in sliding-window layers the rows see the prefix as a query at `window_position` would
        self.window_shift = 0 if window_position is None else max(0, window_position - start_position)
        fed = self.segment.hidden.shape[1]
        if rerun == "scored":
            fed = max(fed, self._scored_layout())
        # every pass writes what it keeps of the chunk, then the tokens it feeds, after the memory in its own growth
        # buffers: the memory is never copied for the probe
        self.scratch = memory.scratch(chunk.length + fed)
        # the positions whose attention ranks the chunk: the scored ones, or every token of the rows (a row's question
        # attends to the demonstrations that resemble it, its answer-predicting position mostly to the earlier answers);
        # with `rank_group`, those of that group's rows only
        ranking = torch.ones_like(self.predicting) if rank_tokens == "rows" else self.predicting
        if rank_group is not None:
            ranking = ranking & (token_groups == rank_group)[None]
        observer = None if importance is not None else \
            AttentionObserver(ranking, slice(None), family.num_heads // family.num_kv_heads)
        cache = self._cache({layer: None for layer in range(family.num_layers)}, start_layer=0)
        hidden, self.entering = run_layers(family, self.segment, cache, observer=observer, keep_hidden=True)
        self.reference = torch.log_softmax(self._logits(hidden[self.predicting]).float(), dim=-1)
        if rerun == "scored":
            self._freeze_rows(cache)
        del cache
        self.unpruned_js = None
        # what `divergence` gives with nothing pruned: 0 against this very pass, or against another context (below)
        self.unpruned_divergence = 0.0
        if reference is not None:
            # the same rows after another context: the variants start from this pass's hidden states (the chunk's
            # lower layers unpruned over the memory) and are compared with that context's answers
            reference_memory, reference_chunk = reference
            cache = self._cache({}, start_layer=0, memory=reference_memory, chunk=reference_chunk,
                                scratch=reference_memory.scratch(chunk.length + fed))
            hidden, _ = run_layers(family, self.segment, cache)
            unpruned = self.reference
            self.reference = torch.log_softmax(self._logits(hidden[self.predicting]).float(), dim=-1)
            # how far `memory ⊕ chunk` already is from that context, before this chunk is pruned at all
            drift = js_divergence(unpruned, self.reference)
            self.unpruned_js, self.unpruned_divergence = drift.mean().item(), self._aggregate(drift)
            del cache
        # importance of each chunk token: attention from the scored positions, summed over them and over the query
        # heads of each KV group, then smoothed along the sequence (paper §3.2)
        if importance is None:
            importance = []
            for layer in range(family.num_layers):
                start = memory.layers[layer].num_tokens
                scores = observer.per_layer[layer][:, start:start + chunk.length]
                importance.append(smooth(scores, builder.pool_width))
        self.importance = importance
        self.passes = self.evaluations = 0  # layer passes of the probe, and candidate evaluations

    def _logits(self, scored_hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[num_scored, vocab or num_choices]` from the hidden states at the scored positions `[num_scored, hidden]`."""
        return self.builder.family.logits(scored_hidden, self.choice_ids)

    def sees_chunk(self, layer: int) -> bool:
        """Whether any probe row reads any of the chunk's tokens in `layer`. In a sliding-window layer a row token at
        position `q` reads prefix positions after `q + window_shift − window` (`EmlocCache.attention_mask`); rows
        windowed as a query far after the chunk (`sliding="query"`, `probe_at="end"`) read none of it there, and
        pruning the chunk in such a layer cannot change their answers."""
        window = self.builder.family.sliding_window(layer)
        if window is None or self.chunk.length == 0:
            return True
        earliest_row_token = int(self.segment.text_positions.min())
        return int(self.chunk.positions.max()) > earliest_row_token + self.window_shift - window

    def _cache(self, kept: dict[int, torch.Tensor | None], start_layer: int, memory: TaskMemory | None = None,
               chunk: ChunkState | None = None, scratch: list | None = None) -> EmlocCache:
        """A cache (batch 1) over the memory plus the chunk tokens `kept[l]` (absent or None = all) in layers
        `start_layer…`, in the probe's scratch buffers; `memory`, `chunk` and `scratch` (its buffers) stand for another
        context, such as a `reference`."""
        memory = self.memory if memory is None else memory
        chunk = self.chunk if chunk is None else chunk
        scratch = self.scratch if scratch is None else scratch
        prefix = [None] * start_layer
        for layer in range(start_layer, self.builder.family.num_layers):
            added = chunk.kept(layer, kept.get(layer))
            positions = torch.cat([memory.layers[layer].positions, added.positions], dim=1)
            prefix.append((added.keys, added.values, positions))
        return EmlocCache(prefix, 1, window_shift=self.window_shift, scratch=scratch)

    def _scored_layout(self) -> int:
        """`rerun="scored"`: lays out the scored positions as one row, each its own segment, and the probe rows'
        tokens before each of them (each scored position's copy of its row so far); returns how many tokens a scored
        pass feeds."""
        columns = self.predicting[0].nonzero().flatten()  # the order of `hidden[self.predicting]`
        device = self.segment.hidden.device
        # where each scored position's row starts in the packed row: its earlier tokens are `row start … column - 1`
        row_starts = torch.ones_like(self.segment.segments[0], dtype=torch.bool)
        row_starts[1:] = self.segment.segments[0, 1:] != self.segment.segments[0, :-1]
        row_of_token = row_starts.long().cumsum(0) - 1
        first_token = row_starts.nonzero().flatten()[row_of_token[columns]]
        counts = columns - first_token
        self.earlier = (torch.cat([torch.arange(int(a), int(b), device=device) for a, b in zip(first_token, columns)])
                        if len(columns) else columns)
        self.scored = columns
        self.frozen_positions = self.segment.text_positions[0, self.earlier][None]
        self.frozen_segments = torch.arange(len(columns), device=device).repeat_interleave(counts)[None]
        # only the scored positions' hidden states depend on the restart layer
        self.scored_segment = Segment(None, self.segment.rope_positions[..., :, columns],
                                      self.segment.text_positions[:, columns],
                                      torch.ones_like(columns, dtype=torch.bool)[None],
                                      segments=torch.arange(len(columns), device=device)[None])
        return len(self.earlier) + len(columns)

    def _freeze_rows(self, cache: EmlocCache) -> None:
        """`rerun="scored"`: keeps, per layer, the reference keys and values of the probe rows' tokens before each
        scored position, packed into one row `[1, kv_heads, tokens, head_dim]` (one segment per scored position)."""
        self.frozen_kv = []
        for layer in range(self.builder.family.num_layers):
            keys, values = cache.new_kv(layer)  # [1, kv_heads, seq, head_dim]
            self.frozen_kv.append((keys[:, :, self.earlier], values[:, :, self.earlier]))

    def divergence(self, start_layer: int, kept: dict[int, torch.Tensor | None]) -> float:
        """Mean JS between the probe's answer distributions with layers `start_layer…` pruned as `kept` and the
        unpruned reference. Runs only layers `start_layer … L-1` from the cached hidden states: the whole probe rows
        (`rerun="rows"`, the paper), or only the scored positions (`rerun="scored"`), which attend to the other row
        tokens' unpruned keys and values instead of recomputing them. At the top layer both are the same computation
        (a layer's own pruning cannot change the keys and values it is given); below, `"scored"` leaves out the effect
        of the pruning on the rows' other tokens, for a pass over a few positions instead of whole rows."""
        family = self.builder.family
        cache = self._cache(kept, start_layer)
        if self.rerun == "scored":
            columns = self.scored
            cache.add_tokens(self.frozen_positions, torch.ones_like(self.frozen_positions, dtype=torch.bool),
                             segments=self.frozen_segments)
            for layer in range(start_layer, family.num_layers):
                cache.layers[layer].update(*self.frozen_kv[layer])
            segment = dataclasses.replace(self.scored_segment, hidden=self.entering[start_layer][:, columns])
            hidden, _ = run_layers(family, segment, cache, start=start_layer)
            logits = self._logits(hidden[0])
        else:
            segment = dataclasses.replace(self.segment, hidden=self.entering[start_layer])
            hidden, _ = run_layers(family, segment, cache, start=start_layer)
            logits = self._logits(hidden[self.predicting])
        self.passes += family.num_layers - start_layer
        self.evaluations += 1
        return self._aggregate(js_divergence(logits, self.reference))

    def _aggregate(self, divergences: torch.Tensor) -> float:
        """The divergence of a variant from the JS at each scored position `[num_scored]`: their mean, or with
        `row_groups` the largest of the groups' means."""
        if not self.group_masks:
            return divergences.mean().item()
        return max(divergences[mask].mean().item() for mask in self.group_masks)


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


def answer_rows(processor: EmlocProcessor, rows: list[EncodedSpan], positions: str = "answer") -> tuple[dict, torch.Tensor]:
    """Demonstration rows as a right-padded batch, and the positions scored on them `[batch, seq]` (bool): those whose
    next token is an answer token (`positions="answer"`, the paper) or only each row's first one (`"first"`).

    A row ends at its last scored position + 1: later tokens cannot change it (attention is causal).
    """
    rows = [_trim_after_last_answer(row, first_only=positions == "first") for row in rows]
    batch = processor.collate(rows, padding_side="right")
    answer_next = (batch["token_types"][:, 1:] == ANSWER) & batch["attention_mask"][:, 1:].bool()
    if positions == "first":
        answer_next = answer_next & (answer_next.long().cumsum(dim=1) == 1)
    predicting = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    predicting[:, :-1] = answer_next
    return batch, predicting


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
    batch, predicting = answer_rows(processor, rows)
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
            way a new query is (the last chunk borrows the first demonstrations); `"self+future"`: both sets of rows,
            each judged on its own — a candidate passes only if the mean JS of the chunk's own rows and that of the
            `future` rows both meet the bound. On the selection splits each probe alone passed the bound too easily
            on a task where the other held (README, "Why this default"): the chunk must keep what answers its own
            demonstrations and what answers new ones.
        probe_size: rows of a `heldout` / `future` probe (the `future` part of `"self+future"`).
        distinct_answers: a `heldout` / `future` probe takes, in its order, rows whose answers differ from the rows
            already taken, while the demonstrations offer them, then the next rows. Rows that share one answer cannot
            see a memory drifting towards that answer: the reference and every pruned variant agree on it.
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
        refine: with `layer_group > 1`, a group is first tried at the floor ratio (`ratios[0]` in every layer of the
            group, one probe run from its lowest layer) and kept there if that meets the bound; otherwise its layers
            are decided one by one, top first, by the paper's rule. The paper's rule ends at the floor in most layer
            decisions (88–93 % on Gemma 3's benchmark splits), and a group of G such layers then costs one run instead
            of G. The memory is the paper's rule's (`layer_group=1`) unless some layer of a group fails at the floor
            while the group's lower layers are unpruned and passes once they are pruned too (a JS that falls as more
            is pruned): the paper's rule checks each layer's step, the group only its last. Measured (README, "Why
            this default"): builds 1.2–1.4× faster on Gemma 3, but the changed decisions lost the gain on a selection
            split.
        search: `"grid"` tries `ratios` in order (the paper); `"bisect"` searches the smallest passing ratio in
            `[ratios[0], 1]` by bisection (`bisect_steps` probe runs per layer, assumes JS falls as the ratio grows).
        budget: a target fraction of the chunk's KV to keep (e.g. 0.2) instead of a fixed bound: each layer, top
            first, may use what the layers above left of the budget (spread over the layers still to decide); it
            takes the smallest ratio within its allowance that meets `delta`, else the largest one within it (least
            divergence). Savings of easy layers flow to harder ones; the chunk never exceeds the budget (beyond the
            always-kept answer tokens).
        relative: a bound relative to what the chunk does to the probe: a chunk's bound becomes the smaller of `delta`
            and `relative` × the JS of removing the whole chunk (one more probe run per chunk). Under the paper's
            fixed bound, a chunk that changes the probe rows little even when removed (the memory before it already
            answers them) passes at the floor in every layer; when every chunk is like that, the memory drops them all
            and drifts (reason 4 of "Why this default"). With `relative=0.5` a pruned chunk must keep at least about
            half of its effect on the rows; a chunk with no effect on them at all is kept whole.
        reuse: `"none"` (the paper) searches every chunk; `"verify"` first tries the previous chunk's ratios on this
            chunk (its own importance, every layer pruned at once, one probe run from the bottom layer) and keeps them
            when the JS stays within `delta`, searching only when it does not. The accepted memory meets the same
            bound as a searched one (a search's lowest accepted decision is also a run with every layer pruned);
            consecutive chunks of one task mostly pass, so a chunk usually costs two probe runs instead of a search.
            `"floor"` first tries the smallest ratio in every layer the same way, and searches only when it fails. A
            search that ends at the floor everywhere ends with that very run (its last decision, at the bottom layer,
            is the floor-everywhere memory), so such chunks get the same bytes for one run instead of a search; a
            chunk the search would give more passes the floor here when the floor everywhere meets the bound while a
            lone floor layer above unpruned layers did not.
        rerun: what a candidate's evaluation recomputes above the layer being decided. `"rows"` (the paper): the
            whole probe rows; `"scored"`: only the scored positions, which attend to the unpruned keys and values of
            the rows' other tokens (kept from the reference pass). Exact at the top layer; below it leaves out how the
            pruning changes the rows' other tokens, for passes over a few positions instead of whole rows. Measured
            (README, "Why this default"): a third of the build time, but the bound then passes too easily.
        probe_at: where the probe rows sit. `"chunk"` (the paper): right after the chunk; `"end"`: where the queries
            will start, estimated from the demonstrations' mean length so far, so that the rows see the chunk from the
            distance a query does (in RoPE distance and in sliding windows). Measured (README, "Why this default"):
            on SmolLM2 the more distant rows let the bound pass too easily; `sliding="query"` keeps only the windows.
        sliding: in sliding-window layers, what the probe rows see of the memory and the chunk. `"probe"` (the
            paper): what their own positions let them see; `"query"`: what a query after the whole context will see
            (estimated as for `probe_at="end"`), while the rows keep their positions for everything else. A chunk far
            from the end then reaches the rows only through the global layers (Gemma 3: one layer in six), as it
            reaches a query; rows right after it also read it through the sliding layers, which hides what pruning
            the global layers costs. No effect on a model without sliding windows.
        importance: which attention ranks a chunk's tokens. `"probe"`: the probe rows' (the paper's, whose rows are
            the chunk's own); `"chunk"`: the chunk's own demonstrations' attention, from the positions predicting
            their answers, whatever rows judge the JS bound (one probe pass more per chunk; none with
            `probe="self"`). Rows that follow the chunk attend to what helps them answer, mostly the earlier answers;
            a demonstration's own answer attends to the tokens that decide it. `"future"` (with `probe="self+future"`
            only): the future rows' attention ranks the tokens, as under `probe="future"`, and the chunk's own rows
            only judge the bound beside them. `"rows"`: the attention of every token of the probe rows, their questions
            included, not only of the scored positions (SnapKV's observation window, here the rows after the chunk):
            a row's question attends to the demonstrations that resemble it, its answer position mostly to the
            earlier answers.
        recent: the chunks holding the last `recent` demonstrations of this build are kept whole, without a probe
            (0: none, the paper). Those chunks sit right before the queries; on Gemma's breast_cancer a memory whose
            last chunks were compressed answered one class to almost every query, each of those chunks having met
            its bound, while compressing only the earlier ones kept the gain. The kept share grows by about the
            whole chunks' share of the context, and they cost no probe. Measured on the selection splits, `recent=4`
            repaired that split but lost the gain elsewhere, so the default keeps none (README, "Why this default").
        reference: what a chunk's pruned variants are compared with. `"memory"` (the paper): the probe rows after the
            memory built so far and the whole chunk, so each bound limits one chunk's step and the steps add up over
            the chunks unchecked (reason 4 of "Why this default"); `"full"`: the rows after the uncompressed context
            so far (every earlier demonstration unpruned) and the chunk, so the bound limits how far the memory with
            this chunk has drifted from the full context. A chunk that cannot bring the memory within the bound is
            kept whole, which is how a drifting memory takes back KV. The build also holds the uncompressed context
            (it grows like a full prefill, and costs one more prefill and one more probe pass per chunk); the chunk's
            stats record `unpruned_js`, the memory's drift before the chunk is pruned.
        skip_unseen: decide without a probe run the layers where no probe row can read any of the chunk's tokens: a
            sliding-window layer whose window, for rows windowed as a query (`sliding="query"`, `probe_at="end"`),
            ends before the chunk. Pruning the chunk there cannot change the rows' answers, so a candidate's JS is that
            of the layers already decided, and the evaluation would only recompute it up to float rounding (the
            masked keys change the order of a sum, not its value); the smallest candidate passes there whenever the
            layers above met the bound. The same decisions and the same memory for fewer probe runs: on Gemma 3 (15
            of 18 layers slide over 512 tokens) every chunk further than a window from the end skips most of the
            search. False evaluates them anyway (for checking). No effect without sliding windows or on rows placed
            right after the chunk (the paper's).
        probe_dtype: the precision of the probe's passes (its reference, its importance and every candidate's
            evaluation). None (the paper): the model's own; `"bfloat16"`: the probe runs under `torch.autocast` in
            bfloat16, while the chunk's prefill, and so every kept key and value, stays in the model's precision. The
            decisions are then those of a slightly noisier probe: the reference and every variant carry the same
            rounding, the JS between them is what is compared. On CPUs with bfloat16 matrix units (AVX-512 BF16,
            AMX) and on GPUs a probe pass costs a fraction of a float32 one, and the build is mostly probe passes;
            autocast holds a bfloat16 copy of the decoder's weights while a chunk is built. Measured (README, "Why
            this default"): builds 1.3-1.6x faster, but the changed decisions lost the gain on two selection splits.
    """

    name: ClassVar[str] = "emloc"
    delta: float = 0.005
    ratios: tuple[float, ...] = (0.1, 0.2, 0.5)
    probe: str = "self"
    probe_size: int = 4
    distinct_answers: bool = False
    protect: str = "count"
    positions: str = "answer"
    over: str = "vocab"
    layer_group: int = 1
    refine: bool = False
    search: str = "grid"
    bisect_steps: int = 4
    budget: float | None = None
    relative: float | None = None
    reuse: str = "none"
    rerun: str = "rows"
    probe_at: str = "chunk"
    sliding: str = "probe"
    importance: str = "probe"
    recent: int = 0
    reference: str = "memory"
    skip_unseen: bool = True
    probe_dtype: str | None = None

    # options and their paper values; `params()` records every option that differs, so a memory names its rule
    PAPER = {"probe": "self", "distinct_answers": False, "protect": "count", "positions": "answer", "over": "vocab",
             "layer_group": 1, "refine": False, "search": "grid", "reuse": "none", "rerun": "rows", "probe_at": "chunk",
             "sliding": "probe", "importance": "probe", "reference": "memory", "skip_unseen": True,
             "probe_dtype": None}

    def __post_init__(self):
        self.ratios = tuple(sorted(float(r) for r in self.ratios))
        choices = {"probe": ("self", "heldout", "future", "self+future"), "protect": ("count", "extra"),
                   "positions": ("answer", "first"), "over": ("vocab", "choices"), "search": ("grid", "bisect"),
                   "reuse": ("none", "verify", "floor"), "rerun": ("rows", "scored"), "probe_at": ("chunk", "end"), "sliding": ("probe", "query"),
                   "importance": ("probe", "chunk", "future", "rows"), "reference": ("memory", "full")}
        for option, allowed in choices.items():
            if getattr(self, option) not in allowed:
                raise ValueError(f"{option} must be one of {allowed}, got {getattr(self, option)!r}")
        if not self.ratios or not all(0.0 < r <= 1.0 for r in self.ratios):
            raise ValueError(f"ratios must lie in (0, 1], got {self.ratios}")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must lie in (0, 1], got {self.budget}")
        if self.relative is not None and not self.relative > 0.0:
            raise ValueError(f"relative must be positive, got {self.relative}")
        if self.distinct_answers and self.probe == "self":
            raise ValueError("distinct_answers chooses the rows of a 'heldout' or 'future' probe; probe='self' has none "
                             "to choose")
        if self.importance == "future" and self.probe != "self+future":
            raise ValueError("importance='future' ranks by the future rows of probe='self+future'; "
                             f"probe={self.probe!r} has no such rows apart")
        self.recent = int(self.recent)
        if self.recent < 0:
            raise ValueError(f"recent must be at least 0, got {self.recent}")
        self.layer_group = int(self.layer_group)
        if self.layer_group < 1:
            raise ValueError(f"layer_group must be at least 1, got {self.layer_group}")
        self.refine = bool(self.refine)
        self.skip_unseen = bool(self.skip_unseen)
        if self.refine and (self.layer_group == 1 or self.budget is not None or self.search != "grid"):
            raise ValueError("refine splits a group of layers (layer_group > 1) that fails at the floor under the "
                             "grid search; it has no meaning with layer_group=1, a budget or search='bisect'")
        if self.probe_dtype not in (None, "bfloat16"):
            raise ValueError(f"probe_dtype must be None or 'bfloat16', got {self.probe_dtype!r}")

    def params(self) -> dict:
        params = {"delta": self.delta, "ratios": list(self.ratios), "probe": self.probe}
        if self.probe != "self":
            params["probe_size"] = self.probe_size
        for option, paper in self.PAPER.items():
            if option not in ("probe", "search") and getattr(self, option) != paper:  # those two are recorded above/below
                params[option] = getattr(self, option)
        if self.search != "grid":
            params.update(search=self.search, bisect_steps=self.bisect_steps)
        if self.budget is not None:
            params["budget"] = self.budget
        if self.relative is not None:
            params["relative"] = self.relative
        if self.recent:
            params["recent"] = self.recent
        return params

    def probe_demos(self, num_demos: int, chunk_demos: list[int],
                    answers: Sequence[str | None] | None = None) -> list[int]:
        """Indices of the demonstrations that probe the chunk `chunk_demos` (`answers[i]`: demonstration i's answer,
        needed by `distinct_answers`)."""
        if self.probe == "self":
            return list(chunk_demos)
        outside = self._rows_outside(num_demos, chunk_demos, answers, future=self.probe != "heldout")
        return list(chunk_demos) + outside if self.probe == "self+future" else outside

    def _rows_outside(self, num_demos: int, chunk_demos: list[int], answers: Sequence[str | None] | None,
                      future: bool) -> list[int]:
        """The `probe_size` rows of a `future` (or else `heldout`) probe; the chunk's own when there are no others."""
        chunk = set(chunk_demos)
        others = [i for i in range(num_demos) if i not in chunk]
        if not others:
            return list(chunk_demos)
        if future:  # the next demonstrations, then (for the last chunks) the first ones
            after = max(chunk_demos) + 1 if chunk_demos else 0
            ordered = [i for i in range(after, num_demos)] + [i for i in range(after) if i not in chunk]
        else:  # a deterministic spread over the demonstrations outside the chunk, different for each chunk
            step = max(1, len(others) // self.probe_size)
            offset = chunk_demos[0] % step if chunk_demos else 0
            ordered = others[offset::step]
        if not self.distinct_answers:
            return ordered[: self.probe_size]
        if answers is None:
            raise ValueError("distinct_answers needs the demonstrations' answers")
        listed = set(ordered)
        ordered = ordered + [i for i in others if i not in listed]  # `heldout`: after its spread, every other row
        taken, seen = [], set()
        for i in ordered:
            if len(taken) < self.probe_size and answers[i] not in seen:
                taken.append(i)
                seen.add(answers[i])
        chosen = set(taken)
        return taken + [i for i in ordered if i not in chosen][: self.probe_size - len(taken)]

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
        if self.recent and chunk_demos and max(chunk_demos) >= len(builder.context.demos) - self.recent:
            return [None] * num_layers, {"ratios": [1.0] * num_layers, "recent": True}
        # one autocast scope for the whole chunk: it casts each weight once and keeps the cast until the chunk is done
        precision = contextlib.nullcontext() if self.probe_dtype is None else \
            torch.autocast(builder.model.model.device.type, dtype=getattr(torch, self.probe_dtype))
        with precision:
            return self._search(builder, memory, chunk, chunk_demos)

    def _search(self, builder, memory, chunk, chunk_demos):
        """The probe and the layer-wise search of one chunk: `compress` without its shortcuts."""
        num_layers = builder.family.num_layers
        demo_answers = [example.answer for example in builder.context.examples] if self.distinct_answers else None
        demos = self.probe_demos(len(builder.context.demos), chunk_demos, demo_answers)
        choice_ids = self.choice_ids(builder, demos)
        # a distribution over the choices is the decision at the first answer token; later positions continue a choice
        positions = "first" if choice_ids is not None else self.positions
        as_query = self.probe_at == "end" or self.sliding == "query"
        query_position = builder.query_position(chunk, chunk_demos) if as_query else None
        own_importance = None
        if self.importance == "chunk" and demos != list(chunk_demos):
            # the paper's importance: the attention of the chunk's own demonstrations, right after it, from the
            # positions that predict their answers. Run first and let go: every probe works in the same scratch room
            own_importance = Probe(builder, memory, chunk, [builder.context.demos[i] for i in chunk_demos],
                                   positions=self.positions).importance
        # `"self+future"`: the chunk's own rows and the future ones are judged apart (group 0 and 1)
        row_groups = None
        if self.probe == "self+future":
            row_groups = [0] * len(chunk_demos) + [1] * (len(demos) - len(chunk_demos))
        probe = Probe(builder, memory, chunk, [builder.context.demos[i] for i in demos], positions=positions,
                      choice_ids=choice_ids, rerun=self.rerun, row_groups=row_groups,
                      start_position=query_position if self.probe_at == "end" else None,
                      window_position=query_position if self.sliding == "query" else None, importance=own_importance,
                      rank_group=1 if self.importance == "future" else None,
                      reference=builder.reference if self.reference == "full" else None,
                      rank_tokens="rows" if self.importance == "rows" else "scored")
        answers = chunk.token_types == ANSWER
        budget_left = None if self.budget is None else self.budget * num_layers
        kept: dict[int, torch.Tensor | None] = {}
        chosen, divergences = {}, {}
        extra = self.protect == "extra"
        bound, bound_stats = self.delta, {}
        if probe.unpruned_js is not None:
            bound_stats["unpruned_js"] = round(probe.unpruned_js, 9)
        if self.relative is not None:
            # the JS of the rows with the chunk removed from every layer: its whole effect on them
            nothing = torch.zeros(builder.family.num_kv_heads, 0, dtype=torch.long, device=chunk.positions.device)
            removed = probe.divergence(0, {layer: nothing for layer in range(num_layers)})
            bound = min(self.delta, self.relative * removed)
            bound_stats = {"removed_js": round(removed, 9), "bound": round(bound, 9)}
        reused = self._reuse(builder, probe, answers, extra, bound)
        if reused is not None:
            index, ratios, js = reused
            stats = {"ratios": ratios, "js": [round(js, 6)] * num_layers, "reused": True, **bound_stats,
                     "probe_layer_passes": probe.passes, "probe_evaluations": probe.evaluations}
            return index, stats

        # layers where no probe row reads the chunk: pruning them leaves the JS of the layers decided so far
        unseen = {layer for layer in range(num_layers) if self.skip_unseen and not probe.sees_chunk(layer)}
        decided_js = probe.unpruned_divergence  # the divergence of `kept` as it stands (nothing pruned yet)

        def evaluate(group, ratio):
            """Keeps `ratio` in every layer of `group` (ascending layer indices); JS from the group's lowest layer."""
            index = {layer: top_tokens(probe.importance[layer], ratio, answers, extra) for layer in group}
            if unseen.issuperset(group):
                return index, decided_js
            return index, probe.divergence(group[0], {**kept, **index})

        def decide(group, decision):
            nonlocal decided_js
            index, ratio, js = decision
            for layer in group:
                kept[layer] = None if index is None else index[layer]
                chosen[layer], divergences[layer] = ratio, js
            if index is not None:  # a group kept whole leaves the variant, and its divergence, as they were
                decided_js = js

        top = num_layers - 1
        while top >= 0:
            group = list(range(max(0, top - self.layer_group + 1), top + 1))
            if budget_left is not None:
                allowance = budget_left / (group[0] + len(group))  # per layer, over this group and those below
                grid = [r for r in self.ratios if r <= allowance + 1e-9] or [self.ratios[0]]
                decide(group, self._first_passing(evaluate, group, grid, bound, keep_whole=False))
                budget_left -= chosen[group[0]] * len(group)
            elif self.search == "bisect":
                decide(group, self._bisect(evaluate, group, bound))
            elif self.refine and len(group) > 1:
                # the whole group at the floor, in one run from its lowest layer; where that fails, the paper's rule
                # layer by layer, the group's top layer first
                index, js = evaluate(group, self.ratios[0])
                if js <= bound:
                    decide(group, (index, self.ratios[0], js))
                else:
                    for layer in reversed(group):
                        decide([layer], self._first_passing(evaluate, [layer], self.ratios, bound, keep_whole=True))
            else:
                decide(group, self._first_passing(evaluate, group, self.ratios, bound, keep_whole=True))
            top = group[0] - 1
        stats = {
            "ratios": [round(chosen[l], 4) for l in range(num_layers)],
            "js": [round(divergences[l], 6) for l in range(num_layers)],
            **bound_stats,
            "probe_layer_passes": probe.passes,
            "probe_evaluations": probe.evaluations,  # restarting each from layer 0 would cost evaluations x L passes
        }
        if self.reuse != "none":
            stats["reused"] = False
        return [kept[l] for l in range(num_layers)], stats

    def _reuse(self, builder, probe: Probe, answers: torch.Tensor, extra: bool,
               bound: float) -> tuple[list, list, float] | None:
        """`reuse="verify"`: the previous chunk's per-layer ratios applied to this chunk (`"floor"`: the smallest
        ratio in every layer), with their whole-stack JS, if it stays within `bound` (None otherwise, or, for
        `"verify"`, when there is no previous chunk of this build)."""
        if self.reuse == "none":
            return None
        if self.reuse == "floor":
            ratios = [self.ratios[0]] * builder.family.num_layers
        else:
            previous = builder.chunk_stats[-1] if builder.chunk_stats else None
            if previous is None or "ratios" not in previous:
                return None
            ratios = [float(r) for r in previous["ratios"]]
        index = [None if ratio >= 1.0 else top_tokens(probe.importance[layer], ratio, answers, extra)
                 for layer, ratio in enumerate(ratios)]
        js = probe.divergence(0, dict(enumerate(index)))
        return (index, [round(ratio, 4) for ratio in ratios], js) if js <= bound else None

    def _first_passing(self, evaluate, group, grid, bound, keep_whole):
        """The smallest ratio of `grid` meeting `bound`; otherwise the whole chunk (faithful rule) or, under a budget,
        the largest ratio of the grid."""
        last = None
        for ratio in grid:
            index, js = evaluate(group, ratio)
            if js <= bound:
                return index, ratio, js
            last = (index, ratio, js)
        return (None, 1.0, 0.0) if keep_whole else last

    def _bisect(self, evaluate, group, bound):
        low, high = self.ratios[0], 1.0
        index, js = evaluate(group, low)
        if js <= bound:
            return index, low, js
        best = (None, 1.0, 0.0)
        for _ in range(self.bisect_steps):
            middle = (low + high) / 2
            index, js = evaluate(group, middle)
            if js <= bound:
                best, high = (index, middle, js), middle
            else:
                low = middle
        return best


def _source_sha256() -> str:
    """SHA-256 of the Emloc modules' source (this file and its siblings, also when loaded as remote code)."""
    digest = hashlib.sha256()
    for module in sorted(Path(__file__).resolve().parent.glob("*_emloc.py")):
        digest.update(module.name.encode() + b"\0" + module.read_bytes())
    return digest.hexdigest()


@register_method
@dataclass
class EmlocQueryMethod(EmlocMethod):
    """The default of `build_memory`: the paper's layer-wise rule, probed the way a query uses the memory.

    Two repairs of the paper's rule at small scale, chosen on a selection split and reported on others (README, "Why
    this default"): the probe rows are demonstrations that no part of the memory has seen yet (`probe="future"`: a
    chunk is judged on how it answers new rows, not on recalling its own copy), and the divergence is taken over the
    choices at the position that decides the answer (`over="choices"`: deterministic continuation tokens no longer
    dilute it). Two such rows probe each chunk (`probe_size=2`): on the selection split they agreed with the full
    context as often as four and built in 0.7 of the time. In sliding-window layers the rows see what a query after
    the whole context will see (`sliding="query"`): on Gemma 3, rows right after a chunk read it through the sliding
    layers, which no later query does, and pruning the global layers went unnoticed. Without sliding windows (Llama,
    Qwen2-VL) that option changes nothing. A chunk's bound is the smaller of `delta` and half the divergence of
    removing the whole chunk (`relative=0.5`): under `delta` alone a chunk the rows barely need passed at the floor in
    every layer, and a memory of such chunks could lose the gain; on the selection splits this bound retained more of
    the gain on average and on the worst split, at 1.05–1.15× the build time. Every option of `EmlocMethod` can still
    be overridden (`relative=None` is the fixed bound).
    """

    name: ClassVar[str] = "emloc-query"
    probe: str = "future"
    probe_size: int = 2
    over: str = "choices"
    sliding: str = "query"
    relative: float | None = 0.5

    def params(self) -> dict:
        """Every option, in field order, so that a memory says exactly which rule made it. `bisect_steps` has never
        been part of the default's record (a checkpoint still tells builds apart by it: `MemoryBuilder._arguments`), nor
        have `recent` while it is 0, `probe_dtype` while it is None, `refine` while it is False and `skip_unseen` while
        it is True."""
        unset = {"recent": 0, **{option: self.PAPER[option] for option in ("probe_dtype", "refine", "skip_unseen")}}
        params = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                  if field.name != "bisect_steps"
                  and not (field.name in unset and getattr(self, field.name) == unset[field.name])}
        return {**params, "ratios": list(self.ratios)}


class MemoryBuilder:
    """Builds a task memory chunk by chunk (paper §3.1): prefill a chunk on top of the memory, let the method choose
    what each layer keeps, append it.

    What a build holds grows with what it keeps: the memory grows in place (`TaskMemory.extend`), a chunk's prefill and
    every probe pass run after the memory in its own growth buffers (`TaskMemory.scratch`: the memory is never copied
    for them), demonstrations are read as their chunk needs them (`StreamedContext`: images decoded per chunk) and a
    chunk's working state (its KV, the probe) is let go before the next chunk. With `checkpoint_dir` each completed chunk is recorded on disk
    (`BuildCheckpoint`), and a rerun with the same arguments continues after the last recorded chunk, to the same bytes.

    `progress` is True for a progress bar, or a callable `progress(chunks_done, chunks_total)` called after each chunk
    (once it is recorded in `checkpoint_dir`).
    """

    def __init__(self, model: "EmlocForConditionalGeneration", processor: EmlocProcessor, method: CompressionMethod,
                 chunk_size: int, pool_width: int, progress: bool | Callable[[int, int], None] = False, validate: int = 0,
                 checkpoint_dir: str | os.PathLike | None = None, retrieval_layer: int | None = None,
                 drop_unreadable: bool = True):
        self.model, self.processor, self.method = model, processor, method
        self.drop_unreadable = drop_unreadable
        self.retrieval_layer = retrieval_layer
        self.family = model.family
        self.chunk_size, self.pool_width, self.progress, self.validate = chunk_size, pool_width, progress, validate
        self.checkpoint_dir = checkpoint_dir
        self.context = None
        self.start_position = 0  # the memory's next position when the build began
        self.chunk_stats: list[dict] = []
        # `reference="full"`: the context so far unpruned, and the chunk being built prefilled on it
        self.uncompressed: TaskMemory | None = None
        self.reference: tuple[TaskMemory, ChunkState] | None = None

    @torch.no_grad()
    def build(self, demos, append_to: TaskMemory | None = None) -> TaskMemory:
        started = time.perf_counter()
        # probes read demonstrations of other chunks (`heldout`, `future`: often the next chunk's): keep a few encoded
        self.context = self.processor.stream_context(demos, cache_size=2 * self.chunk_size)
        num_demos = len(self.context)
        chunks = [list(range(i, min(i + self.chunk_size, num_demos))) for i in range(0, num_demos, self.chunk_size)]
        # a memory of its own over `append_to`'s tensors: growing it never writes into the memory the user gave
        memory = TaskMemory(list(append_to.layers), append_to.next_position) if append_to is not None else self.model._empty_memory()
        self.start_position = memory.next_position
        if getattr(self.method, "reference", "memory") == "full":
            # over `append_to`, the given memory followed by the new demonstrations unpruned
            self.uncompressed = (TaskMemory(list(append_to.layers), append_to.next_position) if append_to is not None
                                 else self.model._empty_memory())
        chunk_stats, full_types, spent_before = [], [], 0.0
        self.chunk_stats = chunk_stats  # what methods may read of the chunks before (`reuse`); restored on resume
        checkpoint = None
        if self.checkpoint_dir is not None:
            checkpoint = BuildCheckpoint(self.checkpoint_dir, self._arguments(append_to))
            for number in range(checkpoint.resume()):
                layers, types = checkpoint.load_chunk(number)
                memory.extend(layers, checkpoint.chunks[number]["next_position"])
                if self.uncompressed is not None:  # not recorded: the same prefills again
                    self._prefill_uncompressed(chunks[number], first=number == 0 and append_to is None)
                    self._extend_uncompressed()
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
        self.uncompressed = self.reference = None
        memory.compact()
        if self.drop_unreadable:
            memory.drop_unreadable(self.family.sliding_windows)
        memory.retrieval = self._retrieval(append_to)
        previous = append_to.stats if append_to is not None else None
        memory.stats = self.model._memory_stats(
            memory, self.method, num_demos, torch.cat(full_types), chunk_stats,
            spent_before + time.perf_counter() - started, self.chunk_size, previous,
        )
        if self.validate and append_to is None:
            memory.stats["validation"] = self._validate(memory)
        return memory

    def query_position(self, chunk: ChunkState, chunk_demos: list[int]) -> int:
        """Where the queries will start, estimated after `chunk`: the demonstrations still to come, at the mean
        length (in positions) of those built so far."""
        done = max(chunk_demos) + 1
        per_demo = (chunk.next_position - self.start_position) / done
        return chunk.next_position + round(per_demo * (len(self.context) - done))

    def _build_chunk(self, memory: TaskMemory, demo_indices: list[int], first: bool) -> tuple[list[MemoryLayer], torch.Tensor, dict, int]:
        """Prefills the demonstrations `demo_indices` on top of `memory` and lets the method prune them.

        Returns per layer the kept tokens, the chunk's token types before pruning `[chunk_len]`, the method's statistics
        and the memory's `next_position` after the chunk. The rest of the chunk's state goes when this returns.
        """
        chunk = self._prefill(memory, demo_indices, first)
        if self.uncompressed is not None:
            self._prefill_uncompressed(demo_indices, first)
        kept, stats = self.method.compress(self, memory, chunk, demo_indices)
        if self.uncompressed is not None:
            self._extend_uncompressed()
        layers = [chunk.kept(index, kept[index]) for index in range(self.family.num_layers)]
        return layers, chunk.token_types.cpu(), stats, chunk.next_position

    def _prefill(self, memory: TaskMemory, demo_indices: list[int], first: bool) -> ChunkState:
        """The demonstrations `demo_indices` (after the template prefix if `first`) prefilled on top of `memory`."""
        spans = [self.context.demos[i] for i in demo_indices]
        if first:
            spans = [self.context.prefix, *spans]  # the template prefix belongs to the first chunk
        chunk = self.model._prefill_chunk(memory, EncodedSpan.concat(spans), in_place=True)
        # the chunk's keys and values are views of the memory's growth buffers, where the probe's passes write next
        chunk.keys, chunk.values = [k.clone() for k in chunk.keys], [v.clone() for v in chunk.values]
        return chunk

    def _prefill_uncompressed(self, demo_indices: list[int], first: bool) -> None:
        """`reference="full"`: prefills the chunk on the uncompressed context, as the method's reference."""
        self.reference = (self.uncompressed, self._prefill(self.uncompressed, demo_indices, first))

    def _extend_uncompressed(self) -> None:
        uncompressed, chunk = self.reference
        uncompressed.extend([chunk.kept(layer, None) for layer in range(self.family.num_layers)], chunk.next_position)
        self.reference = None

    def _retrieval(self, append_to: TaskMemory | None) -> RetrievalIndex | None:
        """The retrieval index of the demonstrations just built (joined to `append_to`'s), or None without
        `retrieval_layer` or when `append_to` has none."""
        if self.retrieval_layer is None or (append_to is not None and append_to.retrieval is None):
            return None
        start = append_to.next_position if append_to is not None else 0
        index = self.model._retrieval_index(self.context, self.processor, self.retrieval_layer, start,
                                            with_prefix=append_to is None, batch_size=self.chunk_size)
        return append_to.retrieval.append(index) if append_to is not None else index

    def _arguments(self, append_to: TaskMemory | None) -> dict:
        """Everything that decides the memory's bytes: a checkpoint recorded under other arguments is not resumed."""
        import transformers

        method = {field.name: getattr(self.method, field.name) for field in dataclasses.fields(self.method)}
        base = self.model.model
        return {
            "demonstrations": {"count": len(self.context), "sha256": self.context.sha256()},
            "method": {"name": self.method.name, "params": method},
            "chunk_size": self.chunk_size,
            "pool_width": self.pool_width,
            "base_model": {"fingerprint": self.model.fingerprint(), "dtype": str(base.dtype), "device": base.device.type},
            "rendering": self.processor.rendering(),
            "append_to": append_to.digest() if append_to is not None else None,
            # another version of the code or of the libraries may decide or compute differently
            "software": {"emloc_sha256": _source_sha256(), "torch": torch.__version__, "transformers": transformers.__version__},
        }

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


def choice_priors(priors: list[dict], choice_lists: Sequence[Sequence[str]],
                  wheres: Sequence[str]) -> dict[tuple, list[float]]:
    """The log prior of each query's choices, looked up in `priors` (`estimate_choice_prior`'s entries) by the
    choices themselves; a query whose choices have none raises `ValueError` naming it (`wheres`, one per query)."""
    by_choices = {tuple(entry["choices"]): entry["log_prior"] for entry in priors}
    for choices, where in zip(choice_lists, wheres):
        if tuple(choices) not in by_choices:
            raise ValueError(f"{where}: no label prior for the choices {list(choices)}; priors cover "
                             f"{[list(c) for c in by_choices]}")
    return by_choices


def calibrated_scores(scores: Sequence[float], log_prior: Sequence[float]) -> list[float]:
    """Contextual calibration of one query's choice scores: its distribution over the choices (`scores`, summed
    log-probabilities `[num_choices]`, renormalised) divided by the context's label prior (`log_prior`, the same
    order), renormalised; returned as log-probabilities. The class the context favours whatever the question loses
    its head start."""
    log_p = torch.log_softmax(torch.tensor(scores, dtype=torch.float64), dim=-1)
    return torch.log_softmax(log_p - torch.tensor(log_prior, dtype=torch.float64), dim=-1).tolist()


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


class EmlocForConditionalGeneration(EmlocPreTrainedModel, GenerationMixin):
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
    >>> out = model.generate(**inputs, memory=memory, max_new_tokens=8)  # the query, then the answer
    >>> processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
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
        self._from_base = False  # `from_base` wrapped a base model (else: loaded from an Emloc repo)
        self.post_init()
        # generation follows the base model's defaults (eos, pad, sampling); a saved generation_config.json overrides
        if getattr(base_model, "generation_config", None) is not None:
            self.generation_config = copy.deepcopy(base_model.generation_config)

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
        model._from_base = True
        if getattr(base, "generation_config", None) is not None:
            model.generation_config = copy.deepcopy(base.generation_config)
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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: EmlocCache | None = None,
        memory: TaskMemory | str | None = None,
        select: float | None = None,
        retrieve: int | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Runs `input_ids` against a memory; what `generate` calls at every step.

        Args:
            input_ids: `[batch, seq]` queries as the processor returns them (left-padded), or the tokens fed since
                `past_key_values`.
            attention_mask: `[batch, seq]`, or `[batch, past + seq]` as `generate` extends it (its last `seq` columns
                are read).
            past_key_values: the `EmlocCache` returned by an earlier call: the tokens continue from it (the memory and
                the query are in it). None starts from `memory`.
            memory: a `TaskMemory`, the name of a loaded one, or None for the active memory; the base model alone if
                there is none (then pass `processor(..., add_template_prefix=True)` inputs for zero-shot answers in the
                full context's format). A list gives each row its own memory (see `generate`).
            select: per-query selection over the memory (see `generate`); fixed by the first pass, kept by the cache.
            retrieve: each query sees its `retrieve` nearest demonstrations only (see `generate`); fixed by the first
                pass, kept by the cache.
            pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts: the query's images
                and videos (vision-language bases); `mm_token_type_ids` and `token_types` are accepted and unused
                (the positions come from the model's own rope index).
            logits_to_keep: if > 0, logits of the last `logits_to_keep` positions only.
        Returns:
            `CausalLMOutputWithPast` with `logits` `[batch, seq | logits_to_keep, vocab]` and, unless
            `use_cache=False`, `past_key_values` (the `EmlocCache`).
        """
        if input_ids is None:
            raise ValueError("EmlocForConditionalGeneration.forward needs input_ids (inputs_embeds are not supported)")
        mask = attention_mask[:, -input_ids.shape[1]:] if attention_mask is not None else torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        # images belong to the pass that feeds their placeholder tokens; `generate` keeps the grids after the prefill
        if pixel_values is not None:
            inputs.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        if pixel_values_videos is not None:
            inputs.update(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                          second_per_grid_ts=second_per_grid_ts)
        if past_key_values is not None and not isinstance(past_key_values, EmlocCache):
            if past_key_values.get_seq_length() > 0:
                raise TypeError(f"past_key_values must be an EmlocCache returned by this model, got "
                                f"{type(past_key_values).__name__} holding tokens")
            past_key_values = None  # an empty cache made by a caller: start from the memory
        if past_key_values is None:
            logits, cache, _ = self._query_pass(self._resolve_memory(memory), inputs, select=select,
                                                logits_to_keep=logits_to_keep, retrieve=retrieve)
        else:
            cache = past_key_values
            segment = self._segment(inputs, start_position=cache.next_position)
            hidden, _ = run_layers(self.family, segment, cache)
            logits = self.family.logits(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache if use_cache is not False else None)

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

    def _prefill_chunk(self, memory: TaskMemory, chunk: EncodedSpan, in_place: bool = False) -> ChunkState:
        """Feeds a chunk (batch 1) on top of `memory`; returns its per-layer KV, positions and types.

        With `in_place` the chunk's keys and values are written after the memory in its growth buffers
        (`TaskMemory.scratch`) instead of a copy of the memory: they are views there, valid until the next write."""
        inputs = {"input_ids": chunk.input_ids[None], "attention_mask": torch.ones_like(chunk.input_ids)[None], **chunk.media}
        segment = self._segment(inputs, start_position=memory.next_position)
        length = chunk.input_ids.shape[0]
        if in_place:
            scratch = memory.scratch(length)
            prefix = [((), (), layer.positions) for layer in memory.layers]
            cache = EmlocCache(prefix, batch_size=1, scratch=scratch)
        else:
            cache = EmlocCache(memory_prefix(memory), batch_size=1, headroom=length)
        run_layers(self.family, segment, cache)
        keys, values = zip(*(cache.new_kv(layer) for layer in range(self.family.num_layers)))
        return ChunkState(
            keys=[k[0] for k in keys], values=[v[0] for v in values],
            positions=segment.text_positions[0], token_types=chunk.token_types.to(segment.hidden.device),
            next_position=int(segment.next_position[0]),
        )

    def _query_pass(self, memory: TaskMemory | None, inputs: dict, select: float | None = None,
                    logits_to_keep: int = 0, retrieve: int | None = None) -> tuple[torch.Tensor, EmlocCache, Segment]:
        """Prefills a batch of queries against one shared memory; returns logits `[batch, seq | logits_to_keep,
        vocab]`, the cache and the segment (for decoding on). `select` turns on per-query selection over the memory
        (`MemorySelector`), `retrieve` retrieval of each query's nearest demonstrations (`_retrieved_prefix`)."""
        if isinstance(memory, list) and (select is not None or retrieve is not None):
            raise ValueError("select= and retrieve= take one memory for the whole batch, not a memory per row")
        _, cache = self._memory_cache(memory, inputs["input_ids"].shape[0], inputs, retrieve)
        segment = self._segment(inputs, start_position=cache.next_position)
        hidden, _ = run_layers(self.family, segment, cache, selector=self._selector(select, cache, segment.valid))
        return self.family.logits(hidden[:, -logits_to_keep:] if logits_to_keep else hidden), cache, segment

    def _memory_cache(self, memory: TaskMemory | list[TaskMemory] | None, batch_size: int, queries: dict | None = None,
                      retrieve: int | None = None) -> tuple[TaskMemory | list[TaskMemory], EmlocCache]:
        """The memory (empty if None) on the model's device and dtype, and a cache of `batch_size` rows starting with it
        — with `retrieve`, each row of `queries` starting with its own view of it (`_retrieved_prefix`); with a list of
        memories, each row with its own memory (`rows_prefix`)."""
        if isinstance(memory, list):
            if len(memory) != batch_size:
                raise ValueError(f"a list of memories takes one per row: got {len(memory)} for {batch_size} rows")
            for each in memory:
                self._check_memory_fits(each)
            memories = [each.to(device=self.model.device, dtype=self.model.dtype) for each in memory]
            prefix, keep, start = rows_prefix(memories, family=self.family)
            cache = EmlocCache(prefix, batch_size=batch_size, start_position=start)
            cache.prefix_keep = keep
            return memories, cache
        memory = memory if memory is not None else self._empty_memory()
        self._check_memory_fits(memory)
        memory = memory.to(device=self.model.device, dtype=self.model.dtype)
        prefix, keep = memory_prefix(memory, family=self.family), None
        if retrieve is not None:
            prefix, keep = self._retrieved_prefix(memory, prefix, queries, retrieve)
        cache = EmlocCache(prefix, batch_size=batch_size, start_position=memory.next_position)
        if keep is not None:
            cache.prefix_keep = keep
        return memory, cache

    # -- retrieval inside the memory ------------------------------------------------------------------------------------

    def _retrieval_layer(self, layer: int | None) -> int:
        """`layer`, else the config's `retrieval_layer`, else half the decoder layers."""
        layer = layer if layer is not None else self.config.retrieval_layer
        layer = self.family.num_layers // 2 if layer is None else int(layer)
        if not 0 <= layer <= self.family.num_layers:
            raise ValueError(f"retrieval_layer must lie in [0, {self.family.num_layers}], got {layer}")
        return layer

    def _retrieval_keys(self, inputs: dict, layer: int) -> torch.Tensor:
        """Each row of `inputs` (a processor batch), run alone — no memory, positions from 0 — through the decoder
        layers below `layer` (none for 0: the input embeddings), mean-pooled over its real tokens: `[batch, hidden]`
        float32. Demonstrations (rendered as queries) and queries get their retrieval keys this one way."""
        inputs = {key: value for key, value in inputs.items() if key != "token_types"}
        segment = self._segment(inputs, start_position=0)
        hidden = segment.hidden
        if layer > 0:
            cache = EmlocCache(memory_prefix(self._empty_memory(), family=self.family), hidden.shape[0])
            hidden, _ = run_layers(self.family, segment, cache, stop=min(layer, self.family.num_layers))
        valid = segment.valid[..., None].to(hidden.device, hidden.dtype)
        return ((hidden * valid).sum(1) / valid.sum(1).clamp(min=1)).float()

    @torch.no_grad()
    def _retrieval_index(self, context, processor: EmlocProcessor, layer: int, start_position: int,
                         with_prefix: bool, batch_size: int = 8) -> RetrievalIndex:
        """Where each demonstration of `context` sits once its tokens follow `start_position` (after the template
        prefix when `with_prefix`), and its key (`_retrieval_keys` of the demonstration rendered as a query)."""
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
            keys.append(self._retrieval_keys(batch, layer).cpu())
        return RetrievalIndex(torch.tensor(starts, dtype=torch.long), torch.tensor(ends, dtype=torch.long),
                              torch.cat(keys) if keys else torch.zeros(0, self.config.text_config.hidden_size), int(layer))

    def _retrieved_prefix(self, memory: TaskMemory, prefix: list, queries: dict, retrieve: int) -> tuple[list, list]:
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
        chosen = index.nearest(self._retrieval_keys(queries, index.layer), retrieve)
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

    @torch.no_grad()
    def index_memory(self, memory: TaskMemory, demos, processor: EmlocProcessor, retrieval_layer: int | None = None) -> TaskMemory:
        """Gives `memory` a retrieval index (for `retrieve=`): where each of `demos` sits and its key. For memories
        without one — saved in memory format 1, or made by another tool (kvpress presses) from the same
        demonstrations rendered by `processor`. `build_memory` does this itself. Returns `memory`."""
        check_rendering(memory.stats, processor.rendering())
        layer = self._retrieval_layer(retrieval_layer)
        context = processor.stream_context(demos, cache_size=2 * self.config.chunk_size)
        index = self._retrieval_index(context, processor, layer, 0, with_prefix=True, batch_size=self.config.chunk_size)
        end = int(index.ends[-1]) if index.num_demos else 0
        if end != memory.next_position:
            raise ValueError(f"these {index.num_demos} demonstrations end at position {end}, the memory at "
                             f"{memory.next_position}: it was not made from them")
        memory.retrieval = index
        return memory

    def _selector(self, select: float | None, cache: EmlocCache, valid: torch.Tensor) -> MemorySelector | None:
        """`MemorySelector` for `select=` (None or 1.0: the whole memory); `valid` `[batch, seq]` marks the positions
        whose attention chooses."""
        if select is not None and not 0 < select:
            raise ValueError(f"select must be a fraction in (0, 1] or a token count, got {select}")
        if select is None or select == 1.0:
            return None
        return MemorySelector(float(select), cache, valid, self.config.pool_width)

    def _prefix_memory(self, processor: EmlocProcessor) -> TaskMemory:
        """The template prefix alone as a memory (zero-shot answering)."""
        prefix = processor.encode_prefix()
        memory = self._empty_memory()
        if len(prefix) == 0:
            return memory
        chunk = self._prefill_chunk(memory, prefix)
        return TaskMemory([layer.append(chunk.kept(i, None)) for i, layer in enumerate(memory.layers)], chunk.next_position)

    def _resolve_memory(self, memory: TaskMemory | str | list | None) -> TaskMemory | list[TaskMemory] | None:
        if isinstance(memory, (list, tuple)):  # one per row
            if not memory or any(each is None for each in memory):
                raise ValueError("memory= as a list takes a memory (or a loaded memory's name) for every row")
            return [self._resolve_memory(each) for each in memory]
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
    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, memory: TaskMemory | str | None = None,
                 select: float | None = None, processor: EmlocProcessor | None = None, retrieve: int | None = None,
                 **kwargs):
        """transformers' `GenerationMixin.generate`, answering from a task memory.

        Every `GenerationConfig` field and `generate` argument works as for any causal LM (`max_new_tokens`,
        `do_sample`, `top_p`, `num_beams`, `num_return_sequences`, `streamer`, `logits_processor`,
        `stopping_criteria`, `return_dict_in_generate`, `output_scores`, ...). The memory rides in the model's cache
        (`EmlocCache`): the first pass puts the queries after it, with positions continuing from its `next_position`,
        and transformers' loop decodes, reorders beams and stops as usual.

        Args:
            input_ids / attention_mask (keywords): `[batch, seq]` queries as the processor returns them (left-padded,
                rendered as they follow the demonstrations), plus their images (`pixel_values`, `image_grid_thw`) for
                vision-language bases.
            memory: a `TaskMemory`, the name of a loaded one, or None for the active memory (`set_memory`); with no
                memory at all, the base model's plain zero-shot generation on `input_ids`. A list (one memory or name
                per row) answers each row from its own memory in the same passes, exactly as alone (`rows_prefix`;
                not with `select` or `retrieve`).
            select: per-query selection over the memory: keep, per layer and KV head, the fraction (or, if > 1, the
                number) of memory tokens each query attends to most, and answer with that subset (`MemorySelector`).
                The stored memory is unchanged; `select=1.0` (or None) uses all of it.
            retrieve: retrieval inside the memory: each query attends, in every layer, only to the template prefix and
                the kept tokens of its `retrieve` nearest demonstrations (by the memory's `RetrievalIndex`: its key,
                made from the query's own tokens as the demonstrations' were, against theirs), at no extra prefill.
                Combines with `select` (selection within the retrieved tokens); needs a memory with a retrieval index.
            processor: the `EmlocProcessor` that rendered the queries. Given it, a memory whose demonstrations were
                rendered otherwise is refused (`MemoryLoadError` naming the difference), and a row that starts with
                the template prefix (a system turn, BOS: what a chat template or a tokenizer puts in front of a whole
                conversation) has it masked out, since the memory already holds it — so prompts rendered by
                `tokenizer.apply_chat_template` or a pipeline answer exactly as the processor's queries do.
        Returns:
            What transformers returns for the same call: token ids `[batch * num_return_sequences, seq + new]`, the
            prompt (`input_ids`, padding included) followed by the generated tokens — the memory is not part of
            them; new tokens only: `out[:, inputs["input_ids"].shape[1]:]` — or a `GenerateDecoderOnlyOutput` /
            `GenerateBeamDecoderOnlyOutput` with `return_dict_in_generate=True`.
        """
        memory = self._resolve_memory(memory)
        kwargs.pop("token_types", None)  # the processor's span types: the memory builder's, not the model's
        if processor is not None and memory is not None:
            for each in memory if isinstance(memory, list) else [memory]:
                check_rendering(each.stats, processor.rendering())
            input_ids = kwargs.get("input_ids", inputs)
            if input_ids is not None:
                kwargs["attention_mask"] = _mask_template_prefix(input_ids, kwargs.get("attention_mask"), processor)
        return super().generate(inputs, generation_config, memory=memory, select=select, retrieve=retrieve, **kwargs)

    def adjust_generation_fn(self, *args, **kwargs):
        """Loads the repo's `generation_config.json` as any model does. Without one (an Emloc repo saved before it was
        written), transformers would derive a config from ours, which holds no special tokens; the base model's
        defaults (eos, pad, bos) apply instead."""
        super().adjust_generation_fn(*args, **kwargs)
        base = getattr(self.model, "generation_config", None)
        if base is not None and self.generation_config.eos_token_id is None \
                and getattr(self.generation_config, "_from_model_config", False):
            self.generation_config = copy.deepcopy(base)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """No cache before the first pass: that pass builds the `EmlocCache` from the memory, for the rows `generate`
        has expanded (beams, `num_return_sequences`). A cache given by the caller must be one this model returned."""
        cache = model_kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, EmlocCache):
            raise TypeError(f"past_key_values must be an EmlocCache returned by this model, got {type(cache).__name__}")
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported: an Emloc model "
                f"keeps its memory in its own cache (EmlocCache); leave cache_implementation unset"
            )
        if cache is not None:
            cache._is_user_defined = True

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """Repeats every row `expand_size` times (beams, `num_return_sequences`). Images and videos are not per row
        (`pixel_values` is `[patches, dim]`, `image_grid_thw` `[images, 3]`), so each row's own are repeated with it."""
        media = {key: model_kwargs.pop(key) for key in _MEDIA_KEYS if model_kwargs.get(key) is not None}
        if isinstance(model_kwargs.get("memory"), list):  # a memory per row: each copy of a row keeps its memory
            model_kwargs["memory"] = [each for each in model_kwargs["memory"] for _ in range(expand_size)]
        if media and expand_size > 1 and input_ids is not None:
            media = self.family.repeat_media(input_ids, media, expand_size)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        model_kwargs.update(media)
        return input_ids, model_kwargs

    # -- scoring --------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score_choices(self, queries, memory: TaskMemory | str | None = None, processor: EmlocProcessor | None = None,
                      history=None, select: float | None = None, batch_size: int = 8,
                      retrieve: int | None = None, calibrate: bool | list[dict] = False) -> list[list[float]]:
        """Per query, the summed log-probability of each of its `choices` as the start of the assistant reply.

        `tokenizer(choice, add_special_tokens=False)` is scored after the query's generation prompt. Queries go in
        batches of `batch_size` (left-padded); each batch is one pass against the memory, every multi-token choice
        riding behind its query as a branch that sees the query and itself only — the same numbers as one query at a
        time. A memory whose demonstrations were rendered otherwise than `processor` renders the queries is refused
        (`MemoryLoadError`). `select` and `retrieve` as in `generate`.

        `calibrate=True` divides out the label prior the memory recorded when it was built (`calibration_rows` of
        `build_memory`): each query's scores become its calibrated log-probabilities over its choices
        (`calibrated_scores`). A list of priors (`estimate_choice_prior`) calibrates with those instead, e.g. for
        zero-shot answering or a memory built elsewhere. A query whose choices have no prior raises `ValueError`.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        memory = self._memory_for(memory, processor, "score_choices")
        examples = load_examples(queries, require_answer=False)
        for query in examples:
            if not query.choices:
                raise ValueError(f"{query.where}: score_choices needs 'choices' on every query")
        priors = None
        if calibrate is not False:  # looked up before any work, so that a missing prior fails at once
            priors = choice_priors(self._calibration_priors(memory, calibrate), [query.choices for query in examples],
                                   [query.where for query in examples])
        history_examples = load_examples(history) if history is not None else None
        results = self._score_examples(examples, memory, processor, history_examples, select, batch_size, retrieve)
        if priors is not None:
            results = [calibrated_scores(scores, priors[tuple(query.choices)]) for scores, query in zip(results, examples)]
        return results

    def _score_examples(self, examples: list[Example], memory: TaskMemory | None, processor: EmlocProcessor,
                        history_examples: list[Example] | None = None, select: float | None = None,
                        batch_size: int = 8, retrieve: int | None = None) -> list[list[float]]:
        """`score_choices` on parsed examples (their `choices`; an answer, if any, is not used)."""
        if memory is None:  # zero-shot: the query follows the template prefix, as it would in a full context
            memory = self._prefix_memory(processor)
        results = []
        for begin in range(0, len(examples), batch_size):
            part = examples[begin:begin + batch_size]
            batch = processor.collate([processor.encode_query(query, history_examples) for query in part])
            choices = [[processor.encode_choice(choice) for choice in query.choices] for query in part]
            results += self._score_continuations(memory, batch, choices, select, retrieve)
        return results

    # -- calibration ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def estimate_choice_prior(self, demos, memory: TaskMemory | str | None = None,
                              processor: EmlocProcessor | None = None, rows: int = 16) -> list[dict]:
        """The label prior a memory (None: zero-shot) puts on each set of choices among `demos`.

        A context biases a small model towards some answers whatever the question (contextual calibration: Zhao et
        al., 2021; Zhou et al., 2024). A compressed memory can carry a stronger bias than the full context: on the
        benchmark a default memory that answered one class to all 240 queries (0.500) scored 0.738 once its bias was
        divided out (README, "Calibrated answers"). The prior is estimated on inputs of the task itself: the
        questions of up to `rows` demonstrations per set of choices, spread evenly over `demos`, asked of the memory
        as queries (their answers are not used). It is the mean of their distributions over the choices.

        Returns one entry per distinct `choices` list: `{"choices": [...], "log_prior": [...], "rows": n}`, the form
        `score_choices(calibrate=...)` and `memory.stats["calibration"]["priors"]` take.
        """
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be a positive integer, got {rows!r}")
        memory = self._memory_for(memory, processor, "estimate_choice_prior")
        examples = load_examples(demos, require_answer=False, decode=False)
        groups: dict[tuple, list[Example]] = {}
        for example in examples:
            if example.choices:
                groups.setdefault(tuple(example.choices), []).append(example)
        priors = []
        for choices, group in groups.items():
            count = min(rows, len(group))
            asked = [decode_media(group[round(i * (len(group) - 1) / max(1, count - 1))]) for i in range(count)]
            scores = torch.tensor(self._score_examples(asked, memory, processor), dtype=torch.float64)
            mean = torch.log_softmax(scores, dim=-1).exp().mean(0)
            priors.append({"choices": list(choices), "log_prior": [round(x, 9) for x in mean.log().tolist()],
                           "rows": len(asked)})
        return priors

    def _memory_for(self, memory: TaskMemory | str | None, processor: EmlocProcessor | None,
                    caller: str) -> TaskMemory | None:
        """The memory (a name: the loaded one; None: the active one, if any) that queries rendered by `processor` are
        asked of; refuses a missing processor, or a memory rendered otherwise (`MemoryLoadError`)."""
        if processor is None:
            raise ValueError(f"{caller} needs the processor")
        if isinstance(memory, (list, tuple)):
            raise ValueError(f"{caller} takes one memory; a list of memories (one per row) is for generate and forward")
        memory = self._resolve_memory(memory)
        if memory is not None:
            check_rendering(memory.stats, processor.rendering())
        return memory

    def _calibration_priors(self, memory: TaskMemory | None, calibrate: bool | list[dict]) -> list[dict]:
        """The priors of `score_choices(calibrate=...)` (`memory` resolved): given, or recorded in the memory."""
        if calibrate is True:
            recorded = None if memory is None else memory.stats.get("calibration")
            if recorded is None:
                raise ValueError("score_choices(calibrate=True): the memory records no label prior; build it with "
                                 "calibration_rows > 0 from demonstrations with 'choices', or pass "
                                 "calibrate=model.estimate_choice_prior(demos, memory, processor)")
            calibrate = recorded["priors"]
        if not isinstance(calibrate, list):
            raise ValueError(f"calibrate must be False, True or a list of priors, got {type(calibrate).__name__}")
        return calibrate

    def _score_continuations(self, memory: TaskMemory, batch: dict, choices: list[list[torch.Tensor]],
                             select: float | None, retrieve: int | None = None) -> list[list[float]]:
        """One pass for a batch of queries (`batch`, left-padded) and all their choices.

        Each query is followed by every choice of more than one token without its last token, each as a branch
        `b = 1, 2, …` at the positions right after the query that sees the query and itself only: the query's last
        token predicts every choice's first token, the branch tokens the rest. The queries are packed into one row, each
        attending to its own tokens only (`segments`), so the memory is copied and read once per batch rather than
        once per query. With `select` or `retrieve`, each query has its own view of the memory (chosen by its own
        tokens' attention, `MemorySelector`, or by its nearest demonstrations): one row per query, padded at the end.
        """
        batch = {key: value for key, value in batch.items() if key != "token_types"}
        device = self.model.device
        query = self._segment(batch, start_position=memory.next_position)
        three_d = query.rope_positions.dim() == 3
        pieces = []  # per query: hidden [n, hidden], rope [n] | [3, n], text [n], branches [n], query length
        for row, row_choices in enumerate(choices):
            mine = query.valid[row]
            tails = [choice[:-1].to(device) for choice in row_choices if len(choice) > 1]
            tokens = torch.cat(tails) if tails else torch.zeros(0, dtype=torch.long, device=device)
            branches = torch.cat([torch.full((len(t),), b, device=device) for b, t in enumerate(tails, 1)]) \
                if tails else tokens.clone()
            offsets = torch.cat([torch.arange(len(t), device=device) for t in tails]) if tails else tokens.clone()
            positions = query.next_position[row] + offsets
            length = int(mine.sum())
            pieces.append((
                torch.cat([query.hidden[row, mine], self.family.decoder.embed_tokens(tokens).to(query.hidden)]),
                torch.cat([query.rope_positions[..., row, mine], positions.expand(3, -1) if three_d else positions], dim=-1),
                torch.cat([query.text_positions[row, mine], positions]),
                torch.cat([torch.zeros(length, dtype=torch.long, device=device), branches]),
                length,
            ))
        if select is None and retrieve is None:  # packed: one row
            starts = [0]
            for piece in pieces:
                starts.append(starts[-1] + piece[0].shape[0])
            segment = Segment(
                hidden=torch.cat([p[0] for p in pieces])[None],
                rope_positions=torch.cat([p[1] for p in pieces], dim=-1)[..., None, :],
                text_positions=torch.cat([p[2] for p in pieces])[None],
                valid=torch.ones(1, starts[-1], dtype=torch.bool, device=device),
                branches=torch.cat([p[3] for p in pieces])[None],
                segments=torch.cat([torch.full((p[0].shape[0],), i, device=device) for i, p in enumerate(pieces)])[None],
            )
            rows = [(0, start) for start in starts[:-1]]
            chooser = None
        else:  # a row per query, padded at the end
            width = max(p[0].shape[0] for p in pieces)
            pad = [width - p[0].shape[0] for p in pieces]
            segment = Segment(
                hidden=torch.stack([F.pad(p[0], (0, 0, 0, n)) for p, n in zip(pieces, pad)]),
                rope_positions=torch.stack([F.pad(p[1], (0, n)) for p, n in zip(pieces, pad)], dim=-2),
                text_positions=torch.stack([F.pad(p[2], (0, n)) for p, n in zip(pieces, pad)]),
                valid=torch.arange(width, device=device)[None] < torch.tensor([p[0].shape[0] for p in pieces], device=device)[:, None],
                branches=torch.stack([F.pad(p[3], (0, n)) for p, n in zip(pieces, pad)]),
            )
            rows = [(row, 0) for row in range(len(pieces))]
            chooser = torch.arange(width, device=device)[None] < torch.tensor([p[4] for p in pieces], device=device)[:, None]
        # with `retrieve` the layout has one row per query, so the queries' rows are the cache's
        memory, cache = self._memory_cache(memory, segment.hidden.shape[0], batch, retrieve)
        selector = self._selector(select, cache, chooser) if chooser is not None else None
        hidden, _ = run_layers(self.family, segment, cache, selector=selector)
        # read out, per query, its last token (predicting every first token) and its branch tokens
        index = [(row, start + piece[4] - 1 + k) for (row, start), piece in zip(rows, pieces)
                 for k in range(piece[0].shape[0] - piece[4] + 1)]
        picked = hidden[torch.tensor([r for r, _ in index], device=hidden.device), torch.tensor([c for _, c in index], device=hidden.device)]
        log_probs = torch.log_softmax(self.family.logits(picked).float(), dim=-1)
        results, at_query = [], 0
        for piece, row_choices in zip(pieces, choices):
            own = log_probs[at_query:at_query + piece[0].shape[0] - piece[4] + 1]  # [1 + tail tokens, vocab]
            at_query += own.shape[0]
            scores, at = [], 0
            for choice in row_choices:
                if len(choice) == 0:
                    scores.append(0.0)
                    continue
                score = own[0, choice[0]]
                if len(choice) > 1:  # token k of the choice is predicted at tail column at + k - 1, row 1 + that of `own`
                    steps = torch.arange(at + 1, at + len(choice), device=own.device)
                    score = score + own[steps, choice[1:].to(own.device)].sum()
                    at += len(choice) - 1
                scores.append(float(score))
            results.append(scores)
        return results

    # -- building memories ----------------------------------------------------------------------------------------------

    def build_memory(self, demos, processor: EmlocProcessor, method: str | None = None, chunk_size: int | None = None,
                     append_to: TaskMemory | None = None, progress: bool = False, validate: int = 0,
                     checkpoint_dir: str | os.PathLike | None = None, retrieval: bool = True,
                     retrieval_layer: int | None = None, drop_unreadable: bool = True, calibration_rows: int = 16,
                     **method_params) -> TaskMemory:
        """Compresses demonstrations into a task memory.

        Args:
            demos: a JSONL path or a list of demonstration dicts (design §6).
            processor: the model's `EmlocProcessor`.
            method: a registered compression method (`COMPRESSION_METHODS`). Default: the config's `method`,
                `"emloc-query"` — the paper's rule with the repairs the benchmark chose (README, "Why this default").
                `"emloc"` is the paper's rule exactly (with the config's `delta`, `ratios`, `probe`), `"full"` keeps
                everything, `"random"` is the baseline.
            chunk_size: demonstrations per chunk (default: the config's, 4).
            append_to: an existing memory to extend with new chunks instead of building from scratch.
            progress: show a progress bar over chunks, or a callable `progress(chunks_done, chunks_total)` called after
                each chunk.
            validate: after the build, measure the mean JS between this memory and the uncompressed context on this
                many demonstrations (one per row) and record it as `stats["validation"]` (costs one full prefill).
            checkpoint_dir: record each completed chunk in this directory (crash-safe), so that a build stopped at any
                moment continues there when rerun with the same arguments, to the same memory bytes. A directory
                holding another build (other demonstrations, method, parameters, chunk size, base model, rendering or
                code) is refused with the differences named (`CheckpointError`); delete it to start over. It is kept
                after the build (a rerun returns the memory at once) until you delete it.
            retrieval: record a retrieval index (where each demonstration sits, and its key), for answering with
                `retrieve=k`; it costs one pass of each demonstration, alone, below `retrieval_layer`.
            retrieval_layer: the layer whose entering hidden state keys each demonstration (default: the config's,
                half the decoder layers; 0 = the input embeddings, which cost no pass).
            drop_unreadable: at the end of the build, drop from each sliding-window layer the tokens that no query can
                read (`TaskMemory.drop_unreadable`): every answer stays the same and the memory is smaller (Gemma 3:
                five layers in six see only the last 512 tokens). False keeps them, as builds before this option did.
                No effect on models without sliding windows. The kept share (`totals.kept_ratio`) counts only what a
                query can read, of what the full context gives it, so it is the same either way.
            calibration_rows: after the build, record the memory's label prior over each set of `choices` among the
                demonstrations, estimated from this many of their questions (`estimate_choice_prior`; answers unused),
                as `stats["calibration"]`; `score_choices(..., calibrate=True)` divides it out. It costs as many
                scored queries. 0 records none; demonstrations without `choices` give none. With `append_to`, the
                prior is estimated anew from the demonstrations given here.
            **method_params: the method's parameters, e.g. `delta=0.005, ratios=(0.1, 0.2, 0.5), probe="self"`.
        """
        method = method or self.config.method
        if method not in COMPRESSION_METHODS:
            raise ValueError(f"unknown method {method!r}; available: {sorted(COMPRESSION_METHODS)}")
        method_cls = COMPRESSION_METHODS[method]
        accepted = {f.name for f in method_cls.__dataclass_fields__.values()}
        unknown = set(method_params) - accepted
        if unknown:
            raise TypeError(f"method {method!r} does not take {sorted(unknown)}; it takes {sorted(accepted)}")
        # the config's delta / ratios / probe are the paper rule's settings; other methods bring their own defaults
        defaults = {"delta": self.config.delta, "ratios": tuple(self.config.ratios), "probe": self.config.probe} \
            if method == EmlocMethod.name else {}
        params = {**{k: v for k, v in defaults.items() if k in accepted}, **method_params}
        if append_to is not None:
            self._check_memory_fits(append_to)
            check_rendering(append_to.stats, processor.rendering())
        builder = MemoryBuilder(self, processor, method_cls(**params), chunk_size or self.config.chunk_size,
                                self.config.pool_width, progress=progress, validate=validate, checkpoint_dir=checkpoint_dir,
                                retrieval_layer=self._retrieval_layer(retrieval_layer) if retrieval else None,
                                drop_unreadable=drop_unreadable)
        if not isinstance(calibration_rows, int) or calibration_rows < 0:
            raise ValueError(f"calibration_rows must be a non-negative integer, got {calibration_rows!r}")
        memory = builder.build(demos, append_to=append_to)
        memory.stats["rendering"] = processor.rendering()  # queries must be rendered the same way (design §7)
        if calibration_rows:
            priors = self.estimate_choice_prior(demos, memory, processor, rows=calibration_rows)
            if priors:
                memory.stats["calibration"] = {"rows": calibration_rows, "priors": priors}
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
        # the kept share counts what a query can read, of what the full context gives it: in a sliding-window layer
        # only the last window of the context (`MemoryLayer.readable`), whether or not the rest was dropped
        share = readable_share(memory, layers, family.sliding_windows, bytes_per_token)
        return {
            "base_model": self._base_model_record(),
            "method": {"name": method.name, "params": {**method.params(), "chunk_size": chunk_size}},
            "num_demos": num_demos + ((previous or {}).get("num_demos", 0)),
            "totals": {
                "full_tokens": full_tokens, "kept_tokens": round(kept_tokens, 2),
                "full_kv_bytes": full_kv_bytes, "kept_kv_bytes": kept_kv_bytes, **share,
            },
            "token_types": {name: {"full": full_by_type[name], "kept": round(kept_by_type[name] / max(1, len(layers)), 2)}
                            for name in TOKEN_TYPE_NAMES.values()},
            "layers": layers,
            "build": {"seconds": round(seconds + ((previous or {}).get("build", {}).get("seconds", 0.0)), 3),
                      "chunks": ((previous or {}).get("build", {}).get("chunks", [])) + chunk_stats},
        }

    def _base_model_record(self) -> dict:
        """`memory_config.json`'s `base_model`: the fingerprint, and how a Hub user gets this model back —
        `name_or_path` (a Hub id; None when the model was loaded from a local directory, whose path means nothing
        elsewhere and is never written into a memory) and `emloc_repo` (True: an Emloc repo, loaded with
        `AutoModel.from_pretrained(..., trust_remote_code=True)`; False: a base model, wrapped with `from_base`)."""
        name = self.config.name_or_path or getattr(self.model.config, "_name_or_path", "")
        return {"name_or_path": hub_name(name), "emloc_repo": not self._from_base, "fingerprint": self.fingerprint()}

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
        """Pushes a memory to a Hub repo like an adapter: `memory.safetensors`, `memory_config.json`, `README.md` (a card
        with the code that loads it from `repo_id`); returns the commit URL. See `memory_emloc.push_memory_to_hub`."""
        memory = self._resolve_memory(memory)
        if memory is None:
            raise ValueError("no memory given and none is active")
        return push_memory_to_hub(memory, repo_id, private=private, commit_message=commit_message, revision=revision,
                                  token=token, create_pr=create_pr)


# what `generate` must hand to the first pass only, and repeat per row rather than per tensor row
_MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def _mask_template_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          processor: EmlocProcessor) -> torch.Tensor:
    """`attention_mask` `[batch, seq]` with the template prefix (`processor.encode_prefix()`) masked out of every row
    whose first real token starts it: a memory already holds that prefix, so a prompt rendered as a whole
    conversation (a chat template's system turn, a tokenizer's BOS) reads as the processor's query does."""
    mask = attention_mask.clone() if attention_mask is not None else torch.ones_like(input_ids)
    prefix = processor.encode_prefix().input_ids.to(input_ids.device)
    length = prefix.shape[0]
    if length == 0:
        return mask
    for row in range(input_ids.shape[0]):
        real = mask[row].nonzero().flatten()
        if len(real) < length:
            continue
        first = int(real[0])
        window = slice(first, first + length)
        if bool(mask[row, window].all()) and torch.equal(input_ids[row, window], prefix):
            mask[row, window] = 0
    return mask


__all__ = [
    "EmlocForConditionalGeneration",
    "EmlocPreTrainedModel",
    "EmlocCache",
    "TaskMemory",
    "COMPRESSION_METHODS",
    "js_divergence",
]
