"""Evaluate task memories against zero-shot, the full context, other KV compression and LoRA fine-tuning.

    python examples/evaluate_memory.py --model smollm2-135m --demos D.jsonl --queries Q.jsonl \\
        --methods zero-shot,full,emloc,random@0.2,snapkv@0.2,rices,lora --out OUT [--budget F] [--emloc-args k=v,...]

`--model`: an Emloc repo directory or Hub id, or `smollm2-135m` / `gemma3-270m` (offline models). Queries are scored by
their `choices` (`model.score_choices`); scoring goes through the `evaluate` library with the metric scripts shipped in
`metrics/` (accuracy, exact match after normalisation, fidelity to `full`: top-choice agreement and mean JS).
Several processes split the queries: `accelerate launch --multi_gpu --num_processes N examples/evaluate_memory.py ...`
(on a machine without GPUs the processes run on the CPU).

Methods (a comma-separated list; `@F` is a kept fraction of the full context's KV, `[k=v;...]` parameters, a tuple
value written with `/`, e.g. `ratios=0.1/0.2/0.5`):
    zero-shot                 no memory
    full                      the whole context as an uncompressed memory (prefix cache)
    emloc[k=v;...]            EMLoC, `method="emloc"` (paper defaults; e.g. emloc[probe=future], emloc[budget=0.2])
    user[k=v;...]             what a user gets: `model.build_memory(demos, processor=processor, **params)` with every
                              default (the held-out certificate and its repairs included), asked with `score_choices`'
                              defaults (the way of asking the certificate chose); no +calibrate or +retrieve of its own
    default[k=v;...]          `model.build_memory(demos, processor=processor, **params)` with no method argument: the
                              library's default method (its name is recorded in the memory's stats)
    NAME[k=v;...]             any other method registered in modeling_emloc (`method=NAME`); `method=` inside the
                              brackets of `emloc[...]` / `default[...]` picks one too
    random@F                  a random F of each chunk per layer and head
    <press>@F                 an NVIDIA kvpress press (snapkv, pyramidkv, streamingllm, tova, knorm,
                              expected_attention, random, kvzip) as a query-agnostic memory; needs
                              `examples/setup_kvpress.sh`
    random@LABEL, <press>@LABEL   at the kept share of the memory labelled LABEL in this run (e.g. random@emloc,
                              snapkv@default, kvzip@emloc[probe=future]); LABEL must be in the list too (it is built
                              first whatever the order)
    rices[k=8]                per query, the k most similar demonstrations by the model's own embeddings, in full
    shots@F, shots@LABEL      few-shot prompting: the leading demonstrations in full, as many as fit in F of the full
                              context's KV (at least one) — what giving the model fewer demonstrations gets at a
                              memory's size
    lora[epochs=3;...]        LoRA fine-tuning with peft on the demonstrations (adaptation time reported)
    full+select@F, emloc+select@F   per-query selection over the memory at answer time
    full+retrieve@K, default+retrieve@K, snapkv@F+retrieve@K, ...   retrieval inside the memory: each query attends to
                              its K nearest demonstrations' kept tokens only (`retrieve=K`); a memory without a
                              retrieval index (kvpress) is indexed first (`model.index_memory`)
    X+calibrate               X's scores with its context's label prior divided out (`score_choices(calibrate=...)`,
                              the prior from `--calibration-rows` demonstrations' questions): zero-shot+calibrate,
                              full+calibrate, default+calibrate, snapkv@default+calibrate, ...; agreement is then
                              measured against full+calibrate when it is in the run

Writes OUT/results.json (design §5), OUT/report.md and OUT/*.png. Under `accelerate launch --num_processes N`, the
queries are split across processes (memories are built once, on the main process, and shared through OUT/memories).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

OFFLINE_MODELS = ("smollm2-135m", "gemma3-270m")
KVPRESS_PRESSES = ("snapkv", "pyramidkv", "streamingllm", "tova", "knorm", "expected_attention", "kvpress-random", "kvzip")
# methods that hold no memory of ours (`shots` holds the full memory of fewer demonstrations); any other name that is not a press is built by `model.build_memory` (`full`,
# `random`, `emloc`, `default`, or a registered method's name)
BASELINES = ("zero-shot", "rices", "lora", "shots")
KVPRESS_PYTHON = HERE.parent / ".venv-kvpress" / "bin" / "python"


# ---------------------------------------------------------------------------------------------------------------------
# Method specs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MethodSpec:
    """One entry of `--methods`: `name[k=v;...]@kept`, `kept` a fraction or the label of another memory."""

    text: str
    name: str
    params: dict = field(default_factory=dict)
    kept: float | str | None = None
    select: float | None = None
    retrieve: int | None = None
    calibrate: bool = False

    @property
    def uncalibrated(self) -> str:
        """The label of the same spec without `+calibrate`."""
        return self.text[:-len(CALIBRATE)] if self.calibrate else self.text

    @property
    def memory_label(self) -> str:
        """The label of the memory this spec reads: without `+calibrate`, `+select` or `+retrieve`, which change how a
        memory is asked, not the memory."""
        return self.uncalibrated.split("+select")[0].split("+retrieve")[0]

    @property
    def label(self) -> str:
        return self.text

    @property
    def reference(self) -> str | None:
        """The label whose kept share this spec matches (`random@emloc` → `"emloc"`), if any."""
        return self.kept if isinstance(self.kept, str) else None


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if "," in text or "/" in text:
        return tuple(_value(t) for t in re.split(r"[,/]", text))
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def split_methods(text: str) -> list[str]:
    """Splits `--methods` at the commas outside brackets (`emloc[ratios=0.1,0.2],full` → 2 items)."""
    items, depth, current = [], 0, []
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def method_arguments(spec: MethodSpec, emloc_args: dict | None = None) -> dict:
    """The `build_memory` method arguments of `emloc[...]` (the paper's rule; `--emloc-args` under the spec's own
    parameters), `default[...]` (no method argument at all: the library's default method) or a registered method's
    name."""
    params = dict(spec.params)
    if spec.name == "emloc":
        return {"method": "emloc", **(emloc_args or {}), **params}
    if spec.name == "default":
        return params
    return {"method": spec.name, **params}


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file, blank lines skipped."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


CALIBRATE = "+calibrate"
_SPEC = re.compile(r"([A-Za-z0-9_\-]+)(\+select)?(?:\[([^\]]*)\])?(?:@(.+?))?(?:\+retrieve(?:@(\d+))?)?")


def parse_methods(text: str) -> list[MethodSpec]:
    specs = []
    for item in split_methods(text):
        calibrate = item.endswith(CALIBRATE)
        match = _SPEC.fullmatch(item[:-len(CALIBRATE)] if calibrate else item)
        if match is None:
            raise SystemExit(f"--methods: cannot read {item!r} (expected name[k=v;...]@F or name@LABEL)")
        name, select, params, kept, retrieve = match.groups()
        params = dict(kv.split("=", 1) if "=" in kv else (kv, "true") for kv in params.split(";") if kv) if params else {}
        spec = MethodSpec(item, name, {k.strip(): _value(v.strip()) for k, v in params.items()}, calibrate=calibrate)
        if calibrate and name in ("rices", "lora"):
            raise SystemExit(f"--methods: {item!r}: calibration needs one context for every query, {name} has none")
        if name == "user" and (calibrate or "+retrieve" in item or select):
            raise SystemExit(f"--methods: {item!r}: `user` is asked the way its certificate chose; give no +calibrate, "
                             f"+retrieve or +select")
        if item.endswith("+retrieve") or retrieve is not None:
            spec.retrieve = int(retrieve) if retrieve is not None else 8
            if name in BASELINES:
                raise SystemExit(f"--methods: {item!r}: retrieval needs a memory, {name} has none")
        if select:
            spec.select = float(kept) if kept else 0.3
        elif kept is not None:
            try:
                spec.kept = float(kept)
            except ValueError:
                spec.kept = kept  # the label of another memory of this run
        specs.append(spec)
    return specs


def order_specs(specs: list[MethodSpec]) -> list[MethodSpec]:
    """`full` first (every other method is compared with it), then each spec after the memory its `@LABEL` refers to;
    otherwise the given order."""
    labels = {s.label for s in specs}
    # the plain full context, then its calibrated scores (the reference of the calibrated methods)
    ordered = sorted((s for s in specs if s.name == "full" and s.select is None and s.retrieve is None),
                     key=lambda s: s.calibrate)
    rest = [s for s in specs if s not in ordered]
    while rest:
        done = {s.label for s in ordered}
        ready = [s for s in rest if s.reference is None or s.reference not in labels or s.reference in done
                 or s.reference == s.label]
        if not ready:  # a cycle: let them fail with the missing-memory message
            ready = rest[:1]
        for s in ready:
            ordered.append(s)
            rest.remove(s)
    return ordered


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------


def score_queries(model, processor, queries, memory=None, select=None, state=None, retrieve=None):
    """Per-query choice log-probabilities and latencies; split across processes under accelerate."""
    indices = list(range(len(queries)))
    if state is not None and state.num_processes > 1:
        with state.split_between_processes(indices) as part:
            indices = list(part)
    rows = []
    kwargs = {"select": select} if select is not None else {}
    if retrieve is not None:
        kwargs["retrieve"] = retrieve
    for index in indices:
        started = time.perf_counter()
        scores = model.score_choices([queries[index]], memory=memory, processor=processor, **kwargs)[0]
        rows.append((index, scores, time.perf_counter() - started))
    if state is not None and state.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    rows.sort(key=lambda row: row[0])
    return [r[1] for r in rows], [r[2] for r in rows]


def summarise(queries, scores, latencies, full_scores, metrics) -> dict:
    predictions = [q["choices"][max(range(len(s)), key=s.__getitem__)] for q, s in zip(queries, scores)]
    references = [q["answer"] for q in queries]
    record = {
        "accuracy": metrics["accuracy"].compute(predictions=predictions, references=references)["accuracy"],
        "exact_match": metrics["exact_match"].compute(predictions=predictions, references=references)["exact_match"],
        "query_seconds_mean": statistics.fmean(latencies),
        "query_seconds_p95": sorted(latencies)[max(0, math.ceil(0.95 * len(latencies)) - 1)],
        "predictions": predictions,
    }
    if full_scores is not None:
        record.update(metrics["fidelity"].compute(predictions=scores, references=full_scores))
    return record


# ---------------------------------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------------------------------


def build_kvpress_memories(model, processor, demos, presses_and_kept, workdir: Path, base_dir: Path) -> dict:
    """Runs the kvpress presses in their own environment (kvpress pins an older transformers) and loads the
    memories they write in our format. Returns {(press, kept): TaskMemory}. A memory's `build.seconds` is the press's
    own prefill (`build.press_seconds`, comparable with our builders'); `build.process_seconds` adds the side process
    (start, model load, position recovery)."""
    from safetensors.torch import save_file

    from memory_emloc import TaskMemory
    from processing_emloc import EncodedSpan

    if not KVPRESS_PYTHON.exists():
        raise RuntimeError("kvpress is not set up: run examples/setup_kvpress.sh")
    if base_dir is None:  # kvpress loads a plain transformers checkpoint: write the Emloc model's base
        base_dir = workdir / "base"
        model.model.save_pretrained(base_dir)
    tokenizer_dir = workdir / "tokenizer"  # KVzip phrases its reconstruction prompt with the model's tokenizer
    if not tokenizer_dir.exists():
        processor.tokenizer.save_pretrained(tokenizer_dir)
    context = processor.encode_context(demos)
    joined = EncodedSpan.concat([context.prefix, *context.demos])
    save_file({"input_ids": joined.input_ids[None].contiguous(), "token_types": joined.token_types.contiguous()},
              str(workdir / "context.safetensors"),
              metadata={"num_demos": str(len(demos)), "template": processor.template,
                        # how the context was rendered: recorded in the memories (design §7), which processors check
                        **({"rendering": json.dumps(processor.rendering())} if hasattr(processor, "rendering") else {})})
    memories = {}
    for press, kept in presses_and_kept:
        out = workdir / f"kvpress-{press}-{kept:.4f}"
        command = [str(KVPRESS_PYTHON), str(HERE / "kvpress_memories.py"), "--base", str(base_dir),
                   "--context", str(workdir / "context.safetensors"), "--presses", press.replace("kvpress-", ""),
                   "--ratios", f"{kept:.6f}", "--out", str(out), "--fingerprint", model.fingerprint(),
                   "--num-demos", str(len(demos)), "--tokenizer", str(tokenizer_dir)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
        if result.returncode != 0 or skipped:
            reason = skipped[0].split(": ", 1)[-1] if skipped else result.stderr[-2000:]  # e.g. KVzip on Gemma 3
            raise RuntimeError(f"kvpress {press} failed: {reason}")
        directories = [p for p in out.rglob("memory_config.json")]
        memory = TaskMemory.from_pretrained(directories[0].parent)
        build = memory.stats.setdefault("build", {})
        build["process_seconds"] = time.perf_counter() - started
        build["seconds"] = build.get("press_seconds", build["process_seconds"])
        memories[(press, kept)] = memory
    return memories


def rices_scores(model, processor, demos, queries, k: int, state=None):
    """RICES: for each query, the k demonstrations whose embeddings (mean of the base model's last hidden states over
    the rendered user turn) are most similar, prefilled in full, in their original order."""
    from processing_emloc import load_examples

    def embed(examples):
        vectors = []
        for example in examples:
            span = processor.encode_query(example)
            batch = processor.collate([span])
            batch.pop("token_types")
            with torch.no_grad():
                out = model.model(**batch, output_hidden_states=True)
            vectors.append(torch.nn.functional.normalize(out.hidden_states[-1][0].mean(0).float(), dim=0))
        return torch.stack(vectors)

    started = time.perf_counter()
    demo_vectors = embed(load_examples(demos))
    query_vectors = embed(load_examples(queries, require_answer=False))
    chosen = (query_vectors @ demo_vectors.T).topk(min(k, len(demos)), dim=-1).indices.sort(dim=-1).values
    scores, latencies = [], []
    for row, query in enumerate(queries):
        started_query = time.perf_counter()
        memory = model.build_memory([demos[i] for i in chosen[row].tolist()], processor=processor, method="full",
                                    chunk_size=k, calibration_rows=0)  # per query: no label prior to spend on
        scores.append(model.score_choices([query], memory=memory, processor=processor)[0])
        latencies.append(time.perf_counter() - started_query)
    return scores, latencies, time.perf_counter() - started


def leading_shots(processor, demos, share: float) -> tuple[int, float]:
    """How many leading demonstrations fit, in full, in `share` of the whole context's tokens (KV grows with tokens),
    at least one; and the share they take. The template prefix counts with them, as it is part of either memory."""
    context = processor.encode_context(demos)
    prefix = len(context.prefix.input_ids)
    lengths = [len(span.input_ids) for span in context.demos]
    total = prefix + sum(lengths)
    count, used = 0, prefix
    while count < len(lengths) and used + lengths[count] <= share * total:
        used += lengths[count]
        count += 1
    if count == 0:
        count, used = 1, prefix + lengths[0]
    return count, used / total


def memory_record(memory) -> dict:
    totals = memory.stats["totals"]
    return {"kept_kv_bytes": totals["kept_kv_bytes"], "full_kv_bytes": totals["full_kv_bytes"],
            "kept_ratio": totals["kept_ratio"], "build_seconds": memory.stats.get("build", {}).get("seconds")}


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def write_report(results: dict, out: Path, memories: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    methods = results["methods"]
    lines = [
        f"# Evaluation: {results['model']}",
        "",
        f"{results['num_demos']} demonstrations, {results['num_queries']} queries, task `{results.get('task', 'custom')}`. "
        f"Machine: {results['machine']}.",
        "",
        "| method | accuracy | agreement w/ full | mean JS to full | kept KV | build s | s/query (mean) | s/query (p95) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, record in methods.items():
        if "error" in record:
            reason = " ".join(record["error"].split()).replace("|", "/")[:100]
            lines.append(f"| {name} | failed: {reason} | | | | | | |")
            continue

        def fmt(key, pattern="{:.3f}"):
            value = record.get(key)
            return pattern.format(value) if isinstance(value, (int, float)) and value is not None else "-"

        lines.append(f"| {name} | {fmt('accuracy')} | {fmt('agreement')} | {fmt('mean_js', '{:.4f}')} | "
                     f"{fmt('kept_ratio', '{:.1%}')} | {fmt('build_seconds', '{:.1f}')} | "
                     f"{fmt('query_seconds_mean', '{:.3f}')} | {fmt('query_seconds_p95', '{:.3f}')} |")
    lines += ["", "`kept KV` is the memory's size as a share of the full context's KV cache; `agreement` is the share "
              "of queries whose top choice equals `full`'s; `mean JS` is the Jensen-Shannon divergence between the "
              "methods' normalised choice distributions. LoRA's build time is its training time.", ""]
    plots = make_plots(results, out, memories)
    lines += [f"![{name}]({name})" for name in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def make_plots(results: dict, out: Path, memories: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    methods = {k: v for k, v in results["methods"].items() if "accuracy" in v}
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for name, record in methods.items():
        axis.scatter(record.get("kept_ratio") or 0.0, record["accuracy"], label=name, s=40)
    axis.set_xlabel("kept KV (share of the full context)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"{results['model']}: accuracy vs memory size")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(out / "accuracy_vs_kept.png", dpi=120)
    plt.close(figure)
    written.append("accuracy_vs_kept.png")

    emloc = {name: m for name, m in memories.items()  # our own pruning methods (emloc, the default, registered ones)
             if m.stats.get("method", {}).get("name") not in (None, "full", "random") and "layers" in m.stats}
    if emloc:
        figure, axis = plt.subplots(figsize=(6.5, 4.2))
        for name, memory in emloc.items():
            layers = memory.stats["layers"]
            axis.plot([l["kept"] / max(1, l["full"]) for l in layers], marker="o", ms=3, label=name)
        axis.set_xlabel("layer")
        axis.set_ylabel("kept share of the context")
        axis.set_title("EMLoC: kept tokens per layer")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / "emloc_kept_per_layer.png", dpi=120)
        plt.close(figure)
        written.append("emloc_kept_per_layer.png")

        figure, axis = plt.subplots(figsize=(6.5, 4.2))
        types = ["template", "text", "image", "answer"]
        width = 0.8 / len(emloc)
        for offset, (name, memory) in enumerate(emloc.items()):
            shares = [memory.stats["token_types"][t]["kept"] / max(1, memory.stats["token_types"][t]["full"]) for t in types]
            axis.bar([i + offset * width for i in range(len(types))], shares, width=width, label=name)
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(types))], types)
        axis.set_ylabel("kept share of that token type")
        axis.set_title("EMLoC: what the memory keeps")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / "emloc_kept_by_type.png", dpi=120)
        plt.close(figure)
        written.append("emloc_kept_by_type.png")
    return written


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
            cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), no GPU" \
        if not torch.cuda.is_available() else f"{torch.cuda.get_device_name()}, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def load_model(name: str, template: str | None):
    from transformers import AutoModel, AutoProcessor

    if name in OFFLINE_MODELS:
        from offline_models import base_model_dir, emloc_repo_dir

        repo = emloc_repo_dir(name, template=template or "plain")
        return AutoModel.from_pretrained(repo, trust_remote_code=True), AutoProcessor.from_pretrained(repo, trust_remote_code=True), base_model_dir(name)
    model = AutoModel.from_pretrained(name, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(name, trust_remote_code=True)
    if template is not None and template != processor.template:
        processor = type(processor)(processor.base_processor, template=template, instruction=processor.instruction)
    return model, processor, None


def evaluate(args) -> dict:
    from accelerate import PartialState

    from memory_emloc import TaskMemory
    from metrics import load_metric
    from scoring_emloc import calibrated_scores, choice_priors
    from processing_emloc import load_examples

    # without a GPU, processes started by `accelerate launch --multi_gpu` (torchrun) join as CPU processes (gloo)
    state = PartialState(cpu=not torch.cuda.is_available())
    metrics = {"accuracy": load_metric("emloc_exact_match", config_name="strict"), "exact_match": load_metric("emloc_exact_match"),
               "fidelity": load_metric("emloc_fidelity")}
    model, processor, base_dir = load_model(args.model, args.template)
    demos, queries = read_jsonl(args.demos), read_jsonl(args.queries)
    load_examples(demos)  # validates every line before any work
    load_examples(queries, require_answer=False)
    if any("answer" not in q or not q.get("choices") for q in queries):
        raise SystemExit(f"{args.queries}: every query needs 'answer' and 'choices' to be scored")
    specs = parse_methods(args.methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shared = out / "memories"
    emloc_args = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.emloc_args.split(",") if kv)} if args.emloc_args else {}
    if args.budget is not None:
        emloc_args["budget"] = args.budget
    # kept shares of memories measured in an earlier run on the same split (`X@LABEL` without rebuilding LABEL)
    measured_shares = {label: float(share) for label, share in (item.rsplit("=", 1) for item in args.shares)}
    # per-query scores on record for these queries (`--reuse-scores`): a memory rebuilt to the same size, or zero-shot,
    # scores them the same (every method is deterministic given the split), so they are taken instead of scored again
    recorded = {}
    if args.reuse_scores:
        earlier = json.loads(Path(args.reuse_scores).read_text())
        if earlier.get("answers") != [q["answer"] for q in queries]:
            raise SystemExit(f"--reuse-scores {args.reuse_scores}: recorded for other queries")
        recorded = earlier["methods"]

    results = {"model": args.model, "task": args.task, "num_demos": len(demos), "num_queries": len(queries),
               "machine": machine_description(), "processes": state.num_processes, "methods": {}}
    memories: dict[str, TaskMemory] = {}
    full_scores = calibrated_full_scores = None

    def raw_scores(spec, memory, score):
        """Per-query scores and latencies of `spec` before any calibration: for `X+calibrate`, X's from this run; or
        a record of `--reuse-scores` made with a memory of the same size (or none); else `score()`. Also says where
        they came from."""
        label = spec.uncalibrated
        sources = [("this run", results["methods"])] if spec.calibrate else []
        sources.append((args.reuse_scores, recorded))
        for source, methods in sources:
            record = methods.get(label, {})
            same_memory = memory is None or (record.get("kept_kv_bytes") == memory.stats["totals"]["kept_kv_bytes"]
                                             and record.get("kept_ratio") == memory.stats["totals"]["kept_ratio"])
            if "choice_logprobs" in record and same_memory:
                return record["choice_logprobs"], [record["query_seconds_mean"]] * len(queries), f"{label} ({source})"
        scores, latencies = score()
        return scores, latencies, None

    def calibrate(memory, scores) -> tuple[list, dict]:
        """`X+calibrate`: the scores with the label prior of X's context (None: zero-shot) divided out. The run's
        memories are built without a prior (`calibration_rows=0`): only the calibrated methods estimate one."""
        priors = model.estimate_choice_prior(demos, memory, processor, rows=args.calibration_rows)
        by_choices = choice_priors(priors, [q["choices"] for q in queries], [f"{args.queries}: query {i + 1}"
                                                                            for i in range(len(queries))])
        calibrated = [calibrated_scores(row, by_choices[tuple(q["choices"])]) for row, q in zip(scores, queries)]
        return calibrated, {"rows": args.calibration_rows, "priors": priors}

    def shared_memory(label, build):
        """Built on the main process, saved, and loaded by the others."""
        path = shared / re.sub(r"[^\w.@+-]", "_", label)
        if state.is_main_process:
            started = time.perf_counter()
            memory = build()
            memory.stats.setdefault("build", {})["seconds"] = memory.stats.get("build", {}).get("seconds", time.perf_counter() - started)
            if state.num_processes > 1:
                memory.save_pretrained(path)
        state.wait_for_everyone()
        if not state.is_main_process:
            memory = TaskMemory.from_pretrained(path)
        return memory

    def kept_share(spec) -> float | None:
        """A fixed fraction, or the measured kept share of the memory labelled `spec.reference` (built earlier)."""
        if spec.reference is None:
            return spec.kept
        if spec.reference not in memories:
            if spec.reference in measured_shares:
                return measured_shares[spec.reference]
            raise ValueError(f"{spec.label}: no memory labelled {spec.reference!r} in this run (add it to --methods; "
                             f"if it is there, its build failed)")
        return memories[spec.reference].stats["totals"]["kept_ratio"]

    def own_build(spec):
        """The builder call of a memory spec: `full`, `random`, `emloc`, `default` or a registered method's name."""
        if spec.name == "user":  # every default of the library, as a user builds it
            return lambda: model.build_memory(demos, processor=processor, progress=state.is_main_process, **spec.params)
        # a calibrated method estimates its prior (`calibrate`); no certificate: the memory as the rule alone builds it
        params = {"calibration_rows": 0, "validation": 0, **spec.params}
        if spec.name == "full":
            return lambda: model.build_memory(demos, processor=processor, method="full", chunk_size=len(demos), **params)
        if spec.name == "random":
            kept = kept_share(spec)
            return lambda: model.build_memory(demos, processor=processor, method="random", ratio=kept or 0.2, **params)
        params = {"calibration_rows": 0, "validation": 0, **method_arguments(spec, emloc_args)}
        return lambda: model.build_memory(demos, processor=processor, progress=state.is_main_process, **params)

    for spec in order_specs(specs):  # full first: every other method is compared with it
        if state.is_main_process:
            print(f"[{spec.label}]", flush=True)
        record: dict = {}
        try:
            memory, scores_from = None, None
            if spec.name == "zero-shot":
                scores, latencies, scores_from = raw_scores(
                    spec, None, lambda: score_queries(model, processor, queries, None, state=state))
                record.update(kept_ratio=0.0, kept_kv_bytes=0, build_seconds=0.0)
            elif spec.name not in BASELINES:
                if spec.name in KVPRESS_PRESSES:
                    kept = kept_share(spec)
                    if kept is None:
                        raise ValueError(f"{spec.label}: a press needs a kept share, e.g. {spec.name}@0.25 or {spec.name}@emloc")
                    def build(spec=spec, kept=kept):
                        with tempfile.TemporaryDirectory() as work:
                            return build_kvpress_memories(model, processor, demos, [(spec.name, kept)], Path(work), base_dir)[(spec.name, kept)]
                else:
                    build = own_build(spec)
                base_label = spec.memory_label
                memory = memories.get(base_label) or shared_memory(base_label, build)
                memories.setdefault(base_label, memory)
                if spec.retrieve is not None and memory.retrieval is None:  # a press's memory: index it here
                    model.index_memory(memory, demos, processor=processor)
                scores, latencies, scores_from = raw_scores(spec, memory, lambda: score_queries(
                    model, processor, queries, memory, select=spec.select, state=state, retrieve=spec.retrieve))
                record.update(memory_record(memory))
                if spec.retrieve is not None:
                    record["retrieve"] = spec.retrieve
                if spec.select is not None:
                    record["kept_ratio"] = record["kept_ratio"] * spec.select
                    record["selected_fraction"] = spec.select
            elif spec.name == "rices":
                k = int(spec.params.get("k", 8))
                scores, latencies, seconds = rices_scores(model, processor, demos, queries, k)
                record.update(build_seconds=0.0, rices_k=k, kept_ratio=k / len(demos), total_seconds=seconds)
            elif spec.name == "shots":
                share = kept_share(spec)
                if share is None:
                    raise ValueError(f"{spec.label}: few-shot prompting needs a kept share, e.g. shots@0.2 or shots@default")
                count, share = leading_shots(processor, demos, share)
                memory = shared_memory(spec.uncalibrated, lambda: model.build_memory(
                    demos[:count], processor=processor, method="full", chunk_size=count, calibration_rows=0))
                scores, latencies, scores_from = raw_scores(
                    spec, memory, lambda: score_queries(model, processor, queries, memory, state=state))
                record.update(memory_record(memory))
                record.update(kept_ratio=share, full_kv_bytes=round(record["kept_kv_bytes"] / share), shots=count)
            elif spec.name == "lora":
                from lora_baseline import train_lora

                adapted, stats = train_lora(model, processor, demos, **spec.params)
                scores, latencies = score_queries(adapted, processor, queries, None, state=state)
                record.update(build_seconds=stats["train_seconds"], kept_ratio=0.0, lora=stats)
            else:
                raise ValueError(f"unknown method {spec.name!r}")
            if scores_from is not None:
                record["scores_from"] = scores_from
            if spec.calibrate:
                scores, record["calibration"] = calibrate(memory, scores)
            plain_full = spec.name == "full" and spec.select is None and spec.retrieve is None and not spec.params
            reference = full_scores
            if plain_full and not spec.calibrate:
                full_scores, reference = scores, None
            elif plain_full:
                calibrated_full_scores, reference = scores, None
            elif spec.calibrate and calibrated_full_scores is not None:
                reference = calibrated_full_scores
            record.update(summarise(queries, scores, latencies, reference, metrics))
            record["choice_logprobs"] = scores
        except Exception as error:  # one failing baseline must not lose the others' results
            if state.is_main_process:
                print(f"  {spec.label} failed: {error}", file=sys.stderr)
            record = {"error": f"{type(error).__name__}: {error}"}
        results["methods"][spec.label] = record
        if state.is_main_process and "accuracy" in record:
            print(f"  accuracy {record['accuracy']:.3f}  kept {record.get('kept_ratio') or 0:.1%}  "
                  f"s/query {record['query_seconds_mean']:.3f}", flush=True)
    if state.is_main_process:
        emloc_memories = {k: v for k, v in memories.items() if k.startswith(("emloc", "default", "user"))}
        for label, memory in memories.items():
            if label in results["methods"]:
                results["methods"][label]["memory_stats"] = {k: memory.stats.get(k) for k in ("totals", "token_types", "layers", "method", "certificate")}
                results["methods"][label]["memory_stats"]["build"] = {
                    k: v for k, v in memory.stats.get("build", {}).items() if k != "chunks"}
        results["answers"] = [q["answer"] for q in queries]  # per-query scoring (benchmark pooling, bootstrap)
        write_report(results, out, emloc_memories)
        if shared.exists():
            shutil.rmtree(shared, ignore_errors=True)
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--demos", required=True)
    parser.add_argument("--queries", required=True)
    parser.add_argument("--methods", default="zero-shot,full,emloc")
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=None, help="EMLoC kept-KV budget (fraction)")
    parser.add_argument("--emloc-args", default="", help="EMLoC parameters, e.g. delta=0.01,probe=future")
    parser.add_argument("--shares", nargs="*", default=[], metavar="LABEL=F",
                        help="kept shares of memories measured in an earlier run on these demonstrations: `X@LABEL` "
                             "then takes LABEL's share without rebuilding it (benchmark.py --add)")
    parser.add_argument("--reuse-scores", default=None, metavar="RESULTS_JSON",
                        help="take per-query scores from this earlier run on the same queries instead of scoring again, "
                             "for zero-shot and for memories rebuilt to the same size (benchmark.py --add of "
                             "`+calibrate` methods)")
    parser.add_argument("--calibration-rows", type=int, default=16,
                        help="demonstrations whose questions estimate the label prior of `X+calibrate`")
    parser.add_argument("--template", default=None, choices=("chat", "plain"), help="override the processor's rendering")
    parser.add_argument("--task", default=None, help="a name for the report")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    return evaluate(args)


if __name__ == "__main__":
    main()
