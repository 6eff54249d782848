"""The evaluation harness: reports in the design's format, and the same numbers under `accelerate launch`."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

METHODS = "zero-shot,full,emloc,random@0.2,rices[k=2],full+select@0.3,emloc+select@0.5,shots@emloc"


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    from tasks import make_task, write_jsonl
    from tiny_models import build_tiny_emloc

    root = tmp_path_factory.mktemp("evaluate")
    repo = build_tiny_emloc("llama", root / "repo", template="plain")
    demos, queries = make_task("iris", 10, 6)
    return repo, write_jsonl(demos, root / "demos.jsonl"), write_jsonl(queries, root / "queries.jsonl"), root


def _args(repo, demos, queries, out):
    return ["--model", str(repo), "--demos", str(demos), "--queries", str(queries), "--methods", METHODS, "--out", str(out)]


def test_report_files_and_keys(tiny_task):
    import evaluate_memory

    repo, demos, queries, root = tiny_task
    results = evaluate_memory.main(_args(repo, demos, queries, root / "single"))
    saved = json.loads((root / "single" / "results.json").read_text())
    assert saved["num_demos"] == 10 and saved["num_queries"] == 6
    for name in METHODS.split(","):
        record = saved["methods"][name]
        assert "error" not in record, record.get("error")
        for key in ("accuracy", "kept_ratio", "build_seconds", "query_seconds_mean", "query_seconds_p95"):
            assert key in record
        if name != "full":
            assert 0 <= record["agreement"] <= 1 and record["mean_js"] >= 0
    assert saved["methods"]["full"]["kept_ratio"] == 1.0
    assert 0 < saved["methods"]["emloc"]["kept_ratio"] < 1
    assert saved["methods"]["full+select@0.3"]["kept_ratio"] == pytest.approx(0.3)
    # fewer demonstrations in full, as many as fit in the memory's share of the context's KV
    shots = saved["methods"]["shots@emloc"]
    assert 1 <= shots["shots"] < 10 and 0 < shots["kept_ratio"] <= max(saved["methods"]["emloc"]["kept_ratio"], 0.2)
    report = (root / "single" / "report.md").read_text()
    assert "| emloc |" in report and "accuracy_vs_kept.png" in report
    for plot in ("accuracy_vs_kept.png", "emloc_kept_per_layer.png", "emloc_kept_by_type.png"):
        assert (root / "single" / plot).stat().st_size > 1000
    assert results["methods"]["emloc"]["memory_stats"]["method"]["name"] == "emloc"


def test_accelerate_launch_with_two_processes_gives_the_same_results(tiny_task):
    repo, demos, queries, root = tiny_task
    single = json.loads((root / "single" / "results.json").read_text()) if (root / "single").exists() else None
    if single is None:
        import evaluate_memory

        evaluate_memory.main(_args(repo, demos, queries, root / "single"))
        single = json.loads((root / "single" / "results.json").read_text())
    # `--multi_gpu` starts N processes through torchrun; without GPUs they run on the CPU (gloo)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "examples" / "evaluate_memory.py"),
               *_args(repo, demos, queries, root / "two")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-4000:]
    two = json.loads((root / "two" / "results.json").read_text())
    assert two["processes"] == 2
    for name, record in single["methods"].items():
        assert two["methods"][name]["predictions"] == record["predictions"]
        for ours, theirs in zip(two["methods"][name]["choice_logprobs"], record["choice_logprobs"]):
            assert ours == pytest.approx(theirs, abs=1e-4)


def test_leading_shots_fit_the_share_and_take_at_least_one(tiny_task):
    from evaluate_memory import leading_shots
    from processing_emloc import EmlocProcessor

    repo, demos, _, _ = tiny_task
    processor = EmlocProcessor.from_pretrained(repo)
    records = [json.loads(line) for line in demos.read_text().splitlines()]
    context = processor.encode_context(records)
    lengths = [len(context.prefix.input_ids)] + [len(span.input_ids) for span in context.demos]
    total = sum(lengths)
    for share in (0.25, 0.5, 0.999):
        count, used = leading_shots(processor, records, share)
        assert used == pytest.approx(sum(lengths[:count + 1]) / total) and used <= share
        assert sum(lengths[:count + 2]) / total > share  # one more would not fit
    assert leading_shots(processor, records, 1e-6) == (1, pytest.approx(sum(lengths[:2]) / total))
    assert leading_shots(processor, records, 1.0) == (10, 1.0)
