"""Builds of one memory side by side, in one process: their cost, and how many of their decisions agree.

    python examples/compare_builds.py --model gemma3-270m --demos D.jsonl \\
        --methods "default,default[relative=None]" [--out OUT.json]

A cheaper build is worth what it changes: this measures both. After a warm-up (a one-chunk build), the full context is
prefilled once (the unit of "build ÷ prefill"), then each method of `--methods` is built in turn on the same
demonstrations, in the order given. `--methods` takes the memory specs of `evaluate_memory.py` (`default[k=v;...]`,
`emloc[...]`, a registered method's name). Per method it reports the build's seconds and their ratio to the prefill,
the probe's work (candidate evaluations and layer passes, summed over the chunks), the kept share and, against the
first method, the layer decisions that agree (the ratio each chunk chose in each layer), the chunks whose decisions all
agree, and whether the two memories are the same bytes. Decisions are compared chunk by chunk: once one chunk differs,
the memory it leaves differs, and later chunks may decide differently for that reason alone.

Timings are only comparable within one run on a quiet machine (the threads are `--threads`, 2 by default).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import evaluate_memory  # noqa: E402


def same_bytes(a, b) -> bool:
    """The two memories hold the same tokens per layer and the same keys and values, bit for bit."""
    return a.tokens_per_layer() == b.tokens_per_layer() and all(
        torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(a.layers, b.layers))


def decision_agreement(chunks: list[dict], reference: list[dict]) -> dict:
    """Layer decisions (`ratios` per chunk per layer) and whole chunks that agree with `reference`'s."""
    if not all("ratios" in chunk for chunk in [*chunks, *reference]):
        return {}  # a build without layer decisions (`full`, `random`)
    pairs = list(zip(chunks, reference))
    layers = sum(len(a["ratios"]) for a, _ in pairs)
    agree = sum(x == y for a, b in pairs for x, y in zip(a["ratios"], b["ratios"]))
    return {"layer_decisions": layers, "layer_decisions_agreeing": agree,
            "chunks": len(pairs), "chunks_agreeing": sum(a["ratios"] == b["ratios"] for a, b in pairs)}


def build_kwargs(spec: evaluate_memory.MethodSpec) -> dict:
    """The `build_memory` arguments of a memory spec (`default[...]`: no method argument, the library's default)."""
    if spec.name in evaluate_memory.BASELINES or spec.name in evaluate_memory.KVPRESS_PRESSES or spec.kept is not None \
            or spec.select is not None or spec.retrieve is not None:
        raise SystemExit(f"--methods: {spec.label!r} is not a memory built by build_memory's search; give "
                         "default[...], emloc[...] or a registered method's name")
    return evaluate_memory.method_arguments(spec)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an Emloc repo directory or Hub id, or smollm2-135m / gemma3-270m")
    parser.add_argument("--demos", required=True, type=Path, help="demonstrations, one JSON object per line")
    parser.add_argument("--methods", required=True, help="memory specs, the first is the one the others are compared with")
    parser.add_argument("--template", default=None, help="the processor's rendering (offline models: plain)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the records as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    specs = evaluate_memory.parse_methods(args.methods)
    kwargs = [build_kwargs(spec) for spec in specs]
    model, processor, _ = evaluate_memory.load_model(args.model, args.template)
    demos = evaluate_memory.read_jsonl(args.demos)

    # the compression alone is timed: no label prior (`calibration_rows=0`) after any build, no certificate
    model.build_memory(demos[:1], processor=processor, method="full", calibration_rows=0)  # warm-up
    started = time.perf_counter()
    model.build_memory(demos, processor=processor, method="full", chunk_size=len(demos), calibration_rows=0)
    prefill = time.perf_counter() - started
    print(f"full-context prefill: {prefill:.1f} s", flush=True)

    records, first = {}, None
    for spec, params in zip(specs, kwargs):
        started = time.perf_counter()
        memory = model.build_memory(demos, processor=processor, calibration_rows=0, validation=0, **params)
        seconds = time.perf_counter() - started
        chunks = memory.stats["build"]["chunks"]
        record = {"build_seconds": round(seconds, 2), "build_over_prefill": round(seconds / prefill, 2),
                  "probe_evaluations": sum(c.get("probe_evaluations", 0) for c in chunks),
                  "probe_layer_passes": sum(c.get("probe_layer_passes", 0) for c in chunks),
                  "kept_ratio": memory.stats["totals"]["kept_ratio"]}
        if first is None:
            first = (spec.label, memory, chunks)
        else:
            record["against"] = first[0]
            record.update(decision_agreement(chunks, first[2]), same_bytes=same_bytes(memory, first[1]))
        records[spec.label] = record
        print(f"[{spec.label}] " + ", ".join(f"{k}={v}" for k, v in record.items()), flush=True)
    report = {"model": args.model, "demos": str(args.demos), "num_demos": len(demos), "threads": args.threads,
              "prefill_seconds": round(prefill, 2), "methods": records}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
