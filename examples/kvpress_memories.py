# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""NVIDIA kvpress presses as query-agnostic task memories (design §5), through kvpress itself.

kvpress pins `transformers<5.3`, so this script runs in a side venv (`examples/setup_kvpress.sh` makes
`.venv-kvpress`), never in the main one. It imports from the project only `memory_emloc` (torch, safetensors and the
standard library), to write memories in exactly the on-disk format the Emloc model loads (design §7).

For each press and ratio, the base model prefills the whole demonstration context with the press applied, the way
kvpress's own pipeline does (`with press(model): model.model(input_ids, past_key_values=DynamicCache())`), and the
compressed cache of every layer becomes a memory layer. kvpress does not say which tokens it kept: the positions are
recovered exactly by matching every kept key to the keys of one uncompressed prefill of the same context, per layer and
KV head (the press only edits the cache after each layer's attention ran, so kept keys are bit-for-bit copies).

KVzip (`kvzip`, Kim et al. 2025, arXiv 2505.23416) goes through the same `with press(model): model.model(...)` call:
kvpress's `KVzipPress` records the context during that prefill and, when the context manager exits, scores every KV
pair by how much the model attends to it while asked to repeat the context (its own reconstruction passes, chunk by
chunk; 2-3x the prefill), then masks the lowest-scored pairs per head (`masked_key_indices`, like AdaKV). Two
adaptations, both recorded in `memory_config.json`:
  * the reconstruction prompt is phrased with the tokenizer given by `--tokenizer` (KVzip loads it from
    `model.config.name_or_path`); for a context rendered with `template="plain"` its chat template is removed, so KVzip
    uses its plain-text prompt (no chat prefix, suffix "\n") as it does for a base model;
  * KVzip keeps a different number of pairs per KV head (and per layer: one global budget); our memory format needs
    equal counts per head within a layer (padding would change attention). Each layer keeps KVzip's total for that
    layer, shared equally by its heads, each head taking its top pairs by KVzip's own score
    (`method.params.head_budget: "equal-within-layer"`; the per-head counts KVzip chose are in
    `build.kvzip_head_counts`). At compression 0 nothing is masked and the memory is the full context, bit for bit.
Every memory drops, as the Emloc builder's do, what no query can read (`TaskMemory.drop_unreadable`: in a
sliding-window layer, the tokens before the last window), and `totals.kept_ratio` counts what a query can read of what
the full context gives it. A press compresses every layer at its ratio, the unreadable tokens included, so on a model
with sliding windows (Gemma 3) its measured share can differ from its nominal one.
kvpress 0.5.5 refuses KVzip on Gemma 3 ("not supported"; removed as broken upstream, kvpress PR #172): that press is
reported as skipped there.

Ratios — two conventions, stated explicitly:
  * kvpress's `compression_ratio` is the fraction REMOVED;
  * our `kept_ratio` (as in EMLoC's ratios) is the fraction KEPT, `kept_ratio = 1 - compression_ratio`.
`--ratios` / `--kept-ratios` take kept fractions, `--compression-ratios` takes kvpress's removed fractions. A memory
directory is named `{press}-kept{kept%}-removed{removed%}`, e.g. `snapkv-kept30-removed70`, and its
`memory_config.json` records both (`method.params.compression_ratio`, `method.params.kept_ratio`).

    # in .venv-kvpress; CONTEXT.safetensors holds input_ids [1, T] and token_types [T] (made in the main venv), and in
    # its metadata `rendering`: the JSON of the processor's `rendering()`, recorded in every memory (design §7)
    python examples/kvpress_memories.py --base ~/.cache/emloc/models/smollm2-135m --context ctx.safetensors \\
        --presses snapkv,pyramidkv,streamingllm,tova,knorm,expected_attention,random --ratios 0.1,0.2,0.3,0.5 \\
        --fingerprint HEX --num-demos 24 --out memories/

`--fingerprint` must be the one the main venv computes (`EmlocForConditionalGeneration.from_base(base).fingerprint()`):
the transformers version here differs, and the fingerprint hashes the config, so computing it here may not match.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memory_emloc import (TOKEN_TYPE_NAMES, MemoryLayer, TaskMemory, base_model_fingerprint,  # noqa: E402
                          config_sliding_windows, readable_share)  # (torch/safetensors only)

MATCH_ATOL = 1e-5


def press_factories() -> dict:
    """Our press names → a function of kvpress's `compression_ratio` (and extra press kwargs) that builds the press,
    with kvpress's defaults otherwise."""
    import kvpress

    def simple(cls, **defaults):
        return lambda cr, **kwargs: cls(compression_ratio=cr, **{**defaults, **kwargs})

    return {
        "snapkv": simple(kvpress.SnapKVPress),
        "pyramidkv": simple(kvpress.PyramidKVPress),
        "streamingllm": simple(kvpress.StreamingLLMPress),
        "tova": simple(kvpress.TOVAPress),
        "knorm": simple(kvpress.KnormPress),
        "expected_attention": simple(kvpress.ExpectedAttentionPress),
        "random": simple(kvpress.RandomPress, seed=0),
        "kvzip": simple(kvzip_press_class()),
        # head-wise budgets: kvpress keeps every token in the cache and masks some per head (masked_key_indices);
        # usable only when the heads of each layer happen to keep equal counts (see `head_masks`).
        "adakv_snapkv": lambda cr, **kwargs: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=cr), **kwargs),
    }


