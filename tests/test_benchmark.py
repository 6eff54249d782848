"""The benchmark (examples/benchmark.py): split records, pooling seeded splits, paired intervals, the report and its
headline table — on synthetic per-split `results.json` files folded into records — and a resumable smoke run on a
tiny random model."""

import json
from pathlib import Path

import numpy as np
import pytest

CHOICES = ["a", "b", "c"]


def _method(rng, answers, accuracy, kept=None, build=1.0, memory_method=None):
    correct = rng.random(len(answers)) < accuracy
    predictions, logprobs = [], []
    for answer, ok in zip(answers, correct):
        index = CHOICES.index(answer) if ok else (CHOICES.index(answer) + 1) % 3
        scores = [-3.0, -2.5, -4.0]
        scores[index] = -0.2
        predictions.append(CHOICES[index])
        logprobs.append(scores)
    record = {"accuracy": float(correct.mean()), "predictions": predictions, "choice_logprobs": logprobs,
              "kept_ratio": kept, "build_seconds": build, "query_seconds_mean": 0.1}
    if memory_method:
        record["memory_stats"] = {"method": {"name": memory_method}}
    return record


def _write_split(path, seed, n, methods, failed=()):
    """A split as `evaluate_memory` leaves it in its working directory, folded into its model's records."""
    rng = np.random.default_rng(seed)
    answers = [CHOICES[i] for i in rng.integers(0, 3, n)]
    records = {label: _method(rng, answers, *spec) for label, spec in methods.items()}
    records.update({label: {"error": "RuntimeError: kvpress snapkv failed"} for label in failed})
    path.mkdir(parents=True)
    _rewrite(path, {"model": "m", "task": path.parent.name, "num_demos": 90, "num_queries": n,
                    "machine": "test machine", "methods": records, "answers": answers})
    return records, answers


def _rewrite(path, results):
    """A split's `results.json` changed in its working directory, and folded again."""
    import benchmark

    (path / "results.json").write_text(json.dumps(results))
    benchmark.fold_split(path)


