"""Load the project's offline `evaluate` metrics (``metrics/<name>/<name>.py``) by path, never from the Hub.

``load_metric("emloc_exact_match")`` (``config_name="strict"``: accuracy over strings as they are),
``load_metric("emloc_fidelity")``.
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent.parent / "metrics"


def load_metric(name: str, **kwargs):
    """`evaluate.load` the local metric script ``metrics/<name>/<name>.py`` (extra kwargs go to `evaluate.load`)."""
    import evaluate

    if not (METRICS_DIR / name / f"{name}.py").is_file():
        raise FileNotFoundError(f"no metric script {METRICS_DIR / name / (name + '.py')}")
    return evaluate.load(str(METRICS_DIR / name), **kwargs)
