# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
Asking a task memory to choose: the log-probability of each of a query's `choices` (`score_choices`), and contextual
calibration (the label prior a context puts on the choices whatever the question, divided out).

Every query of a batch and every continuation of a multi-token choice share one pass over the memory: the queries are
packed into one row, each a segment that sees only its own tokens, and a choice's tokens ride behind its query as a
branch that sees the query and itself only (`EmlocCache`) — the numbers of one query at a time, for one read of the
memory per batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

try:  # loaded as remote code: transformers makes a package of the repository's modules
    from .memory_emloc import TaskMemory
    from .processing_emloc import EmlocProcessor, Example, decode_media, load_examples
    from .running_emloc import MemoryRunner, Segment, run_layers
except ImportError:  # imported from the repository root as flat modules
    from memory_emloc import TaskMemory
    from processing_emloc import EmlocProcessor, Example, decode_media, load_examples
    from running_emloc import MemoryRunner, Segment, run_layers


# ---------------------------------------------------------------------------------------------------------------------
# Scoring choices
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def score_examples(runner: MemoryRunner, examples: list[Example], memory: TaskMemory | None, processor: EmlocProcessor,
                   history: list[Example] | None = None, select: float | None = None, batch_size: int = 8,
                   retrieve: int | None = None, exclude: Sequence[int] | None = None) -> list[list[float]]:
    """Per example, the summed log-probability of each of its `choices` as the start of the reply after `memory`
    (None: zero-shot, the query after the template prefix, as it would be in a full context); an answer, if any, is
    not used. `history` stands before each query as `EmlocProcessor.encode_query` takes it; `select` and `retrieve` as
    in `generate`; `exclude` (one per example, -1 for none) a demonstration of the memory each may not retrieve (its
    own copy, when the example is one of the memory's demonstrations). `batch_size` queries share a pass."""
    if memory is None:
        memory = runner.uncompressed(processor.encode_prefix())
    results = []
    for begin in range(0, len(examples), batch_size):
        part = examples[begin:begin + batch_size]
        batch = processor.collate([processor.encode_query(query, history) for query in part])
        choices = [[processor.encode_choice(choice) for choice in query.choices] for query in part]
        excluded = None if exclude is None else torch.tensor(list(exclude[begin:begin + batch_size]), dtype=torch.long)
        results += score_continuations(runner, memory, batch, choices, select, retrieve, excluded)
    return results


