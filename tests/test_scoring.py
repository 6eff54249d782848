"""Batched `score_choices`: queries go in left-padded batches, every multi-token choice rides behind its query as a
branch, and the numbers are those of one query at a time (and of the full context when nothing is pruned)."""

import pytest
import torch

from conftest import FAMILIES, demos_for, queries_for, text_demos, text_queries
from reference import full_inputs

CHOICES = ["7", "12", "setosa", "versicolor", "virginica", "Iris virginica, surely"]


def _queries(family, count):
    queries = queries_for(family, count)
    for index, query in enumerate(queries):  # different numbers and lengths of choices per query
        query["choices"] = CHOICES[index % 3:] if index % 2 else CHOICES[: 3 + index % 4]
    if family in ("llama", "gemma3"):
        queries[1] = dict(queries[1], question="short?")
    return queries


@pytest.mark.parametrize("family", FAMILIES)
def test_batches_equal_one_query_at_a_time(tiny, family):
    model, processor, _ = tiny(family)
    # the paper's rule keeps enough of these random tiny models that a 30 % selection does not cut between ties
    memory = model.build_memory(demos_for(family, 5), processor=processor, method="emloc", chunk_size=2, delta=0.01)
    queries = _queries(family, 5)
    alone = model.score_choices(queries, memory=memory, processor=processor, batch_size=1)
    together = model.score_choices(queries, memory=memory, processor=processor, batch_size=3)
    assert [len(s) for s in together] == [len(q["choices"]) for q in queries]
    torch.testing.assert_close(torch.tensor(sum(together, [])), torch.tensor(sum(alone, [])), atol=1e-4, rtol=0)
    selected = model.score_choices(queries, memory=memory, processor=processor, batch_size=4, select=0.3)
    selected_alone = model.score_choices(queries, memory=memory, processor=processor, batch_size=1, select=0.3)
    torch.testing.assert_close(torch.tensor(sum(selected, [])), torch.tensor(sum(selected_alone, [])), atol=1e-4, rtol=0)
    assert not torch.allclose(torch.tensor(sum(selected, [])), torch.tensor(sum(together, [])), atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen2.5-vl"])
def test_batched_scores_are_full_context_log_probabilities(tiny, family):
    model, processor, _ = tiny(family)
    demos = demos_for(family, 3)
    memory = model.build_memory(demos, processor=processor, method="full")
    queries = _queries(family, 3)
    scores = model.score_choices(queries, memory=memory, processor=processor)
    for query, row in zip(queries, scores):
        inputs = full_inputs(processor, demos, query)
        start = inputs["input_ids"].shape[1]
        for choice, score in zip(query["choices"], row):
            ids = processor.encode_choice(choice)
            extended = dict(inputs, input_ids=torch.cat([inputs["input_ids"], ids[None]], dim=1))
            extended["attention_mask"] = torch.ones_like(extended["input_ids"])
            if "mm_token_type_ids" in inputs:
                extended["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)[None]], dim=1)
            with torch.no_grad():
                log_probs = torch.log_softmax(model.model(**extended).logits[0].float(), dim=-1)
            expected = sum(log_probs[start - 1 + i, token].item() for i, token in enumerate(ids))
            assert score == pytest.approx(expected, abs=1e-3), (query.get("question"), choice)


def test_batches_equal_one_query_at_a_time_on_real_weights(smollm2):
    model, processor, _ = smollm2
    memory = model.build_memory(text_demos(20), processor=processor, method="full", chunk_size=10)
    queries = text_queries(5)
    assert any(len(processor.encode_choice(c)) > 1 for c in queries[0]["choices"]), "multi-token choices expected"
    alone = model.score_choices(queries, memory=memory, processor=processor, batch_size=1)
    together = model.score_choices(queries, memory=memory, processor=processor, batch_size=5)
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=1e-4, rtol=0)


def test_scoring_refuses_bad_arguments_before_any_work(tiny):
    model, processor, _ = tiny("llama")
    queries = _queries("llama", 2)
    queries[1] = {"question": "no choices here"}
    with pytest.raises(ValueError, match=r"<list>\[1\]: score_choices needs 'choices'"):
        model.score_choices(queries, processor=processor)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        model.score_choices(queries[:1], processor=processor, batch_size=0)
