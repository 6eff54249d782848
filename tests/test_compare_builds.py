"""`examples/compare_builds.py`: two builds side by side, their cost and how many decisions agree."""

import json

import pytest


@pytest.fixture(scope="module")
def tiny_demos(tmp_path_factory):
    from tasks import make_task, write_jsonl
    from tiny_models import build_tiny_emloc

    root = tmp_path_factory.mktemp("compare")
    repo = build_tiny_emloc("llama", root / "repo", template="plain")
    demos, _ = make_task("iris", 12, 3)
    return repo, write_jsonl(demos, root / "demos.jsonl"), root


def test_agreeing_and_disagreeing_builds_are_told_apart(tiny_demos):
    import compare_builds

    repo, demos, root = tiny_demos
    methods = "emloc[delta=1e9],emloc[delta=1e9;ratios=0.1],emloc[delta=-1]"
    report = compare_builds.main(["--model", str(repo), "--demos", str(demos), "--methods", methods,
                                  "--out", str(root / "out" / "compare.json")])
    assert json.loads((root / "out" / "compare.json").read_text()) == report
    assert report["num_demos"] == 12 and report["prefill_seconds"] > 0
    first, same, kept_whole = (report["methods"][label] for label in
                                  ("emloc[delta=1e9]", "emloc[delta=1e9;ratios=0.1]", "emloc[delta=-1]"))
    assert "against" not in first and first["build_over_prefill"] > 0
    # everything passes at the floor: a grid of the floor alone gives the same memory for as many evaluations
    assert same["against"] == "emloc[delta=1e9]" and same["same_bytes"] is True
    assert same["layer_decisions_agreeing"] == same["layer_decisions"] > 0
    assert same["chunks_agreeing"] == same["chunks"] == 3
    assert same["probe_evaluations"] == first["probe_evaluations"]
    # nothing passes: every layer keeps the whole chunk, no decision agrees with the floor
    assert kept_whole["same_bytes"] is False and kept_whole["layer_decisions_agreeing"] == 0
    assert kept_whole["chunks_agreeing"] == 0 and kept_whole["kept_ratio"] > first["kept_ratio"]


def test_a_spec_that_is_not_a_searched_memory_is_refused(tiny_demos):
    import compare_builds

    repo, demos, _ = tiny_demos
    for spec in ("zero-shot", "random@0.2", "snapkv@0.2", "default+retrieve@4"):
        with pytest.raises(SystemExit, match="not a memory built by build_memory's search"):
            compare_builds.main(["--model", str(repo), "--demos", str(demos), "--methods", f"default,{spec}"])
