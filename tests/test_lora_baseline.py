"""The LoRA fine-tuning baseline (examples/lora_baseline.py) on the tiny llama: it learns the demonstrations, leaves the
caller's weights alone, is reproducible with a seed and scores through the usual API."""

import pytest
import torch

from conftest import text_demos, text_queries
from lora_baseline import answer_loss, train_lora, training_rows
from rendering_emloc import ANSWER

pytest.importorskip("peft")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and on a busy CPU spinning threads make training ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tiny):
    model, processor, _ = tiny("llama", "plain")
    return model, processor, text_demos(8)


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def test_rows_are_prefix_plus_one_demo_ending_with_its_answer(setup):
    _, processor, demos = setup
    context = processor.encode_context(demos)
    rows = training_rows(processor, demos)
    assert len(rows) == len(demos)
    for row, span in zip(rows, context.demos):
        full = torch.cat([context.prefix.input_ids, span.input_ids])
        assert torch.equal(row.input_ids, full[: len(row)])
        assert row.token_types[-1] == ANSWER and int(row.answer_mask.sum()) == int(span.answer_mask.sum())


def test_training_lowers_the_answer_loss_and_leaves_the_base_alone(setup):
    model, processor, demos = setup
    before_weights = _snapshot(model)
    before = answer_loss(model, processor, demos)
    adapted, stats = train_lora(model, processor, demos, epochs=3, batch_size=4, learning_rate=5e-3, seed=0)
    after = answer_loss(adapted, processor, demos)
    assert after < before - 0.1, (before, after)
    # the caller's model: same weights, still the same objects, no LoRA modules
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before_weights[name], rtol=0, atol=0)
    assert not any("lora" in name for name, _ in model.named_modules())
    assert adapted is not model and adapted.model is not model.model
    assert not any("lora" in name for name, _ in adapted.named_modules())  # merged
    assert answer_loss(model, processor, demos) == pytest.approx(before)
    assert stats["train_seconds"] > 0 and stats["epochs"] == 3 and stats["steps"] == 3 * 2
    assert stats["trainable_params"] > 0 and stats["final_loss"] == stats["epoch_losses"][-1]
    assert set(stats) >= {"train_seconds", "epochs", "steps", "trainable_params", "final_loss"}
    # scoring through the same API, zero-shot on the adapted weights
    queries = text_queries(3)
    scores = adapted.score_choices(queries, processor=processor)
    assert len(scores) == 3 and all(len(s) == len(q["choices"]) for s, q in zip(scores, queries))
    assert scores != model.score_choices(queries, processor=processor)


def test_same_seed_same_weights_other_seed_other_weights(setup):
    model, processor, demos = setup
    kwargs = dict(epochs=2, batch_size=2, learning_rate=5e-3, rank=4, target_modules=("q_proj", "v_proj"))
    first, stats_first = train_lora(model, processor, demos[:4], seed=1, **kwargs)
    second, stats_second = train_lora(model, processor, demos[:4], seed=1, **kwargs)
    other, _ = train_lora(model, processor, demos[:4], seed=2, **kwargs)
    a, b, c = first.model.state_dict(), second.model.state_dict(), other.model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert stats_first["final_loss"] == stats_second["final_loss"]
    assert any(not torch.equal(a[name], c[name]) for name in a)


def test_accepts_the_base_model_and_rejects_zero_epochs(setup):
    model, processor, demos = setup
    adapted, stats = train_lora(model.model, processor, demos[:4], epochs=1, rank=2, target_modules=("q_proj",))
    assert stats["steps"] == 1 and adapted.model is not model.model
    with pytest.raises(ValueError):
        train_lora(model, processor, demos, epochs=0)


def test_vision_language_demos_train_and_score(tiny):
    from conftest import image_demos, image_queries

    model, processor, _ = tiny("qwen2-vl")
    demos = image_demos(3)
    before = answer_loss(model, processor, demos)
    adapted, stats = train_lora(model, processor, demos, epochs=2, batch_size=2, learning_rate=5e-3)
    assert answer_loss(adapted, processor, demos) < before
    assert stats["steps"] == 2 * 2
    assert len(adapted.score_choices(image_queries(1), processor=processor)[0]) == 10