def score_continuations(runner: MemoryRunner, memory: TaskMemory, batch: dict, choices: list[list[torch.Tensor]],
                        select: float | None, retrieve: int | None = None,
                        exclude: torch.Tensor | None = None) -> list[list[float]]:
    """One pass for a batch of queries (`batch`, left-padded) and all their choices.

    Each query is followed by every choice of more than one token without its last token, each as a branch
    `b = 1, 2, …` at the positions right after the query that sees the query and itself only: the query's last
    token predicts every choice's first token, the branch tokens the rest. The queries are packed into one row, each
    attending to its own tokens only (`segments`), so the memory is copied and read once per batch rather than
    once per query. With `select` or `retrieve`, each query has its own view of the memory (chosen by its own
    tokens' attention, `MemorySelector`, or by its nearest demonstrations): one row per query, padded at the end.
    """
    batch = {key: value for key, value in batch.items() if key != "token_types"}
    device = runner.device
    query = runner.segment(batch, start_position=memory.next_position)
    three_d = query.rope_positions.dim() == 3
    pieces = []  # per query: hidden [n, hidden], rope [n] | [3, n], text [n], branches [n], query length
    for row, row_choices in enumerate(choices):
        mine = query.valid[row]
        tails = [choice[:-1].to(device) for choice in row_choices if len(choice) > 1]
        tokens = torch.cat(tails) if tails else torch.zeros(0, dtype=torch.long, device=device)
        branches = torch.cat([torch.full((len(t),), b, device=device) for b, t in enumerate(tails, 1)]) \
            if tails else tokens.clone()
        offsets = torch.cat([torch.arange(len(t), device=device) for t in tails]) if tails else tokens.clone()
        positions = query.next_position[row] + offsets
        length = int(mine.sum())
        pieces.append((
            torch.cat([query.hidden[row, mine], runner.family.decoder.embed_tokens(tokens).to(query.hidden)]),
            torch.cat([query.rope_positions[..., row, mine], positions.expand(3, -1) if three_d else positions], dim=-1),
            torch.cat([query.text_positions[row, mine], positions]),
            torch.cat([torch.zeros(length, dtype=torch.long, device=device), branches]),
            length,
        ))
    if select is None and retrieve is None:  # packed: one row
        starts = [0]
        for piece in pieces:
            starts.append(starts[-1] + piece[0].shape[0])
        segment = Segment(
            hidden=torch.cat([p[0] for p in pieces])[None],
            rope_positions=torch.cat([p[1] for p in pieces], dim=-1)[..., None, :],
            text_positions=torch.cat([p[2] for p in pieces])[None],
            valid=torch.ones(1, starts[-1], dtype=torch.bool, device=device),
            branches=torch.cat([p[3] for p in pieces])[None],
            segments=torch.cat([torch.full((p[0].shape[0],), i, device=device) for i, p in enumerate(pieces)])[None],
        )
        rows = [(0, start) for start in starts[:-1]]
        chooser = None
    else:  # a row per query, padded at the end
        width = max(p[0].shape[0] for p in pieces)
        pad = [width - p[0].shape[0] for p in pieces]
        segment = Segment(
            hidden=torch.stack([F.pad(p[0], (0, 0, 0, n)) for p, n in zip(pieces, pad)]),
            rope_positions=torch.stack([F.pad(p[1], (0, n)) for p, n in zip(pieces, pad)], dim=-2),
            text_positions=torch.stack([F.pad(p[2], (0, n)) for p, n in zip(pieces, pad)]),
            valid=torch.arange(width, device=device)[None] < torch.tensor([p[0].shape[0] for p in pieces], device=device)[:, None],
            branches=torch.stack([F.pad(p[3], (0, n)) for p, n in zip(pieces, pad)]),
        )
        rows = [(row, 0) for row in range(len(pieces))]
        chooser = torch.arange(width, device=device)[None] < torch.tensor([p[4] for p in pieces], device=device)[:, None]
    # with `retrieve` the layout has one row per query, so the queries' rows are the cache's
    memory, cache = runner.memory_cache(memory, segment.hidden.shape[0], batch, retrieve, exclude)
    selector = runner.selector(select, cache, chooser) if chooser is not None else None
    hidden, _ = run_layers(runner.family, segment, cache, selector=selector)
    # read out, per query, its last token (predicting every first token) and its branch tokens
    index = [(row, start + piece[4] - 1 + k) for (row, start), piece in zip(rows, pieces)
             for k in range(piece[0].shape[0] - piece[4] + 1)]
    picked = hidden[torch.tensor([r for r, _ in index], device=hidden.device), torch.tensor([c for _, c in index], device=hidden.device)]
    log_probs = torch.log_softmax(runner.family.logits(picked).float(), dim=-1)
    results, at_query = [], 0
    for piece, row_choices in zip(pieces, choices):
        own = log_probs[at_query:at_query + piece[0].shape[0] - piece[4] + 1]  # [1 + tail tokens, vocab]
        at_query += own.shape[0]
        scores, at = [], 0
        for choice in row_choices:
            if len(choice) == 0:
                scores.append(0.0)
                continue
            score = own[0, choice[0]]
            if len(choice) > 1:  # token k of the choice is predicted at tail column at + k - 1, row 1 + that of `own`
                steps = torch.arange(at + 1, at + len(choice), device=own.device)
                score = score + own[steps, choice[1:].to(own.device)].sum()
                at += len(choice) - 1
            scores.append(float(score))
        results.append(scores)
    return results

