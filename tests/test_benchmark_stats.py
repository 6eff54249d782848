"""The benchmark's statistics (examples/stats.py): paired, stratified bootstrap intervals and per-query fidelity."""

import math

import numpy as np
import pytest

from stats import choice_js, paired_bootstrap, stratified_indices, top_choice


def _bernoulli(p, n, seed):
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_identical_methods_give_a_difference_interval_around_zero():
    a = _bernoulli(0.6, 240, 0)
    result = paired_bootstrap({"a": a, "b": a.copy()}, contrasts=[("a", "b")], resamples=500)
    diff = result["diff"]["a-b"]
    assert diff["estimate"] == 0 and diff["low"] == 0 and diff["high"] == 0  # paired: every resample is exactly 0
    assert result["mean"]["a"]["low"] < a.mean() < result["mean"]["a"]["high"]


def test_noisy_but_equal_methods_contain_zero_and_different_ones_exclude_it():
    n = 300
    a, b = _bernoulli(0.6, n, 1), _bernoulli(0.6, n, 2)  # same accuracy, independent errors
    result = paired_bootstrap({"a": a, "b": b}, contrasts=[("a", "b")], resamples=2000, seed=3)
    assert result["diff"]["a-b"]["low"] < 0 < result["diff"]["a-b"]["high"]
    good, bad = _bernoulli(0.85, n, 4), _bernoulli(0.35, n, 5)
    result = paired_bootstrap({"good": good, "bad": bad}, contrasts=[("good", "bad")], resamples=2000, seed=3)
    assert result["diff"]["good-bad"]["low"] > 0.3
    assert result["diff"]["good-bad"]["estimate"] == pytest.approx(good.mean() - bad.mean())


def test_same_seed_same_intervals_other_seed_other_intervals():
    values = {"a": _bernoulli(0.5, 200, 6), "b": _bernoulli(0.7, 200, 7)}
    first = paired_bootstrap(values, contrasts=[("b", "a")], resamples=400, seed=11)
    again = paired_bootstrap(values, contrasts=[("b", "a")], resamples=400, seed=11)
    other = paired_bootstrap(values, contrasts=[("b", "a")], resamples=400, seed=12)
    assert first == again
    assert first["diff"]["b-a"]["low"] != other["diff"]["b-a"]["low"] or first["mean"]["a"] != other["mean"]["a"]


def test_strata_keep_their_sizes_and_weights_make_a_mean_of_group_means():
    groups = np.array([0] * 10 + [1] * 30)
    index = stratified_indices(groups, 50, np.random.default_rng(0))
    assert (groups[index] == groups).all()  # every resample keeps 10 of group 0 and 30 of group 1
    # two tasks of different sizes, each weighing the same: the mean is the mean of the two task means
    x = np.concatenate([np.ones(10), np.zeros(30)])
    weights = np.concatenate([np.full(10, 1 / 10), np.full(30, 1 / 30)])
    result = paired_bootstrap({"x": x}, groups=groups, weights=weights, resamples=100)
    assert result["mean"]["x"]["estimate"] == pytest.approx(0.5)
    assert result["mean"]["x"]["low"] == pytest.approx(0.5) and result["mean"]["x"]["high"] == pytest.approx(0.5)


def test_missing_values_are_left_out_pairwise():
    a = np.array([1.0, 1.0, np.nan, 0.0])
    b = np.array([0.0, 1.0, 1.0, 0.0])
    result = paired_bootstrap({"a": a, "b": b}, contrasts=[("a", "b")], resamples=100)
    assert result["mean"]["a"]["n"] == 3 and result["mean"]["a"]["estimate"] == pytest.approx(2 / 3)
    assert result["diff"]["a-b"]["n"] == 3 and result["diff"]["a-b"]["estimate"] == pytest.approx(1 / 3)


def test_retained_gain_interval():
    n = 400
    zero, full = _bernoulli(0.3, n, 8), _bernoulli(0.8, n, 9)
    half = np.where(np.random.default_rng(10).random(n) < 0.5, zero, full)  # answers like full on half the queries
    result = paired_bootstrap({"m": half, "zero": zero, "full": full}, gains=[("m", "zero", "full"), ("full", "zero", "full")],
                              resamples=1000)
    expected = (half.mean() - zero.mean()) / (full.mean() - zero.mean())
    assert result["gain"]["m"]["estimate"] == pytest.approx(expected)
    assert result["gain"]["m"]["low"] < expected < result["gain"]["m"]["high"]
    assert result["gain"]["full"]["estimate"] == pytest.approx(1.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap({"a": [1, 0], "b": [1]})
    with pytest.raises(ValueError, match="not given"):
        paired_bootstrap({"a": [1, 0]}, contrasts=[("a", "b")])


def test_choice_js_matches_the_fidelity_metric_and_top_choice_takes_the_first_tie():
    assert choice_js([-0.1, -2.4], [-0.1, -2.4]) == 0.0
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.2, 0.5, 0.3])
    m = (p + q) / 2
    expected = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert choice_js(np.log(p) + 3.0, np.log(q)) == pytest.approx(expected)  # log-scores are renormalised
    assert choice_js([0.0, -math.inf], [-math.inf, 0.0]) == pytest.approx(math.log(2))
    assert top_choice([-1.0, -0.5, -0.5]) == 1