SUITE = {  # label: (accuracy, kept share, build seconds, recorded method)
    "zero-shot": (0.3, 0.0, 0.0), "full": (0.8, 1.0, 2.0), "emloc": (0.5, 0.2, 20.0, "emloc"),
    "default": (0.75, 0.2, 10.0, "emloc"), "random@emloc": (0.45, 0.2, 2.0), "random@default": (0.45, 0.2, 2.0),
    "kvzip@default": (0.6, 0.2, 5.0), "kvzip@0.1": (0.5, 0.1, 5.0), "random@0.1": (0.35, 0.1, 2.0),
    "lora[epochs=5;learning_rate=0.002]": (0.7, 0.0, 30.0),
    "rices[k=8]": (0.7, 0.1, 0.0), "full+retrieve@8": (0.85, 1.0, 2.0),
    "default[budget=0.1]": (0.6, 0.1, 8.0, "emloc"), "random@default[budget=0.1]": (0.35, 0.1, 2.0),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    model = out / "smollm2-135m"
    _write_split(model / "iris" / "screen-seed100", 100, 60, {"zero-shot": (0.3, 0.0, 0.0), "full": (0.9, 1.0, 2.0)})
    splits = {seed: _write_split(model / "iris" / f"seed{seed}", seed, 60, SUITE,
                                 failed=("snapkv@default",) if seed == 0 else ()) for seed in (0, 1)}
    path = model / "iris" / "seed1" / "results.json"  # snapkv@default failed on seed 0, works on seed 1
    results = json.loads(path.read_text())
    results["methods"]["snapkv@default"] = _method(np.random.default_rng(5), results["answers"], 0.5, 0.2, 3.0)
    splits[1][0]["snapkv@default"] = results["methods"]["snapkv@default"]
    # a press measured on every task, but on one of iris's two splits only: pooled per task, left out of the summary
    results["methods"]["tova@default"] = _method(np.random.default_rng(6), results["answers"], 0.55, 0.2, 3.0)
    _rewrite(path.parent, results)
    _write_split(model / "digits_text" / "screen-seed100", 101, 50, {"zero-shot": (0.3, 0.0, 0.0), "full": (0.9, 1.0, 2.0)})
    _write_split(model / "digits_text" / "seed0", 7, 50, {**SUITE, "tova@default": (0.55, 0.2, 3.0)})
    _write_split(model / "wine" / "screen-seed100", 102, 50, {"zero-shot": (0.5, 0.0, 0.0), "full": (0.5, 1.0, 2.0)})
    _write_split(model / "wine" / "seed0", 8, 50, SUITE)  # on disk, but the task has no many-shot gain
    _write_split(model / "iris" / "select-seed100", 9, 60, {"zero-shot": (0.3, 0.0, 0.0), "full": (0.9, 1.0, 2.0),
                                                            "emloc[probe=future]": (0.7, 0.2, 20.0, "emloc")})
    import benchmark

    benchmark.main(["--out", str(out), "--report-only", "--bootstrap", "300"])
    return out, splits


def test_pooled_numbers_and_comparators(synthetic):
    out, splits = synthetic
    saved = json.loads((out / "results.json").read_text())
    iris = saved["models"]["smollm2-135m"]["tasks"]["iris"]
    # retrieval is compared, query by query, with RICES over as many demonstrations
    versus = iris["methods"]["full+retrieve@8"]["vs_rices"]
    correct = {label: np.concatenate([np.array(splits[seed][0][label]["predictions"]) == np.array(splits[seed][1])
                                      for seed in (0, 1)]) for label in ("full+retrieve@8", "rices[k=8]")}
    assert versus["against"] == "rices[k=8]"
    assert versus["estimate"] == pytest.approx(correct["full+retrieve@8"].mean() - correct["rices[k=8]"].mean())
    assert "against RICES" in (out / "report.md").read_text()
    assert iris["num_queries"] == 120 and [s["seed"] for s in iris["splits"]] == [0, 1]
    methods = iris["methods"]
    correct = {label: np.concatenate([[p == a for p, a in zip(splits[s][0][label]["predictions"], splits[s][1])]
                                      for s in (0, 1)]) for label in SUITE}
    for label in SUITE:
        assert methods[label]["accuracy"]["estimate"] == pytest.approx(correct[label].mean())
        assert methods[label]["accuracy"]["low"] <= correct[label].mean() <= methods[label]["accuracy"]["high"]
    zero, full, emloc = (correct[k].mean() for k in ("zero-shot", "full", "emloc"))
    assert methods["emloc"]["retained_gain"]["estimate"] == pytest.approx((emloc - zero) / (full - zero))
    assert methods["emloc"]["vs_full"]["estimate"] == pytest.approx(emloc - full)
    assert methods["emloc"]["vs_random"]["against"] == "random@emloc"
    assert methods["kvzip@default"]["vs_random"]["against"] == "random@default"
    assert methods["kvzip@0.1"]["vs_random"]["against"] == "random@0.1"
    assert set(methods["default"]["vs_same_share"]) == {"random@default", "kvzip@default", "snapkv@default", "tova@default"}
    assert "vs_random" not in methods["lora[epochs=5;learning_rate=0.002]"] and "vs_random" not in methods["random@0.1"]
    assert methods["lora[epochs=5;learning_rate=0.002]"]["kept_ratio"] == 0.0
    assert methods["emloc"]["build_over_full_prefill"] == pytest.approx(10.0)
    assert methods["emloc"]["kept_ratio"] == pytest.approx(0.2)
    full_top = [np.argmax(r) for s in (0, 1) for r in splits[s][0]["full"]["choice_logprobs"]]
    emloc_top = [np.argmax(r) for s in (0, 1) for r in splits[s][0]["emloc"]["choice_logprobs"]]
    assert methods["emloc"]["agreement"] == pytest.approx(np.mean(np.equal(full_top, emloc_top)))
    assert methods["full"]["agreement"] == 1.0 and methods["full"]["mean_js"] == 0.0
    snapkv = methods["snapkv@default"]  # failed on seed 0: pooled over seed 1 only, the failure kept
    assert snapkv["num_splits"] == 1 and snapkv["num_queries"] == 60 and snapkv["errors"][0]["seed"] == 0
    assert snapkv["vs_full"]["n"] == 60
    assert iris["splits"][0]["failed"] == {"snapkv@default": "RuntimeError: kvpress snapkv failed"}


def test_dropped_tasks_summary_and_report(synthetic):
    out, _ = synthetic
    saved = json.loads((out / "results.json").read_text())
    model = saved["models"]["smollm2-135m"]
    assert not model["tasks"]["wine"]["screen"]["kept"] and model["tasks"]["wine"]["methods"] == {}
    assert model["tasks"]["wine"]["screen"]["verdict"].startswith("dropped")
    summary = model["summary"]
    assert "snapkv@default" not in summary  # not measured on digits_text
    assert model["tasks"]["iris"]["methods"]["tova@default"]["num_splits"] == 1  # pooled over the split it ran on
    assert "tova@default" not in summary  # on every task, not on every split: iris would weigh half as much
    assert summary["emloc"]["tasks"] == ["digits_text", "iris"]
    iris, digits = (model["tasks"][t]["methods"]["emloc"]["accuracy"]["estimate"] for t in ("iris", "digits_text"))
    assert summary["emloc"]["accuracy"]["estimate"] == pytest.approx((iris + digits) / 2)  # tasks weigh the same
    assert summary["emloc"]["vs_random"]["against"] == "random@emloc"
    report = (out / "report.md").read_text()
    for text in ("## Summary", "| SmolLM2-135M-Instruct | `default` |", "| wine | 178 | - |", "dropped: the full context gains",
                 "## Targets of issue 9 for `default`", "accuracy_vs_kept_smollm2-135m.png", "## Warnings",
                 "smollm2-135m/iris: 120 pooled queries", "[smollm2-135m/iris/seed0](records/smollm2-135m.jsonl.gz)"):
        assert text in report, text
    assert (out / "accuracy_vs_kept_smollm2-135m.png").stat().st_size > 10_000
    targets = report.split("## Targets of issue 9")[1].split("## Splits")[0]
    assert "| smollm2-135m | iris | `default` | 20.0% |" in targets and "(need 90%)" in targets
    capped = next(line for line in targets.splitlines() if "| iris | `default[budget=0.1]` |" in line)
    assert "(need 75%)" in capped and "`random@default[budget=0.1]`" in capped
    assert "`emloc`" not in targets and "`default[method=" not in targets
    selection = (out / "selection" / "report.md").read_text()
    assert "`emloc[probe=future]`" in selection and "not a reported result" in selection
    assert "[smollm2-135m/iris/select-seed100](../records/smollm2-135m.jsonl.gz)" in selection


def test_keep_reports_a_task_its_screening_split_dropped(synthetic, tmp_path):
    """`--keep MODEL/TASK` reports a task whatever its screening split shows, and the report says which gain it overrode."""
    import shutil

    import benchmark

    out = tmp_path / "bench"
    shutil.copytree(synthetic[0], out)
    _write_split(out / "smollm2-135m" / "breast_cancer" / "screen-seed100", 103, 40,  # screened, never run on a seed
                 {"zero-shot": (0.2, 0.0, 0.0), "full": (0.95, 1.0, 2.0)})
    saved = benchmark.main(["--out", str(out), "--report-only", "--bootstrap", "300", "--keep", "smollm2-135m/wine"])
    wine = saved["models"]["smollm2-135m"]["tasks"]["wine"]
    gain = wine["screen"]["full"] - wine["screen"]["zero_shot"]
    assert wine["screen"]["kept"] and wine["screen"]["verdict"] == f"kept by --keep: the full context gains {gain:+.3f} (< 0.15)"
    assert wine["methods"]["default"]["num_queries"] == 50
    assert saved["models"]["smollm2-135m"]["summary"]["emloc"]["tasks"] == ["digits_text", "iris", "wine"]
    assert saved["protocol"]["kept_by_hand"] == ["smollm2-135m/wine"]
    report = (out / "report.md").read_text()
    assert "or is named in --keep (smollm2-135m/wine)" in report and "kept by --keep: the full context gains" in report
    assert "| kept; no reported split | - |" in report
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--keep", "wine"])
    assert benchmark.parse_args([]).keep_set == set(benchmark.KEEP) and not benchmark.parse_args(["--keep", ""]).keep_set


def test_report_only_needs_no_task_data(synthetic, tmp_path, monkeypatch):
    """`--report-only` reads the records: a task's row count is on record, so the report needs no task data; a task
    without it on record whose data is not installed here is reported without its rows."""
    import shutil

    import benchmark

    def data_not_installed(task):
        raise FileNotFoundError(f"{task} needs a system package")

    out = tmp_path / "bench"
    shutil.copytree(synthetic[0], out)
    assert {r["task_rows"] for r in benchmark.read_records(benchmark.records_path(out, "smollm2-135m"))
            if r["task"] == "iris"} == {150}  # folded where the data is installed
    monkeypatch.setattr(benchmark, "task_rows", data_not_installed)
    saved = benchmark.main(["--out", str(out), "--report-only", "--bootstrap", "300"])
    assert saved["models"]["smollm2-135m"]["tasks"]["iris"]["rows"] == 150
    assert "| smollm2-135m | iris | 150 | 60 |" in (out / "report.md").read_text()
    path = benchmark.records_path(out, "smollm2-135m")  # records folded where the data was not installed
    benchmark.write_records(path, [{k: v for k, v in r.items() if k != "task_rows"} for r in benchmark.read_records(path)])
    saved = benchmark.main(["--out", str(out), "--report-only", "--bootstrap", "300"])
    assert saved["models"]["smollm2-135m"]["tasks"]["iris"]["rows"] is None
    assert "| smollm2-135m | iris | - | 60 |" in (out / "report.md").read_text()


def test_the_report_is_the_same_with_or_without_the_kvpress_side_venv(synthetic, tmp_path, monkeypatch):
    """The presses are left out of a run where kvpress is not set up, but not out of the report's row order: a clone
    without the side venv regenerates the same report."""
    import shutil
    import sys

    import benchmark
    import evaluate_memory

    reports = []
    for kvpress in (Path(sys.executable), tmp_path / "no-kvpress" / "python"):
        out = tmp_path / kvpress.parent.name
        shutil.copytree(synthetic[0], out)
        monkeypatch.setattr(evaluate_memory, "KVPRESS_PYTHON", kvpress)
        benchmark.main(["--out", str(out), "--report-only", "--bootstrap", "300"])
        reports.append((out / "report.md").read_text().split("\n", 3)[3])  # after the dated line
    assert reports[0] == reports[1]
    assert reports[0].index("| `kvzip@default` |") < reports[0].index("| `random@0.1` |")  # the suite's order


def test_comparators_and_method_specs():
    import benchmark
    import evaluate_memory

    assert benchmark.random_comparator("emloc[probe=future;protect=extra]") == "random@emloc[probe=future;protect=extra]"
    assert benchmark.random_comparator("kvzip@emloc[probe=future]") == "random@emloc[probe=future]"
    assert benchmark.is_target_label("default") and benchmark.is_target_label("default[budget=0.1]")
    assert not any(benchmark.is_target_label(label) for label in ("emloc", "default[method=emloc]", "random@default",
                                                                   "default+retrieve@8", "default[budget=0.1;probe=self]"))
    assert benchmark.random_comparator("full") is None and benchmark.random_comparator("rices[k=8]") is None
    assert benchmark.random_comparator("emloc+select@0.5") is None
    assert benchmark.random_comparator("default+retrieve@8") is None and not benchmark.is_memory_label("full+retrieve@8")
    retrieval = evaluate_memory.parse_methods("full+retrieve@16,default+retrieve,snapkv@0.25+retrieve@4")
    assert [(s.name, s.kept, s.retrieve) for s in retrieval] == [("full", None, 16), ("default", None, 8), ("snapkv", 0.25, 4)]
    with pytest.raises(SystemExit, match="needs a memory"):
        evaluate_memory.parse_methods("rices[k=8]+retrieve@4")
    specs = evaluate_memory.parse_methods("default[method=emloc;ratios=0.1/0.2],random@default,kvzip@emloc[probe=future],"
                                          "emloc[ratios=0.1,0.2],emloc[probe=future],full")
    assert [s.label for s in specs][0] == "default[method=emloc;ratios=0.1/0.2]"
    assert specs[0].params == {"method": "emloc", "ratios": (0.1, 0.2)} and specs[3].params == {"ratios": (0.1, 0.2)}
    assert specs[1].reference == "default" and specs[2].reference == "emloc[probe=future]"
    ordered = [s.label for s in evaluate_memory.order_specs(specs)]
    assert ordered[0] == "full" and ordered.index("kvzip@emloc[probe=future]") > ordered.index("emloc[probe=future]")
    assert evaluate_memory.parse_methods("random@0.25")[0].kept == 0.25


def test_calibrated_methods_are_measured_against_calibrated_references(tmp_path):
    import benchmark

    calibrated = {"zero-shot+calibrate": (0.4, 0.0, 0.0), "full+calibrate": (0.9, 1.0, 2.0),
                  "default+calibrate": (0.85, 0.2, 10.0, "emloc"), "random@default+calibrate": (0.5, 0.2, 2.0),
                  "kvzip@default+calibrate": (0.7, 0.2, 5.0)}
    model = tmp_path / "smollm2-135m"
    _write_split(model / "iris" / "screen-seed100", 100, 60, {"zero-shot": (0.3, 0.0, 0.0), "full": (0.9, 1.0, 2.0)})
    splits = {seed: _write_split(model / "iris" / f"seed{seed}", seed, 80, {**SUITE, **calibrated}) for seed in (0, 1)}
    benchmark.main(["--out", str(tmp_path), "--report-only", "--bootstrap", "300"])
    methods = json.loads((tmp_path / "results.json").read_text())["models"]["smollm2-135m"]["tasks"]["iris"]["methods"]
    correct = {label: np.concatenate([[p == a for p, a in zip(splits[s][0][label]["predictions"], splits[s][1])]
                                      for s in (0, 1)]) for label in {**SUITE, **calibrated}}
    zero, full, default = (correct[k].mean() for k in ("zero-shot+calibrate", "full+calibrate", "default+calibrate"))
    entry = methods["default+calibrate"]
    assert entry["retained_gain"]["estimate"] == pytest.approx((default - zero) / (full - zero))
    assert entry["vs_full"]["estimate"] == pytest.approx(default - full)
    assert entry["vs_random"]["against"] == "random@default+calibrate"
    assert set(entry["vs_same_share"]) == {"random@default+calibrate", "kvzip@default+calibrate"}
    assert set(methods["default"]["vs_same_share"]) == {"random@default", "kvzip@default"}
    assert methods["kvzip@default+calibrate"]["vs_random"]["against"] == "random@default+calibrate"
    top = {label: [np.argmax(r) for s in (0, 1) for r in splits[s][0][label]["choice_logprobs"]]
           for label in ("full+calibrate", "default+calibrate")}
    assert entry["agreement"] == pytest.approx(np.mean(np.equal(top["full+calibrate"], top["default+calibrate"])))
    assert methods["full+calibrate"]["agreement"] == 1.0 and "vs_full" not in methods["full+calibrate"]
    assert benchmark.references("snapkv@default+calibrate") == ("zero-shot+calibrate", "full+calibrate")
    assert benchmark.references("default") == ("zero-shot", "full")


def test_smoke_run_on_a_tiny_model_is_resumable(tmp_path):
    """Two seeded splits of a tiny random model: screening, splits, report; a second call reruns nothing; `--add` on a
    split only the records hold draws its demonstrations and queries again, byte for byte, and adds to its record."""
    import shutil

    import benchmark
    from tiny_models import build_tiny_emloc

    repo = build_tiny_emloc("llama", tmp_path / "tiny-llama", template="plain")
    args = ["--out", str(tmp_path / "bench"), "--models", str(repo), "--tasks", "iris", "--seeds", "0,1", "--demos", "8",
            "--queries", "5", "--methods", "zero-shot,full,default,random@default,emloc[ratios=0.1/0.5],random@0.25",
            "--min-gain", "-1", "--bootstrap", "200"]
    saved = benchmark.main(args)
    task = saved["models"]["tiny-llama"]["tasks"]["iris"]
    assert [s["seed"] for s in task["splits"]] == [0, 1] and task["num_queries"] == 10
    for label in ("full", "default", "random@default", "emloc[ratios=0.1/0.5]", "random@0.25"):
        assert task["methods"][label]["num_queries"] == 10, task["methods"][label].get("errors")
    assert task["methods"]["default"]["vs_random"]["against"] == "random@default"
    assert task["methods"]["default"]["memory_method"] == ["emloc-query"]
    split = tmp_path / "bench" / "tiny-llama" / "iris" / "seed0"
    records = benchmark.records_path(tmp_path / "bench", "tiny-llama")

    def on_record(name="seed0"):
        return next(r for r in benchmark.read_records(records) if r["split"] == name)

    recorded = on_record()
    assert recorded["answers"] == [json.loads(line)["answer"] for line in (split / "queries.jsonl").read_text().splitlines()]
    assert recorded["methods"]["emloc[ratios=0.1/0.5]"]["memory_stats"]["method"]["params"]["ratios"] == [0.1, 0.5]
    assert recorded["methods"]["random@default"]["kept_ratio"] == pytest.approx(
        recorded["methods"]["default"]["kept_ratio"], abs=0.05)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "bench").rglob("results.json") if "seed" in p.parent.name}
    before[records] = records.stat().st_mtime_ns
    benchmark.main(args)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert "tiny-llama" in (tmp_path / "bench" / "report.md").read_text()
    # --add runs only what a split lacks (retrieval inside the memories here) and keeps the records it had; the split's
    # working directory is gone (a fresh clone): its demonstrations and queries are drawn again from the task and seed
    drawn = {name: (split / name).read_bytes() for name in ("demos.jsonl", "queries.jsonl")}
    shutil.rmtree(split)
    added = benchmark.main([*args[:args.index("--methods")], "--methods",
                            "zero-shot,full,default,random@default,full+retrieve@2,default+retrieve@2", "--add",
                            *args[args.index("--methods") + 2:]])
    assert {name: (split / name).read_bytes() for name in drawn} == drawn
    after = on_record()
    assert after["methods"]["default"] == recorded["methods"]["default"]
    for label in ("full+retrieve@2", "default+retrieve@2"):
        assert after["methods"][label]["retrieve"] == 2 and len(after["methods"][label]["predictions"]) == 5
        assert added["models"]["tiny-llama"]["tasks"]["iris"]["methods"][label]["num_queries"] == 10
    assert after["added"][0]["methods"] == ["full+retrieve@2", "default+retrieve@2"]
    assert after["added"][0]["rebuilt"] == ["zero-shot", "full", "default"]
    assert (split / after["added"][0]["dir"] / "results.json").exists()
    assert set(after["added"][0]["references"]) == {"zero-shot", "full"}  # what the added methods are measured against
    pooled = added["models"]["tiny-llama"]["tasks"]["iris"]["methods"]["default+retrieve@2"]
    assert pooled["query_over_zero_shot"] > 0 and pooled["build_over_full_prefill"] > 0  # against the same run's
    assert "s / query ÷ zero-shot" in (tmp_path / "bench" / "report.md").read_text()
    assert benchmark.rices_comparator("default+retrieve@8") == "rices[k=8]" and benchmark.rices_comparator("full") is None
    # a method that needs only another memory's kept share takes the recorded share: that memory is not rebuilt
    benchmark.main([*args[:args.index("--methods")], "--methods", "zero-shot,full,default,shots@default", "--add",
                    *args[args.index("--methods") + 2:]])
    again = on_record()
    assert again["added"][1]["rebuilt"] == ["zero-shot", "full"]
    assert again["added"][1]["shares"] == {"default": recorded["methods"]["default"]["kept_ratio"]}
    shots = again["methods"]["shots@default"]
    assert shots["shots"] == 1 or shots["kept_ratio"] <= recorded["methods"]["default"]["kept_ratio"]
    # --redo measures them again: the new records replace the old ones, kept aside, and a comparator redone with its
    # memory takes that memory's new share, not the recorded one
    benchmark.main([*args[:args.index("--methods")], "--methods", "default,random@default", "--add", "--redo",
                    *args[args.index("--methods") + 2:]])
    redone = on_record()
    replaced = {r["label"]: r["record"] for r in json.loads((split / "results.json").read_text())["replaced"]}
    assert {"default", "random@default"} <= set(replaced) and replaced["default"] == again["methods"]["default"]
    assert {r["label"] for r in redone["replaced"]} == set(replaced)  # the record keeps their labels and dates
    assert all(set(r) == {"label", "date"} for r in redone["replaced"])
    assert redone["methods"]["default"]["predictions"] == again["methods"]["default"]["predictions"]
    assert redone["added"][-1]["shares"] == {} and {"default", "random@default"} <= set(redone["added"][-1]["methods"])
    assert redone["added"][-1]["rebuilt"] == []  # zero-shot and full are redone too, once
    with pytest.raises(SystemExit):
        benchmark.main([*args, "--redo"])  # without --add
    # the selection split takes --add too: a new candidate joins it, the memories it had are kept
    def select(methods, *extra):
        return benchmark.main(["--out", str(tmp_path / "bench"), "--models", str(repo), "--tasks", "iris", "--selection",
                               "--demos", "8", "--queries", "5", "--methods", methods, "--min-gain", "-1",
                               "--bootstrap", "200", *extra])

    select("zero-shot,full,default")
    first = on_record("select-seed100")
    select("zero-shot,full,default,random@0.25", "--add")
    grown = on_record("select-seed100")
    assert grown["methods"]["default"] == first["methods"]["default"] and "random@0.25" in grown["methods"]


