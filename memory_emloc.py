# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
The task memory: per layer, the kept keys and values of a demonstration context with their original positions.

Each KV head keeps its own tokens (equal counts inside a layer); layers may keep different counts. Keys keep the RoPE
they were computed with, so pruned tokens just leave gaps in position space (EMLoC, §3.2). On disk a memory is a
directory like a PEFT adapter: `memory.safetensors`, `memory_config.json` and a `README.md` card (design §7). While it
is built, a memory grows in place (`TaskMemory.extend`) and the build can be recorded chunk by chunk on disk, to be
resumed after a crash (`BuildCheckpoint`).
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


MEMORY_WEIGHTS_NAME = "memory.safetensors"
MEMORY_CONFIG_NAME = "memory_config.json"
MEMORY_CARD_NAME = "README.md"
FORMAT_VERSION = 2  # 2: a retrieval index per memory (`RetrievalIndex`); 1 still loads, without one
READABLE_VERSIONS = (1, 2)
TOKEN_TYPE_NAMES = ("template", "text", "image", "answer", "video")  # indexed by rendering_emloc's token type ids


class MemoryLoadError(ValueError):
    """A memory cannot be used: wrong base model, unknown format, truncated or missing files, wrong shapes, or
    demonstrations rendered otherwise than the processor renders queries."""


def check_rendering(stats: dict, rendering: dict) -> None:
    """Raises `MemoryLoadError` unless a memory (its `stats`, i.e. `memory_config.json`) was rendered and tokenised
    the way a processor renders (`rendering`, from `EmlocProcessor.rendering()`), naming every field that differs.

    A query rendered otherwise than the demonstrations in the memory (another template, instruction, chat template,
    tokenizer, or image and video sampling) is answered silently wrong, so the mismatch is refused rather than warned
    about. Nested settings are named by their path (`vision.video.fps`). A memory built before emloc recorded the
    vision processors' sampling (no `vision` entry) is not checked for it.
    """
    recorded = stats.get("rendering") or {}
    if not recorded.get("tokenization"):
        raise MemoryLoadError(
            "memory records no tokenization: it was built with per-segment tokenisation by an older emloc, whose tokens "
            "can differ from the model's tokenisation of the whole text; rebuild it with build_memory"
        )
    checked = [key for key in rendering if key != "vision" or "vision" in recorded]
    found = [entry for key in checked for entry in differing(recorded.get(key), rendering[key], key)]
    if found:
        raise MemoryLoadError(
            "memory was rendered with " + ", ".join(f"{key}={then!r}" for key, then, _ in found)
            + "; this processor renders " + ", ".join(f"{key}={now!r}" for key, _, now in found)
        )


def differing(recorded: Any, current: Any, where: str = "") -> list[tuple[str, Any, Any]]:
    """`(dotted key, recorded value, current value)` for every key whose value differs, nested dicts walked."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(recorded) | set(current), key=str):
            found += differing(recorded.get(key), current.get(key), f"{where}.{key}" if where else str(key))
        return found
    return [] if recorded == current else [(where, recorded, current)]


def config_sliding_windows(text_config) -> list[int | None]:
    """Per decoder layer of a text config, its sliding window, None for a global layer. Declared `layer_types` decide
    (Gemma 3, and Qwen2, whose layers below `max_window_layers` stay global); without them a `use_sliding_window`
    config slides in every layer (Mistral-style)."""
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    slides = bool(getattr(text_config, "use_sliding_window", False) and window)
    return [window if slides else None] * text_config.num_hidden_layers


def readable_context_tokens(full_tokens: int, window: int | None) -> int:
    """How many tokens of a context of `full_tokens` tokens, one position each and ending where the queries start, a
    query can read in a layer with a sliding `window` (`MemoryLayer.readable`); all of them without a window."""
    return full_tokens if window is None else min(full_tokens, window - 1)


def readable_share(memory: "TaskMemory", layer_stats: list[dict], windows: list[int | None],
                   bytes_per_token: int) -> dict:
    """The totals of a memory's kept share (`memory_config.json`): what a query can read of the memory over what it
    can read of the full context. Adds to each windowed layer's entry of `layer_stats` (`{"full": ..., "kept": ...}`)
    its `readable` context tokens and `kept_readable` memory tokens; returns `readable_kv_bytes` and `kept_ratio`."""
    readable_kept = memory.readable_tokens(windows)
    for entry, window, kept_readable in zip(layer_stats, windows, readable_kept):
        if window is not None:
            entry.update(readable=readable_context_tokens(entry["full"], window), kept_readable=round(kept_readable, 2))
    readable_kv_bytes = sum(entry.get("readable", entry["full"]) for entry in layer_stats) * bytes_per_token
    kept_readable_bytes = round(sum(readable_kept) * bytes_per_token)
    return {"readable_kv_bytes": readable_kv_bytes,
            "kept_ratio": round(kept_readable_bytes / readable_kv_bytes, 6) if readable_kv_bytes else 0.0}


@functools.lru_cache(maxsize=None)
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None


def release_freed_memory() -> None:
    """Hands back to the operating system what freed tensors left in the C allocator's heap (glibc's `malloc_trim`; a
    no-op elsewhere). glibc keeps freed blocks below its mmap threshold for reuse and returns only the top of the heap:
    without this, a build's resident memory would keep every buffer its growing memory outgrew and the holes of every
    chunk's working state."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass
class MemoryLayer:
    """One layer of a task memory.

    Attributes:
        keys: `[num_kv_heads, tokens, head_dim]`, RoPE already applied.
        values: `[num_kv_heads, tokens, head_dim]`.
        positions: `[num_kv_heads, tokens]` text position of each kept token (the temporal M-RoPE axis for
            vision-language models); used by sliding-window masks and statistics.
        token_types: `[num_kv_heads, tokens]` template / text / image / answer, for statistics.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    token_types: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The layer's tensors by field name; each has the token axis at dim 1."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def readable(self, next_position: int, window: int | None) -> torch.Tensor:
        """`[num_kv_heads, tokens]` bool: the tokens a query can read. A query starts at `next_position` and only
        moves on, and in a layer with a sliding `window` a token at position `q` reads the positions `> q - window`:
        a token at or before `next_position - window` is masked for every query, every generated token and every chunk
        appended later. Without a window every token is readable."""
        if window is None:
            return torch.ones_like(self.positions, dtype=torch.bool)
        return self.positions > next_position - window

    def append(self, other: "MemoryLayer") -> "MemoryLayer":
        return MemoryLayer(
            keys=torch.cat([self.keys, other.keys], dim=1),
            values=torch.cat([self.values, other.values], dim=1),
            positions=torch.cat([self.positions, other.positions], dim=1),
            token_types=torch.cat([self.token_types, other.token_types], dim=1),
        )


@dataclass
class RetrievalIndex:
    """What a memory needs to let each query attend to its nearest demonstrations only (`retrieve=k`).

    A kept token belongs to the demonstration whose position range holds its position (every memory records its
    tokens' positions, so this holds for any method that made it); tokens outside every range (the template prefix)
    belong to none and stay visible. Each demonstration has a key: its rendering as a query, run alone through the
    decoder layers below `layer` (0: the input embeddings), averaged over its tokens. A query's key is made the same
    way; similarity is the cosine after subtracting the demonstrations' mean key (what every rendering shares).

    Attributes:
        starts / ends: `[num_demos]` long, each demonstration's text positions `[start, end)` in the context.
        keys: `[num_demos, hidden]` float32 pooled hidden states (not centred or normalised).
        layer: the decoder layer the keys enter (0 = embeddings).
    """

    starts: torch.Tensor
    ends: torch.Tensor
    keys: torch.Tensor
    layer: int

    @property
    def num_demos(self) -> int:
        return self.starts.shape[0]

    def append(self, other: "RetrievalIndex") -> "RetrievalIndex":
        if other.layer != self.layer:
            raise ValueError(f"cannot join retrieval keys of layer {self.layer} and layer {other.layer}")
        return RetrievalIndex(torch.cat([self.starts, other.starts]), torch.cat([self.ends, other.ends]),
                              torch.cat([self.keys, other.keys]), self.layer)

    def to(self, device) -> "RetrievalIndex":
        return RetrievalIndex(self.starts.to(device), self.ends.to(device), self.keys.to(device), self.layer)

    def nearest(self, query_keys: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """The `k` demonstrations most similar to each query: `query_keys [batch, hidden]` → `[batch, k]` indices.
        `exclude` (`[batch]`, -1 for none) names a demonstration a row may not retrieve: a demonstration asked as a
        query would otherwise find its own copy first."""
        center = self.keys.mean(0)
        demos = torch.nn.functional.normalize(self.keys - center, dim=-1)
        queries = torch.nn.functional.normalize(query_keys.float().to(demos.device) - center, dim=-1)
        similarity = queries @ demos.T
        if exclude is not None:
            exclude = torch.as_tensor(exclude, device=similarity.device).reshape(-1, 1)
            own = torch.arange(self.num_demos, device=similarity.device)[None] == exclude
            similarity = similarity.masked_fill(own, float("-inf"))
        available = self.num_demos - (0 if exclude is None else int((exclude >= 0).any()))
        return similarity.topk(max(1, min(int(k), available)), dim=-1).indices

    def demo_of(self, positions: torch.Tensor) -> torch.Tensor:
        """The demonstration holding each position (any shape), -1 where none does."""
        starts, ends = self.starts.to(positions.device), self.ends.to(positions.device)
        index = torch.searchsorted(starts, positions.contiguous(), right=True) - 1
        inside = (index >= 0) & (positions < ends[index.clamp(min=0)])
        return torch.where(inside, index, torch.full_like(index, -1))

    def visible(self, positions: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Which memory tokens (`positions [kv_heads, tokens]`) each query row sees, given its `chosen [batch, k]`
        demonstrations: bool `[batch, kv_heads, tokens]`, True for the chosen demonstrations' tokens and the tokens of
        none."""
        sees = torch.zeros(chosen.shape[0], self.num_demos + 1, dtype=torch.bool, device=positions.device)
        sees[:, -1] = True  # index -1: the template prefix
        sees.scatter_(1, chosen.to(positions.device), True)
        return sees[:, self.demo_of(positions)]


class TaskMemory:
    """A compressed demonstration context, reusable across queries.

    Args:
        layers: one `MemoryLayer` per decoder layer of the base model.
        next_position: the position the first query token takes (max position in the context + 1).
        stats: build statistics, the content of `memory_config.json`.
        retrieval: where each demonstration sits and its key (`retrieve=k` when answering), or None.
    """

    def __init__(self, layers: list[MemoryLayer], next_position: int, stats: dict | None = None,
                 retrieval: RetrievalIndex | None = None):
        self.layers = layers
        self.next_position = int(next_position)
        self.stats = stats if stats is not None else {}
        self.retrieval = retrieval
        # growth buffers of `extend`, per layer, and the views of them that `layers` holds (see `extend`)
        self._buffers: dict[int, MemoryLayer] = {}
        self._views: dict[int, MemoryLayer] = {}

    @classmethod
    def empty(cls, num_layers: int, num_kv_heads: int, head_dim: int, dtype=torch.float32, device="cpu") -> "TaskMemory":
        def layer():
            kv = torch.zeros(num_kv_heads, 0, head_dim, dtype=dtype, device=device)
            index = torch.zeros(num_kv_heads, 0, dtype=torch.long, device=device)
            return MemoryLayer(kv, kv.clone(), index, index.clone())

        return cls([layer() for _ in range(num_layers)], next_position=0)

    # -- growing while it is built ----------------------------------------------------------------------------------

    def extend(self, chunk: list[MemoryLayer], next_position: int) -> None:
        """Appends a chunk's kept tokens (one `MemoryLayer` per layer) in place and moves `next_position` on.

        Each layer lives in buffers with room to spare along the token axis whose capacity doubles when full, as a
        vector grows: a build of `n` chunks copies each kept token a bounded number of times on average, where
        concatenating per chunk would copy the whole memory `n` times. `layers` then holds views of the filled part —
        the same values `MemoryLayer.append` would give, not necessarily contiguous. A tensor handed out before is never
        written to (a chunk is written past its end, and growing moves to a new buffer), and a layer replaced from
        outside is copied into a new buffer rather than overwritten.
        """
        if len(chunk) != len(self.layers):
            raise ValueError(f"a chunk of {len(chunk)} layers cannot extend a memory of {len(self.layers)}")
        # a new list (whoever holds the old one keeps what it had), filled layer by layer: a layer that moves to a
        # larger buffer lets the old one go before the next layer grows
        self.layers = list(self.layers)
        before = dict(self._buffers)
        for index, new in enumerate(chunk):
            self.layers[index] = self._extend_layer(index, new)
        self.next_position = int(next_position)
        self._release_outgrown(before)

    def _extend_layer(self, index: int, new: MemoryLayer) -> MemoryLayer:
        filled = self.layers[index].num_tokens
        needed = filled + new.num_tokens
        buffer = self._buffer(index, needed)
        for name, tensor in buffer.tensors().items():
            tensor[:, filled:needed] = getattr(new, name)
        view = MemoryLayer(**{name: tensor[:, :needed] for name, tensor in buffer.tensors().items()})
        self._views[index] = view
        return view

    def _buffer(self, index: int, needed: int) -> MemoryLayer:
        """Layer `index`'s growth buffer, holding the layer in its first tokens, with room for `needed` tokens."""
        layer, buffer = self.layers[index], self._buffers.get(index)
        if buffer is None or self._views.get(index) is not layer or buffer.num_tokens < needed:
            filled = layer.num_tokens
            capacity = max(needed, 2 * filled)
            buffer = MemoryLayer(**{
                name: tensor.new_empty(tensor.shape[0], capacity, *tensor.shape[2:])
                for name, tensor in layer.tensors().items()
            })
            for name, tensor in buffer.tensors().items():
                tensor[:, :filled] = getattr(layer, name)
            self._buffers[index] = buffer
            # the layer is now read from the new buffer (its values unchanged), so the old one can go
            self.layers[index] = self._views[index] = MemoryLayer(**{name: t[:, :filled] for name, t in buffer.tensors().items()})
        return buffer

    def scratch(self, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Room for `tokens` more tokens after every layer, in the growth buffers: per layer `(keys, values, filled)`,
        keys and values `[1, kv_heads, capacity, head_dim]` whose first `filled` tokens are the layer (what
        `EmlocCache(scratch=...)` takes). A build runs its chunk's passes there: the memory is never copied for them.
        What is written after the filled part is not part of the memory; the next `extend` writes over it."""
        self.layers = list(self.layers)
        before = dict(self._buffers)
        room = []
        for index, layer in enumerate(self.layers):
            buffer = self._buffer(index, layer.num_tokens + tokens)
            room.append((buffer.keys[None], buffer.values[None], layer.num_tokens))
        self._release_outgrown(before)
        return room

    def _release_outgrown(self, before: dict[int, MemoryLayer]) -> None:
        """Hands the buffers outgrown since `before` (the growth buffers then) back to the operating system."""
        if any(buffer is not before.get(index) for index, buffer in self._buffers.items()):
            release_freed_memory()

    def compact(self) -> None:
        """Gives each layer contiguous tensors of exactly its size and drops the growth buffers (the end of a build).
        One layer at a time, so only one layer is ever held twice."""
        self.layers = list(self.layers)
        for index in list(self._buffers):
            if self._views.get(index) is self.layers[index]:
                self.layers[index] = MemoryLayer(**{
                    name: tensor.clone(memory_format=torch.contiguous_format)
                    for name, tensor in self.layers[index].tensors().items()
                })
            del self._buffers[index], self._views[index]

    # -- what no query can read ----------------------------------------------------------------------------------------

    def drop_unreadable(self, sliding_windows: list[int | None]) -> list[int]:
        """Drops from each sliding-window layer the tokens no query can read (`MemoryLayer.readable`; `sliding_windows`
        holds each layer's window, None for a global layer) and returns how many tokens each layer dropped.

        Every answer stays the same: those tokens are masked for whatever comes after the memory, as transformers' own
        cache of a sliding-window layer keeps only the window. On Gemma 3, five layers in six slide over 512 tokens, so
        most of a long context's KV there is never read. Heads keep equal counts: each keeps its latest `m` tokens, `m`
        the most any head can still read, so a head may keep a few unreadable ones, which stay masked."""
        if len(sliding_windows) != self.num_layers:
            raise ValueError(f"{len(sliding_windows)} windows for a memory of {self.num_layers} layers")
        self.layers = list(self.layers)
        dropped = []
        for index, (layer, window) in enumerate(zip(self.layers, sliding_windows)):
            keep = int(layer.readable(self.next_position, window).sum(-1).max()) if layer.num_tokens else 0
            if keep == layer.num_tokens:
                dropped.append(0)
                continue
            # each head's `keep` latest tokens, in the order the memory holds them
            latest = layer.positions.argsort(dim=-1, stable=True)[:, layer.num_tokens - keep:].sort(dim=-1).values
            self.layers[index] = MemoryLayer(**{
                name: tensor.gather(1, latest.view(*latest.shape, *([1] * (tensor.dim() - 2))).expand(
                    -1, -1, *tensor.shape[2:])).contiguous()
                for name, tensor in layer.tensors().items()
            })
            self._buffers.pop(index, None)
            self._views.pop(index, None)
            dropped.append(layer.num_tokens - keep)
        return dropped

    def readable_tokens(self, sliding_windows: list[int | None]) -> list[float]:
        """Per layer, the tokens a query can read, averaged over the KV heads."""
        return [float(layer.readable(self.next_position, window).sum()) / max(1, layer.keys.shape[0])
                for layer, window in zip(self.layers, sliding_windows)]

    # -- sizes ----------------------------------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].keys.shape[0]

    @property
    def head_dim(self) -> int:
        return self.layers[0].keys.shape[2]

    def kv_bytes(self) -> int:
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.layers)

    def tokens_per_layer(self) -> list[int]:
        return [layer.num_tokens for layer in self.layers]

    def __repr__(self) -> str:
        tokens = self.tokens_per_layer()
        return (
            f"TaskMemory(layers={self.num_layers}, kv_heads={self.num_kv_heads}, tokens/layer={min(tokens)}..{max(tokens)},"
            f" next_position={self.next_position}, method={self.stats.get('method', {}).get('name')!r})"
        )

    def to(self, device=None, dtype=None) -> "TaskMemory":
        """The memory on `device` in `dtype`; itself when nothing changes (answering calls this for every query)."""
        layers = [
            MemoryLayer(l.keys.to(device=device, dtype=dtype), l.values.to(device=device, dtype=dtype),
                        l.positions.to(device), l.token_types.to(device))
            for l in self.layers
        ]
        retrieval = self.retrieval.to(device) if self.retrieval is not None else None
        if all(new.keys is old.keys and new.values is old.values and new.positions is old.positions
               for new, old in zip(layers, self.layers)) and (retrieval is None or retrieval.keys is self.retrieval.keys):
            return self
        return TaskMemory(layers, self.next_position, copy.deepcopy(self.stats), retrieval)

    def digest(self) -> str:
        """SHA-256 of the memory's tensors (names, dtypes, shapes, bytes) and `next_position`: equal digests, equal
        memories."""
        digest = hashlib.sha256(f"next_position={self.next_position}".encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # -- saving and loading ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for index, layer in enumerate(self.layers):
            tensors[f"layers.{index}.keys"] = layer.keys.contiguous()
            tensors[f"layers.{index}.values"] = layer.values.contiguous()
            tensors[f"layers.{index}.positions"] = layer.positions.contiguous()
            tensors[f"layers.{index}.token_types"] = layer.token_types.to(torch.uint8).contiguous()
        if self.retrieval is not None:
            for name in ("starts", "ends", "keys"):
                tensors[f"retrieval.{name}"] = getattr(self.retrieval, name).contiguous()
        return tensors

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Writes `memory.safetensors`, `memory_config.json` and `README.md`.

        Everything is written into a temporary sibling directory which is then renamed into place, so a crash never
        leaves a loadable half-written memory.
        """
        from safetensors.torch import save_file

        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            save_file(self.state_dict(), staging / MEMORY_WEIGHTS_NAME, metadata={"format": "pt"})
            config = dict(self.stats)
            config["format_version"] = FORMAT_VERSION
            config["next_position"] = self.next_position
            config.pop("retrieval", None)
            if self.retrieval is not None:
                config["retrieval"] = {"layer": self.retrieval.layer, "num_demos": self.retrieval.num_demos,
                                       "key": "mean hidden state entering `layer` of each demonstration rendered as a query"}
            (staging / MEMORY_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
            (staging / MEMORY_CARD_NAME).write_text(memory_card(config))
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
                os.replace(target, old / "memory")
                os.replace(staging, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "TaskMemory":
        """Loads a memory directory; raises `MemoryLoadError` with a one-line reason when it cannot be used.

        Only JSON and safetensors are read: nothing is unpickled.
        """
        from safetensors import safe_open

        directory = Path(directory)
        config_path, weights_path = directory / MEMORY_CONFIG_NAME, directory / MEMORY_WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise MemoryLoadError(f"{directory}: not a task memory, {path.name} is missing")
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise MemoryLoadError(f"{config_path}: corrupt memory config ({error})") from None
        version = config.get("format_version")
        if version not in READABLE_VERSIONS:
            raise MemoryLoadError(f"{config_path}: unknown memory format version {version!r} (this code reads "
                                  f"{', '.join(map(str, READABLE_VERSIONS))})")
        try:
            with safe_open(str(weights_path), framework="pt") as handle:
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as error:  # safetensors raises its own error type for truncated headers and data
            raise MemoryLoadError(f"{weights_path}: truncated or corrupt memory weights ({error})") from None
        num_layers = len(config.get("layers", [])) or len({k.split(".")[1] for k in tensors})
        layers = []
        for index in range(num_layers):
            names = [f"layers.{index}.{part}" for part in ("keys", "values", "positions", "token_types")]
            missing = [name for name in names if name not in tensors]
            if missing:
                raise MemoryLoadError(f"{weights_path}: truncated or corrupt memory weights (no tensor {missing[0]})")
            keys, values, positions, token_types = (tensors[name] for name in names)
            if keys.shape != values.shape or positions.shape != keys.shape[:2] or token_types.shape != keys.shape[:2]:
                raise MemoryLoadError(f"{weights_path}: layer {index} tensors have inconsistent shapes")
            layers.append(MemoryLayer(keys, values, positions.long(), token_types.long()))
        retrieval = None
        if "retrieval" in config:
            names = [f"retrieval.{part}" for part in ("starts", "ends", "keys")]
            missing = [name for name in names if name not in tensors]
            if missing:
                raise MemoryLoadError(f"{weights_path}: truncated or corrupt memory weights (no tensor {missing[0]})")
            starts, ends, keys = (tensors[name] for name in names)
            if not starts.shape == ends.shape == keys.shape[:1] == (config["retrieval"]["num_demos"],):
                raise MemoryLoadError(f"{weights_path}: retrieval tensors have inconsistent shapes")
            retrieval = RetrievalIndex(starts.long(), ends.long(), keys.float(), int(config["retrieval"]["layer"]))
        stats = {k: v for k, v in config.items() if k not in ("format_version", "next_position", "retrieval")}
        return cls(layers, int(config["next_position"]), stats, retrieval)


# ---------------------------------------------------------------------------------------------------------------------
# Fingerprint of a base model, and the memory card
# ---------------------------------------------------------------------------------------------------------------------


def base_model_fingerprint(model: torch.nn.Module, config: Any) -> str:
    """A short hash of the base model's config and weights.

    Hashing every weight of a multi-billion-parameter model takes minutes, so the weights enter through their names,
    shapes, dtypes and a fixed strided sample of up to 4096 values each: enough to tell two checkpoints apart (a
    fine-tuned or differently quantised model changes the samples), cheap enough to run at every load.
    """
    digest = hashlib.sha256()
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # where and how the checkpoint was loaded, not what it computes; a quantisation that changes the weights shows in
    # the weight samples (a GGUF file dequantised on load gives the same model as its converted copy)
    volatile = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "_attn_implementation_autoset",
                "architectures", "auto_map", "use_cache", "_commit_hash", "quantization_config"}

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in sorted(value.items()) if k not in volatile}
        return value

    digest.update(json.dumps(clean(config_dict), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        sample = flat[::stride][:4096].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def push_memory_to_hub(memory: TaskMemory, repo_id: str, private: bool | None = None,
                       commit_message: str = "Upload task memory", revision: str | None = None,
                       token: str | None = None, create_pr: bool = False) -> str:
    """Pushes a memory to a Hub repo like an adapter (`memory.safetensors`, `memory_config.json`, `README.md`) and
    returns the commit URL. The card shows the code that loads it from `repo_id`; no local path is pushed (a config
    string naming a file or directory of this machine, e.g. the base model's directory recorded by an older emloc,
    goes as None)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        folder = memory.save_pretrained(Path(staging) / "memory")
        config = _without_local_paths(json.loads((folder / MEMORY_CONFIG_NAME).read_text()))
        base = config.get("base_model")
        if isinstance(base, dict) and base.get("name_or_path") is not None:
            base["name_or_path"] = hub_name(base["name_or_path"])
        (folder / MEMORY_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (folder / MEMORY_CARD_NAME).write_text(memory_card(config, repo_id=repo_id))
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 revision=revision, create_pr=create_pr)
    return str(info)


def _without_local_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(item) for item in value]
    if isinstance(value, str) and os.path.isabs(value) and os.path.exists(value):  # a path here, not text like "/x"
        return None
    return value


def hub_name(name_or_path: str | os.PathLike | None) -> str | None:
    """`name_or_path` if it names a Hub repo (`name` or `owner/name`), else None: a local path (absolute, relative to
    `.` or `~`, or an existing file or directory) means nothing on another machine and is never written into a memory
    (design §7)."""
    if not name_or_path:
        return None
    name = str(name_or_path)
    if os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        return None
    return name if re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) else None


def _card_code(config: dict, repo_id: str | None) -> str:
    """Python that loads the model, the processor and this memory and asks a question, with every name filled in
    that the config knows."""
    base = config.get("base_model", {})
    name = hub_name(base.get("name_or_path"))
    rendering = config.get("rendering") or {}
    memory_ref = json.dumps(repo_id or "path/to/this/memory")

    def holds(token_type: str) -> bool:
        return (config.get("token_types", {}).get(token_type, {}).get("full") or 0) > 0

    query = ('{"video": "query.mp4", "question": "..."}' if holds("video") else
             '{"image": "query.png", "question": "..."}' if holds("image") else '{"question": "..."}')
    renders = ""
    if rendering.get("template"):
        renders = f"template={json.dumps(rendering['template'])}" + (
            f", instruction={json.dumps(rendering['instruction'])}" if rendering.get("instruction") else "")
    if name is not None and base.get("emloc_repo") is False:  # built on a base model wrapped by `from_base`
        lines = [
            "# the emloc package (pip install of its repository), or the *_emloc.py files of any Emloc repo:",
            "from modeling_emloc import EmlocForConditionalGeneration",
            "from processing_emloc import EmlocProcessor",
            "",
            f"model = EmlocForConditionalGeneration.from_base({json.dumps(name)})",
            f"processor = EmlocProcessor.from_base({json.dumps(name)}{', ' + renders if renders else ''})",
        ]
    else:
        repo = json.dumps(name if name is not None else "<an Emloc repo of the base model>")
        lines = [
            "from transformers import AutoModel, AutoProcessor",
            "",
            f"model = AutoModel.from_pretrained({repo}, trust_remote_code=True)",
            f"processor = AutoProcessor.from_pretrained({repo}, trust_remote_code=True)",
        ]
        if renders:  # whatever the repo's processor renders by default, queries must follow the demonstrations
            lines.append(f"processor = type(processor)(processor.base_processor, {renders})")
    if not repo_id:
        lines.append("# this directory, or the Hub repo it was pushed to:")
    lines += [
        f"model.load_memory({memory_ref}, processor=processor)",
        "",
        f"inputs = processor([{query}], return_tensors=\"pt\")",
        "out = model.generate(**inputs, max_new_tokens=16)",
        "print(processor.batch_decode(out[:, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True)[0])",
    ]
    if config.get("retrieval"):
        lines += ["# or from the memory of its 8 nearest demonstrations only (retrieval inside the memory):",
                  "out = model.generate(**inputs, max_new_tokens=16, retrieve=8)"]
    priors = (config.get("calibration") or {}).get("priors") or []
    if priors:  # a classification task: rank its choices, with the label prior the memory recorded divided out
        choices = json.dumps(priors[0]["choices"], ensure_ascii=False)
        lines += ["# or rank the choices, with the label prior the memory recorded divided out:",
                  f"query = dict({query}, choices={choices})",
                  "scores = model.score_choices([query], processor=processor, calibrate=True)[0]"]
    return "\n".join(lines)


def _card_certificate(certificate: dict | None) -> str:
    """The card's section on how the memory answered demonstrations held out of its build (`certificate_emloc`)."""
    if not certificate or "skipped" in certificate:
        reason = certificate["skipped"] if certificate else "built without validation"
        return f"## Certificate\n\nNone: {reason}.\n\n"
    gain, interval = certificate.get("retained_gain"), certificate.get("retained_gain_interval")
    gain_text = "n/a (the full context gained nothing on these rows)" if gain is None else \
        f"{100 * gain:.0f} %" + (f" (95 % interval {100 * interval[0]:.0f}–{100 * interval[1]:.0f} %)" if interval else "")
    return f"""## Certificate

Before its last {certificate['rows']} demonstrations joined it, the memory answered them (held out of its build) as
follows; the full context of the same demonstrations and the model alone answered them too.

| | |
|---|---|
| accuracy: memory / full context / zero-shot | {certificate['accuracy']:.2f} / {certificate['full_accuracy']:.2f} / {certificate['zero_shot_accuracy']:.2f} |
| retained gain (target {certificate.get('target')}) | {gain_text}: {'met' if certificate.get('met') else 'missed'} |
| agreement with the full context, mean JS over the choices | {certificate['agreement']:.2f}, {certificate['mean_js']:.4f} |
| one answer to most rows (collapse) | {'yes' if certificate.get('collapsed') else 'no'} |
| asked as (`score_choices` and `generate` do so unless told otherwise) | `{certificate['recipe']}` |
| builds tried | {', '.join(r['rung'] for r in certificate.get('rungs', []))} |

"""


def memory_card(config: dict, repo_id: str | None = None) -> str:
    """The README.md of a memory directory or Hub repo (`repo_id`, when pushed): Hub metadata, what the memory is, and
    the exact code that loads the model, the processor and the memory and asks a question. Shows no local path."""
    base = hub_name(config.get("base_model", {}).get("name_or_path")) or "unknown"
    method = config.get("method", {})
    totals = config.get("totals", {})
    kept = totals.get("kept_ratio")
    kept_text = f"{100 * kept:.1f} %" if isinstance(kept, (int, float)) and not math.isnan(kept) else "n/a"
    params = ", ".join(f"{k}={v}" for k, v in method.get("params", {}).items()) or "none"
    base_meta = f"base_model: {base}\n" if base != "unknown" else ""
    rendering = config.get("rendering") or {}
    template = rendering.get("template")
    if template is None:
        rendering_text = "not recorded (built by an older emloc: rebuild it)"
    else:
        instruction = rendering.get("instruction")
        shown = repr(instruction).replace("|", "\\|") if instruction else ""  # a "|" would end the table cell
        rendering_text = f"`template={template!r}`" + (f", instruction {shown}" if instruction else "")
        rendering_text += f", {rendering.get('tokenization', 'per-segment')} tokenisation"
    ask = f"emloc ask {repo_id or 'path/to/this/memory'} \"...\"" + ("" if base != "unknown" else " --model EMLOC_REPO")
    return f"""---
{base_meta}library_name: transformers
tags:
- emloc
- task-memory
- kv-cache-compression
- many-shot-in-context-learning
---

# Task memory

A compressed demonstration context (EMLoC, Ma et al., ICML 2025, arXiv 2505.19812) for the base model `{base}`,
usable with an Emloc model of that base without any training.

| | |
|---|---|
| method | `{method.get('name', 'n/a')}` ({params}) |
| demonstrations | {config.get('num_demos', 'n/a')} |
| context tokens | {totals.get('full_tokens', 'n/a')} |
| kept KV (share of what a query reads of the full context) | {kept_text} |
| rendering of the demonstrations | {rendering_text} |
| base model fingerprint | `{config.get('base_model', {}).get('fingerprint', 'n/a')}` |

{_card_certificate(config.get("certificate"))}## Use

```python
{_card_code(config, repo_id)}
```

or from the command line: `{ask}`.

Loading checks the base model's fingerprint and refuses a memory made for another model. Queries must be rendered
as the demonstrations were (the processor's `template`, instruction, chat template and tokenizer, recorded under
`rendering` in `memory_config.json`): given the processor, `load_memory`, `generate` and `score_choices` refuse one
that renders otherwise.
"""


__all__ = ["TaskMemory", "MemoryLayer", "MemoryLoadError", "base_model_fingerprint",
           "check_rendering", "hub_name", "memory_card", "push_memory_to_hub"]
