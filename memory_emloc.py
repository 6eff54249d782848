# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
The task memory: per layer, the kept keys and values of a demonstration context with their original positions.

Each KV head keeps its own tokens (equal counts inside a layer); layers may keep different counts. Keys keep the RoPE
they were computed with, so pruned tokens just leave gaps in position space (EMLoC, §3.2). On disk a memory is a
directory like a PEFT adapter: `memory.safetensors`, `memory_config.json` and a `README.md` card (design §7).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


MEMORY_WEIGHTS_NAME = "memory.safetensors"
MEMORY_CONFIG_NAME = "memory_config.json"
MEMORY_CARD_NAME = "README.md"
FORMAT_VERSION = 1
TOKEN_TYPE_NAMES = ("template", "text", "image", "answer")  # indexed by processing_emloc's token type ids


class MemoryLoadError(ValueError):
    """A memory cannot be used: wrong base model, unknown format, truncated or missing files, wrong shapes, or
    demonstrations rendered otherwise than the processor renders queries."""


def check_rendering(stats: dict, rendering: dict) -> None:
    """Raises `MemoryLoadError` unless a memory (its `stats`, i.e. `memory_config.json`) was rendered and tokenised
    the way a processor renders (`rendering`, from `EmlocProcessor.rendering()`), naming every field that differs.

    A query rendered otherwise than the demonstrations in the memory (another template, instruction, chat template or
    tokenizer) is answered silently wrong, so the mismatch is refused rather than warned about.
    """
    recorded = stats.get("rendering") or {}
    if not recorded.get("tokenization"):
        raise MemoryLoadError(
            "memory records no tokenization: it was built with per-segment tokenisation by an older emloc, whose tokens "
            "can differ from the model's tokenisation of the whole text; rebuild it with build_memory"
        )
    differing = [key for key in rendering if recorded.get(key) != rendering[key]]
    if differing:
        raise MemoryLoadError(
            "memory was rendered with " + ", ".join(f"{key}={recorded.get(key)!r}" for key in differing)
            + "; this processor renders " + ", ".join(f"{key}={rendering[key]!r}" for key in differing)
        )


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

    def append(self, other: "MemoryLayer") -> "MemoryLayer":
        return MemoryLayer(
            keys=torch.cat([self.keys, other.keys], dim=1),
            values=torch.cat([self.values, other.values], dim=1),
            positions=torch.cat([self.positions, other.positions], dim=1),
            token_types=torch.cat([self.token_types, other.token_types], dim=1),
        )


class TaskMemory:
    """A compressed demonstration context, reusable across queries.

    Args:
        layers: one `MemoryLayer` per decoder layer of the base model.
        next_position: the position the first query token takes (max position in the context + 1).
        stats: build statistics, the content of `memory_config.json`.
    """

    def __init__(self, layers: list[MemoryLayer], next_position: int, stats: dict | None = None):
        self.layers = layers
        self.next_position = int(next_position)
        self.stats = stats if stats is not None else {}

    @classmethod
    def empty(cls, num_layers: int, num_kv_heads: int, head_dim: int, dtype=torch.float32, device="cpu") -> "TaskMemory":
        def layer():
            kv = torch.zeros(num_kv_heads, 0, head_dim, dtype=dtype, device=device)
            index = torch.zeros(num_kv_heads, 0, dtype=torch.long, device=device)
            return MemoryLayer(kv, kv.clone(), index, index.clone())

        return cls([layer() for _ in range(num_layers)], next_position=0)

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
        if all(new.keys is old.keys and new.values is old.values and new.positions is old.positions
               for new, old in zip(layers, self.layers)):
            return self
        return TaskMemory(layers, self.next_position, copy.deepcopy(self.stats))

    # -- saving and loading ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for index, layer in enumerate(self.layers):
            tensors[f"layers.{index}.keys"] = layer.keys.contiguous()
            tensors[f"layers.{index}.values"] = layer.values.contiguous()
            tensors[f"layers.{index}.positions"] = layer.positions.contiguous()
            tensors[f"layers.{index}.token_types"] = layer.token_types.to(torch.uint8).contiguous()
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
        if version != FORMAT_VERSION:
            raise MemoryLoadError(f"{config_path}: unknown memory format version {version!r} (this code reads {FORMAT_VERSION})")
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
        stats = {k: v for k, v in config.items() if k not in ("format_version", "next_position")}
        return cls(layers, int(config["next_position"]), stats)


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


def memory_card(config: dict) -> str:
    """The README.md of a memory directory or Hub repo: Hub metadata, what the memory is and how to load it."""
    base = config.get("base_model", {}).get("name_or_path") or "unknown"
    method = config.get("method", {})
    totals = config.get("totals", {})
    kept = totals.get("kept_ratio")
    kept_text = f"{100 * kept:.1f} %" if isinstance(kept, (int, float)) and not math.isnan(kept) else "n/a"
    params = ", ".join(f"{k}={v}" for k, v in method.get("params", {}).items()) or "none"
    base_meta = f"base_model: {base}\n" if base != "unknown" and not os.path.isabs(base) else ""
    rendering = config.get("rendering") or {}
    template = rendering.get("template")
    if template is None:
        rendering_text = "not recorded (built by an older emloc: rebuild it)"
    else:
        instruction = rendering.get("instruction")
        shown = repr(instruction).replace("|", "\\|") if instruction else ""  # a "|" would end the table cell
        rendering_text = f"`template={template!r}`" + (f", instruction {shown}" if instruction else "")
        rendering_text += f", {rendering.get('tokenization', 'per-segment')} tokenisation"
    template_note = f"  # must render template={template!r}" if template else ""
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
| kept KV (share of the full context) | {kept_text} |
| rendering of the demonstrations | {rendering_text} |
| base model fingerprint | `{config.get('base_model', {}).get('fingerprint', 'n/a')}` |

## Use

```python
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("<emloc repo of {base}>", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("<emloc repo of {base}>", trust_remote_code=True){template_note}
model.load_memory("<this repo or directory>", name="task", processor=processor)
inputs = processor([{{"question": "..."}}], return_tensors="pt")
answers = processor.batch_decode(model.generate(**inputs, max_new_tokens=16))
```

Loading checks the base model's fingerprint and refuses a memory made for another model. Queries must be rendered
as the demonstrations were (the processor's `template`, instruction, chat template and tokenizer, recorded under
`rendering` in `memory_config.json`): given the processor, `load_memory` and `score_choices` refuse one that renders
otherwise.
"""


__all__ = ["TaskMemory", "MemoryLayer", "MemoryLoadError", "base_model_fingerprint", "check_rendering", "memory_card"]