def test_scaling_records_each_build_in_a_fresh_process_and_replaces_a_rerun(tmp_path):
    """`--scaling`: one record per method and size (build, peak memory, latency), build ÷ prefill in the report; a
    rerun of one method replaces its record instead of adding a second."""
    import benchmark
    from tiny_models import build_tiny_emloc

    repo = build_tiny_emloc("llama", tmp_path / "tiny-llama", template="plain")
    out = tmp_path / "bench"
    out.mkdir()
    rows = benchmark.run_scaling(out, "iris", [6], ["full", "default"], model=str(repo), chunk_size=2)
    assert [(r["method"], r["num_demos"]) for r in rows] == [("full", 6), ("default", 6)]
    full, default = rows
    assert full["kept_ratio"] == 1.0 and full["chunk_size"] == 6 and default["memory_method"] == "emloc-query"
    assert default["context_tokens"] == full["context_tokens"] and 0 < default["kept_kv_mb"] < full["kept_kv_mb"]
    assert all(r["build_seconds"] > 0 and r["peak_rss_mb_over_baseline"] >= 0 for r in rows)
    derived = benchmark.scaling_rows(rows)
    assert derived[0]["build_over_prefill"] == 1.0
    assert derived[1]["build_over_prefill"] == pytest.approx(default["build_seconds"] / full["build_seconds"])
    again = benchmark.run_scaling(out, "iris", [6], ["default"], model=str(repo), chunk_size=2)
    assert [(r["method"], r["num_demos"]) for r in again] == [("full", 6), ("default", 6)]
    assert json.loads((out / "scaling.json").read_text()) == again and (out / "scaling.png").exists()
    args = benchmark.parse_args(["--out", str(out)])
    benchmark.write_report(out, {}, args, scaling=again)
    assert "| tiny-llama | iris | default | 6 |" in (out / "report.md").read_text()
    # a method with options builds with them, beside the plain one
    rows = benchmark.run_scaling(out, "iris", [6], ["default[relative=none]"], model=str(repo), chunk_size=2)
    fixed = next(r for r in rows if r["method"] == "default[relative=none]")
    assert fixed["memory_method"] == "emloc-query" and fixed["memory_params"]["relative"] is None
    assert next(r for r in rows if r["method"] == "default")["memory_params"]["relative"] == 0.5


