"""EMLoC fidelity: how closely a compressed memory reproduces the full context's choice distribution (an offline `evaluate` metric)."""

import math

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Fidelity of a compressed task memory to the full (uncompressed) context, measured on the
multiple-choice scores each one gives to the same queries. For every query both sides supply one
log-probability (or any log-score: each list is renormalised) per choice. Each list is turned into
a distribution over the choices with a log-softmax, then:

* `agreement`: share of queries where the method's top choice (argmax; ties go to the first
  index) is the full context's top choice;
* `mean_js`: mean over queries of the Jensen-Shannon divergence, natural log (so in [0, ln 2]),
  between the two choice distributions. It is computed in float64 from the log-probabilities:
  log m = logaddexp(log p, log q) - ln 2, JS = (KL(p||m) + KL(q||m)) / 2, with 0 * log 0 = 0, so
  `-inf` entries (impossible choices) are fine; it is exactly 0 for identical inputs and is
  clipped to [0, ln 2] against rounding. It is never NaN: NaN or `+inf` inputs, all-`-inf` lists,
  empty lists and mismatched choice counts raise `ValueError`.

Queries may have different numbers of choices; within a query both lists must have the same length.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): per query, the method's log-probability for each
        choice (e.g. from a compressed EMLoC memory).
    references (`list` of `list` of `float`): per query, the same from the full context, same
        query order and same number of choices per query as `predictions`.

Returns:
    agreement (`float`): share of queries whose argmax choice matches, in [0, 1].
    mean_js (`float`): mean Jensen-Shannon divergence (nats), in [0, ln 2]; 0 for identical inputs.
    Both are 0.0 when there are no queries.

Examples:
    >>> metric = evaluate.load("/path/to/metrics/emloc_fidelity")
    >>> metric.compute(predictions=[[-0.1, -2.4], [-1.0, -0.5, -3.0]],
    ...                references=[[-0.1, -2.4], [-1.0, -0.5, -3.0]])
    {'agreement': 1.0, 'mean_js': 0.0}
"""

_CITATION = """\
@inproceedings{ma2025emloc,
  title     = {Efficient Multi-Modal Long Context Learning for Training-free Adaptation},
  author    = {Ma, Zehong and Zhang, Shiliang and Wei, Longhui and Tian, Qi},
  booktitle = {Proceedings of the 42nd International Conference on Machine Learning (ICML)},
  series    = {Proceedings of Machine Learning Research},
  volume    = {267},
  pages     = {42236--42251},
  year      = {2025},
  eprint    = {2505.19812},
  archivePrefix = {arXiv},
}
"""

_LN2 = math.log(2.0)


def _log_softmax(values, which: str, index: int) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"{which}[{index}] must be a non-empty list of floats")
    if np.isnan(scores).any() or np.isposinf(scores).any():
        raise ValueError(f"{which}[{index}] contains NaN or +inf: {list(values)}")
    top = scores.max()
    if not np.isfinite(top):
        raise ValueError(f"{which}[{index}] is all -inf: no choice has any probability")
    shifted = scores - top
    return shifted - np.log(np.exp(shifted).sum())


def _kl_to_mixture(log_p: np.ndarray, log_m: np.ndarray) -> float:
    keep = np.isfinite(log_p)  # 0 * log 0 = 0; where p > 0, m >= p / 2 > 0 so log_m is finite
    return float(np.sum(np.exp(log_p[keep]) * (log_p[keep] - log_m[keep])))


def js_from_log_probs(log_p: np.ndarray, log_q: np.ndarray) -> float:
    """Jensen-Shannon divergence (nats) between two normalised log-probability vectors, in [0, ln 2]."""
    log_m = np.logaddexp(log_p, log_q) - _LN2
    js = 0.5 * (_kl_to_mixture(log_p, log_m) + _kl_to_mixture(log_q, log_m))
    return min(max(js, 0.0), _LN2)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EmlocFidelity(evaluate.Metric):
    """Argmax agreement and mean Jensen-Shannon divergence between choice distributions."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Sequence(datasets.Value("float64")),
            }),
            reference_urls=["https://arxiv.org/abs/2505.19812"],
        )

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if not predictions:
            return {"agreement": 0.0, "mean_js": 0.0}
        agree, js_total = 0, 0.0
        for index, (pred, ref) in enumerate(zip(predictions, references)):
            log_p = _log_softmax(pred, "predictions", index)
            log_q = _log_softmax(ref, "references", index)
            if log_p.size != log_q.size:
                raise ValueError(f"query {index}: {log_p.size} choices in predictions but {log_q.size} in references")
            agree += int(np.argmax(log_p) == np.argmax(log_q))
            js_total += js_from_log_probs(log_p, log_q)
        count = len(predictions)
        return {"agreement": float(agree / count), "mean_js": float(js_total / count)}
