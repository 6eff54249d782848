"""The benchmark suite (`make bench`): EMLoC against zero-shot, the full context, kvpress presses, random, RICES and
LoRA on few-shot tasks from real data, plus scaling figures. Writes `benchmarks/` (one report per task, a suite
report, plots and the machine it ran on).

    python examples/benchmark.py --out benchmarks [--tasks iris,wine] [--budgets 0.1,0.2,0.3,0.5] [--skip-scaling]

Tasks are kept only where the full context clearly beats zero-shot on SmolLM2-135M (the report says which and why).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import evaluate_memory  # noqa: E402
from tasks import make_task, write_jsonl  # noqa: E402

KVPRESS = ("snapkv", "pyramidkv", "streamingllm", "tova", "knorm", "expected_attention", "kvpress-random")


def suite_methods(budgets: list[float], kvpress: bool) -> str:
    methods = ["zero-shot", "full", "emloc", "rices[k=8]", "lora[epochs=5;learning_rate=0.002]"]
    methods += ["random@emloc"] + [f"random@{b}" for b in budgets]
    if kvpress:
        methods += [f"{p}@emloc" for p in KVPRESS] + [f"snapkv@{b}" for b in budgets]
    methods += ["emloc+select@0.5", "full+select@0.1", "full+select@0.3"]
    return ",".join(methods)


EMLOC_OPTIONS = "full,emloc[probe=heldout],emloc[budget=0.3],emloc[delta=0.001]"


def run_task(task: str, out: Path, model: str, methods: str, demos: int, queries: int) -> dict:
    data = out / "data" / task
    demo_rows, query_rows = make_task(task, demos, queries)
    write_jsonl(demo_rows, data / "demos.jsonl")
    write_jsonl(query_rows, data / "queries.jsonl")
    return evaluate_memory.main(["--model", model, "--demos", str(data / "demos.jsonl"), "--queries",
                                 str(data / "queries.jsonl"), "--methods", methods, "--out", str(out / task),
                                 "--task", task])


SCALING_SCRIPT = """
import json, resource, sys, time, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/examples"]
from offline_models import emloc_repo_dir
from tasks import make_task
from transformers import AutoModel, AutoProcessor
repo = emloc_repo_dir("smollm2-135m")
model = AutoModel.from_pretrained(repo, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
demos, queries = make_task(sys.argv[2], int(sys.argv[3]), 10)
import threading
def rss_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20
model.score_choices(queries[:1], processor=processor)          # warm-up; weights resident
# the process's lifetime peak (ru_maxrss) is set by loading the model: sample the resident size during the build
baseline, peak, building = rss_mb(), [0.0], [True]
def sample():
    while building[0]:
        peak[0] = max(peak[0], rss_mb()); time.sleep(0.02)
sampler = threading.Thread(target=sample, daemon=True); sampler.start()
started = time.perf_counter()
memory = model.build_memory(demos, processor=processor, method=sys.argv[4], chunk_size=int(sys.argv[5]))
build = time.perf_counter() - started
building[0] = False; sampler.join()
latencies = []
for query in queries:
    t = time.perf_counter(); model.score_choices([query], memory=memory, processor=processor); latencies.append(time.perf_counter() - t)
print(json.dumps({"build_seconds": build, "peak_rss_mb_over_baseline": peak[0] - baseline, "baseline_rss_mb": baseline,
                  "query_seconds_mean": sum(latencies) / len(latencies), "kept_ratio": memory.stats["totals"]["kept_ratio"],
                  "context_tokens": memory.stats["totals"]["full_tokens"], "kept_kv_mb": memory.kv_bytes() / 2**20}))
"""


def run_scaling(out: Path, task: str, sizes: list[int]) -> list[dict]:
    """Build time, peak memory and query latency vs number of demonstrations, each in a fresh process."""
    rows = []
    for size in sizes:
        for method, chunk in (("full", size), ("emloc", 4)):
            result = subprocess.run([sys.executable, "-c", SCALING_SCRIPT, str(HERE.parent), task, str(size), method, str(chunk)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-2000:])
            record = json.loads(result.stdout.strip().splitlines()[-1])
            record.update(method=method, num_demos=size, task=task)
            rows.append(record)
            print(f"[scaling] {task} {method} {size} demos: {record}", flush=True)
    (out / "scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def write_suite_report(out: Path, results: dict, scaling: list[dict], machine: str, screened: dict) -> None:
    tasks = list(results)
    methods = []
    for task in tasks:
        for name in results[task]["methods"]:
            if name not in methods:
                methods.append(name)
    lines = ["# emloc benchmark suite", "", f"Model: SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32). Machine: {machine}.",
             "", "Tasks (90 demonstrations, 40 held-out queries, plain rendering, scored by choices):", ""]
    for task, verdict in screened.items():
        lines.append(f"- `{task}`: {verdict}")
    lines += ["", "## Accuracy by method", "", "| method | " + " | ".join(tasks) + " | mean | kept KV (mean) | s/query (mean) |",
              "|---|" + "---|" * (len(tasks) + 3)]
    summary = {}
    for name in methods:
        accuracies, kept, latency = [], [], []
        cells = []
        for task in tasks:
            record = results[task]["methods"].get(name, {})
            if "accuracy" in record:
                accuracies.append(record["accuracy"])
                kept.append(record.get("kept_ratio") or 0.0)
                latency.append(record["query_seconds_mean"])
                cells.append(f"{record['accuracy']:.3f}")
            else:
                cells.append("failed" if "error" in record else "-")
        if accuracies and len(accuracies) == len(tasks):
            summary[name] = {"accuracy": statistics.fmean(accuracies), "kept_ratio": statistics.fmean(kept),
                             "query_seconds_mean": statistics.fmean(latency)}
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {summary[name]['accuracy']:.3f} | "
                         f"{summary[name]['kept_ratio']:.1%} | {summary[name]['query_seconds_mean']:.3f} |")
        else:
            lines.append(f"| {name} | " + " | ".join(cells) + " | - | - | - |")
    if scaling:
        lines += ["", "## Scaling (one task, each build in a fresh process)", "",
                  "| method | demos | context tokens | build s | peak RSS over baseline (MB) | kept KV (MB) | s/query |",
                  "|---|---|---|---|---|---|---|"]
        for row in scaling:
            lines.append(f"| {row['method']} | {row['num_demos']} | {row['context_tokens']} | {row['build_seconds']:.1f} | "
                         f"{row['peak_rss_mb_over_baseline']:.0f} | {row['kept_kv_mb']:.1f} | {row['query_seconds_mean']:.3f} |")
    lines += ["", "Per-task reports: " + ", ".join(f"[{t}]({t}/report.md)" for t in tasks), ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"machine": machine, "summary": summary, "tasks": tasks,
                                                 "screened": screened, "scaling": scaling}, indent=2) + "\n")
    plot_suite(out, summary, scaling)


def plot_suite(out: Path, summary: dict, scaling: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, record in summary.items():
        axis.scatter(record["kept_ratio"], record["accuracy"], s=36)
        axis.annotate(name, (record["kept_ratio"], record["accuracy"]), fontsize=6)
    axis.set_xlabel("kept KV (share of the full context, mean over tasks)")
    axis.set_ylabel("accuracy (mean over tasks)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "suite_accuracy_vs_kept.png", dpi=120)
    plt.close(figure)
    if scaling:
        figure, axes = plt.subplots(1, 3, figsize=(11, 3.4))
        for method in ("full", "emloc"):
            rows = [r for r in scaling if r["method"] == method]
            sizes = [r["num_demos"] for r in rows]
            axes[0].plot(sizes, [r["build_seconds"] for r in rows], marker="o", label=method)
            axes[1].plot(sizes, [r["peak_rss_mb_over_baseline"] for r in rows], marker="o", label=method)
            axes[2].plot(sizes, [r["query_seconds_mean"] for r in rows], marker="o", label=method)
        for axis, title in zip(axes, ("build seconds", "peak RSS over baseline (MB)", "seconds per query")):
            axis.set_xlabel("demonstrations")
            axis.set_title(title)
            axis.grid(alpha=0.3)
            axis.legend()
        figure.tight_layout()
        figure.savefig(out / "scaling.png", dpi=120)
        plt.close(figure)


def screen(task: str, out: Path) -> tuple[bool, str]:
    """Zero-shot vs full context on the task: kept if the full context gains at least 10 points."""
    data = out / "screen" / task
    demo_rows, query_rows = make_task(task, 90, 40)
    write_jsonl(demo_rows, data / "demos.jsonl")
    write_jsonl(query_rows, data / "queries.jsonl")
    results = evaluate_memory.main(["--model", "smollm2-135m", "--demos", str(data / "demos.jsonl"), "--queries",
                                    str(data / "queries.jsonl"), "--methods", "zero-shot,full", "--out", str(data)])
    zero, full = results["methods"]["zero-shot"]["accuracy"], results["methods"]["full"]["accuracy"]
    keep = full - zero >= 0.10
    return keep, f"zero-shot {zero:.3f}, full context {full:.3f} → {'kept' if keep else 'dropped (no many-shot gain)'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--tasks", default="iris,digits_text,wine,breast_cancer")
    parser.add_argument("--budgets", default="0.1,0.3,0.5")
    parser.add_argument("--demos", type=int, default=90)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-options", action="store_true", help="skip the EMLoC options run on iris")
    parser.add_argument("--scaling-task", default="digits_text", help="a task with at least 190 rows")
    parser.add_argument("--only-scaling", action="store_true", help="rerun the scaling figures into an existing report")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only_scaling:
        previous = json.loads((out / "results.json").read_text())
        results = {task: json.loads((out / task / "results.json").read_text()) for task in previous["tasks"]}
        scaling = run_scaling(out, args.scaling_task, [45, 180])
        write_suite_report(out, results, scaling, evaluate_memory.machine_description(), previous["screened"])
        return
    budgets = [float(b) for b in args.budgets.split(",")]
    kvpress = evaluate_memory.KVPRESS_PYTHON.exists()
    machine = evaluate_memory.machine_description()
    screened, kept_tasks = {}, []
    for task in args.tasks.split(","):
        keep, verdict = screen(task, out)
        screened[task] = verdict
        print(f"[screen] {task}: {verdict}", flush=True)
        if keep:
            kept_tasks.append(task)
    results = {}
    for task in kept_tasks:
        started = time.perf_counter()
        results[task] = run_task(task, out, "smollm2-135m", suite_methods(budgets, kvpress), args.demos, args.queries)
        print(f"[task] {task} done in {time.perf_counter() - started:.0f} s", flush=True)
        write_suite_report(out, results, [], machine, screened)
    scaling = [] if args.skip_scaling else run_scaling(out, args.scaling_task, [45, 180])
    write_suite_report(out, results, scaling, machine, screened)
    if not args.skip_options and "iris" in kept_tasks:  # EMLoC's options beside the faithful default, on iris
        data = out / "data" / "iris"
        evaluate_memory.main(["--model", "smollm2-135m", "--demos", str(data / "demos.jsonl"), "--queries",
                              str(data / "queries.jsonl"), "--methods", EMLOC_OPTIONS, "--out", str(out / "iris-emloc-options"),
                              "--task", "iris"])
    print(f"wrote {out / 'report.md'}")


if __name__ == "__main__":
    main()