def test_a_share_recorded_over_the_whole_context_is_marked_where_the_model_has_sliding_windows(tmp_path):
    """Records from before `drop_unreadable` (no `readable_kv_bytes`) are marked `†` on a task whose newer records show
    sliding windows (readable < full), and not on a model without them."""
    import benchmark

    suite = {"zero-shot": (0.3, 0.0, 0.0), "full": (0.8, 1.0, 2.0), "emloc": (0.6, 0.15, 20.0, "emloc"),
             "default": (0.7, 0.2, 10.0, "emloc")}
    for model, readable in (("gemma3-270m", 300), ("smollm2-135m", 1000)):
        _write_split(tmp_path / model / "iris" / "screen-seed100", 100, 40, {"zero-shot": (0.3, 0.0, 0.0),
                                                                              "full": (0.9, 1.0, 2.0)})
        path = tmp_path / model / "iris" / "seed1"
        _write_split(path, 1, 40, suite)
        results = json.loads((path / "results.json").read_text())
        results["methods"]["emloc"]["memory_stats"]["totals"] = {"full_kv_bytes": 1000, "kept_kv_bytes": 150}
        results["methods"]["default"]["memory_stats"]["totals"] = {"full_kv_bytes": 1000, "kept_kv_bytes": 100,
                                                                   "readable_kv_bytes": readable}
        _rewrite(path, results)
    benchmark.main(["--out", str(tmp_path), "--report-only", "--bootstrap", "50"])
    saved = json.loads((tmp_path / "results.json").read_text())["models"]
    gemma = saved["gemma3-270m"]["tasks"]["iris"]["methods"]
    assert gemma["emloc"]["whole_context_share"] == [1] and gemma["default"]["whole_context_share"] == []
    assert "whole_context_share" not in saved["smollm2-135m"]["tasks"]["iris"]["methods"]["emloc"]
    report = (tmp_path / "report.md").read_text()
    gemma_table = report.split("## Gemma 3 270M")[1].split("## SmolLM2")[0]
    assert "15.0%†" in gemma_table and "20.0%†" not in gemma_table
    assert "†" not in report.split("## SmolLM2-135M-Instruct (")[1].split("## Targets")[0]


