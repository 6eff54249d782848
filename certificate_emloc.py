# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
A memory that checks itself: held-out validation inside the build, a repair ladder, and the best way to ask it.

A compressed memory can keep the many-shot gain on one task and lose all of it on the next, silently. So a build
holds out a few demonstrations, builds the memory from the others, and asks the held-out rows of the memory, of the
uncompressed context of the same demonstrations and of the model alone (zero-shot). Their answers give the memory's
**certificate**: accuracy, agreement with the full context, JS over the choices, the retained gain
`(acc − zero-shot) / (full − zero-shot)` with a bootstrap interval, and a collapse check (one answer to most rows where
the full context varies). On the same rows the build compares the ways of asking the memory (`Recipe`: as scored,
calibrated, with retrieval, both) and records the best; `score_choices`, `generate` and `emloc ask` use it unless told
otherwise. When the certificate falls short of the target, the build climbs a ladder of stronger memories (`LADDER`)
until one meets it. The held-out rows then join the memory, so no demonstration is lost.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

try:  # loaded as remote code: transformers makes a package of the repository's modules
    from .building_emloc import COMPRESSION_METHODS
    from .memory_emloc import TaskMemory
    from .processing_emloc import EmlocProcessor, Example, EncodedSpan
    from .running_emloc import MemoryRunner
    from .scoring_emloc import calibrated_scores, estimate_choice_prior, score_examples
except ImportError:  # imported from the repository root as flat modules
    from building_emloc import COMPRESSION_METHODS
    from memory_emloc import TaskMemory
    from processing_emloc import EmlocProcessor, Example, EncodedSpan
    from running_emloc import MemoryRunner
    from scoring_emloc import calibrated_scores, estimate_choice_prior, score_examples


# ---------------------------------------------------------------------------------------------------------------------
# Ways of asking a memory
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """How a memory is asked to choose: `calibrate` divides out its label prior (estimated with the same retrieval),
    `retrieve=k` reads only the `k` nearest demonstrations' kept tokens."""

    calibrate: bool = False
    retrieve: int | None = None

    @property
    def name(self) -> str:
        parts = ([f"retrieve@{self.retrieve}"] if self.retrieve else []) + (["calibrated"] if self.calibrate else [])
        return "+".join(parts) or "scored"

    @classmethod
    def parse(cls, text: str) -> "Recipe":
        """`"scored"`, `"calibrated"`, `"retrieve@8"`, `"retrieve@8+calibrated"` → a `Recipe`."""
        calibrate, retrieve = False, None
        for part in str(text).split("+"):
            if part == "calibrated":
                calibrate = True
            elif part.startswith("retrieve@") and part[len("retrieve@"):].isdigit() and int(part[len("retrieve@"):]) > 0:
                retrieve = int(part[len("retrieve@"):])
            elif part != "scored":
                raise ValueError(f"unknown recipe {text!r}: give 'scored', 'calibrated', 'retrieve@K' or "
                                 f"'retrieve@K+calibrated'")
        return cls(calibrate, retrieve)


# the recipes a build compares, simplest first (a tie goes to the simpler). Retrieval reads the 8 nearest
# demonstrations: on the selection split 8 was ahead of 4 and 16 (docs/method.md), and each retrieving recipe costs
# its rows a key pass and a memory view of their own, the larger part of a certificate's time
RECIPES = (Recipe(), Recipe(calibrate=True), Recipe(retrieve=8), Recipe(calibrate=True, retrieve=8))


# ---------------------------------------------------------------------------------------------------------------------
# The repair ladder
# ---------------------------------------------------------------------------------------------------------------------

# What a build tries, in order, until the certificate meets its target: the method asked for; the same with a bound
# five times tighter; the paper's rule; the uncompressed chunks (the full context, which meets it by definition).
LADDER = ("asked", "tighter bound", "paper's rule", "uncompressed")


def ladder_rung(rung: str, method: str, params: dict) -> tuple[str, dict]:
    """The method and parameters of a rung of `LADDER`, from what the build was asked (`method`, `params`)."""
    if rung == "asked":
        return method, dict(params)
    if rung == "tighter bound":
        return method, {**params, "delta": params.get("delta", 0.005) / 5}
    if rung == "paper's rule":
        return "emloc", {}
    return "full", {}


