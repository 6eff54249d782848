"""A memory that checks itself (`certificate_emloc`): held-out rows, the certificate's measures, the way of asking it
chooses, the repair ladder, and the held-out rows joining the memory."""

import json

import pytest
import torch

from certificate_emloc import MIN_ROWS, HeldOutScores, Recipe, collapsed, held_out_rows, measure, meets
from memory_emloc import RetrievalIndex, TaskMemory


def _iris(count, queries=4, seed=1):
    from tasks import make_task

    demos, held = make_task("iris", count, queries, seed=seed)
    return [dict(d, answer=str(d["answer"]), choices=[str(c) for c in d["choices"]]) for d in demos], \
        [{"question": q["question"], "choices": [str(c) for c in q["choices"]]} for q in held]


def test_held_out_rows_are_spread_over_the_file_and_few_enough():
    assert held_out_rows(90, 16) == [2, 8, 14, 19, 25, 30, 36, 42, 47, 53, 59, 64, 70, 75, 81, 87]
    assert held_out_rows(40, 16) == [2, 7, 12, 17, 22, 27, 32, 37]  # at most one row in five
    assert held_out_rows(5 * MIN_ROWS - 1, 16) == []  # fewer than MIN_ROWS rows: no certificate
    assert held_out_rows(1000, 0) == []


def test_recipes_read_and_write_their_names():
    for name in ("scored", "calibrated", "retrieve@4", "retrieve@8+calibrated"):
        assert Recipe.parse(name).name == name
    assert Recipe.parse("calibrated+retrieve@8") == Recipe(calibrate=True, retrieve=8)
    for bad in ("retrieve@0", "retrieve@x", "sampled"):
        with pytest.raises(ValueError, match="unknown recipe"):
            Recipe.parse(bad)


def test_measures_of_a_certificate():
    """Accuracy, agreement, JS and the retained gain, on rows whose answers are set by hand."""
    def scores(winners, sure=5.0):
        return HeldOutScores.from_scores([[sure if c == w else 0.0 for c in range(3)] for w in winners])

    gold = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    zero = scores([0] * 10)  # right on 4 rows
    full = scores(gold[:8] + [0, 0])  # right on 9 rows (row 9 is 0 anyway): gain 5 rows
    memory = scores(gold[:6] + [0, 0, 0, 0])  # right on 8 rows (6 and 9 are 0 anyway), differs from full on row 7
    measured = measure(memory, gold, zero, full)
    assert measured["accuracy"] == 0.8 and measured["retained_gain"] == pytest.approx((8 - 4) / (9 - 4))
    assert measured["agreement"] == 0.9 and not measured["collapsed"]
    low, high = measured["retained_gain_interval"]
    assert low <= measured["retained_gain"] <= high
    assert measure(full, gold, zero, full)["mean_js"] == pytest.approx(0.0, abs=1e-12)
    assert measure(full, gold, zero, full)["retained_gain"] == 1.0
    assert measure(zero, gold, zero, full)["collapsed"]  # one answer to every row, where the full context varies
    assert measure(zero, gold, zero, zero)["retained_gain"] is None  # no gain to retain


def test_one_answer_to_most_rows_is_a_collapse_only_where_the_full_context_varies():
    assert collapsed([0] * 8 + [1, 2], [0, 1, 2] * 3 + [0])
    assert not collapsed([0] * 8 + [1, 2], [0] * 9 + [1])  # the full context answers so too
    assert not collapsed([0, 1] * 5, [0, 1, 2] * 3 + [0])


def test_retrieval_can_keep_a_row_from_its_own_demonstration():
    keys = torch.eye(4)
    index = RetrievalIndex(torch.arange(4) * 10, torch.arange(1, 5) * 10, keys, 0)
    assert index.nearest(keys[:2], 1).flatten().tolist() == [0, 1]
    assert 0 not in index.nearest(keys[:1], 3, exclude=torch.tensor([0])).tolist()[0]
    assert index.nearest(keys[:2], 1, exclude=torch.tensor([-1, 1])).flatten().tolist()[0] == 0