def test_a_split_folds_into_one_record_line_and_the_report_needs_nothing_else(tmp_path):
    """split → record → report: the record keeps the per-query predictions and scores, the costs, the split's facts
    and each `--add` run's own references; it drops the per-split aggregates and plots; the same split gives the same
    bytes; the report regenerated from the records alone, working directories gone, has the same numbers."""
    import gzip
    import shutil

    import benchmark

    model = tmp_path / "smollm2-135m"
    _write_split(model / "iris" / "screen-seed100", 100, 30, {"zero-shot": (0.3, 0.0, 0.0), "full": (0.9, 1.0, 2.0)})
    split = model / "iris" / "seed1"
    records, answers = _write_split(split, 1, 30, {"zero-shot": (0.3, 0.0, 0.0), "full": (0.9, 1.0, 2.0),
                                                   "default": (0.8, 0.2, 10.0, "emloc-query")})
    results = json.loads((split / "results.json").read_text())
    # as evaluate_memory writes them: per-split aggregates, per-layer counts; an --add run measured against its own
    # full (a 4 s prefill, the split's own took 2 s) and zero-shot; a record replaced by --redo
    results["methods"]["default"].update(agreement=0.9, mean_js=0.01, exact_match=0.8)
    results["methods"]["default"]["memory_stats"].update(layers=[{"full": 10, "kept": 2}], totals={"kept_ratio": 0.2},
                                                         token_types={"answer": {"full": 3, "kept": 3}})
    results["methods"]["default+retrieve@2"] = _method(np.random.default_rng(3), answers, 0.85, 0.2, 12.0)
    results["added"] = [{"methods": ["default+retrieve@2"], "rebuilt": ["zero-shot", "full", "default"],
                         "dir": "added-0", "date": "2026-12-01"}]
    results["replaced"] = [{"label": "default", "record": dict(results["methods"]["default"]), "date": "2026-12-02"}]
    (split / "added-0").mkdir()
    (split / "added-0" / "results.json").write_text(json.dumps({"methods": {
        "zero-shot": {"query_seconds_mean": 0.05, "accuracy": 0.3}, "full": {"build_seconds": 4.0, "accuracy": 0.9}}}))
    _rewrite(split, results)
    path = benchmark.records_path(tmp_path, "smollm2-135m")
    first = path.read_bytes()
    assert gzip.decompress(first).count(b"\n") == 2 and first[4:8] == b"\0\0\0\0"  # two splits; no timestamp
    benchmark.fold_split(split)
    assert path.read_bytes() == first  # the same split, the same bytes
    record = next(r for r in benchmark.read_records(path) if r["split"] == "seed1")
    assert (record["task"], record["seed"], record["num_queries"], record["answers"]) == ("iris", 1, 30, answers)
    default = record["methods"]["default"]
    assert default["predictions"] == records["default"]["predictions"]
    assert default["choice_logprobs"] == records["default"]["choice_logprobs"]
    assert {"agreement", "mean_js", "exact_match"}.isdisjoint(default)
    assert set(default["memory_stats"]) == {"method", "totals"}
    assert record["added"][0]["references"] == {"zero-shot": {"query_seconds_mean": 0.05}, "full": {"build_seconds": 4.0}}
    assert record["replaced"] == [{"label": "default", "date": "2026-12-02"}]

    benchmark.main(["--out", str(tmp_path), "--report-only", "--bootstrap", "100"])
    with_directories = (tmp_path / "results.json").read_text()
    shutil.rmtree(model)
    benchmark.main(["--out", str(tmp_path), "--report-only", "--bootstrap", "100"])
    assert (tmp_path / "results.json").read_text() == with_directories
    methods = json.loads(with_directories)["models"]["smollm2-135m"]["tasks"]["iris"]["methods"]
    assert methods["default+retrieve@2"]["build_over_full_prefill"] == pytest.approx(12.0 / 4.0)  # its own run's full
    assert methods["default+retrieve@2"]["query_over_zero_shot"] == pytest.approx(0.1 / 0.05)
    assert methods["default"]["build_over_full_prefill"] == pytest.approx(10.0 / 2.0)
    correct = np.equal(records["default"]["predictions"], answers)
    assert methods["default"]["accuracy"]["estimate"] == pytest.approx(correct.mean())
    top = [np.argmax(m) == np.argmax(f) for m, f in zip(records["default"]["choice_logprobs"],
                                                         records["full"]["choice_logprobs"])]
    assert methods["default"]["agreement"] == pytest.approx(np.mean(top))  # recomputed query by query