def test_a_gain_over_groups_is_the_mean_of_the_groups_gains_in_the_estimate_and_in_every_resample():
    """`gain_groups`: the retained gain per group (task), then the mean over groups, each weighing the same — not the
    gain of the pooled means, which a large task would dominate."""
    sizes, seeds = (40, 120), iter(range(20, 40))  # two tasks; the second has three splits of 40
    splits = np.concatenate([np.full(40, 0), np.full(40, 1), np.full(40, 2), np.full(40, 3)])
    tasks = np.concatenate([np.full(sizes[0], 0), np.full(sizes[1], 1)])
    zero = np.concatenate([_bernoulli(0.3, sizes[0], next(seeds)), _bernoulli(0.2, sizes[1], next(seeds))])
    full = np.concatenate([_bernoulli(0.9, sizes[0], next(seeds)), _bernoulli(0.8, sizes[1], next(seeds))])
    memory = np.concatenate([_bernoulli(0.8, sizes[0], next(seeds)), _bernoulli(0.4, sizes[1], next(seeds))])
    weights = np.where(tasks == 0, 1 / sizes[0], 1 / sizes[1])
    values = {"memory": memory, "zero": zero, "full": full}
    result = paired_bootstrap(values, gains=[("memory", "zero", "full")], groups=splits, weights=weights,
                              gain_groups=tasks, resamples=300, seed=5)["gain"]["memory"]

    def gain(m, z, f):
        return (m.mean() - z.mean()) / (f.mean() - z.mean())

    per_task = [gain(memory[tasks == t], zero[tasks == t], full[tasks == t]) for t in (0, 1)]
    assert result["estimate"] == pytest.approx(np.mean(per_task))
    assert abs(np.mean(per_task) - gain(memory, zero, full)) > 0.05  # the pooled gain is another number
    index = stratified_indices(splits, 300, np.random.default_rng(5))  # the same resamples, by hand
    samples = [np.mean([gain(*(x[row][tasks[row] == t] for x in (memory, zero, full))) for t in (0, 1)])
               for row in index]
    assert [result["low"], result["high"]] == pytest.approx(np.quantile(samples, [0.025, 0.975]))
    pooled = paired_bootstrap(values, gains=[("memory", "zero", "full")], groups=splits, resamples=300, seed=5)
    assert pooled["gain"]["memory"]["estimate"] == pytest.approx(gain(memory, zero, full))


def test_certificates_are_pooled_per_pair_and_set_beside_what_the_queries_measured():
    """Two splits' certificates (their held-out rows' answers) pool into one retained gain with an interval; a pair is
    flagged when a split's certificate fell under 70 % or collapsed, weak when the queries did."""
    import benchmark

    def split(memory, collapsed=False, recipe="calibrated"):
        certificate = {"answers": {"gold": [0, 1, 2, 0, 1, 2, 0, 1], "zero_shot": [0] * 8, "full": [0, 1, 2, 0, 1, 2, 0, 0],
                                   "memory": memory}, "retained_gain": 0.5 if collapsed else 1.0, "collapsed": collapsed,
                       "recipe": recipe, "rung": "asked", "met": not collapsed, "seconds": 3.0}
        return {"results": {"methods": {"user": {"memory_stats": {"certificate": certificate}, "predictions": ["a", "b"] * 10},
                                        "full": {"predictions": ["a", "b"] * 10}}}}

    models = {"m": {"tasks": {"t": {"splits_data": [split([0, 1, 2, 0, 1, 2, 0, 0]), split([0, 1, 0, 0, 1, 0, 0, 0], True)],
                                    "methods": {"user": {"retained_gain": {"estimate": 0.8, "low": 0.6, "high": 0.95}}}}}}}
    [pair] = benchmark.certificate_pairs(models, resamples=200)
    # zero-shot is right on 6 of the 16 pooled rows (every gold 0): the gain is counted over the pooled rows
    gold = [0, 1, 2, 0, 1, 2, 0, 1] * 2
    memory = [0, 1, 2, 0, 1, 2, 0, 0] + [0, 1, 0, 0, 1, 0, 0, 0]
    full = [0, 1, 2, 0, 1, 2, 0, 0] * 2
    right = lambda answers: sum(a == g for a, g in zip(answers, gold))  # noqa: E731
    assert pair["certificate"]["estimate"] == pytest.approx((right(memory) - 6) / (right(full) - 6))
    assert pair["certificate"]["low"] <= pair["certificate"]["estimate"] <= pair["certificate"]["high"]
    assert pair["rows"] == 16 and pair["splits"] == 2 and pair["recipes"] == {"calibrated": 2}
    assert pair["flagged"] and not pair["weak"] and pair["met"] == 1
    assert pair["contains"] == (pair["certificate"]["low"] <= 0.8 <= pair["certificate"]["high"])
