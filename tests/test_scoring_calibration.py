"""Calibrated choice scores: a memory's label prior, estimated from its demonstrations' questions, recorded when it is
built, travelling with it, and divided out of `score_choices` on request; the harness's `X+calibrate` methods."""

import json
import math

import pytest
import torch

from conftest import demos_for, queries_for

CHOICE_SETS = (["setosa", "versicolor", "virginica"], ["yes", "no"])


def _demos(family, count):
    """Demonstrations with two choice sets: every third one asks yes or no (a demonstration without choices, the
    vision-language families' last one, stays without: it gives no prior)."""
    demos = demos_for(family, count)
    for index, demo in enumerate(demos):
        if "choices" not in demo:
            continue
        if index % 3 == 2:
            demo.update(answer="yes", choices=list(CHOICE_SETS[1]))
        elif family in ("qwen2-vl", "qwen2.5-vl"):
            demo["choices"] = [str(digit) for digit in range(10)]
        else:
            demo["choices"] = list(CHOICE_SETS[0])
    return demos


def _choice_distribution(scores):
    return torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=-1)


def test_calibrated_scores_divide_the_prior_out():
    from scoring_emloc import calibrated_scores

    scores = [math.log(0.6), math.log(0.3), math.log(0.1)]
    calibrated = torch.tensor(calibrated_scores(scores, [math.log(0.6), math.log(0.2), math.log(0.2)]), dtype=torch.float64)
    # p / prior = (1, 1.5, 0.5), renormalised: the class the context favoured loses its head start
    torch.testing.assert_close(calibrated.exp(), torch.tensor([1 / 3, 1 / 2, 1 / 6], dtype=torch.float64))
    assert int(calibrated.argmax()) == 1 and int(torch.tensor(scores).argmax()) == 0
    # summed log-probabilities of multi-token choices are renormalised over the choices first; a flat prior is a no-op
    unnormalised = [-3.0, -1.5, -7.25]
    torch.testing.assert_close(torch.tensor(calibrated_scores(unnormalised, [math.log(1 / 3)] * 3), dtype=torch.float64),
                               torch.log_softmax(torch.tensor(unnormalised, dtype=torch.float64), dim=-1))


@pytest.mark.parametrize("family", ["llama", "qwen2-vl"])
def test_prior_is_the_mean_choice_distribution_of_demonstration_questions(tiny, family):
    model, processor, _ = tiny(family)
    demos = _demos(family, 9)
    memory = model.build_memory(demos, processor=processor, method="emloc", chunk_size=3, calibration_rows=0)
    priors = model.estimate_choice_prior(demos, memory, processor, rows=4)
    groups = {}
    for demo in demos:
        if "choices" in demo:
            groups.setdefault(tuple(demo["choices"]), []).append(demo)
    assert [tuple(entry["choices"]) for entry in priors] == list(groups)
    for entry in priors:
        group = groups[tuple(entry["choices"])]
        # rows spread evenly over the group's demonstrations, first and last included (all of a smaller group);
        # answers not used
        picked = [group[i] for i in ((0, 2, 3, 5) if len(group) == 6 else range(len(group)))]
        assert len(group) in (3, 6) and entry["rows"] == len(picked) == min(4, len(group))
        asked = [{key: value for key, value in demo.items() if key != "answer"} for demo in picked]
        expected = torch.stack([_choice_distribution(row) for row in
                                model.score_choices(asked, memory=memory, processor=processor)]).mean(0)
        torch.testing.assert_close(torch.tensor(entry["log_prior"], dtype=torch.float64).exp(), expected, atol=1e-6, rtol=0)
    # zero-shot has a prior of its own: the template prefix's
    zero_shot = model.estimate_choice_prior(demos, None, processor, rows=4)
    assert [entry["choices"] for entry in zero_shot] == [entry["choices"] for entry in priors]
    assert zero_shot[0]["log_prior"] != priors[0]["log_prior"]