def kvzip_press_class():
    """kvpress's `KVzipPress`, keeping the per-pair scores it computed (`kept_scores`, `[layers, 1, kv_heads, T]`) so
    that head budgets can be equalised by KVzip's own ranking (kvpress resets its scores when the press exits)."""
    from kvpress import KVzipPress

    @dataclasses.dataclass
    class KVzipKeepingScores(KVzipPress):
        def compress_post(self, model):
            super().compress_post(model)  # also raises the attention sinks' scores to the top
            self.kept_scores = self.score_val.detach().float().cpu().clone()

    KVzipKeepingScores.__name__ = KVzipKeepingScores.__qualname__ = "KVzipPress"
    return KVzipKeepingScores


@contextlib.contextmanager
def tokenizer_for(model, tokenizer_dir: str | None, template: str):
    """Points `model.config.name_or_path` (where KVzip loads its tokenizer from) at `tokenizer_dir`, without its chat
    template for a plain-rendered context; restored afterwards."""
    import tempfile

    from transformers import AutoTokenizer

    previous = model.config.name_or_path
    with tempfile.TemporaryDirectory() as work:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or previous)
        if template == "plain":
            tokenizer.chat_template = None
        tokenizer.save_pretrained(work)
        model.config.name_or_path = work
        try:
            yield
        finally:
            model.config.name_or_path = previous


def press_params(press) -> dict:
    """The press's dataclass fields, JSON-able (nested presses as their class name and fields)."""
    out = {}
    for field in dataclasses.fields(press):
        value = getattr(press, field.name)
        if dataclasses.is_dataclass(value):
            value = {"class": type(value).__name__, **press_params(value)}
        elif not isinstance(value, (int, float, str, bool, type(None), list, dict)):
            continue
        out[field.name] = value
    return out


def load_context(path: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        names = set(handle.keys())
        input_ids = handle.get_tensor("input_ids").long()
        token_types = handle.get_tensor("token_types").long() if "token_types" in names else None
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise SystemExit(f"{path}: input_ids must be [1, T], got {list(input_ids.shape)}")
    if token_types is None:
        print(f"warning: {path} has no token_types; every token is counted as text", file=sys.stderr)
        token_types = torch.ones(input_ids.shape[1], dtype=torch.long)
    token_types = token_types.reshape(-1)
    if token_types.shape[0] != input_ids.shape[1]:
        raise SystemExit(f"{path}: token_types has {token_types.shape[0]} entries for {input_ids.shape[1]} tokens")
    return input_ids, token_types, metadata


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, press=None):
    """kvpress's pipeline prefill (`KVPressTextGenerationPipeline._forward`): the decoder without the LM head over the
    whole context into a fresh `DynamicCache`, inside the press's context manager. Returns the cache and the press's
    per-layer head masks (AdaKV-style presses), if any."""
    from transformers import DynamicCache

    cache = DynamicCache()
    attention = [layer.self_attn for layer in model.model.layers]
    for module in attention:
        module.masked_key_indices = None
    with press(model) if press is not None else contextlib.nullcontext():
        model.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    masked = [getattr(module, "masked_key_indices", None) for module in attention]
    for module in attention:
        module.masked_key_indices = None
    return cache, masked


def cache_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    entry = cache.layers[layer]
    return entry.keys, entry.values


