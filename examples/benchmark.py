"""The benchmark (`make bench`): task memories against zero-shot, the full context, random pruning, kvpress presses
(KVzip included), RICES and LoRA, on few-shot tasks from real data and two real models, with paired bootstrap
intervals. The protocol (screening, splits, seeds, methods, intervals, retained gain) and the records are described in
docs/benchmark.md.

Each split runs in a working directory `OUT/<model>/<task>/<split>/` and, when it finishes, is folded into one JSON
line of `OUT/records/<model>.jsonl.gz`; the report is regenerated from those records alone. Run it in pieces (a split
on record is not rerun; `--force` reruns it; `--add` runs only the methods it lacks, `--add --redo` measures them
again); the report is rebuilt after each split and with `--report-only`:

    python examples/benchmark.py --models smollm2-135m --tasks iris --seeds 1,2          # a first piece
    python examples/benchmark.py --models gemma3-270m --quick                             # short method list
    python examples/benchmark.py --selection --models smollm2-135m --tasks iris \
        --methods "zero-shot,full,emloc,emloc[probe=future;protect=extra],random@emloc"  # choose options on seed 100
    python examples/benchmark.py --models smollm2-135m --seeds 1,2 --quick --add          # new methods on old splits
    python examples/benchmark.py --models gemma3-270m --tasks iris --add --redo --methods "default,random@default"
    python examples/benchmark.py --report-only                     # report.md, results.json, headline.md, plots
    python examples/benchmark.py --report-only --scaling --scaling-sizes 720 --scaling-methods default  # one more point

Outputs: `OUT/report.md` (per model a table per task, differences, cost; a summary; the targets of issue 9 for
`default`), `OUT/results.json` (pooled numbers and intervals), `OUT/headline.md` (the README's table, between its
`<!-- headline:start -->` and `<!-- headline:end -->` markers), per model `OUT/accuracy_vs_kept_<model>.png`, the
option-selection report in `OUT/selection/`, and the scaling records and figure (`OUT/scaling.json`, `scaling.png`).
The kvpress presses need the side venv (`make kvpress`); without it they are left out (the run says so).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import gzip
import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import evaluate_memory  # noqa: E402
from stats import choice_js, paired_bootstrap, top_choice  # noqa: E402
from tasks import make_task, task_rows, write_jsonl  # noqa: E402

MODELS = ("smollm2-135m", "gemma3-270m")
MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma 3 270M"}
TASKS = ("iris", "digits_text", "wine", "breast_cancer", "digits_text_346", "diabetes", "fashion_text")
SEEDS = (0, 1, 2, 3)
SCREEN_SEED = 100  # screening and option selection; never a reported seed
MIN_GAIN = 0.15
MIN_POOLED_QUERIES = 200
# reported whatever their screening split shows: SmolLM2's iris screening split (60 queries) shows no gain
# (0.333 -> 0.333), while its reported seeds 1-4 show +33 points; `--keep ""` applies the screening rule alone
KEEP = ("smollm2-135m/iris",)
DEFAULT_METHOD = "emloc-query"  # the registered method `build_memory` uses with no method argument (--default-method)

SUITE = ["zero-shot", "full", "emloc", "default", "random@emloc", "random@default", "snapkv@default",
         "streamingllm@default", "tova@default", "kvzip@default", "kvzip@emloc", "kvzip@0.1", "kvzip@0.25", "kvzip@0.5",
         "random@0.1", "random@0.25", "random@0.5", "rices[k=8]", "rices[k=16]", "full+retrieve@4", "full+retrieve@8",
         "full+retrieve@16", "default+retrieve@4", "default+retrieve@8", "default+retrieve@16", "emloc+retrieve@8",
         "lora[epochs=5;learning_rate=0.002]"]
QUICK = ["zero-shot", "full", "emloc", "default", "random@emloc", "random@default", "snapkv@default", "kvzip@default",
         "full+retrieve@4", "full+retrieve@8", "full+retrieve@16", "default+retrieve@8", "rices[k=8]", "rices[k=16]"]
NO_KEPT_SHARE = ("zero-shot", "lora")  # methods that hold no memory (their kept KV is 0 by definition)


# ---------------------------------------------------------------------------------------------------------------------
# Running splits
# ---------------------------------------------------------------------------------------------------------------------


def model_key(model: str) -> str:
    """The directory name of a model: its offline name, or a repo directory's name."""
    return model if model in MODELS else re.sub(r"[^\w.+-]", "_", Path(model).name or model)


def queries_per_split(task: str, demos: int, max_queries: int) -> int:
    rows = task_rows(task)
    queries = min(max_queries, rows - demos)
    if queries < 1:
        raise SystemExit(f"{task} has {rows} rows: no queries left after {demos} demonstrations")
    return queries


def run_split(model: str, task: str, seed: int, methods: str, out: Path, demos: int, queries: int,
              force: bool = False, add: bool = False, redo: bool = False) -> dict:
    """One seeded split: its demonstrations and queries, every method on them (`evaluate_memory`), run in the working
    directory `out` (`OUT/<model>/<task>/<split>`) and folded into the model's records (`fold_split`). A split on
    record is not rerun (unless `force`); with `add`, the methods it lacks are run on its demonstrations and queries
    and added to it (`add_methods`); with `redo` as well, `methods` it has are measured again, their records replaced
    (the labels and dates of the old ones kept under `replaced`). A split the records lack whose `results.json` is in
    the working directory (a run stopped before folding) is folded, not rerun."""
    record = find_record(out)
    if record is None and (out / "results.json").exists() and not force:
        record = fold_split(out)
    if record is not None and not force:
        results = record
        if redo and add:
            for label in evaluate_memory.split_methods(methods):
                if label in results["methods"]:
                    results.setdefault("replaced", []).append({"label": label, "record": results["methods"].pop(label),
                                                               "date": datetime.date.today().isoformat()})
        missing = [m for m in evaluate_memory.split_methods(methods) if m not in results["methods"]]
        if missing and add:
            materialise_split(out, results)
            add_methods(model, task, out, results, missing)
            return fold_split(out)
        note = f"; without {', '.join(missing)} (rerun with --force, or --add, to add them)" if missing else ""
        print(f"[skip] {out} is on record{note}", flush=True)
        return results
    demo_rows, query_rows = make_task(task, demos, queries, seed=seed)
    write_jsonl(demo_rows, out / "demos.jsonl")
    write_jsonl(query_rows, out / "queries.jsonl")
    (out / "split.json").write_text(json.dumps({"model": model, "task": task, "seed": seed, "num_demos": demos,
                                                "num_queries": queries, "methods": methods}, indent=2) + "\n")
    started = time.perf_counter()
    evaluate_memory.main(["--model", model, "--demos", str(out / "demos.jsonl"), "--queries",
                          str(out / "queries.jsonl"), "--methods", methods, "--out", str(out), "--task", task])
    print(f"[split] {out} done in {time.perf_counter() - started:.0f} s", flush=True)
    return fold_split(out)


def add_methods(model: str, task: str, out: Path, results: dict, missing: list[str]) -> dict:
    """Runs `missing` on an existing split — with `zero-shot` and `full` (latency and agreement references in the
    same run) and the memories they refer to (`LABEL+retrieve@K`; `X@LABEL` of a LABEL not yet measured), which are
    rebuilt, not reused; `X@LABEL` of a LABEL on record takes its recorded kept share — and adds their records to its
    `results.json` (the whole run stays in `added/`). The records already there are kept: every
    method is deterministic given the split. When every method added is `X+calibrate`, the run takes the per-query
    scores on record (`--reuse-scores`) for zero-shot and for each memory rebuilt to the same size: only the priors
    are computed."""
    needed, shares = [label for label in ("zero-shot", "full") if label not in missing], {}
    for label in missing:
        spec = evaluate_memory.parse_methods(label)[0]
        base = spec.memory_label
        share = results["methods"].get(spec.reference, {}).get("kept_ratio") if spec.reference else None
        if share is not None:  # `X@LABEL` needs only LABEL's share, on record: no rebuild
            shares[spec.reference] = share
        for dependency in (None if share is not None else spec.reference, base if base != label else None):
            if dependency and dependency not in needed and dependency not in missing:
                needed.append(dependency)
    started = time.perf_counter()
    work = out / f"added-{len(results.get('added', []))}"
    # calibrated records of methods on record: their memories are rebuilt for the prior, their queries not scored again
    reuse = ["--reuse-scores", str(out / "results.json")] if all(
        evaluate_memory.parse_methods(label)[0].calibrate for label in missing) else []
    added = evaluate_memory.main(["--model", model, "--demos", str(out / "demos.jsonl"), "--queries",
                                  str(out / "queries.jsonl"), "--methods", ",".join(needed + missing), "--out", str(work),
                                  "--task", task, *reuse,
                                  "--shares", *(f"{label}={share!r}" for label, share in shares.items())])
    for label in missing:
        results["methods"][label] = added["methods"][label]
    results.setdefault("added", []).append({"methods": missing, "rebuilt": needed, "shares": shares, "dir": work.name,
                                            "machine": added.get("machine"),
                                            "date": datetime.date.today().isoformat()})
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"[added] {', '.join(missing)} to {out} in {time.perf_counter() - started:.0f} s", flush=True)
    return results