# ---------------------------------------------------------------------------------------------------------------------
# Held-out rows
# ---------------------------------------------------------------------------------------------------------------------


MIN_ROWS = 8  # a certificate on fewer held-out rows says too little to act on


def held_out_rows(num_demos: int, count: int) -> list[int]:
    """`count` demonstrations spread evenly over `num_demos` (a file sorted by answer still gives rows of every
    answer), at most one in five; none when that leaves fewer than `MIN_ROWS`."""
    count = min(count, num_demos // 5)
    return [int((i + 0.5) * num_demos / count) for i in range(count)] if count >= MIN_ROWS else []


@dataclass
class HeldOutScores:
    """The held-out rows' choice distributions (normalised log-probabilities, one list per row) under one context."""

    log_probs: list[list[float]]

    @classmethod
    def from_scores(cls, scores: list[list[float]]) -> "HeldOutScores":
        return cls([torch.log_softmax(torch.tensor(row, dtype=torch.float64), -1).tolist() for row in scores])

    def predictions(self) -> list[int]:
        return [max(range(len(row)), key=row.__getitem__) for row in self.log_probs]


def _retained_gain(correct: Sequence[bool], zero: Sequence[bool], full: Sequence[bool]) -> float | None:
    gain = sum(full) - sum(zero)
    return None if gain <= 0 else (sum(correct) - sum(zero)) / gain


def _bootstrap_gain(correct: list[bool], zero: list[bool], full: list[bool], resamples: int = 2000,
                    seed: int = 0) -> list[float] | None:
    """95 % percentile interval of the retained gain, the rows resampled together (paired); resamples where the full
    context gains nothing over zero-shot have no gain to retain and are left out."""
    rng = random.Random(seed)
    n, values = len(correct), []
    for _ in range(resamples):
        rows = [rng.randrange(n) for _ in range(n)]
        value = _retained_gain([correct[i] for i in rows], [zero[i] for i in rows], [full[i] for i in rows])
        if value is not None:
            values.append(value)
    if len(values) < resamples // 2:
        return None
    values.sort()
    return [round(values[int(0.025 * (len(values) - 1))], 4), round(values[int(0.975 * (len(values) - 1))], 4)]


def _js(log_p: Sequence[float], log_q: Sequence[float]) -> float:
    p, q = torch.tensor(log_p, dtype=torch.float64), torch.tensor(log_q, dtype=torch.float64)
    log_m = torch.logaddexp(p, q) - math.log(2.0)
    return float((0.5 * (p.exp() * (p - log_m)).sum() + 0.5 * (q.exp() * (q - log_m)).sum()).clamp(min=0.0))


def collapsed(predictions: Sequence[int], full_predictions: Sequence[int]) -> bool:
    """One answer to most rows where the full context varies: the memory's most frequent answer covers at least 75 %
    of the rows and at least 20 points more of them than the full context's most frequent answer does."""
    if not predictions:
        return False
    top = Counter(predictions).most_common(1)[0][1] / len(predictions)
    full_top = Counter(full_predictions).most_common(1)[0][1] / len(full_predictions)
    return top >= 0.75 and top >= full_top + 0.2


def measure(scores: HeldOutScores, gold: list[int], zero: HeldOutScores, full: HeldOutScores) -> dict:
    """A memory asked one way, on the held-out rows, against the full context and zero-shot (as scored)."""
    predictions, full_predictions = scores.predictions(), full.predictions()
    correct = [p == g for p, g in zip(predictions, gold)]
    zero_correct = [p == g for p, g in zip(zero.predictions(), gold)]
    full_correct = [p == g for p, g in zip(full_predictions, gold)]
    gain = _retained_gain(correct, zero_correct, full_correct)
    return {
        "accuracy": round(sum(correct) / len(gold), 4),
        "retained_gain": None if gain is None else round(gain, 4),
        "retained_gain_interval": _bootstrap_gain(correct, zero_correct, full_correct),
        "agreement": round(sum(p == f for p, f in zip(predictions, full_predictions)) / len(gold), 4),
        "mean_js": round(sum(_js(a, b) for a, b in zip(scores.log_probs, full.log_probs)) / len(gold), 6),
        "gold_log_prob": round(sum(row[g] for row, g in zip(scores.log_probs, gold)) / len(gold), 4),
        "collapsed": collapsed(predictions, full_predictions),
    }


# ---------------------------------------------------------------------------------------------------------------------
# The certificate
# ---------------------------------------------------------------------------------------------------------------------


class Validation:
    """The held-out rows of a build and the references a certificate compares with, computed once per build and shared
    by every rung of the ladder: the zero-shot and full-context answers (the full context: the build's demonstrations
    uncompressed, one prefill).

    Args:
        runner, processor: the model's passes and the processor that renders the rows.
        built: the demonstrations the memory is built from, in memory order (`Example`s, answers and choices given).
        rows: the held-out demonstrations.
        calibration_rows: questions per set of choices that estimate a calibrated recipe's prior (from `built`).
        recipes: the recipes compared.
    """

    def __init__(self, runner: MemoryRunner, processor: EmlocProcessor, built: list[Example], rows: list[Example],
                 calibration_rows: int = 16, recipes: Sequence[Recipe] = RECIPES):
        started = time.perf_counter()
        self.runner, self.processor, self.built, self.rows = runner, processor, built, rows
        self.calibration_rows = calibration_rows
        self.gold = [row.choices.index(row.answer) for row in rows]
        self.recipes = [recipe for recipe in recipes if not (recipe.calibrate and not calibration_rows)]
        context = processor.encode_context(built)
        full = runner.uncompressed(EncodedSpan.concat([context.prefix, *context.demos]))
        self.zero = HeldOutScores.from_scores(score_examples(runner, rows, None, processor))
        self.full = HeldOutScores.from_scores(score_examples(runner, rows, full, processor))
        del full
        self.seconds = time.perf_counter() - started

    @classmethod
    def usable(cls, rows: Sequence[Example]) -> str | None:
        """Why these held-out rows cannot certify a memory, or None: every row needs `choices` holding its answer."""
        for row in rows:
            if not row.choices or row.answer not in row.choices:
                return f"{row.where}: a held-out row needs 'choices' that include its answer"
        return None

    def certify(self, memory: TaskMemory) -> dict:
        """The memory asked every recipe on the held-out rows: per recipe its `measure`, and the chosen recipe — the
        most accurate, then the likeliest gold answers, then the simplest."""
        started = time.perf_counter()
        measured, answers = {}, {}
        for recipe in self.recipes:
            scores = self.ask(memory, recipe)
            measured[recipe.name], answers[recipe.name] = measure(scores, self.gold, self.zero, self.full), \
                scores.predictions()
        order = {recipe.name: rank for rank, recipe in enumerate(self.recipes)}
        chosen = max(measured, key=lambda name: (measured[name]["accuracy"], measured[name]["gold_log_prob"],
                                                 -order[name]))
        return {"recipe": chosen, "recipes": measured, "predictions": answers[chosen],
                "seconds": round(time.perf_counter() - started, 3)}

    def ask(self, memory: TaskMemory, recipe: Recipe) -> HeldOutScores:
        scores = score_examples(self.runner, self.rows, memory, self.processor, retrieve=recipe.retrieve)
        if recipe.calibrate:
            priors = estimate_choice_prior(self.runner, self.built, memory, self.processor, self.calibration_rows,
                                           retrieve=recipe.retrieve, first_demo=0)
            by_choices = {tuple(entry["choices"]): entry["log_prior"] for entry in priors}
            scores = [calibrated_scores(row_scores, by_choices[tuple(row.choices)]) if tuple(row.choices) in by_choices
                      else row_scores for row_scores, row in zip(scores, self.rows)]
        return HeldOutScores.from_scores(scores)

    def summary(self) -> dict:
        """What the references say on their own: rows, zero-shot and full-context accuracy, and per row the answer (an
        index into its choices) of each, beside the gold one."""
        count = len(self.gold)
        return {
            "rows": count,
            "zero_shot_accuracy": round(sum(p == g for p, g in zip(self.zero.predictions(), self.gold)) / count, 4),
            "full_accuracy": round(sum(p == g for p, g in zip(self.full.predictions(), self.gold)) / count, 4),
            "reference_seconds": round(self.seconds, 3),
            "answers": {"gold": self.gold, "zero_shot": self.zero.predictions(), "full": self.full.predictions()},
        }


def meets(certificate: dict, target: float) -> bool:
    """Whether a certificate's chosen recipe retains `target` of the gain without collapsing. Rows on which the full
    context gains nothing over zero-shot have no gain to lose: they pass unless the memory collapses."""
    chosen = certificate["recipes"][certificate["recipe"]]
    gain = chosen["retained_gain"]
    return not chosen["collapsed"] and (gain is None or gain >= target)


# ---------------------------------------------------------------------------------------------------------------------
# A certified build
# ---------------------------------------------------------------------------------------------------------------------


def certified_build(build, examples: list[Example], runner: MemoryRunner, processor: EmlocProcessor, method: str,
                    params: dict, rows: int, target: float | None, calibration_rows: int) -> tuple[TaskMemory, list[int]]:
    """Builds a memory that checks itself.

    `build(method, params, demos, append_to, step)` builds a memory (`MemoryBuilder.build`; `step` names the build
    within this one, e.g. for its checkpoints). `rows` demonstrations of
    `examples` are held out (`held_out_rows`); the memory of the others is certified on them (`Validation`), rebuilt up
    the `LADDER` while its certificate misses `target` (None: no repair), and then the held-out rows are appended with
    the method of the rung that met it. Returns the memory, its `stats["certificate"]` filled, and the order its
    demonstrations are in (the built ones, then the held-out ones: indices into `examples`)."""
    held = held_out_rows(len(examples), rows)
    reason = Validation.usable([examples[i] for i in held]) if held else \
        f"{len(examples)} demonstrations are too few to certify: {MIN_ROWS} held-out rows need {5 * MIN_ROWS}"
    if reason is not None:
        memory = build(method, params, examples, None, None)
        memory.stats["certificate"] = {"skipped": reason}
        return memory, list(range(len(examples)))
    kept = [i for i in range(len(examples)) if i not in set(held)]
    built, held_rows = [examples[i] for i in kept], [examples[i] for i in held]
    validation = Validation(runner, processor, built, held_rows, calibration_rows)
    tried, memory, seen = [], None, set()
    for rung in LADDER:
        rung_method, rung_params = ladder_rung(rung, method, params)
        takes_delta = "delta" in COMPRESSION_METHODS[rung_method].__dataclass_fields__
        if (rung_method, repr(sorted(rung_params.items()))) in seen or (rung == "tighter bound" and not takes_delta):
            continue
        seen.add((rung_method, repr(sorted(rung_params.items()))))
        started = time.perf_counter()
        memory = build(rung_method, rung_params, built, None, rung.replace(" ", "-").replace("'", ""))
        built_seconds = time.perf_counter() - started
        certificate = validation.certify(memory)
        tried.append({"rung": rung, "method": rung_method, "params": _jsonable(rung_params),
                      "kept_ratio": memory.stats["totals"]["kept_ratio"], "build_seconds": round(built_seconds, 3),
                      **certificate})
        if target is None or meets(certificate, target):
            break
    final = tried[-1]
    grown = build(final["method"], ladder_rung(final["rung"], method, params)[1], held_rows, memory, "held-out")
    summary = validation.summary()
    summary["answers"]["memory"] = final.pop("predictions")
    for entry in tried:
        entry.pop("predictions", None)
    grown.stats["certificate"] = {
        **summary, "held_out": held, "target": target, "met": target is None or meets(final, target),
        "recipe": final["recipe"], **final["recipes"][final["recipe"]], "rung": final["rung"], "rungs": tried,
        "seconds": round(validation.seconds + sum(entry["seconds"] for entry in tried), 3),
    }
    return grown, kept + held


def _jsonable(params: dict) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in params.items()}


__all__ = ["LADDER", "RECIPES", "Recipe", "Validation", "certified_build", "held_out_rows", "ladder_rung", "measure",
           "meets"]