def test_a_certified_build_holds_rows_out_certifies_and_adds_them(tiny, tmp_path):
    """40 demonstrations: 8 held out, the memory of the other 32 certified on them, then the 8 appended — the same
    bytes as building the 32 and appending the 8 by hand — and asked by default the way the certificate chose."""
    model, processor, _ = tiny("llama", template="plain")
    demos, queries = _iris(40)
    memory = model.build_memory(demos, processor=processor, chunk_size=4)
    certificate = memory.stats["certificate"]
    held = held_out_rows(40, 16)
    assert certificate["held_out"] == held and certificate["rows"] == len(held) == 8
    for key in ("accuracy", "agreement", "mean_js", "retained_gain", "collapsed", "recipe", "zero_shot_accuracy",
                "full_accuracy", "rungs", "target", "met", "seconds"):
        assert key in certificate
    assert certificate["rungs"][0]["rung"] == "asked" and set(certificate["rungs"][0]["recipes"]) == \
        {"scored", "calibrated", "retrieve@8", "retrieve@8+calibrated"}
    assert memory.stats["num_demos"] == 40 and memory.retrieval.num_demos == 40

    built = [demos[i] for i in range(40) if i not in held]
    by_hand = model.build_memory(built, processor=processor, chunk_size=4, validation=0, calibration_rows=0)
    by_hand = model.build_memory([demos[i] for i in held], processor=processor, chunk_size=4, validation=0,
                                 calibration_rows=0, append_to=by_hand)
    assert memory.digest() == by_hand.digest()

    recipe = Recipe.parse(certificate["recipe"])
    asked = model.score_choices(queries, memory=memory, processor=processor)
    assert asked == model.score_choices(queries, memory=memory, processor=processor, calibrate=recipe.calibrate,
                                        retrieve=recipe.retrieve)
    plain = model.score_choices(queries, memory=memory, processor=processor, calibrate=False)
    assert model.score_choices(queries, memory=memory, processor=processor, recipe="scored") == plain
    saved = TaskMemory.from_pretrained(memory.save_pretrained(tmp_path / "certified"))
    assert json.loads((tmp_path / "certified" / "memory_config.json").read_text())["certificate"]["recipe"] == \
        certificate["recipe"]
    assert model.score_choices(queries, memory=saved, processor=processor) == asked
    card = (tmp_path / "certified" / "README.md").read_text()
    assert "Certificate" in card and certificate["recipe"] in card


def test_a_certificate_meets_its_target_by_its_recipe_and_never_when_collapsed():
    certificate = {"recipe": "calibrated", "recipes": {"scored": {"retained_gain": 0.2, "collapsed": True},
                                                       "calibrated": {"retained_gain": 0.95, "collapsed": False}}}
    assert meets(certificate, 0.9) and not meets(certificate, 0.96)
    certificate["recipes"]["calibrated"]["collapsed"] = True
    assert not meets(certificate, 0.5)
    # rows on which the full context gains nothing over zero-shot have no gain to lose
    assert meets({"recipe": "scored", "recipes": {"scored": {"retained_gain": None, "collapsed": False}}}, 0.9)


def test_a_certificate_below_target_climbs_the_ladder(tiny, monkeypatch):
    """A target no rung meets: every rung is built and certified, the last keeps the chunks whole, and the certificate
    says the target was missed. (A tiny random model shows no many-shot gain to miss, so the verdict is forced.)"""
    import certificate_emloc

    model, processor, _ = tiny("llama", template="plain")
    demos, _ = _iris(40)
    monkeypatch.setattr(certificate_emloc, "meets", lambda certificate, target: False)
    memory = model.build_memory(demos, processor=processor, chunk_size=8, target=0.9, calibration_rows=0)
    certificate = memory.stats["certificate"]
    assert [rung["rung"] for rung in certificate["rungs"]] == ["asked", "tighter bound", "paper's rule", "uncompressed"]
    assert certificate["rungs"][1]["params"]["delta"] == pytest.approx(0.001)
    assert certificate["rung"] == "uncompressed" and certificate["met"] is False
    assert memory.stats["totals"]["kept_ratio"] == 1.0 and memory.stats["method"]["name"] == "full"
    # no target: certified, never repaired
    once = model.build_memory(demos, processor=processor, chunk_size=8, target=None, calibration_rows=0)
    assert [rung["rung"] for rung in once.stats["certificate"]["rungs"]] == ["asked"]


def test_too_few_demonstrations_or_no_choices_build_without_a_certificate(tiny):
    model, processor, _ = tiny("llama", template="plain")
    demos, _ = _iris(12)
    assert "too few" in model.build_memory(demos, processor=processor, calibration_rows=0).stats["certificate"]["skipped"]
    demos, _ = _iris(40)
    no_choices = [{k: v for k, v in d.items() if k != "choices"} for d in demos]
    skipped = model.build_memory(no_choices, processor=processor, calibration_rows=0).stats["certificate"]["skipped"]
    assert "choices" in skipped
    assert "certificate" not in model.build_memory(demos, processor=processor, validation=0).stats
    with pytest.raises(ValueError, match="validation must be a non-negative integer"):
        model.build_memory(demos, processor=processor, validation=-1)