def same_run_methods(results: dict) -> dict:
    """For each method of a split, the records of the run that measured it (the split's own, or the `--add` run that
    added it, whose `zero-shot` and `full` the split's record keeps as `references`): its build and latency are
    compared with that run's `full` and `zero-shot` only."""
    runs = {label: results["methods"] for label in results["methods"]}
    for added in results.get("added", []):
        if "references" in added:
            runs.update({label: added["references"] for label in added["methods"]})
    return runs


# ---------------------------------------------------------------------------------------------------------------------
# Records: one line per split, what the report is regenerated from
# ---------------------------------------------------------------------------------------------------------------------


RECORDS = "records"  # OUT/records/<model>.jsonl.gz
SPLIT_NAME = re.compile(r"(?:screen-|select-)?seed(\d+)")  # a split's working directory: seed1, screen-seed100, ...
# per-split aggregates the report recomputes query by query from the predictions and choice scores it keeps
PER_SPLIT_AGGREGATES = ("exact_match", "agreement", "mean_js")
# a memory's kept tokens per layer and per token type: drawn in each split's own plots only
PER_SPLIT_PLOTTED = ("layers", "token_types")
# what the report reads of an `--add` run's own references: build ÷ prefill and s/query ÷ zero-shot of the methods it
# added are measured against that run's `full` and `zero-shot` (`same_run_methods`)
RUN_REFERENCES = {"full": "build_seconds", "zero-shot": "query_seconds_mean"}


def records_path(out: Path, model: str) -> Path:
    """The records of `model` (a `model_key`) under the benchmark directory `out`."""
    return out / RECORDS / f"{model}.jsonl.gz"