def match_positions(full_keys: torch.Tensor, full_values: torch.Tensor, kept_keys: torch.Tensor,
                    kept_values: torch.Tensor, where: str) -> torch.Tensor:
    """Indices `[H, K]` into the full context of each kept key, per KV head.

    A kept key is a bit-for-bit copy of one key of the uncompressed prefill (the press only edits the cache after the
    layer's attention ran), so it is looked up by its bytes; a key with no exact twin falls back to the nearest full
    key within `MATCH_ATOL` (max abs difference). Asserts a unique match per kept key whose value vector matches too.
    """
    heads, kept, _ = kept_keys.shape
    index = torch.empty(heads, kept, dtype=torch.long)
    for head in range(heads):
        full_k, kept_k = full_keys[head].contiguous(), kept_keys[head].contiguous()
        rows = full_k.numpy().view(f"V{full_k.shape[1] * full_k.element_size()}").reshape(-1)
        lookup: dict[bytes, list[int]] = {}
        for position, row in enumerate(rows.tolist()):
            lookup.setdefault(row, []).append(position)
        wanted = kept_k.numpy().view(f"V{kept_k.shape[1] * kept_k.element_size()}").reshape(-1).tolist()
        for slot, row in enumerate(wanted):
            hits = lookup.get(row)
            if hits is None:  # not bit-identical: nearest within the tolerance
                distance = (full_k - kept_k[slot]).abs().amax(dim=-1)
                hits = torch.nonzero(distance <= MATCH_ATOL).squeeze(1).tolist()
                if not hits:
                    raise AssertionError(f"{where}, head {head}: kept key {slot} matches no key of the full context "
                                         f"(closest {float(distance.min()):.3g} > {MATCH_ATOL})")
            if len(hits) != 1:
                raise AssertionError(f"{where}, head {head}: kept key {slot} matches positions {hits[:5]}")
            index[head, slot] = hits[0]
        if index[head].unique().numel() != kept:
            raise AssertionError(f"{where}, head {head}: two kept keys map to the same position")
        if kept and (full_values[head, index[head]] - kept_values[head]).abs().max() > MATCH_ATOL:
            raise AssertionError(f"{where}, head {head}: values differ from the full context's at the matched positions")
    return index


def head_masks(masked, layer: int, heads: int, length: int) -> torch.Tensor | None:
    """`[H, T]` True where a head keeps a token, from an AdaKV-style `masked_key_indices` (batch, head, seq)."""
    if masked[layer] is None:
        return None
    _, head_index, seq_index = masked[layer]
    keep = torch.ones(heads, length, dtype=torch.bool)
    keep[head_index.cpu(), seq_index.cpu()] = False
    return keep