def test_headline_table_shows_the_rows_a_user_compares(synthetic):
    """`headline.md`: per model zero-shot, full, the user path, the default (as scored, calibrated, with retrieval), the
    paper's rule, the best press at the user path's share — those not on record say so — with the retained gain's
    interval over tasks."""
    import benchmark

    out, _ = synthetic
    headline = (out / "headline.md").read_text()
    saved = json.loads((out / "results.json").read_text())["models"]
    assert headline == benchmark.headline_table(saved)  # regenerated from results.json alone
    rows = {line.split(" | ")[1]: line for line in headline.splitlines() if line.startswith("| ")}
    summary = saved["smollm2-135m"]["summary"]
    gain = summary["default"]["retained_gain_interval"]
    assert gain["estimate"] == pytest.approx(summary["default"]["retained_gain"])  # the mean of the task gains
    assert gain["low"] <= summary["default"]["retained_gain"] <= gain["high"]
    assert rows["`zero-shot`"].startswith("| SmolLM2-135M-Instruct | `zero-shot` |")  # the model on its first row
    assert rows["`default`"] == (f"|  | `default` | {summary['default']['accuracy']['estimate']:.3f} "
                                 f"| {gain['estimate']:.0%} [{gain['low']:.0%}, {gain['high']:.0%}] | 20.0% | 5.0× |")
    assert "| `emloc` |" in rows["`emloc`"]
    assert rows["`default+calibrate`"].endswith("| not measured on every reported split | | | |")
    assert rows["`user`"].endswith("| not measured on every reported split | | | |")  # the synthetic run has none
    assert rows["a kvpress press at the user path's share"].endswith("| not measured on every reported split | | | |")
    assert rows["`zero-shot`"].endswith("| - | 0.0% | - |") and rows["`rices[k=8]`"].endswith("| 10.0% | - |")
    assert "`lora[epochs=5;learning_rate=0.002]`" in rows and "`random@default`" not in rows
    with_presses = {"snapkv@user": {"retained_gain": 0.5}, "kvzip@user": {"retained_gain": 0.8},
                    "random@user": {"retained_gain": 0.9}, "snapkv@user+calibrate": {"retained_gain": 0.85},
                    "kvzip@default": {"retained_gain": 0.95}, "snapkv@0.1": {"retained_gain": 0.99},
                    "lora[epochs=5]": {"retained_gain": 0.7}}
    assert benchmark.headline_label(with_presses, benchmark.BEST_PRESS) == "snapkv@user+calibrate"
    assert benchmark.headline_label(with_presses, "lora") == "lora[epochs=5]"
    assert benchmark.headline_label({"random@user": {"retained_gain": 0.9}}, benchmark.BEST_PRESS) is None


