"""EMLoC exact match: string equality after a light, documented normalisation — or, as the configuration `"strict"`,
without it: accuracy over string answers (an offline `evaluate` metric)."""

import string
import unicodedata

import datasets
import evaluate

_DESCRIPTION = """\
Exact match after normalisation: the share of predictions whose normalised form equals the
normalised reference. Both sides go through `normalize_answer`, which applies, in this order:

1. lowercase (`str.lower()`);
2. strip surrounding whitespace and punctuation from the whole string;
3. split on whitespace (any run of Unicode whitespace), which collapses internal whitespace;
4. drop every token that is exactly `a`, `an` or `the` (after step 1, so `The` too);
5. join the remaining tokens with single spaces and strip surrounding whitespace and
   punctuation again (so `"Paris, the."` -> `"paris"` and `"the 'cat'"` -> `"cat"`).

"Punctuation" is any character in `string.punctuation` (ASCII punctuation and symbols such as
`$ + < = > ^ | ~`) or in a Unicode punctuation category (`P*`, e.g. `« » ¿ 。 — “ ”`).
Punctuation *inside* the answer is kept (`"3.5"`, `"u.s"`, `"rock-paper"`), as is an article
glued to punctuation inside the answer (`"a,b"`). No accent folding or number normalisation.

The configuration `"strict"` (`evaluate.load(path, "strict")`) compares the strings as they are
(Python `==`: case-, whitespace- and punctuation-sensitive) and reports it as `accuracy`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): predicted answers, one per query.
    references (`list` of `str`): gold answers, same length and order as `predictions`.

Returns:
    exact_match (`float`): share of queries whose normalised prediction equals the normalised
        reference, in [0, 1]. 0.0 when there are no queries. Under `"strict"`: `accuracy`, the share
        of predictions equal to their reference as they are.

Examples:
    >>> metric = evaluate.load("/path/to/metrics/emloc_exact_match")
    >>> metric.compute(predictions=["  The Cat. ", "a  dog"], references=["cat", "Dog!"])
    {'exact_match': 1.0}
    >>> evaluate.load("/path/to/metrics/emloc_exact_match", "strict").compute(predictions=["a", "B"], references=["a", "b"])
    {'accuracy': 0.5}
"""

_CITATION = ""

_ARTICLES = frozenset({"a", "an", "the"})
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def _is_strippable(char: str) -> bool:
    return char.isspace() or char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def _strip(text: str) -> str:
    start, end = 0, len(text)
    while start < end and _is_strippable(text[start]):
        start += 1
    while end > start and _is_strippable(text[end - 1]):
        end -= 1
    return text[start:end]


def normalize_answer(text: str) -> str:
    """Lowercase, strip surrounding whitespace/punctuation, collapse whitespace, drop a/an/the, strip again."""
    tokens = _strip(str(text).lower()).split()
    return _strip(" ".join(token for token in tokens if token not in _ARTICLES))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EmlocExactMatch(evaluate.Metric):
    """Exact match after answer normalisation."""

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
        strict = self.config_name == "strict"
        key = "accuracy" if strict else "exact_match"
        if not predictions:
            return {key: 0.0}
        form = str if strict else normalize_answer
        hits = sum(form(p) == form(r) for p, r in zip(predictions, references))
        return {key: float(hits / len(predictions))}