def equal_head_budget(keep: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """`[H, T]` keep mask with the same count per head: the layer's total kept (`keep.sum()`) shared equally by the
    heads, each taking its top tokens by `scores` `[H, T]` (KVzip's per-pair scores)."""
    heads, length = keep.shape
    per_head = min(length, max(1, round(int(keep.sum()) / heads)))
    top = scores.topk(per_head, dim=-1).indices
    return torch.zeros_like(keep).scatter_(1, top, True)


def build_memory(model, press, input_ids, token_types, full_kv, press_name: str, cr: float) -> tuple[TaskMemory | None, str, dict]:
    """One memory from one press; `(None, reason, info)` if the press's result cannot be written in our format.
    `info` has `press_seconds` (the prefill with the press, KVzip's reconstruction included) and, for KVzip, the
    per-head counts it chose before the head budgets were equalised."""
    started = time.perf_counter()
    cache, masked = prefill(model, input_ids, press)
    info = {"press_seconds": round(time.perf_counter() - started, 3)}
    scores = getattr(press, "kept_scores", None)  # KVzip: [L, 1, H, T]
    layers, counts = [], []
    for layer in range(len(full_kv)):
        full_keys, full_values = full_kv[layer]
        keys, values = (t[0].float().cpu() for t in cache_kv(cache, layer))
        where = f"{press_name} (compression_ratio={cr}), layer {layer}"
        index = match_positions(full_keys, full_values, keys, values, where)
        keep = head_masks(masked, layer, keys.shape[0], keys.shape[1])
        if keep is not None:  # head-wise press: everything is in the cache, some tokens masked per head
            per_head = keep.sum(dim=1)
            counts.append(per_head.tolist())
            if per_head.unique().numel() != 1:
                if scores is None:
                    return None, (f"layer {layer} keeps {per_head.tolist()} tokens per KV head (head-wise budgets); the "
                                  f"memory format needs equal counts per head within a layer — skipped (padding would "
                                  f"change attention)"), info
                keep = equal_head_budget(keep, scores[layer, 0, :, :keep.shape[1]])
            select = torch.stack([torch.nonzero(keep[h]).squeeze(1) for h in range(keep.shape[0])])
            keys = keys.gather(1, select[..., None].expand(-1, -1, keys.shape[-1]))
            values = values.gather(1, select[..., None].expand(-1, -1, values.shape[-1]))
            index = index.gather(1, select)
        order = index.argsort(dim=1)  # store each head's tokens in context order
        index = index.gather(1, order)
        keys = keys.gather(1, order[..., None].expand_as(keys))
        values = values.gather(1, order[..., None].expand_as(values))
        dtype = cache_kv(cache, layer)[0].dtype
        layers.append(MemoryLayer(keys.to(dtype).contiguous(), values.to(dtype).contiguous(), index.contiguous(),
                                  token_types[index].contiguous()))
    if scores is not None:
        info["head_budget"] = "equal-within-layer"
        info["kvzip_head_counts"] = counts
    return TaskMemory(layers, next_position=input_ids.shape[1]), "", info


def memory_stats(memory: TaskMemory, token_types: torch.Tensor, args, press_name: str, press, cr: float,
                 fingerprint: str, seconds: float, itemsize: int, rendering: dict | None,
                 info: dict | None = None, windows: list | None = None) -> dict:
    """`memory_config.json` content, the same keys as the main venv's builder writes (design §7). The kept share
    counts, as the builder's does, what a query can read of what the full context gives it (`windows`: each layer's
    sliding window, None for a global layer)."""
    import transformers

    full_tokens = int(token_types.shape[0])
    heads, head_dim = memory.num_kv_heads, memory.head_dim
    full_kv_bytes = full_tokens * 2 * heads * head_dim * itemsize * memory.num_layers
    kept_kv_bytes = memory.kv_bytes()
    layers = [{"full": full_tokens, "kept": layer.num_tokens} for layer in memory.layers]
    kept_tokens = sum(l["kept"] for l in layers) / max(1, len(layers))
    share = readable_share(memory, layers, windows or [None] * memory.num_layers, 2 * heads * head_dim * itemsize)
    type_stats = {}
    for type_id, name in enumerate(TOKEN_TYPE_NAMES):
        kept = sum(float((layer.token_types == type_id).sum()) / heads for layer in memory.layers) / max(1, len(layers))
        type_stats[name] = {"full": int((token_types == type_id).sum()), "kept": round(kept, 2)}
    stats = {
        "base_model": {"name_or_path": args.base_name or args.base, "fingerprint": fingerprint},
        "method": {
            "name": f"kvpress:{press_name}",
            "params": {
                "compression_ratio": cr,  # kvpress: fraction removed
                "kept_ratio": round(1 - cr, 10),  # ours: fraction kept (nominal; totals.kept_ratio is measured)
                "press": type(press).__name__,
                "press_params": press_params(press),
                "kvpress_version": _version("kvpress"),
                "transformers_version": transformers.__version__,
                **({"head_budget": info["head_budget"], "template": args.template}
                   if info and "head_budget" in info else {}),
            },
        },
        "num_demos": args.num_demos,
        "totals": {
            "full_tokens": full_tokens, "kept_tokens": round(kept_tokens, 2),
            "full_kv_bytes": full_kv_bytes, "kept_kv_bytes": kept_kv_bytes, **share,
        },
        "token_types": type_stats,
        "layers": layers,
        "build": {"seconds": round(seconds, 3), "query_agnostic": True,
                  **{k: v for k, v in (info or {}).items() if k != "head_budget"},
                  "note": "prefill of the whole context with the press applied (kvpress pipeline); positions "
                          "recovered by matching kept keys to an uncompressed prefill"},
    }
    if rendering is not None:  # how the context was rendered and tokenised: a processor that renders otherwise is refused
        stats["rendering"] = rendering
    return stats


def _version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:
        return "unknown"


def parse_ratios(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def percent(x: float) -> str:
    return f"{round(100 * x):02d}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="plain transformers checkpoint directory of the base model")
    parser.add_argument("--base-name", default=None, help="base_model.name_or_path to record (default: --base)")
    parser.add_argument("--context", required=True, help="safetensors with input_ids [1, T] and token_types [T]")
    parser.add_argument("--presses", default="snapkv,pyramidkv,streamingllm,tova,knorm,expected_attention,random")
    ratios = parser.add_mutually_exclusive_group()
    ratios.add_argument("--ratios", "--kept-ratios", dest="kept_ratios", default=None,
                        help="fractions KEPT (ours), comma-separated; compression_ratio = 1 - kept (default 0.3)")
    ratios.add_argument("--compression-ratios", default=None,
                        help="kvpress compression_ratio values (fractions REMOVED), comma-separated")
    parser.add_argument("--out", required=True, help="output directory; one memory directory per press and ratio")
    parser.add_argument("--fingerprint", default=None,
                        help="the base model fingerprint computed by the main venv (written verbatim)")
    parser.add_argument("--num-demos", type=int, default=None)
    parser.add_argument("--press-args", default="{}",
                        help='JSON of extra press kwargs per press, e.g. \'{"pyramidkv": {"beta": 4}}\'')
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory for presses that prompt the model (KVzip); default: --base")
    parser.add_argument("--template", default=None, choices=("chat", "plain"),
                        help="how the context was rendered (default: the context file's metadata `template` or "
                             "`rendering`, else chat); with plain, KVzip's prompt goes without the chat template")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.compression_ratios is not None:
        compression = parse_ratios(args.compression_ratios)
    else:
        compression = [round(1 - k, 10) for k in parse_ratios(args.kept_ratios or "0.3")]
    for cr in compression:
        if not 0 <= cr < 1:
            raise SystemExit(f"compression_ratio {cr} (fraction removed) must be in [0, 1); kept = {1 - cr}")

    import kvpress  # noqa: F401  (patches the attention functions, as any kvpress use does)
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    factories = press_factories()
    press_args = json.loads(args.press_args)
    names = [n.strip() for n in args.presses.split(",") if n.strip()]
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise SystemExit(f"unknown press(es) {unknown}; known: {sorted(factories)}")

    input_ids, token_types, metadata = load_context(args.context)
    if args.num_demos is None and "num_demos" in metadata:
        args.num_demos = int(metadata["num_demos"])
    rendering = json.loads(metadata["rendering"]) if "rendering" in metadata else None
    if args.template is None:
        args.template = metadata.get("template") or (rendering or {}).get("template") or "chat"
    if rendering is None:
        print(f"warning: {args.context} records no rendering (metadata 'rendering'); processors will refuse these "
              f"memories", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model.eval()
    # what no query can read is dropped from every memory, as the Emloc builder does (`TaskMemory.drop_unreadable`)
    windows = config_sliding_windows(model.config.get_text_config())
    fingerprint = args.fingerprint
    if fingerprint is None:
        fingerprint = base_model_fingerprint(model, model.config)
        print(f"warning: no --fingerprint; computed {fingerprint} with transformers here, which may differ from the "
              f"main venv's (Emloc models would then refuse these memories)", file=sys.stderr)

    started = time.perf_counter()
    cache, _ = prefill(model, input_ids)
    full_kv = [tuple(t[0].float().cpu() for t in cache_kv(cache, layer)) for layer in range(len(cache.layers))]
    itemsize = cache_kv(cache, 0)[0].element_size()
    del cache
    print(f"context: {input_ids.shape[1]} tokens; uncompressed prefill {time.perf_counter() - started:.2f}s", flush=True)

    out = Path(args.out)
    summary = []
    for name in names:
        for cr in compression:
            kept = round(1 - cr, 10)
            target = out / f"{name}-kept{percent(kept)}-removed{percent(cr)}"
            started = time.perf_counter()
            try:
                press = factories[name](cr, **press_args.get(name, {}))
                scope = tokenizer_for(model, args.tokenizer, args.template) if name == "kvzip" else contextlib.nullcontext()
                with scope:
                    memory, reason, info = build_memory(model, press, input_ids, token_types, full_kv, name, cr)
            except Exception as error:  # a press that fails on this model/context is reported, the others go on
                memory, reason, info = None, f"{type(error).__name__}: {error}", {}
            seconds = time.perf_counter() - started
            if memory is None:
                print(f"SKIPPED {target.name}: {reason}", flush=True)
                summary.append({"press": name, "compression_ratio": cr, "kept_ratio": kept, "skipped": reason})
                continue
            memory.drop_unreadable(windows)
            memory.stats = memory_stats(memory, token_types, args, name, press, cr, fingerprint, seconds, itemsize,
                                        rendering, info, windows)
            memory.save_pretrained(target)
            totals = memory.stats["totals"]
            tokens = memory.tokens_per_layer()
            print(f"{target.name}: kept {totals['kept_ratio']:.3f} of the KV bytes, tokens/layer {min(tokens)}..{max(tokens)}"
                  f" of {input_ids.shape[1]}, {seconds:.2f}s", flush=True)
            summary.append({"press": name, "compression_ratio": cr, "kept_ratio": kept, "dir": str(target),
                            "measured_kept_ratio": totals["kept_ratio"], "seconds": round(seconds, 3)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "kvpress_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if any("skipped" in s for s in summary) and all("skipped" in s for s in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