def test_build_records_the_prior_and_score_choices_divides_it_out(tiny, tmp_path):
    from memory_emloc import TaskMemory
    from scoring_emloc import calibrated_scores

    model, processor, _ = tiny("llama")
    demos = _demos("llama", 8)
    memory = model.build_memory(demos, processor=processor, method="emloc", chunk_size=4, calibration_rows=4)
    recorded = memory.stats["calibration"]
    assert recorded["rows"] == 4
    assert recorded["priors"] == model.estimate_choice_prior(demos, memory, processor, rows=4)
    memory.save_pretrained(tmp_path / "memory")
    loaded = TaskMemory.from_pretrained(tmp_path / "memory")
    assert loaded.stats["calibration"] == recorded

    queries = queries_for("llama", 3)
    queries[2] = dict(queries[2], choices=list(CHOICE_SETS[1]))
    raw = model.score_choices(queries, memory=loaded, processor=processor)
    calibrated = model.score_choices(queries, memory=loaded, processor=processor, calibrate=True)
    by_choices = {tuple(entry["choices"]): entry["log_prior"] for entry in recorded["priors"]}
    for query, raw_row, row in zip(queries, raw, calibrated):
        assert row == pytest.approx(calibrated_scores(raw_row, by_choices[tuple(query["choices"])]), abs=1e-12)
        assert sum(math.exp(x) for x in row) == pytest.approx(1.0)
    # an explicit list of priors (here zero-shot's) calibrates a query answered without a memory
    zero_shot_priors = model.estimate_choice_prior(demos, None, processor, rows=4)
    alone = model.score_choices(queries, processor=processor, calibrate=zero_shot_priors)
    zero_shot = {tuple(entry["choices"]): entry["log_prior"] for entry in zero_shot_priors}
    for query, raw_row, row in zip(queries, model.score_choices(queries, processor=processor), alone):
        assert row == pytest.approx(calibrated_scores(raw_row, zero_shot[tuple(query["choices"])]), abs=1e-12)


def test_an_appended_memory_records_the_prior_of_the_grown_memory(tiny):
    model, processor, _ = tiny("llama")
    demos = _demos("llama", 12)
    first = model.build_memory(demos[:6], processor=processor, method="emloc", chunk_size=3, calibration_rows=4)
    grown = model.build_memory(demos[6:], processor=processor, method="emloc", chunk_size=3, append_to=first,
                               calibration_rows=4)
    # estimated anew, from the demonstrations given, against the memory they grew: not the prior of `first`
    assert grown.stats["calibration"]["priors"] == model.estimate_choice_prior(demos[6:], grown, processor, rows=4)
    assert grown.stats["calibration"]["priors"] != first.stats["calibration"]["priors"]
    # with no rows, the grown memory records no prior rather than the one `first` recorded for less context
    bare = model.build_memory(demos[6:], processor=processor, method="emloc", chunk_size=3, append_to=first,
                              calibration_rows=0)
    assert "calibration" not in bare.stats and "calibration" in first.stats
    with pytest.raises(ValueError, match="records no label prior"):
        model.score_choices(queries_for("llama", 1), memory=bare, processor=processor, calibrate=True)


def test_calibration_refuses_what_it_cannot_do(tiny):
    model, processor, _ = tiny("llama")
    demos = _demos("llama", 6)
    plain = model.build_memory(demos, processor=processor, method="emloc", chunk_size=3, calibration_rows=0)
    assert "calibration" not in plain.stats
    queries = queries_for("llama", 2)
    with pytest.raises(ValueError, match="records no label prior"):
        model.score_choices(queries, memory=plain, processor=processor, calibrate=True)
    with pytest.raises(ValueError, match="records no label prior"):
        model.score_choices(queries, processor=processor, calibrate=True)  # zero-shot: nothing recorded
    priors = model.estimate_choice_prior(demos, plain, processor, rows=2)
    other = [dict(queries[0], choices=["red", "green"])]
    with pytest.raises(ValueError, match=r"<list>\[0\]: no label prior for the choices \['red', 'green'\]"):
        model.score_choices(other, memory=plain, processor=processor, calibrate=priors)
    with pytest.raises(ValueError, match="calibrate must be"):
        model.score_choices(queries, memory=plain, processor=processor, calibrate="yes")
    with pytest.raises(ValueError, match="calibration_rows"):
        model.build_memory(demos, processor=processor, method="full", calibration_rows=-1)
    with pytest.raises(ValueError, match="rows must be"):
        model.estimate_choice_prior(demos, plain, processor, rows=0)
    # demonstrations without choices give no prior to record
    bare = [{key: value for key, value in demo.items() if key != "choices"} for demo in demos]
    assert "calibration" not in model.build_memory(bare, processor=processor, method="full").stats