# ---------------------------------------------------------------------------------------------------------------------
# Contextual calibration
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def estimate_choice_prior(runner: MemoryRunner, demos, memory: TaskMemory | None, processor: EmlocProcessor,
                          rows: int = 16, retrieve: int | None = None, first_demo: int | None = None) -> list[dict]:
    """The label prior a memory (None: zero-shot) puts on each set of choices among `demos`.

    A context biases a small model towards some answers whatever the question (contextual calibration: Zhao et
    al., 2021; Zhou et al., 2024). A compressed memory can carry a stronger bias than the full context: on the
    benchmark a default memory that answered one class to all 240 queries (0.500) scored 0.738 once its bias was
    divided out (docs/method.md, "Asking a memory"). The prior is estimated on inputs of the task itself: the
    questions of up to `rows` demonstrations per set of choices, spread evenly over `demos`, asked of the memory
    as queries (their answers are not used). It is the mean of their distributions over the choices.

    With `retrieve=k` the questions are asked as a query with retrieval is: each reads its `k` nearest demonstrations
    of the memory, never its own copy (`demos[i]` is the memory's demonstration `first_demo + i`; None: `demos` are
    not in the memory).

    Returns one entry per distinct `choices` list: `{"choices": [...], "log_prior": [...], "rows": n}`, the form
    `score_choices(calibrate=...)` and `memory.stats["calibration"]["priors"]` take.
    """
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive integer, got {rows!r}")
    examples = load_examples(demos, require_answer=False, decode=False)
    groups: dict[tuple, list[int]] = {}
    for index, example in enumerate(examples):
        if example.choices:
            groups.setdefault(tuple(example.choices), []).append(index)
    priors = []
    for choices, group in groups.items():
        count = min(rows, len(group))
        picked = [group[round(i * (len(group) - 1) / max(1, count - 1))] for i in range(count)]
        asked = [decode_media(examples[index]) for index in picked]
        exclude = None if retrieve is None or first_demo is None else [first_demo + index for index in picked]
        scores = torch.tensor(score_examples(runner, asked, memory, processor, retrieve=retrieve, exclude=exclude),
                              dtype=torch.float64)
        mean = torch.log_softmax(scores, dim=-1).exp().mean(0)
        priors.append({"choices": list(choices), "log_prior": [round(x, 9) for x in mean.log().tolist()],
                       "rows": len(asked)})
    return priors

def choice_priors(priors: list[dict], choice_lists: Sequence[Sequence[str]],
                  wheres: Sequence[str]) -> dict[tuple, list[float]]:
    """The log prior of each query's choices, looked up in `priors` (`estimate_choice_prior`'s entries) by the
    choices themselves; a query whose choices have none raises `ValueError` naming it (`wheres`, one per query)."""
    by_choices = {tuple(entry["choices"]): entry["log_prior"] for entry in priors}
    for choices, where in zip(choice_lists, wheres):
        if tuple(choices) not in by_choices:
            raise ValueError(f"{where}: no label prior for the choices {list(choices)}; priors cover "
                             f"{[list(c) for c in by_choices]}")
    return by_choices


def calibrated_scores(scores: Sequence[float], log_prior: Sequence[float]) -> list[float]:
    """Contextual calibration of one query's choice scores: its distribution over the choices (`scores`, summed
    log-probabilities `[num_choices]`, renormalised) divided by the context's label prior (`log_prior`, the same
    order), renormalised; returned as log-probabilities. The class the context favours whatever the question loses
    its head start."""
    log_p = torch.log_softmax(torch.tensor(scores, dtype=torch.float64), dim=-1)
    return torch.log_softmax(log_p - torch.tensor(log_prior, dtype=torch.float64), dim=-1).tolist()


__all__ = ["calibrated_scores", "choice_priors", "estimate_choice_prior", "score_continuations", "score_examples"]