def test_the_readme_embeds_the_generated_headline_table():
    """The README's table between the headline markers is `benchmarks/headline.md`, which is what `--report-only`
    generates from `benchmarks/results.json`."""
    from pathlib import Path

    import benchmark

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    assert readme.count(benchmark.HEADLINE_START) == 1 and readme.count(benchmark.HEADLINE_END) == 1
    embedded = readme.split(benchmark.HEADLINE_START)[1].split(benchmark.HEADLINE_END)[0]
    headline = (root / "benchmarks" / "headline.md").read_text()
    assert embedded.strip("\n") == headline.strip("\n"), "README.md: paste benchmarks/headline.md between the markers"
    models = json.loads((root / "benchmarks" / "results.json").read_text())["models"]
    assert headline == benchmark.headline_table(models), "benchmarks/headline.md: run examples/benchmark.py --report-only"


def test_methods_run_in_another_directory_merge_into_the_records_as_an_added_run(tmp_path):
    """`--merge-from DIR`: the methods a split's record lacks come in with an `added` entry whose references are that
    run's `full` and `zero-shot`; what the record has stays; other queries are refused."""
    import benchmark

    def record(methods, answers=("a", "b")):
        return {"task": "iris", "split": "seed1", "seed": 1, "answers": list(answers), "machine": "m",
                "methods": {label: {"accuracy": 0.5, **extra} for label, extra in methods.items()}}

    here, there = tmp_path / "here", tmp_path / "there"
    benchmark.write_records(benchmark.records_path(here, "tiny"), [record({"full": {"build_seconds": 1.0}, "user": {}})])
    benchmark.write_records(benchmark.records_path(there, "tiny"), [record({
        "full": {"build_seconds": 2.0}, "zero-shot": {"query_seconds_mean": 0.1}, "user": {"accuracy": 0.9},
        "snapkv@user": {}})])
    assert benchmark.merge_records(there, here) == [("tiny", "iris", "seed1")]
    [merged] = benchmark.read_records(benchmark.records_path(here, "tiny"))
    assert set(merged["methods"]) == {"full", "user", "snapkv@user", "zero-shot"}
    assert merged["methods"]["user"] == {"accuracy": 0.5} and merged["methods"]["full"]["build_seconds"] == 1.0
    [added] = merged["added"]
    assert added["methods"] == ["zero-shot", "snapkv@user"]
    assert added["references"] == {"full": {"build_seconds": 2.0}, "zero-shot": {"query_seconds_mean": 0.1}}
    assert benchmark.same_run_methods(merged)["snapkv@user"]["full"]["build_seconds"] == 2.0
    assert benchmark.merge_records(there, here) == []  # nothing left to add
    benchmark.write_records(benchmark.records_path(there, "tiny"), [record({"new": {}}, answers=("b", "a"))])
    with pytest.raises(ValueError, match="other queries"):
        benchmark.merge_records(there, here)