def test_harness_calibrated_methods_and_reused_scores(tmp_path):
    import evaluate_memory
    from scoring_emloc import calibrated_scores
    from tasks import make_task, write_jsonl
    from tiny_models import build_tiny_emloc

    repo = build_tiny_emloc("llama", tmp_path / "repo", template="plain")
    demo_rows, query_rows = make_task("iris", 8, 5)
    demos, queries = write_jsonl(demo_rows, tmp_path / "demos.jsonl"), write_jsonl(query_rows, tmp_path / "queries.jsonl")
    common = ["--model", str(repo), "--demos", str(demos), "--queries", str(queries), "--calibration-rows", "4"]
    first = evaluate_memory.main([*common, "--out", str(tmp_path / "first"), "--methods",
                                  "zero-shot,full,random@0.3,zero-shot+calibrate,full+calibrate,random@0.3+calibrate"])
    methods = first["methods"]
    for label in ("zero-shot", "full", "random@0.3"):
        calibrated = methods[f"{label}+calibrate"]
        assert calibrated["scores_from"] == f"{label} (this run)" and calibrated["calibration"]["rows"] == 4
        (entry,) = calibrated["calibration"]["priors"]
        expected = [calibrated_scores(row, entry["log_prior"]) for row in methods[label]["choice_logprobs"]]
        torch.testing.assert_close(torch.tensor(calibrated["choice_logprobs"]), torch.tensor(expected), atol=1e-12, rtol=0)
    # the calibrated methods agree with the calibrated full context; the others with the full context as scored
    full = methods["full+calibrate"]["choice_logprobs"]
    expected_agreement = sum(max(range(3), key=a.__getitem__) == max(range(3), key=b.__getitem__)
                             for a, b in zip(methods["random@0.3+calibrate"]["choice_logprobs"], full)) / 5
    assert methods["random@0.3+calibrate"]["agreement"] == pytest.approx(expected_agreement)
    assert "agreement" not in methods["full+calibrate"]

    # a later run takes the scores on record for zero-shot and for memories rebuilt to the same size
    second = evaluate_memory.main([*common, "--out", str(tmp_path / "second"), "--reuse-scores",
                                   str(tmp_path / "first" / "results.json"), "--methods", "zero-shot,random@0.3+calibrate"])
    record = second["methods"]["random@0.3+calibrate"]
    assert second["methods"]["zero-shot"]["scores_from"].startswith("zero-shot (")
    assert record["choice_logprobs"] == methods["random@0.3+calibrate"]["choice_logprobs"]
    other = json.loads((tmp_path / "first" / "results.json").read_text())
    other["answers"] = other["answers"][::-1]
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="recorded for other queries"):
        evaluate_memory.main([*common, "--out", str(tmp_path / "third"), "--reuse-scores", str(tmp_path / "other.json"),
                              "--methods", "zero-shot"])
    with pytest.raises(SystemExit, match="calibration needs one context"):
        evaluate_memory.parse_methods("rices[k=2]+calibrate")
    spec = evaluate_memory.parse_methods("snapkv@default+calibrate")[0]
    assert spec.calibrate and spec.uncalibrated == "snapkv@default" and spec.reference == "default"