def read_records(path: Path) -> list[dict]:
    """The split records of one model's file, in file order (by task, then split name); none if there is no file."""
    if not path.exists():
        return []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_records(path: Path, records: list[dict]) -> None:
    """One JSON line per split, sorted by task and split name, gzip without a timestamp: the same records give the
    same bytes. Written beside and renamed over, so a reader never sees half a file."""
    text = "".join(json.dumps(record, separators=(",", ":")) + "\n"
                   for record in sorted(records, key=lambda r: (r["task"], r["split"])))
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as handle:
        handle.write(text.encode("utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(buffer.getvalue())
    partial.replace(path)


@contextlib.contextmanager
def _records_lock(path: Path):
    """Holds a lock on `path`'s directory: two runs of one model (different tasks) fold their splits one after the
    other, and no lock file is left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def split_record(split_dir: Path) -> dict:
    """The record of a split's working directory `OUT/<model>/<task>/<split>`: its `results.json` (as
    `evaluate_memory` wrote it) less the per-split aggregates and per-layer counts the report does not read, the
    replaced records reduced to their labels and dates, and for each `--add` run the `zero-shot` and `full` numbers
    its methods are compared with (`references`; a run whose directory is gone keeps the ones on record)."""
    results = json.loads((split_dir / "results.json").read_text())
    match = SPLIT_NAME.fullmatch(split_dir.name)
    if match is None:
        raise ValueError(f"{split_dir}: not a split directory (expected seedN, screen-seedN or select-seedN)")
    answers = results.get("answers")
    if answers is None:  # recorded before `evaluate_memory` kept them
        answers = [row["answer"] for row in evaluate_memory.read_jsonl(split_dir / "queries.jsonl")]
    methods = {}
    for label, record in results["methods"].items():
        record = {key: value for key, value in record.items() if key not in PER_SPLIT_AGGREGATES}
        if "memory_stats" in record:
            record["memory_stats"] = {k: v for k, v in record["memory_stats"].items() if k not in PER_SPLIT_PLOTTED}
        methods[label] = record
    added = []
    for entry in results.get("added", []):
        entry = dict(entry)
        run_path = split_dir / entry.get("dir", "added") / "results.json"
        if run_path.exists():
            run = json.loads(run_path.read_text())["methods"]
            entry["references"] = {label: {key: run[label][key]} for label, key in RUN_REFERENCES.items()
                                   if key in run.get(label, {})}
        added.append(entry)
    facts = {key: value for key, value in results.items()
             if key not in ("task", "split", "seed", "task_rows", "methods", "answers", "added", "replaced")}
    record = {"task": split_dir.parent.name, "split": split_dir.name, "seed": int(match.group(1)), **facts,
              "answers": answers, "methods": methods}
    rows = _rows(record["task"])
    if rows is not None:  # the report's row count, from the record: regenerating it needs no task data
        record["task_rows"] = rows
    if added:
        record["added"] = added
    if results.get("replaced"):
        record["replaced"] = [{"label": r["label"], "date": r.get("date")} for r in results["replaced"]]
    return record


def find_record(split_dir: Path) -> dict | None:
    """The record of the split whose working directory is `split_dir`, if its model's records have it."""
    model, task = split_dir.parent.parent.name, split_dir.parent.name
    return next((r for r in read_records(records_path(split_dir.parents[2], model))
                 if r["task"] == task and r["split"] == split_dir.name), None)


def fold_split(split_dir: Path) -> dict:
    """Writes the record of the split measured in `split_dir` into its model's records, replacing the split's earlier
    record; returns it."""
    record = split_record(split_dir)
    path = records_path(split_dir.parents[2], split_dir.parent.parent.name)
    with _records_lock(path):
        others = [r for r in read_records(path) if (r["task"], r["split"]) != (record["task"], record["split"])]
        write_records(path, [*others, record])
    return record


def merge_records(source: Path, target: Path) -> list[tuple[str, str, str]]:
    """Adds the methods measured in another benchmark directory `source` (a run with its own `--out`, on the same
    splits) to the records of `target`, as an `--add` run would have: per split on record in both (the same queries,
    checked), the methods `target` lacks, and an `added` entry naming them with that run's `full` and `zero-shot`
    (their build ÷ prefill and latency are measured against those). Returns `(model, task, split)` of each split
    merged. Lets parts of a benchmark run side by side, each in its own directory."""
    merged = []
    for path in sorted((source / RECORDS).glob("*.jsonl.gz")):
        model = path.name[:-len(".jsonl.gz")]
        destination = records_path(target, model)
        with _records_lock(destination):
            records = {(r["task"], r["split"]): r for r in read_records(destination)}
            for record in read_records(path):
                key = (record["task"], record["split"])
                if key not in records or record["split"].startswith("screen-"):
                    continue
                own = records[key]
                if own["answers"] != record["answers"]:
                    raise ValueError(f"{source}: {model}/{key[0]}/{key[1]} holds other queries than {target}'s record")
                new = [label for label in record["methods"] if label not in own["methods"]]
                if not new:
                    continue
                own["methods"].update({label: record["methods"][label] for label in new})
                references = {label: {key_: record["methods"][label][key_]} for label, key_ in RUN_REFERENCES.items()
                              if key_ in record["methods"].get(label, {})}
                own.setdefault("added", []).append({
                    "methods": new, "rebuilt": [label for label in record["methods"] if label not in new],
                    "dir": f"merged from {source.name}", "machine": record.get("machine"),
                    "date": datetime.date.today().isoformat(), "references": references})
                merged.append((model, *key))
            write_records(destination, list(records.values()))
    return merged


def fold_splits(out: Path) -> list[Path]:
    """Folds every split working directory under `out` (`OUT/<model>/<task>/<split>/results.json`) into the records;
    returns the directories folded."""
    folded = []
    for results_path in sorted(out.glob("*/*/*/results.json")):
        if SPLIT_NAME.fullmatch(results_path.parent.name):
            fold_split(results_path.parent)
            folded.append(results_path.parent)
    return folded


def materialise_split(split_dir: Path, record: dict) -> None:
    """The working directory of a split on record, for `--add`: its demonstrations and queries, drawn again from the
    task and seed (`make_task` gives the same rows, byte for byte), and its `results.json` from the record."""
    demos, queries = make_task(record["task"], record["num_demos"], record["num_queries"], seed=record["seed"])
    if [q["answer"] for q in queries] != record["answers"]:
        raise SystemExit(f"{split_dir}: the task {record['task']!r} draws other queries for seed {record['seed']} than "
                         f"the split on record (its data changed?); rerun the split with --force")
    write_jsonl(demos, split_dir / "demos.jsonl")
    write_jsonl(queries, split_dir / "queries.jsonl")
    (split_dir / "results.json").write_text(json.dumps(record, indent=2) + "\n")


def screen_verdict(results: dict | None, min_gain: float, keep: bool = False) -> dict:
    """Whether a task is reported for a model: the full context gains at least `min_gain` over zero-shot on the
    screening split, or the task is named in `--keep` (`keep`; the verdict then says which gain it overrode)."""
    if results is None:
        return {"kept": False, "verdict": "not screened"}
    methods = results["methods"]
    if "accuracy" not in methods.get("zero-shot", {}) or "accuracy" not in methods.get("full", {}):
        return {"kept": False, "verdict": "screening failed"}
    zero, full = methods["zero-shot"]["accuracy"], methods["full"]["accuracy"]
    kept = full - zero >= min_gain
    verdict = "kept" if kept else f"dropped: the full context gains {full - zero:+.3f} (< {min_gain:.2f})"
    if keep and not kept:
        kept, verdict = True, f"kept by --keep: the full context gains {full - zero:+.3f} (< {min_gain:.2f})"
    return {"kept": kept, "zero_shot": zero, "full": full, "gain": full - zero, "verdict": verdict,
            "num_queries": results["num_queries"], "num_demos": results["num_demos"]}


# ---------------------------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------------------------


def method_family(label: str) -> str:
    """`kvzip@0.25` → `kvzip`, `emloc[probe=future]` → `emloc`, `rices[k=8]` → `rices`."""
    return re.match(r"[^@\[+]*", label).group(0) or label


def is_memory_label(label: str) -> bool:
    """A memory built by our builder at its own size (`emloc`, `default`, `emloc[...]`, a registered method)."""
    spec = evaluate_memory.parse_methods(label)[0]
    return (spec.kept is None and spec.select is None and spec.retrieve is None and spec.name not in ("zero-shot", "full", "random")
            and spec.name not in evaluate_memory.BASELINES and spec.name not in evaluate_memory.KVPRESS_PRESSES)


def is_target_label(label: str) -> bool:
    """The memories the targets are about: `user` (issue 40: the default path as a user gets it), `default`, and
    `default[budget=F]` (the default with its kept share capped, for the target at ≤ 10 % kept)."""
    spec = evaluate_memory.parse_methods(label)[0]
    return spec.name in ("default", "user") and is_memory_label(label) and set(spec.params) <= {"budget"}


def references(label: str) -> tuple[str, str]:
    """The zero-shot and full-context labels `label` is measured against: calibrated scores (`X+calibrate`) against
    the calibrated `zero-shot+calibrate` and `full+calibrate`, so that retained gain, agreement and differences compare
    like with like."""
    if evaluate_memory.parse_methods(label)[0].calibrate:
        return "zero-shot" + evaluate_memory.CALIBRATE, "full" + evaluate_memory.CALIBRATE
    return "zero-shot", "full"


def same_share(label: str, other: str) -> bool:
    """`other` is a memory at `label`'s kept share (`snapkv@default` for `default`), scored alike (both calibrated or
    neither)."""
    spec, other_spec = evaluate_memory.parse_methods(label)[0], evaluate_memory.parse_methods(other)[0]
    return other != label and spec.calibrate == other_spec.calibrate \
        and other_spec.uncalibrated.endswith(f"@{spec.uncalibrated}")


def random_comparator(label: str) -> str | None:
    """The `random` method at the same kept share as `label`: `random@LABEL` for a memory LABEL, `random@REF` for
    `X@REF` (REF a fraction or a label); None where there is none (baselines, `full`, random itself, `+select`). A
    calibrated label's comparator is calibrated too."""
    spec = evaluate_memory.parse_methods(label)[0]
    if spec.calibrate:
        comparator = random_comparator(spec.uncalibrated)
        return None if comparator is None else comparator + evaluate_memory.CALIBRATE
    if spec.name in ("zero-shot", "full", "random") or spec.name in evaluate_memory.BASELINES or spec.select is not None \
            or spec.retrieve is not None:
        return None
    if spec.kept is not None:
        return "random@" + label.split("@", 1)[1]
    return f"random@{label}" if is_memory_label(label) else None


def rices_comparator(label: str) -> str | None:
    """RICES with the same number of demonstrations as a retrieval label (`default+retrieve@8` → `rices[k=8]`)."""
    match = re.search(r"\+retrieve@(\d+)$", label)
    return f"rices[k={match.group(1)}]" if match else None


def per_query(results: dict, answers: list[str]) -> dict:
    """Per method of one split: `correct`, `agree` (top choice = full's), `js` (to full), one value per query; a
    calibrated method's `full` is the calibrated full context (`references`)."""
    methods = results["methods"]
    out = {}
    for label, record in methods.items():
        if "predictions" not in record:
            continue
        full = methods.get(references(label)[1], {}).get("choice_logprobs")
        row = {"correct": [float(p == a) for p, a in zip(record["predictions"], answers)]}
        if full is not None and record.get("choice_logprobs") is not None:
            row["agree"] = [float(top_choice(m) == top_choice(f)) for m, f in zip(record["choice_logprobs"], full)]
            row["js"] = [choice_js(m, f) for m, f in zip(record["choice_logprobs"], full)]
        out[label] = row
    return out


def ordered_methods(splits: list[dict], preferred: list[str] | None = None) -> list[str]:
    seen = []
    for split in splits:
        for label in split["results"]["methods"]:
            if label not in seen:
                seen.append(label)
    first = [m for m in (preferred or []) if m in seen]
    head = [m for m in ("zero-shot", "full") if m in seen and m not in first]
    first += [m for m in ("zero-shot+calibrate", "full+calibrate") if m in seen and m not in first]
    return head + first + [m for m in seen if m not in first and m not in head]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else None


def aligned(splits: list[dict], labels: list[str], key: str) -> dict[str, np.ndarray]:
    """Per label, `key` values over every query of every split, NaN where the method has no score."""
    series = {}
    for label in labels:
        parts = []
        for split in splits:
            row = split["per_query"].get(label, {}).get(key)
            parts.append(np.asarray(row, dtype=np.float64) if row is not None else np.full(split["num_queries"], np.nan))
        series[label] = np.concatenate(parts) if parts else np.zeros(0)
    return series


def pool_task(splits: list[dict], labels: list[str], resamples: int, seed: int) -> dict:
    """Pooled numbers and paired bootstrap intervals of every method over the splits of one (model, task)."""
    correct = aligned(splits, labels, "correct")
    agree, js = aligned(splits, labels, "agree"), aligned(splits, labels, "js")
    groups = np.concatenate([np.full(s["num_queries"], i) for i, s in enumerate(splits)])
    contrasts, ratios = set(), []
    for label in labels:
        zero_shot, full = references(label)
        if label != full and full in correct:
            contrasts.add((label, full))
        comparator = random_comparator(label)
        if comparator in correct:
            contrasts.add((label, comparator))
        if is_memory_label(evaluate_memory.parse_methods(label)[0].uncalibrated):
            for other in labels:
                if same_share(label, other):
                    contrasts.add((label, other))
        if rices_comparator(label) in correct:
            contrasts.add((label, rices_comparator(label)))
        if zero_shot in correct and full in correct and label not in (zero_shot, full):
            ratios.append(label)
    boot = paired_bootstrap(correct, sorted(contrasts), groups=groups, resamples=resamples, seed=seed,
                            gains=[(label, *references(label)) for label in ratios])
    # a memory recorded before `drop_unreadable` counted its kept share over the whole context; that differs from what a
    # query reads where the model has sliding windows, which shows in the task's newer records
    totals = [r.get("memory_stats", {}).get("totals", {}) for s in splits for r in s["results"]["methods"].values()]
    windowed = any(t.get("readable_kv_bytes", t.get("full_kv_bytes")) != t.get("full_kv_bytes") for t in totals)
    pooled = {}
    for label in labels:
        records = [(s, s["results"]["methods"].get(label, {})) for s in splits]
        done = [(s, r) for s, r in records if "accuracy" in r]
        run = {id(s): s.get("runs", {}).get(label, s["results"]["methods"]) for s, _ in done}  # same-run references
        full_builds = {id(s): run[id(s)].get("full", {}).get("build_seconds") for s, _ in done}
        build_ratio = [r["build_seconds"] / full_builds[id(s)] for s, r in done
                       if r.get("build_seconds") is not None and full_builds[id(s)]]
        zero_latency = {id(s): run[id(s)].get("zero-shot", {}).get("query_seconds_mean") for s, _ in done}
        latency_ratio = [r["query_seconds_mean"] / zero_latency[id(s)] for s, r in done
                         if r.get("query_seconds_mean") is not None and zero_latency[id(s)]]
        n_done = sum(s["num_queries"] for s, _ in done)
        entry = {
            "accuracy": boot["mean"][label],
            "retained_gain": boot["gain"].get(label),
            "agreement": _mean(agree[label]) if label != references(label)[1] else 1.0,
            "mean_js": _mean(js[label]) if label != references(label)[1] else 0.0,
            "kept_ratio": 0.0 if method_family(label) in NO_KEPT_SHARE else _mean(r.get("kept_ratio") for _, r in done),
            "build_seconds": _mean(r.get("build_seconds") for _, r in done),
            "build_over_full_prefill": _mean(build_ratio),
            "query_seconds_mean": (sum(r["query_seconds_mean"] * s["num_queries"] for s, r in done) / n_done) if n_done else None,
            "query_over_zero_shot": _mean(latency_ratio),  # per split, against zero-shot in the same run
            "num_queries": n_done,
            "num_splits": len(done),
            "errors": [{"seed": s["seed"], "error": r["error"]} for s, r in records if "error" in r],
            "missing_splits": [s["seed"] for s, r in records if not r],
        }
        full = references(label)[1]
        if (label, full) in contrasts:
            entry["vs_full"] = boot["diff"][f"{label}-{full}"]
        comparator = random_comparator(label)
        if comparator is not None:
            entry["vs_random"] = {"against": comparator, **boot["diff"][f"{label}-{comparator}"]} \
                if (label, comparator) in contrasts else {"against": comparator, "estimate": None, "missing": True}
        at_share = {other: boot["diff"][f"{label}-{other}"] for a, other in sorted(contrasts)
                    if a == label and same_share(label, other)}
        if at_share:
            entry["vs_same_share"] = at_share
        if (label, rices_comparator(label)) in contrasts:
            entry["vs_rices"] = {"against": rices_comparator(label), **boot["diff"][f"{label}-{rices_comparator(label)}"]}
        if windowed:
            entry["whole_context_share"] = [s["seed"] for s, r in done if "totals" in r.get("memory_stats", {})
                                            and "readable_kv_bytes" not in r["memory_stats"]["totals"]]
        names = {r.get("memory_stats", {}).get("method", {}).get("name") for _, r in done} - {None}
        if names:
            entry["memory_method"] = sorted(names)
        pooled[label] = entry
    return pooled


def pool_summary(tasks: dict, labels: list[str], resamples: int, seed: int) -> dict:
    """Means over tasks (each task weighs the same), with intervals for accuracy, the retained gain (per task, then
    averaged) and the differences to `full` and to `random` at the same share (queries resampled within their split)."""
    kept_tasks = [t for t, entry in tasks.items() if entry.get("splits_data")]
    task_queries = {t: sum(s["num_queries"] for s in tasks[t]["splits_data"]) for t in kept_tasks}
    # only methods measured on every split of every task: a task's queries weigh 1 / (its queries) in the mean, so a
    # method missing some of a task's splits would weigh that task less than the others
    complete = [l for l in labels
                if all(tasks[t]["methods"].get(l, {}).get("num_queries") == task_queries[t] for t in kept_tasks)]
    if not kept_tasks or not complete:
        return {}
    all_splits = [s for t in kept_tasks for s in tasks[t]["splits_data"]]
    correct = aligned(all_splits, complete, "correct")
    groups = np.concatenate([np.full(s["num_queries"], i) for i, s in enumerate(all_splits)])
    weights = np.concatenate([np.full(s["num_queries"], 1.0 / task_queries[t])
                              for t in kept_tasks for s in tasks[t]["splits_data"]])
    contrasts = {(l, references(l)[1]) for l in complete if l != references(l)[1] and references(l)[1] in complete}
    contrasts |= {(l, random_comparator(l)) for l in complete if random_comparator(l) in complete}
    # the retained gain's interval: per task, then the mean over tasks, as the summary's retained gain is computed
    gain_triples = [(l, *references(l)) for l in complete
                    if l not in references(l) and set(references(l)) <= set(complete)]
    task_of_query = np.concatenate([np.full(s["num_queries"], i) for i, t in enumerate(kept_tasks)
                                    for s in tasks[t]["splits_data"]])
    boot = paired_bootstrap(correct, sorted(contrasts), groups=groups, weights=weights, resamples=resamples, seed=seed,
                            gains=gain_triples, gain_groups=task_of_query)
    summary = {}
    for label in complete:
        per_task = [tasks[t]["methods"][label] for t in kept_tasks]
        gains = [(p.get("retained_gain") or {}).get("estimate") for p in per_task]
        entry = {"accuracy": boot["mean"][label], "tasks": kept_tasks,
                 **{key: _mean(p.get(key) for p in per_task) for key in
                    ("agreement", "mean_js", "kept_ratio", "build_seconds", "build_over_full_prefill", "query_seconds_mean",
                     "query_over_zero_shot")},
                 "retained_gain": _mean(gains) if all(g is not None for g in gains) else None}
        if label in boot["gain"]:
            entry["retained_gain_interval"] = boot["gain"][label]
        if (label, references(label)[1]) in contrasts:
            entry["vs_full"] = boot["diff"][f"{label}-{references(label)[1]}"]
        comparator = random_comparator(label)
        if (label, comparator) in contrasts:
            entry["vs_random"] = {"against": comparator, **boot["diff"][f"{label}-{comparator}"]}
        summary[label] = entry
    return summary


def collect(out: Path, split_prefix: str, min_gain: float, seeds: set[int] | None = None,
            preferred: list[str] | None = None, resamples: int = 2000, boot_seed: int = 0,
            screen_seed: int = SCREEN_SEED, keep: frozenset[str] = frozenset()) -> dict:
    """Everything on record under `out/records/`: screening verdicts and pooled splits (`<split_prefix><seed>`);
    `keep` names `model/task` pairs reported whatever their screening split shows."""
    models = {}
    for path in sorted((out / RECORDS).glob("*.jsonl.gz")):
        model = path.name[:-len(".jsonl.gz")]
        by_task: dict[str, dict[str, dict]] = {}
        for record in read_records(path):
            by_task.setdefault(record["task"], {})[record["split"]] = record
        tasks = {}
        for task, on_record in sorted(by_task.items()):
            screen = screen_verdict(on_record.get(f"screen-seed{screen_seed}"), min_gain,
                                    keep=f"{model}/{task}" in keep)
            splits = []
            for name, results in sorted(on_record.items()):
                match = re.fullmatch(rf"{re.escape(split_prefix)}(\d+)", name)
                if not match or (seeds is not None and int(match.group(1)) not in seeds):
                    continue
                splits.append({"seed": int(match.group(1)), "dir": f"{model}/{task}/{name}", "results": results,
                               "record": path.relative_to(out).as_posix(), "num_queries": len(results["answers"]),
                               "per_query": per_query(results, results["answers"]), "runs": same_run_methods(results)})
            if not splits and screen["verdict"] == "not screened":
                continue
            if split_prefix == "seed" and not screen["kept"]:
                splits_for_report = []  # a task without a many-shot gain is listed, not reported
            else:
                splits_for_report = splits
            rows = next((r["task_rows"] for r in on_record.values() if "task_rows" in r), None)
            entry = {"screen": screen, "rows": _rows(task) if rows is None else rows, "splits_data": splits_for_report,
                     "splits": [{"seed": s["seed"], "dir": s["dir"], "record": s["record"],
                                 "num_queries": s["num_queries"], "num_demos": s["results"].get("num_demos"),
                                 "failed": {m: r["error"] for m, r in s["results"]["methods"].items() if "error" in r}}
                                for s in splits_for_report],
                     "methods": {}}
            if splits_for_report:
                labels = ordered_methods(splits_for_report, preferred)
                entry["methods"] = pool_task(splits_for_report, labels, resamples, boot_seed)
                entry["num_queries"] = sum(s["num_queries"] for s in splits_for_report)
            tasks[task] = entry
        if tasks:
            labels = []
            for entry in tasks.values():
                labels += [l for l in entry["methods"] if l not in labels]
            models[model] = {"tasks": tasks, "summary": pool_summary(tasks, labels, resamples, boot_seed),
                             "methods": labels}
    return models


def _rows(task: str) -> int | None:
    """The task's row count, or None where the task is unknown here or its data is not installed (`--report-only`
    takes it from the records where they have it, and must not need fashion_text's Debian package)."""
    try:
        return task_rows(task)
    except (ValueError, FileNotFoundError):
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def _num(value, pattern="{:.3f}") -> str:
    return pattern.format(value) if isinstance(value, (int, float)) and not math.isnan(value) else "-"


def _ci(interval: dict | None, signed: bool = False, pattern: str = "{:.3f}") -> str:
    if not interval or interval.get("estimate") is None:
        return "-"
    fmt = pattern.replace("{:", "{:+") if signed else pattern
    return f"{fmt.format(interval['estimate'])} [{fmt.format(interval['low'])}, {fmt.format(interval['high'])}]"


def _pct(value) -> str:
    return _num(value, "{:.1%}")


def _gain(interval: dict | None) -> str:
    return _num((interval or {}).get("estimate"), "{:.0%}")


def _top_share(answers: list) -> float:
    return max(answers.count(a) for a in set(answers)) / len(answers) if answers else 0.0


def _gain_of(correct, zero, full) -> float | None:
    gain = float(np.sum(full) - np.sum(zero))
    return None if gain <= 0 else float((np.sum(correct) - np.sum(zero)) / gain)


def certificate_pairs(models: dict, label: str = "user", resamples: int = 2000, seed: int = 0) -> list[dict]:
    """How well the certificates of memory `label` predicted what the reported queries then measured, per (model,
    task): the held-out rows of its splits pooled (their answers are in each certificate) into one retained gain with a
    95 % bootstrap interval, beside the pooled retained gain measured on the queries; the flags the certificates raised
    (a split's certificate under 70 % or collapsed) beside what the queries show (under 70 %, or one answer to most
    queries where the full context varies); the recipes and repair rungs the builds chose."""
    pairs = []
    rng = np.random.default_rng(seed)
    for model, data in models.items():
        for task, entry in data["tasks"].items():
            certificates = [s["results"]["methods"].get(label, {}).get("memory_stats", {}).get("certificate")
                            for s in entry["splits_data"]]
            certificates = [c for c in certificates if c and "answers" in c]
            measured = (entry["methods"].get(label) or {}).get("retained_gain") or {}
            if not certificates or measured.get("estimate") is None:
                continue
            answers = {key: np.concatenate([np.array(c["answers"][key]) for c in certificates])
                       for key in ("gold", "zero_shot", "full", "memory")}
            correct = {key: answers[key] == answers["gold"] for key in ("zero_shot", "full", "memory")}
            estimate = _gain_of(correct["memory"], correct["zero_shot"], correct["full"])
            draws = []
            for _ in range(resamples):
                rows = rng.integers(0, len(answers["gold"]), len(answers["gold"]))
                value = _gain_of(correct["memory"][rows], correct["zero_shot"][rows], correct["full"][rows])
                if value is not None:
                    draws.append(value)
            low, high = (np.percentile(draws, [2.5, 97.5]).tolist() if len(draws) >= resamples // 2 else (None, None))
            predictions = [p for s in entry["splits_data"] for p in s["results"]["methods"].get(label, {}).get("predictions", [])]
            full_predictions = [p for s in entry["splits_data"] for p in s["results"]["methods"].get("full", {}).get("predictions", [])]
            collapsed = _top_share(predictions) >= 0.75 and _top_share(predictions) >= _top_share(full_predictions) + 0.2
            flagged = any((c.get("retained_gain") is not None and c["retained_gain"] < 0.7) or c.get("collapsed")
                          for c in certificates)
            pairs.append({
                "model": model, "task": task, "splits": len(certificates), "rows": int(len(answers["gold"])),
                "certificate": {"estimate": estimate, "low": low, "high": high},
                "measured": measured, "contains": None if low is None else bool(low <= measured["estimate"] <= high),
                "flagged": flagged, "weak": bool(measured["estimate"] < 0.7 or collapsed), "collapsed": collapsed,
                "recipes": dict(Counter(c["recipe"] for c in certificates)),
                "rungs": dict(Counter(c["rung"] for c in certificates)),
                "met": sum(bool(c.get("met")) for c in certificates),
                "seconds": _mean([c.get("seconds") for c in certificates]),
            })
    return pairs


_WHOLE_CONTEXT_NOTE = (" `†`: on some splits the memory was recorded before `drop_unreadable` and its share counts the KV "
                       "a sliding-window layer can no longer read (the predictions are the same; on the splits "
                       "re-measured the readable share was higher).")


def write_report(out: Path, models: dict, args, title: str = "emloc benchmark", scaling: list | None = None,
                 root: Path | None = None) -> None:
    """`out/report.md`, `out/results.json` and a plot per model; the splits' records are linked relative to `out` from
    the benchmark directory `root` (default: `out`)."""
    machines = sorted({s["results"].get("machine", "?") for m in models.values() for t in m["tasks"].values()
                       for s in t["splits_data"]})
    lines = [f"# {title}", "",
             f"Generated {datetime.date.today().isoformat()} from the split records. Machine: {'; '.join(machines) or '-'}.",
             "",
             f"Protocol: {args.demos} demonstrations per split, plain rendering, queries scored by their choices; a task "
             f"is kept for a model if the full context beats zero-shot by at least {args.min_gain:.0%} on the "
             f"screening split (seed {args.screen_seed}, also the option-selection split; never reported)"
             f"{' or is named in --keep (' + ', '.join(sorted(args.keep_set)) + ')' if args.keep_set else ''}. Reported "
             f"numbers pool every split of seeds {', '.join(map(str, sorted({s['seed'] for m in models.values() for t in m['tasks'].values() for s in t['splits_data']}))) or '-'}; "
             f"each split builds its own memories. Intervals: 95 % paired bootstrap ({args.bootstrap} resamples, "
             f"seed {args.bootstrap_seed}, queries resampled within their split). `default` is the library's default "
             f"method (`build_memory` without a method argument; expected: `{args.default_method}`).", ""]
    warnings = []
    # -- screening
    lines += ["## Tasks", "", "| model | task | rows | queries / split | screening: zero-shot | full | gain | verdict | pooled queries |",
              "|---|---|---|---|---|---|---|---|---|"]
    for model, data in models.items():
        for task, entry in data["tasks"].items():
            screen = entry["screen"]
            pooled = entry.get("num_queries")
            per_split = sorted({s["num_queries"] for s in entry["splits"]})
            lines.append(f"| {model} | {task} | {entry['rows'] or '-'} | {'/'.join(map(str, per_split)) or '-'} | "
                         f"{_num(screen.get('zero_shot'))} | {_num(screen.get('full'))} | "
                         f"{_num(screen.get('gain'), '{:+.3f}')} | {screen['verdict']}"
                         f"{'; no reported split' if screen['kept'] and not pooled else ''} | {pooled or '-'} |")
            if pooled and pooled < MIN_POOLED_QUERIES:
                warnings.append(f"{model}/{task}: {pooled} pooled queries (< {MIN_POOLED_QUERIES}); run more seeds")
    lines.append("")
    # -- summary for the README
    lines += ["## Summary (means over each model's kept tasks; paste into the README)", "",
              "| model | method | accuracy [95 % CI] | retained gain | kept KV | agreement | Δ vs full [95 % CI] | "
              "Δ vs random, same share [95 % CI] |", "|---|---|---|---|---|---|---|---|"]
    for model, data in models.items():
        for label, entry in data["summary"].items():
            random_cell = _ci(entry.get("vs_random"), signed=True)
            if entry.get("vs_random"):
                random_cell += f" (`{entry['vs_random']['against']}`)"
            lines.append(f"| {MODEL_NAMES.get(model, model)} | `{label}` | {_ci(entry['accuracy'])} | "
                         f"{_num(entry.get('retained_gain'), '{:.0%}')} | {_pct(entry.get('kept_ratio'))} | "
                         f"{_num(entry.get('agreement'))} | {_ci(entry.get('vs_full'), signed=True)} | {random_cell} |")
    lines += ["", "Means over tasks weigh every task the same; the summary lists the methods measured on every split "
              "of every kept task of the model. Retained gain = (accuracy − zero-shot) / (full − zero-shot) per task, then averaged.",
              ""]
    # -- per model
    for model, data in models.items():
        tasks = [t for t, e in data["tasks"].items() if e["splits_data"]]
        if not tasks:
            continue
        labels = data["methods"]
        lines += [f"## {MODEL_NAMES.get(model, model)} (`{model}`)", "", "### Accuracy, retained gain, kept KV, agreement with full", "",
                  "| method | " + " | ".join(f"{t}: accuracy [95 % CI] | gain | kept | agr." for t in tasks) + " |",
                  "|---|" + "---|---|---|---|" * len(tasks)]
        marked = any((data["tasks"][t]["methods"].get(label) or {}).get("whole_context_share")
                     for t in tasks for label in labels)
        for label in labels:
            cells = []
            for task in tasks:
                entry = data["tasks"][task]["methods"].get(label)
                if not entry or not entry["num_queries"]:
                    reason = (entry or {}).get("errors", [{}])
                    failed = reason[0].get("error", "") if reason else ""
                    cells += [f"failed: {_short(failed)}" if failed else "-", "", "", ""]
                    continue
                partial = "*" if entry["missing_splits"] or entry["errors"] else ""
                whole = "†" if entry.get("whole_context_share") else ""
                cells += [_ci(entry["accuracy"]) + partial, _gain(entry.get("retained_gain")),
                          _pct(entry["kept_ratio"]) + whole, _num(entry["agreement"])]
            lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
        lines += ["", "`*`: the method is missing or failed on some splits (pooled over the others). `gain`: retained "
                  "many-shot gain; `kept`: kept share of the full context's KV (mean over splits), counted over what a query reads "
                  "(`totals.readable_kv_bytes`)." + (_WHOLE_CONTEXT_NOTE if marked else ""), "",
                  "### Paired differences (95 % CI): to `full`, and to `random` at the same kept share", "",
                  "| method | " + " | ".join(f"{t}: Δ vs full | Δ vs random" for t in tasks) + " |",
                  "|---|" + "---|---|" * len(tasks)]
        for label in labels:
            cells = []
            for task in tasks:
                entry = data["tasks"][task]["methods"].get(label) or {}
                cells += [_ci(entry.get("vs_full"), signed=True), _ci(entry.get("vs_random"), signed=True)]
            if any(c != "-" for c in cells):
                lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
        comparators = sorted({(e.get("vs_random") or {}).get("against") for t in tasks
                              for e in data["tasks"][t]["methods"].values()} - {None})
        if comparators:
            lines += ["", "Random baselines used: " + ", ".join(f"`{c}`" for c in comparators) + "."]
        retrieval = [label for label in labels if any("vs_rices" in (data["tasks"][t]["methods"].get(label) or {})
                                                       for t in tasks)]
        if retrieval:
            lines += ["", "### Retrieval inside the memory against RICES with as many demonstrations (paired Δ, 95 % CI)", "",
                      "| method | " + " | ".join(f"{t}: Δ vs RICES" for t in tasks) + " |",
                      "|---|" + "---|" * len(tasks)]
            for label in retrieval:
                cells = [_ci((data["tasks"][t]["methods"].get(label) or {}).get("vs_rices"), signed=True) for t in tasks]
                against = next((data["tasks"][t]["methods"][label]["vs_rices"]["against"] for t in tasks
                                if "vs_rices" in (data["tasks"][t]["methods"].get(label) or {})), "")
                lines.append(f"| `{label}` (vs `{against}`) | " + " | ".join(cells) + " |")
        lines += ["", "### Cost and fidelity (means over tasks)", "",
                  "| method | mean JS to full | build s | build ÷ one full prefill | s / query | s / query ÷ zero-shot |",
                  "|---|---|---|---|---|---|"]
        for label in labels:
            per_task = [data["tasks"][t]["methods"].get(label) or {} for t in tasks]
            row = {k: _mean(p.get(k) for p in per_task) for k in ("mean_js", "build_seconds", "build_over_full_prefill",
                                                                 "query_seconds_mean", "query_over_zero_shot")}
            lines.append(f"| `{label}` | {_num(row['mean_js'], '{:.4f}')} | {_num(row['build_seconds'], '{:.1f}')} | "
                         f"{_num(row['build_over_full_prefill'], '{:.1f}')} | {_num(row['query_seconds_mean'])} | "
                         f"{_num(row['query_over_zero_shot'], '{:.2f}')} |")
        lines += ["", f"![accuracy against kept KV, {model}](accuracy_vs_kept_{model}.png)", ""]
        for task in tasks:
            recorded = data["tasks"][task]["methods"].get("default", {}).get("memory_method")
            if recorded and recorded != [args.default_method]:
                warnings.append(f"{model}/{task}: `default` memories recorded method {recorded}, expected "
                                f"`{args.default_method}` (--default-method)")
    # -- targets (issue 9) for the default, and for the default under a kept-share cap (`default[budget=F]`)
    target_rows = []
    for model, data in models.items():
        for task, entry in data["tasks"].items():
            for label, memory in entry["methods"].items():
                if not is_target_label(label) or not memory["num_queries"]:
                    continue
                kept = memory["kept_ratio"]
                gain = (memory.get("retained_gain") or {}).get("estimate")
                need = 0.75 if kept is not None and kept <= 0.10 else 0.90 if kept is not None and kept <= 0.25 else None
                lows = {k: v.get("low") for k, v in memory.get("vs_same_share", {}).items()}
                weakest = min(lows, key=lambda k: lows[k] if lows[k] is not None else -1) if lows else None
                ok = [need is not None and gain is not None and gain >= need,
                      bool(lows) and all(v is not None and v > 0 for v in lows.values()),
                      kept is not None and kept <= 0.25 and (memory.get("agreement") or 0) >= 0.9]
                target_rows.append(f"| {model} | {task} | `{label}` | {_pct(kept)} | "
                                   f"{_gain(memory.get('retained_gain'))} (need {_num(need, '{:.0%}')}) | "
                                   f"{_num(memory.get('agreement'))} | "
                                   f"{f'`{weakest}` ' + _num(lows[weakest], '{:+.3f}') if weakest else '-'} | "
                                   f"{' '.join('✓' if x else '✗' for x in ok)} |")
    if target_rows:
        lines += ["## Targets of issue 9 for `default`", "",
                  "Retained gain ≥ 90 % at ≤ 25 % kept (≥ 75 % at ≤ 10 %); the interval's lower bound above every "
                  "method at the same kept share (`X@default`, `X@default[budget=F]`); agreement ≥ 0.9 at ≤ 25 % "
                  "kept. Marks: gain, lower bounds, agreement. `default[budget=F]` is the default capped at F of "
                  "each chunk (the ≤ 10 % target).", "",
                  "| model | task | memory | kept KV | retained gain | agreement | lowest lower bound vs `X@memory` "
                  "| targets |",
                  "|---|---|---|---|---|---|---|---|", *target_rows, ""]
    # -- certificates (issue 40)
    pairs = certificate_pairs(models, resamples=args.bootstrap, seed=args.bootstrap_seed)
    if pairs:
        lines += ["## Certificates of `user` (issue 40)", "",
                  "`user` is the default path as a user gets it: `build_memory(demos)` — 16 demonstrations held out, the "
                  "memory of the others certified on them and repaired up the ladder below 90 % of the gain, then the "
                  "rows added — asked as its certificate chose. Per pair, the held-out rows of its splits pooled (the "
                  "certificate's prediction, with its 95 % bootstrap interval) beside the retained gain the reported "
                  "queries measured; a pair is flagged when a split's certificate showed under 70 % of the gain or a "
                  "collapse, weak when the queries did.", "",
                  "| model | task | held-out rows | certificate: retained gain [95 % CI] | measured on the queries | "
                  "contains | flagged / weak | recipes chosen | rungs | targets met |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for pair in pairs:
            cert = pair["certificate"]
            interval = "-" if cert["low"] is None else f"[{cert['low']:.0%}, {cert['high']:.0%}]"
            lines.append(f"| {pair['model']} | {pair['task']} | {pair['rows']} | {_num(cert['estimate'], '{:.0%}')} "
                         f"{interval} | {_gain(pair['measured'])} | {'-' if pair['contains'] is None else '✓' if pair['contains'] else '✗'} | "
                         f"{'yes' if pair['flagged'] else 'no'} / {'yes' if pair['weak'] else 'no'} | "
                         f"{', '.join(f'{k} ×{v}' for k, v in sorted(pair['recipes'].items()))} | "
                         f"{', '.join(f'{k} ×{v}' for k, v in sorted(pair['rungs'].items()))} | {pair['met']}/{pair['splits']} |")
        errors = [abs(p["certificate"]["estimate"] - p["measured"]["estimate"]) for p in pairs
                  if p["certificate"]["estimate"] is not None]
        contained = [p["contains"] for p in pairs if p["contains"] is not None]
        mean_error = _num(_mean(errors), "{:.0%}") if errors else "-"
        lines += ["", f"Intervals containing the measured gain: {sum(contained)} of {len(contained)} pairs; mean |certificate "
                  f"− measured| {mean_error} (points of retained gain); weak pairs flagged: "
                  f"{sum(p['flagged'] for p in pairs if p['weak'])} of {sum(p['weak'] for p in pairs)}; flagged pairs "
                  f"that were not weak: {sum(p['flagged'] and not p['weak'] for p in pairs)}.", ""]
    # -- splits
    def link(record: str) -> str:
        return Path(os.path.relpath((root or out) / record, out)).as_posix()

    lines += ["## Splits", "", "| model | task | seed | demos | queries | results | failed methods |", "|---|---|---|---|---|---|---|"]
    for model, data in models.items():
        for task, entry in data["tasks"].items():
            for split in entry["splits"]:
                failed = "; ".join(f"`{m}`: {_short(e)}" for m, e in split["failed"].items()) or "-"
                lines.append(f"| {model} | {task} | {split['seed']} | {split['num_demos']} | {split['num_queries']} | "
                             f"[{split['dir']}]({link(split['record'])}) | {failed} |")
    lines.append("")
    if scaling:
        lines += ["## Scaling (one task, each build in a fresh process)", "",
                  "`full` is the prefill (in chunks of 45 demonstrations); `default` is `build_memory` with no method. "
                  "Peak RSS is the resident size sampled during the build, over the loaded model's.", "",
                  "| model | task | method | demos | context tokens | build s | build ÷ prefill | peak RSS over baseline (MB) "
                  "| kept KV (MB) | peak ÷ kept KV | s/query |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in scaling_rows(scaling):
            ratio = f"{row['build_over_prefill']:.1f}×" if row["build_over_prefill"] else "-"
            over_kept = f"{row['peak_over_kept']:.1f}" if row["peak_over_kept"] else "-"
            lines.append(f"| {scaling_model(row)} | {row['task']} | {row['method']} | {row['num_demos']} | "
                         f"{row['context_tokens']} | {row['build_seconds']:.1f} | {ratio} | "
                         f"{row['peak_rss_mb_over_baseline']:.0f} | {row['kept_kv_mb']:.1f} | {over_kept} | "
                         f"{row['query_seconds_mean']:.3f} |")
        lines += ["", "![scaling](scaling.png)", ""]
    if warnings:
        lines += ["## Warnings", "", *[f"- {w}" for w in warnings], ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    serialisable = {model: {"summary": data["summary"], "methods": data["methods"],
                            "tasks": {t: {k: v for k, v in e.items() if k != "splits_data"} for t, e in data["tasks"].items()}}
                    for model, data in models.items()}
    (out / "results.json").write_text(json.dumps({
        "protocol": {"demos": args.demos, "max_queries_per_split": args.queries, "min_gain": args.min_gain,
                     "kept_by_hand": sorted(args.keep_set),
                     "screen_seed": args.screen_seed, "bootstrap": {"resamples": args.bootstrap, "seed": args.bootstrap_seed,
                                                                    "level": 0.95, "paired": True, "strata": "split"},
                     "default_method": args.default_method},
        "machines": machines, "models": serialisable, "warnings": warnings, "scaling": scaling or [],
        **({"certificates": pairs} if pairs else {})}, indent=1) + "\n")
    for model, data in models.items():
        plot_model(out, model, data)


def _short(text: str, length: int = 140) -> str:
    return " ".join(str(text).split()).replace("|", "/")[:length]


def plot_model(out: Path, model: str, data: dict) -> Path | None:
    """Accuracy against kept KV, a panel per task, 95 % intervals as error bars; a colour per method family, lines
    through each family's fixed budgets (`X@0.1`, `X@0.25`, ...)."""
    tasks = [t for t, e in data["tasks"].items() if e["splits_data"]]
    if not tasks:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = []
    for label in data["methods"]:
        if method_family(label) not in families:
            families.append(method_family(label))
    fixed_colours = {"zero-shot": "black", "full": "tab:blue", "emloc": "tab:orange", "default": "tab:red",
                     "random": "tab:gray", "kvzip": "tab:green", "snapkv": "tab:purple", "streamingllm": "tab:brown",
                     "tova": "tab:pink", "rices": "tab:olive", "lora": "tab:cyan"}
    others = [f for f in families if f not in fixed_colours]
    colours = {**fixed_colours, **{f: plt.get_cmap("Set3")(i % 12) for i, f in enumerate(others)}}
    columns = min(3, len(tasks))
    rows = math.ceil(len(tasks) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False)
    for axis, task in zip(axes.flat, tasks):
        methods = data["tasks"][task]["methods"]
        budgets: dict[str, list] = {}
        for label, entry in methods.items():
            accuracy = entry["accuracy"]
            if accuracy.get("estimate") is None or entry.get("kept_ratio") is None:
                continue
            x, y = entry["kept_ratio"], accuracy["estimate"]
            family = method_family(label)
            fixed = re.fullmatch(r"[^@+]+@([0-9.]+)", label)
            marker = "^" if fixed else "s" if "@" in label else "o"
            axis.errorbar(x, y, yerr=[[y - accuracy["low"]], [accuracy["high"] - y]], fmt=marker, ms=5, capsize=2,
                          color=colours[family], label=family if family not in axis.get_legend_handles_labels()[1] else None)
            if fixed:
                budgets.setdefault(family, []).append((x, y))
            if label in ("zero-shot", "full"):
                axis.axhline(y, color=colours[family], ls="--", lw=0.8)
            elif not fixed:
                axis.annotate(label if len(label) <= 24 else family, (x, y), fontsize=5, xytext=(3, 2),
                              textcoords="offset points")
        for family, points in budgets.items():
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], color=colours[family], lw=0.8)
        axis.set_title(f"{task} (n = {data['tasks'][task].get('num_queries')})")
        axis.set_xlabel("kept KV (share of the full context)")
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(tasks):]:
        axis.axis("off")
    handles, names = [], []
    for axis in axes.flat:
        for handle, name in zip(*axis.get_legend_handles_labels()):
            if name not in names:
                handles.append(handle)
                names.append(name)
    figure.legend(handles, names, loc="lower center", ncol=min(8, len(names)), fontsize=7)
    figure.suptitle(f"{MODEL_NAMES.get(model, model)}: accuracy against kept KV (95 % paired-bootstrap intervals; "
                    f"○ own size, □ at another memory's share, △ fixed budget)", fontsize=9)
    figure.tight_layout(rect=(0, 0.06, 1, 0.96))
    path = out / f"accuracy_vs_kept_{model}.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Headline: the README's table
# ---------------------------------------------------------------------------------------------------------------------


BEST_PRESS = "best press@user"  # the kvpress press at the user path's kept share with the highest retained gain
# (label or BEST_PRESS, shown for every model (a row that is not on record says so) or only where on record)
HEADLINE_ROWS = (("zero-shot", True), ("full", True), ("user", True), ("default", True), ("default+calibrate", True),
                 ("default+retrieve@8", True), ("emloc", True), (BEST_PRESS, True), ("rices[k=8]", False),
                 ("lora", False))
HEADLINE_START, HEADLINE_END = "<!-- headline:start -->", "<!-- headline:end -->"


def headline_label(summary: dict, row: str) -> str | None:
    """The summary label a headline row shows: the label itself; for `lora` the first LoRA label; for `BEST_PRESS`
    the press `X@user` (as scored or calibrated) with the highest retained gain. None where the summary has none."""
    if row == BEST_PRESS:
        presses = [label for label, entry in summary.items() if entry.get("retained_gain") is not None
                   and re.fullmatch(rf"({'|'.join(evaluate_memory.KVPRESS_PRESSES)})@user(\+calibrate)?", label)]
        return max(presses, key=lambda label: summary[label]["retained_gain"]) if presses else None
    if row == "lora":
        return next((label for label in summary if method_family(label) == "lora"), None)
    return row if row in summary else None


def headline_table(models: dict) -> str:
    """The README's headline table (markdown): per model, the rows of `HEADLINE_ROWS` from its summary (means over
    its reported tasks): accuracy, retained gain with its 95 % interval, kept KV share, build ÷ one full prefill.
    `models` is `collect`'s result or the `models` of `results.json`."""
    order = [m for m in MODELS if m in models] + [m for m in models if m not in MODELS]
    lines = ["| model | method | accuracy | retained gain [95 % CI] | kept KV | build ÷ full prefill |",
             "|---|---|---|---|---|---|"]
    pools = []  # per model, the tasks and queries its means are over
    for model in order:
        summary = models[model]["summary"]
        if not summary:
            continue
        name = MODEL_NAMES.get(model, model)
        tasks = next(iter(summary.values()))["tasks"]
        queries = sum(models[model]["tasks"][t]["num_queries"] for t in tasks)
        pools.append(f"{name}: {', '.join(tasks)} ({queries} queries)")
        for row, always in HEADLINE_ROWS:
            label = headline_label(summary, row)
            if label is None:
                if always:
                    shown = "a kvpress press at the user path's share" if row == BEST_PRESS else f"`{row}`"
                    lines.append(f"| {name} | {shown} | not measured on every reported split | | | |")
                    name = ""
                continue
            entry = summary[label]
            interval = entry.get("retained_gain_interval") or {}
            gain = "-" if interval.get("estimate") is None else \
                f"{interval['estimate']:.0%} [{interval['low']:.0%}, {interval['high']:.0%}]"
            built = entry.get("build_over_full_prefill") if entry.get("build_seconds") else None  # zero-shot, RICES: none
            lines.append(f"| {name} | `{label}` | {_num(entry['accuracy'].get('estimate'))} | {gain} | "
                         f"{_pct(entry.get('kept_ratio'))} | {_num(built, '{:.1f}×')} |")
            name = ""
    notes = (f"Means over each model's reported tasks, each weighing the same ({'; '.join(pools)}). Retained gain = "
             "(accuracy − zero-shot) / (full − zero-shot) per task, then averaged (`+calibrate`: against the calibrated "
             "zero-shot and full context), with its 95 % paired bootstrap interval (queries resampled within their "
             "split). Kept KV: the memory's share of the full context's KV cache. Build ÷ full prefill: the build's "
             "time over the full context's prefill in the same run (`user`: the whole `build_memory` call, its "
             "certificate and repairs included). `user`: `build_memory(demos)` with every default, asked with "
             "`score_choices`' defaults (the way its certificate chose) — what a user gets; `default`: the default "
             "rule without a certificate, scored as is; `+calibrate`: `score_choices(calibrate=True)`; "
             "`+retrieve@8`: each query reads its 8 nearest demonstrations in the memory; `emloc`: the paper's rule; "
             "`X@user`: the best kvpress press measured at the user path's kept share. Generated by "
             "`examples/benchmark.py --report-only` from `benchmarks/records/`; every number, per task, in "
             "`benchmarks/report.md`.")
    lines += ["", textwrap.fill(notes, width=120, break_long_words=False, break_on_hyphens=False)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Scaling (issue 10 extends it)
# ---------------------------------------------------------------------------------------------------------------------


SCALING_SCRIPT = """
import json, resource, sys, time, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/examples"]
from evaluate_memory import load_model, machine_description, parse_methods
from tasks import make_task
model, processor, _ = load_model(sys.argv[6], None)
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
spec = parse_methods(sys.argv[4])[0]  # a method name, or one with options: `default[relative=none]`
# `user`: every default of build_memory (the certificate, its repairs, the priors); the others: the rule alone
method = {**({} if spec.name in ("default", "user") else {"method": spec.name}), **spec.params}
if spec.name != "user":
    method = {"calibration_rows": 0, "validation": 0, **method}
started = time.perf_counter()
memory = model.build_memory(demos, processor=processor, chunk_size=int(sys.argv[5]), **method)
build = time.perf_counter() - started
building[0] = False; sampler.join()
def seconds_per_query(memory, **options):  # asked one at a time, as the memory's recipe says unless told otherwise
    latencies = []
    for query in queries:
        t = time.perf_counter(); model.score_choices([query], memory=memory, processor=processor, **options)
        latencies.append(time.perf_counter() - t)
    return sum(latencies) / len(latencies)
asked = seconds_per_query(memory)
zero_shot = seconds_per_query(None)  # the same queries with no memory, in this process: the unit of a query's cost
retrieved = seconds_per_query(memory, retrieve=8) if memory.retrieval is not None else None
print(json.dumps({"build_seconds": build, "peak_rss_mb_over_baseline": peak[0] - baseline, "baseline_rss_mb": baseline,
                  "query_seconds_mean": asked, "zero_shot_query_seconds_mean": zero_shot,
                  "retrieve8_query_seconds_mean": retrieved,
                  "recipe": (memory.stats.get("certificate") or {}).get("recipe"),
                  "kept_ratio": memory.stats["totals"]["kept_ratio"],
                  "context_tokens": memory.stats["totals"]["full_tokens"], "kept_kv_mb": memory.kv_bytes() / 2**20,
                  "memory_method": memory.stats["method"]["name"], "memory_params": memory.stats["method"]["params"],
                  "chunk_size": int(sys.argv[5]),
                  "machine": machine_description()}))
"""

SCALING_SIZES = (45, 180, 720)
SCALING_METHODS = ("full", "emloc", "default")
FULL_PREFILL_CHUNK = 45  # demonstrations per prefill chunk of `full`: one pass over thousands of tokens would need
# the whole [tokens, tokens] attention matrix at once; chunking gives the same keys and values (attention is causal)


def run_scaling(out: Path, task: str, sizes: list[int], methods: list[str], model: str = "smollm2-135m",
                chunk_size: int = 4) -> list[dict]:
    """Build time, peak resident memory and query latency against the number of demonstrations, each build in a fresh
    process. `full` is the prefill (in chunks of `FULL_PREFILL_CHUNK` demonstrations), the others build with
    `chunk_size`; `default` is `build_memory` with no method. Each record is written to `OUT/scaling.json` as soon as
    it is measured, replacing an earlier record of the same method, size and task (a killed run keeps what it
    measured)."""
    path = out / "scaling.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    order = list(dict.fromkeys([*SCALING_METHODS, *methods]))
    for size in sizes:
        for method in methods:
            chunk = min(size, FULL_PREFILL_CHUNK) if method == "full" else chunk_size
            result = subprocess.run([sys.executable, "-c", SCALING_SCRIPT, str(HERE.parent), task, str(size), method,
                                     str(chunk), model], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-2000:])
            record = json.loads(result.stdout.strip().splitlines()[-1])
            record.update(method=method, num_demos=size, task=task, model=model_key(model))
            same = (record["model"], task, size, method)
            rows = [r for r in rows if (r.get("model"), r["task"], r["num_demos"], r["method"]) != same] + [record]
            models = list(dict.fromkeys(scaling_model(r) for r in rows))  # each model's rows together, in measured order
            rows.sort(key=lambda r: (models.index(scaling_model(r)), r["task"], r["num_demos"],
                                     order.index(r["method"]) if r["method"] in order else 99))
            path.write_text(json.dumps(rows, indent=2) + "\n")
            print(f"[scaling] {task} {method} {size} demos: {record}", flush=True)
    plot_scaling(out, rows)
    return rows


def scaling_model(row: dict) -> str:
    """The model of a scaling record; the records from before the model was recorded are SmolLM2's."""
    return row.get("model", "smollm2-135m")


def scaling_rows(scaling: list[dict]) -> list[dict]:
    """Each record with its build over the `full` prefill of the same size and its peak over its kept KV."""
    prefill = {(r.get("model"), r["task"], r["num_demos"]): r["build_seconds"] for r in scaling if r["method"] == "full"}
    rows = []
    for row in scaling:
        full = prefill.get((row.get("model"), row["task"], row["num_demos"]))
        rows.append({**row, "build_over_prefill": row["build_seconds"] / full if full else None,
                     "peak_over_kept": row["peak_rss_mb_over_baseline"] / row["kept_kv_mb"] if row["kept_kv_mb"] else None})
    return rows


def plot_scaling(out: Path, scaling: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(11, 4.2))
    models = list(dict.fromkeys(scaling_model(r) for r in scaling))
    for model, method in dict.fromkeys((scaling_model(r), r["method"]) for r in scaling):
        rows = sorted((r for r in scaling if scaling_model(r) == model and r["method"] == method),
                      key=lambda r: r["num_demos"])
        sizes = [r["num_demos"] for r in rows]
        label = f"{model} {method}" if len(models) > 1 else method  # one line per model and method
        axes[0].plot(sizes, [r["build_seconds"] for r in rows], marker="o", label=label)
        axes[1].plot(sizes, [r["peak_rss_mb_over_baseline"] for r in rows], marker="o", label=label)
        axes[2].plot(sizes, [r["query_seconds_mean"] for r in rows], marker="o", label=label)
    for axis, title in zip(axes, ("build seconds", "peak RSS over baseline (MB)", "seconds per query")):
        axis.set_xlabel("demonstrations")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize="small")  # one legend, below the three plots
    figure.tight_layout(rect=(0, 0.04 + 0.05 * ((len(labels) + 2) // 3), 1, 1))
    figure.savefig(out / "scaling.png", dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def requested_methods(args) -> list[str]:
    """`--methods` (default: the suite, or `--quick`'s list), with `zero-shot` and `full` first where missing: the
    methods to run, and the order of the report's rows whatever this machine can run."""
    methods = evaluate_memory.split_methods(args.methods) if args.methods else list(QUICK if args.quick else SUITE)
    for required in ("zero-shot", "full"):  # retained gain and fidelity need both
        if required not in methods:
            methods.insert(0 if required == "zero-shot" else 1, required)
    return methods


def method_list(args) -> list[str]:
    """The requested methods this machine can run: without the kvpress side venv, no press."""
    methods = requested_methods(args)
    if not evaluate_memory.KVPRESS_PYTHON.exists():
        presses = [m for m in methods if evaluate_memory.parse_methods(m)[0].name in evaluate_memory.KVPRESS_PRESSES]
        if presses:
            print(f"[note] no kvpress side venv ({evaluate_memory.KVPRESS_PYTHON}; `make kvpress`): skipping "
                  f"{', '.join(presses)}", flush=True)
            methods = [m for m in methods if m not in presses]
    return methods


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--models", default=",".join(MODELS), help="offline model names or Emloc repo directories")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="reported splits")
    parser.add_argument("--demos", type=int, default=90)
    parser.add_argument("--queries", type=int, default=60, help="queries per split, at most (capped by the task's rows)")
    parser.add_argument("--methods", default=None, help="comma-separated method specs (default: the suite)")
    parser.add_argument("--quick", action="store_true", help="a short method list: " + ",".join(QUICK))
    parser.add_argument("--default-method", default=DEFAULT_METHOD,
                        help="the registered method `default` is expected to be (checked against the memories)")
    parser.add_argument("--min-gain", type=float, default=MIN_GAIN, help="screening: full minus zero-shot, at least")
    parser.add_argument("--keep", default=",".join(KEEP),
                        help="MODEL/TASK pairs reported whatever their screening split shows (comma-separated; the "
                             "report says which gain each overrode; '' for none)")
    parser.add_argument("--screen-seed", type=int, default=SCREEN_SEED, help="the screening / option-selection split")
    parser.add_argument("--selection", action="store_true",
                        help="run --methods on the option-selection split (the screening seed) instead of --seeds; "
                             "report in OUT/selection/")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from the split records")
    parser.add_argument("--force", action="store_true", help="rerun splits whose results.json exists")
    parser.add_argument("--add", action="store_true",
                        help="run only the methods an existing split lacks (with what they need) and add them to it")
    parser.add_argument("--merge-from", default=None, metavar="DIR",
                        help="add the methods measured in another benchmark directory (its own --out, same splits) to "
                             "these records, as --add would have, then rebuild the report")
    parser.add_argument("--redo", action="store_true",
                        help="with --add: measure --methods again on existing splits, replacing their records (the old "
                             "ones are kept under `replaced` in the split's results.json), e.g. after a change in how "
                             "a statistic is counted")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    parser.add_argument("--scaling", action="store_true", help="also measure build time / memory / latency scaling")
    parser.add_argument("--scaling-task", default="digits_text_all", help="a task with the largest size + 10 rows")
    parser.add_argument("--scaling-sizes", default=",".join(map(str, SCALING_SIZES)), help="numbers of demonstrations")
    parser.add_argument("--scaling-methods", default=",".join(SCALING_METHODS),
                        help="full, emloc, default, ... (with options: default[reuse=floor])")
    parser.add_argument("--scaling-model", default="smollm2-135m", help="an offline model name or an Emloc repo directory")
    args = parser.parse_args(argv)
    args.seeds_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.scaling_sizes_list = [int(n) for n in args.scaling_sizes.split(",") if n.strip()]
    args.scaling_methods_list = evaluate_memory.split_methods(args.scaling_methods)
    args.keep_set = frozenset(k.strip() for k in args.keep.split(",") if k.strip())
    if any(k.count("/") != 1 for k in args.keep_set):
        parser.error(f"--keep takes MODEL/TASK pairs, got {args.keep!r}")
    if args.redo and not args.add:
        parser.error("--redo replaces records of existing splits: use it with --add")
    if args.screen_seed in args.seeds_list:
        parser.error(f"seed {args.screen_seed} is the screening / option-selection split; report other seeds")
    return args


def report(args, out: Path, preferred: list[str] | None = None) -> None:
    scaling_path = out / "scaling.json"
    scaling = json.loads(scaling_path.read_text()) if scaling_path.exists() else None
    models = collect(out, "seed", args.min_gain, preferred=preferred, resamples=args.bootstrap,
                     boot_seed=args.bootstrap_seed, screen_seed=args.screen_seed, keep=args.keep_set)
    write_report(out, models, args, scaling=scaling)
    if any(data["summary"] for data in models.values()):
        (out / "headline.md").write_text(headline_table(models))
    selection = collect(out, "select-seed", args.min_gain, preferred=preferred, resamples=args.bootstrap,
                        boot_seed=args.bootstrap_seed, screen_seed=args.screen_seed, keep=args.keep_set)
    selection = {m: d for m, d in selection.items() if any(t["splits_data"] for t in d["tasks"].values())}
    if selection:
        write_report(out / "selection", selection, args,
                     title=f"emloc option selection (split seed {args.screen_seed}; not a reported result)", root=out)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    order = requested_methods(args)  # the report's rows: the same with or without the kvpress side venv
    if args.merge_from:
        for model, task, split in merge_records(Path(args.merge_from), out):
            print(f"[merged] {model}/{task}/{split}", flush=True)
    if not args.report_only and not args.merge_from:
        methods = method_list(args)
        for model in [m for m in args.models.split(",") if m]:
            key = model_key(model)
            for task in [t for t in args.tasks.split(",") if t]:
                queries = queries_per_split(task, args.demos, args.queries)
                task_dir = out / key / task
                screen = run_split(model, task, args.screen_seed, "zero-shot,full", task_dir / f"screen-seed{args.screen_seed}",
                                   args.demos, queries)
                verdict = screen_verdict(screen, args.min_gain, keep=f"{key}/{task}" in args.keep_set)
                print(f"[screen] {key}/{task}: {verdict['verdict']}", flush=True)
                if args.selection and verdict["kept"]:
                    run_split(model, task, args.screen_seed, ",".join(methods), task_dir / f"select-seed{args.screen_seed}",
                              args.demos, queries, args.force, args.add, args.redo)
                elif verdict["kept"]:
                    for seed in args.seeds_list:
                        run_split(model, task, seed, ",".join(methods), task_dir / f"seed{seed}", args.demos, queries,
                                  args.force, args.add, args.redo)
                        report(args, out, order)
    if args.scaling:
        run_scaling(out, args.scaling_task, args.scaling_sizes_list, args.scaling_methods_list, model=args.scaling_model)
    report(args, out, order)
    print(f"wrote {out / 'report.md'}", flush=True)
    return json.loads((out / "results.json").read_text())


if __name__ == "__main__":
    main()
