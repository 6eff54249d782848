"""EMLoC accuracy: share of predictions that equal their reference string exactly (an offline `evaluate` metric)."""

import datasets
import evaluate

_DESCRIPTION = """\
Accuracy over string answers: the share of predictions that are exactly equal (Python `==`, so
case-, whitespace- and punctuation-sensitive) to their reference. For a forgiving comparison use
`emloc_exact_match`, which normalises both sides first.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): predicted answers (e.g. the chosen choice label), one per query.
    references (`list` of `str`): gold answers, same length and order as `predictions`.

Returns:
    accuracy (`float`): number of exact matches divided by the number of queries, in [0, 1].
        0.0 when there are no queries.

Examples:
    >>> metric = evaluate.load("/path/to/metrics/emloc_accuracy")
    >>> metric.compute(predictions=["a", "b", "c"], references=["a", "b", "x"])
    {'accuracy': 0.6666666666666666}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EmlocAccuracy(evaluate.Metric):
    """Exact string-equality accuracy."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Value("string"),
            }),
        )

    def _compute(self, predictions, references):
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        if not predictions:
            return {"accuracy": 0.0}
        hits = sum(p == r for p, r in zip(predictions, references))
        return {"accuracy": float(hits / len(predictions))}
