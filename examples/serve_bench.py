# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
Load benchmark of `emloc serve`: SmolLM2-135M, four iris memories, 16 concurrent clients of the real `openai` client.

    python examples/serve_bench.py --out benchmarks/serve [--clients 16] [--requests 64] [--max-tokens 8]

Three runs of the same load against a fresh server each (on 127.0.0.1, in this process): every request to one of four
memories (mixed), every request to one memory (single), and the mixed load with batching off (`--max-batch-size 1`,
one request at a time). Each client sends its requests one after another (half of the clients stream); every answer is
checked against what `generate` gives for that query and memory alone (greedy). Writes `results.json` and `report.md`:
requests/s, tokens/s, p50/p99 latency, errors and wrong answers per run, and the machine and threads it ran on.
"""

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import emloc_serve  # noqa: E402
from memory_emloc import TaskMemory  # noqa: E402
from modeling_emloc import EmlocForConditionalGeneration  # noqa: E402
from offline_models import base_model_dir  # noqa: E402
from processing_emloc import EmlocProcessor  # noqa: E402
from tasks import make_task  # noqa: E402

MEMORIES = 4


def build_memories(model, processor, demos: int, cache: Path) -> dict[str, Path]:
    """Four memories of iris demonstrations (different draws, `demos` each, uncompressed), built once into `cache`."""
    paths = {}
    for seed in range(MEMORIES):
        path = cache / f"iris-{demos}-seed{seed}"
        if not (path / "memory_config.json").is_file():
            task_demos, _ = make_task("iris", demos, 30, seed=seed)
            memory = model.build_memory(task_demos, processor=processor, method="full", calibration_rows=0, retrieval=False)
            memory.save_pretrained(path)
        paths[f"iris-{seed}"] = path
    return paths


def reference_answers(model, processor, paths, pairs, max_tokens) -> dict:
    """`generate` for each (memory, query) alone, greedy: what every served answer must equal."""
    memories = {name: TaskMemory.from_pretrained(path) for name, path in paths.items()}
    answers = {}
    for name, question in sorted(set(pairs)):
        inputs = processor([{"question": question}])
        out = model.generate(**inputs, memory=memories[name], processor=processor, max_new_tokens=max_tokens)
        answers[name, question] = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    return answers


async def load(url: str, plan: list[list[tuple[str, str]]], max_tokens: int) -> list[dict]:
    """Each client sends its list of (memory, question) one after another; half of the clients stream."""
    import openai

    api = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    records = []

    async def client(number: int, requests: list[tuple[str, str]]):
        for name, question in requests:
            started = time.perf_counter()
            record = {"memory": name, "question": question, "stream": number % 2 == 1}
            try:
                if record["stream"]:
                    stream = await api.completions.create(model=name, prompt=question, max_tokens=max_tokens,
                                                          temperature=0, stream=True, stream_options={"include_usage": True})
                    text, tokens = "", 0
                    async for chunk in stream:
                        text += "".join(choice.text for choice in chunk.choices)
                        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
                else:
                    answer = await api.completions.create(model=name, prompt=question, max_tokens=max_tokens, temperature=0)
                    text, tokens = answer.choices[0].text, answer.usage.completion_tokens
                record.update(text=text, tokens=tokens)
            except openai.OpenAIError as error:
                record["error"] = f"{type(error).__name__}: {error}"
            record["seconds"] = time.perf_counter() - started
            records.append(record)

    await asyncio.gather(*(client(number, requests) for number, requests in enumerate(plan)))
    await api.close()
    return records


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


def run(model, processor, paths, plan, references, max_tokens, **limits) -> dict:
    settings = emloc_serve.ServeSettings(model="smollm2-135m", memories={k: str(v) for k, v in paths.items()}, **limits)
    engine = emloc_serve.Engine(model, processor, settings)
    with emloc_serve.running_server(emloc_serve.create_app(emloc_serve.LocalBackend(engine), settings)) as url:
        warm = [[(name, plan[0][0][1])] for name in sorted({name for requests in plan for name, _ in requests})]
        asyncio.run(load(url, warm, max_tokens))  # memories loaded, first passes done
        before = dict(engine.stats)
        started = time.perf_counter()
        records = asyncio.run(load(url, plan, max_tokens))
        seconds = time.perf_counter() - started
    stats = {key: engine.stats[key] - before.get(key, 0) for key in ("batches", "rows", "mixed_batches")}
    latencies = [r["seconds"] for r in records]
    errors = [r for r in records if "error" in r]
    wrong = [r for r in records if "error" not in r and r["text"] != references[r["memory"], r["question"]]]
    tokens = sum(r.get("tokens", 0) for r in records)
    return {
        "requests": len(records), "errors": len(errors), "wrong": len(wrong), "seconds": round(seconds, 2),
        "requests_per_s": round(len(records) / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
        "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p99_s": round(percentile(latencies, 0.99), 3),
        "p99_over_p50": round(percentile(latencies, 0.99) / percentile(latencies, 0.5), 2),
        "batches": stats["batches"], "rows_per_batch": round(stats["rows"] / max(1, stats["batches"]), 2),
        "mixed_batches": stats["mixed_batches"],
        "examples_of_errors": [r["error"] for r in errors[:3]],
        "settings": {"max_batch_size": settings.max_batch_size, "batch_wait_ms": settings.batch_wait_ms},
    }


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def report(results: dict) -> str:
    runs = results["runs"]
    rows = ["| run | requests/s | tokens/s | p50 s | p99 s | p99/p50 | rows/batch | errors | wrong |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        rows.append(f"| {name} | {r['requests_per_s']} | {r['tokens_per_s']} | {r['latency_p50_s']} | {r['latency_p99_s']} | "
                    f"{r['p99_over_p50']} | {r['rows_per_batch']} | {r['errors']} | {r['wrong']} |")
    t, m = results["targets"], results["machine"]
    return "\n".join([
        "# `emloc serve` under load",
        "",
        f"SmolLM2-135M (plain rendering), {MEMORIES} memories of {results['demos_per_memory']} iris demonstrations each "
        f"(uncompressed; {', '.join(str(v) for v in results['memory_tokens'].values())} tokens), "
        f"{results['clients']} concurrent clients of the `openai` client (half streaming), {results['requests']} requests "
        f"per run, `max_tokens` {results['max_tokens']}, greedy. Every answer is compared with `generate` for that "
        f"query and memory alone.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} threads; the server "
        f"and the clients share it (load average {m['load_average_at_start']} when the run began: other work was "
        f"running too).",
        "",
        *rows,
        "",
        f"- mixed / single throughput: **{t['mixed_over_single']}** (target ≥ 0.8)",
        f"- batching on / off (mixed): **{t['batching_speedup']}** (target ≥ 1.5)",
        f"- p99 / p50 latency, mixed: **{t['mixed_p99_over_p50']}** (target ≤ 3)",
        f"- failed or wrong answers: **{t['failed_or_wrong']}** (target 0)",
        "",
        f"Command: `{results['command']}`",
        "",
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--out", default="benchmarks/serve")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests per run, spread over the clients")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--demos", type=int, default=24, help="demonstrations per memory")
    parser.add_argument("--questions", type=int, default=16, help="distinct questions (each is checked against "
                        "`generate` alone with each memory it is asked of)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = base_model_dir("smollm2-135m")
    model = EmlocForConditionalGeneration.from_base(str(base))
    processor = EmlocProcessor.from_base(str(base), template="plain")
    paths = build_memories(model, processor, args.demos, Path.home() / ".cache" / "emloc" / "serve-bench")
    _, queries = make_task("iris", args.demos, 30, seed=0)
    questions = [query["question"] for query in queries[:args.questions]]

    def plan(names):  # request k goes to memory k mod len(names), question k mod len(questions); dealt to the clients
        requests = [(names[k % len(names)], questions[k % len(questions)]) for k in range(args.requests)]
        return [requests[c::args.clients] for c in range(args.clients)]

    mixed, single = plan(sorted(paths)), plan([sorted(paths)[0]])
    references = reference_answers(model, processor, paths, [p for part in mixed + single for p in part], args.max_tokens)
    results = {
        "model": "smollm2-135m", "template": "plain", "demos_per_memory": args.demos,
        "memory_tokens": {name: TaskMemory.from_pretrained(path).tokens_per_layer()[0] for name, path in paths.items()},
        "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens, "machine": machine(),
        "command": "python examples/serve_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "runs": {},
    }
    batching = dict(max_batch_size=args.clients, batch_wait_ms=args.batch_wait_ms)
    for name, requests, limits in (("mixed (4 memories)", mixed, batching), ("single memory", single, batching),
                                   ("mixed, batching off", mixed, dict(max_batch_size=1, batch_wait_ms=0))):
        results["runs"][name] = run(model, processor, paths, requests, references, args.max_tokens, **limits)
        print(name, json.dumps(results["runs"][name]), flush=True)
    runs = list(results["runs"].values())
    results["targets"] = {
        "mixed_over_single": round(runs[0]["requests_per_s"] / runs[1]["requests_per_s"], 2),
        "batching_speedup": round(runs[0]["requests_per_s"] / runs[2]["requests_per_s"], 2),
        "mixed_p99_over_p50": runs[0]["p99_over_p50"],
        "failed_or_wrong": sum(r["errors"] + r["wrong"] for r in runs),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
