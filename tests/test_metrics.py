"""The offline `evaluate` metrics in metrics/: known values, edge cases, and loading with no Hub at all."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metrics import METRICS_DIR, load_metric

LN2 = math.log(2.0)
NAMES = ("emloc_exact_match", "emloc_fidelity")


@pytest.fixture(scope="module")
def metric():
    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = load_metric(name, keep_in_memory=True)
        return loaded[name]

    return get


def test_layout():
    for name in NAMES:
        assert (METRICS_DIR / name / f"{name}.py").is_file()
    assert not (METRICS_DIR / "__init__.py").exists()
    with pytest.raises(FileNotFoundError):
        load_metric("no_such_metric")


def test_strict_accuracy():
    accuracy = load_metric("emloc_exact_match", config_name="strict")
    assert accuracy.compute(predictions=["a", "b", "c"], references=["a", "b", "x"]) == {"accuracy": pytest.approx(2 / 3)}
    # exact equality: case and whitespace count
    assert accuracy.compute(predictions=["Setosa", "setosa "], references=["setosa", "setosa"])["accuracy"] == 0.0
    assert accuracy.compute(predictions=[], references=[]) == {"accuracy": 0.0}
    assert "accuracy" in accuracy.description.lower() and "predictions" in accuracy.inputs_description


@pytest.mark.parametrize("prediction, reference, same", [
    ("  The Cat. ", "cat", True),
    ("a  dog", "Dog!", True),
    ("An\tapple\n", "apple", True),
    ("Paris, the.", "paris", True),
    ("the 'cat'", "«Cat»", True),
    ("new   york", "New York", True),
    ("3.5", "35", False),            # inner punctuation is kept
    ("the", "", True),               # articles only -> empty
    ("theater", "ater", False),      # only whole tokens are articles
    ("cat dog", "dog cat", False),
])
def test_exact_match_normalisation(metric, prediction, reference, same):
    score = metric("emloc_exact_match").compute(predictions=[prediction], references=[reference])["exact_match"]
    assert score == (1.0 if same else 0.0)


def test_exact_match_mean(metric):
    result = metric("emloc_exact_match").compute(predictions=["The Cat", "dog", "bird"], references=["cat", "a dog.", "fish"])
    assert result == {"exact_match": pytest.approx(2 / 3)}


def test_fidelity_identical(metric):
    fidelity = metric("emloc_fidelity")
    scores = [[-0.1, -2.4], [-1.0, -0.5, -3.0, float("-inf")], [math.log(0.25)] * 4]
    assert fidelity.compute(predictions=scores, references=scores) == {"agreement": 1.0, "mean_js": 0.0}
    # unnormalised log-scores are log-softmaxed first: a shift changes nothing
    result = fidelity.compute(predictions=[[1.0, 2.0, -5.0]], references=[[-11.0, -10.0, -17.0]])
    assert result["agreement"] == 1.0 and result["mean_js"] == pytest.approx(0.0, abs=1e-12)
    assert "Ma, Zehong" in fidelity.citation and "2505.19812" in fidelity.citation


def test_fidelity_disjoint(metric):
    fidelity = metric("emloc_fidelity")
    result = fidelity.compute(predictions=[[0.0, -1e4], [0.0, float("-inf"), float("-inf")]],
                              references=[[-1e4, 0.0], [float("-inf"), 0.0, float("-inf")]])
    assert result["agreement"] == 0.0
    assert result["mean_js"] == pytest.approx(LN2, abs=1e-9) and result["mean_js"] <= LN2
    # extreme values stay finite
    result = fidelity.compute(predictions=[[0.0, -1e300]], references=[[-1e300, 0.0]])
    assert math.isfinite(result["mean_js"]) and result["mean_js"] == pytest.approx(LN2)


def _js_reference(log_p, log_q):
    p = np.exp(np.asarray(log_p) - np.logaddexp.reduce(log_p))
    q = np.exp(np.asarray(log_q) - np.logaddexp.reduce(log_q))
    m = (p + q) / 2
    return 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))


def test_fidelity_variable_lengths(metric):
    rng = np.random.default_rng(0)
    predictions, references = [], []
    for size in (2, 3, 5, 10, 4):
        predictions.append(list(rng.normal(size=size) * 3))
        references.append(list(rng.normal(size=size) * 3))
    result = metric("emloc_fidelity").compute(predictions=predictions, references=references)
    expected_js = np.mean([_js_reference(p, q) for p, q in zip(predictions, references)])
    expected_agree = np.mean([np.argmax(p) == np.argmax(q) for p, q in zip(predictions, references)])
    assert result["mean_js"] == pytest.approx(expected_js, rel=1e-10)
    assert result["agreement"] == pytest.approx(expected_agree)
    assert 0 < result["mean_js"] < LN2


@pytest.mark.parametrize("predictions, references", [
    ([[0.0, -1.0]], [[0.0, -1.0, -2.0]]),          # choice counts differ within a query
    ([[0.0, float("nan")]], [[0.0, -1.0]]),         # NaN
    ([[float("-inf"), float("-inf")]], [[0.0, -1.0]]),  # no choice possible
    ([[]], [[]]),                                   # no choices
])
def test_fidelity_rejects_bad_input(metric, predictions, references):
    with pytest.raises(ValueError):
        metric("emloc_fidelity").compute(predictions=predictions, references=references)


_OFFLINE_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from metrics import load_metric
out = {
    "accuracy": load_metric("emloc_exact_match", config_name="strict").compute(predictions=["a", "b", "c"], references=["a", "b", "x"]),
    "exact_match": load_metric("emloc_exact_match").compute(predictions=["The Cat."], references=["cat"]),
    "fidelity": load_metric("emloc_fidelity").compute(predictions=[[0.0, -1.0], [0.0, -1.0, -2.0]],
                                                      references=[[0.0, -1.0], [0.0, -1.0, -2.0]]),
}
print(json.dumps(out))
"""


def test_loads_offline_in_fresh_hf_home(tmp_path):
    hf_home = tmp_path / "hf_home"  # does not exist yet: evaluate must create its caches there
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_DISABLE_TELEMETRY="1")  # an endpoint that cannot answer
    run = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, str(Path(__file__).resolve().parent.parent / "examples")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["accuracy"]["accuracy"] == pytest.approx(2 / 3)
    assert out["exact_match"] == {"exact_match": 1.0}
    assert out["fidelity"] == {"agreement": 1.0, "mean_js": 0.0}
    modules = hf_home / "modules" / "evaluate_modules" / "metrics"
    assert {p.name for p in modules.iterdir() if p.is_dir()} >= set(NAMES)
