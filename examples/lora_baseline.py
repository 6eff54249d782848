"""The paper's training baseline: LoRA fine-tuning (with peft) on the same demonstrations a task memory is built from.

Each demonstration becomes one training sequence, rendered exactly as the processor renders it inside a context
(`processor.encode_context(demos)`: the template prefix followed by that one demonstration's span), so the adapter
sees the format the queries are asked in. The loss is the cross-entropy of the ANSWER tokens only (the answer and the
token that ends it), averaged over the answer tokens of a batch.

The caller's model is never touched: `train_lora` deep-copies the base model, attaches LoRA to the copy, trains it,
merges the adapter into the copy (`merge_and_unload`) and wraps the merged copy as a new
`EmlocForConditionalGeneration`. Queries are then scored through the usual API, zero-shot on the adapted weights:

    adapted, stats = train_lora(model, processor, demos, epochs=3)
    scores = adapted.score_choices(queries, processor=processor)      # memory=None: no demonstrations in context

Quick check on a real model (SmolLM2-135M-Instruct, offline):

    python examples/tasks.py iris /tmp/iris --demos 90 --queries 40
    python examples/lora_baseline.py --demos /tmp/iris/demos.jsonl --queries /tmp/iris/queries.jsonl --epochs 3 5
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

HERE = Path(__file__).resolve().parent
for _path in (HERE.parent, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from modeling_emloc import EmlocForConditionalGeneration  # noqa: E402
from processing_emloc import ANSWER, EncodedSpan, EmlocProcessor, load_examples  # noqa: E402

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def _base_model(model):
    """The base `PreTrainedModel` of an Emloc model (or the model itself)."""
    # an Emloc model may come from remote code (`AutoModel(..., trust_remote_code=True)`): its class is a copy of ours
    return model.model if getattr(model.config, "model_type", None) == "emloc" else model


def training_rows(processor: EmlocProcessor, demos) -> list[EncodedSpan]:
    """One row per demonstration: the template prefix + that demonstration's span (as in the full context), with any
    template tokens after its last answer token dropped (nothing is learnt from them)."""
    context = processor.encode_context(demos)
    rows = []
    for span in context.demos:
        row = EncodedSpan.concat([context.prefix, span])
        answers = torch.nonzero(row.answer_mask).flatten()
        if len(answers) == 0:
            raise ValueError("a demonstration rendered without answer tokens; nothing to train on")
        end = int(answers[-1]) + 1
        if not row.media:  # media tensors are tied to placeholder tokens: never cut a row that has them
            row = EncodedSpan(row.input_ids[:end], row.token_types[:end], row.media)
        rows.append(row)
    return rows


def _batch(processor: EmlocProcessor, rows: Sequence[EncodedSpan], base) -> tuple[dict, torch.Tensor]:
    """Right-padded inputs of `base` and labels `[batch, seq]` (-100 everywhere but on ANSWER tokens)."""
    batch = processor.collate(rows, padding_side="right")
    token_types = batch.pop("token_types")
    labels = batch["input_ids"].masked_fill(token_types != ANSWER, -100)
    config = base.config
    if ("image_grid_thw" in batch or "video_grid_thw" in batch) and hasattr(config, "image_token_id"):
        # Qwen-VL's own forward needs the placeholder types to lay out M-RoPE (the processor leaves them out)
        ids = batch["input_ids"]
        mm_token_type_ids = torch.zeros_like(ids, dtype=torch.int)
        for type_id, token_id in ((1, config.image_token_id), (2, getattr(config, "video_token_id", None))):
            if token_id is not None:
                mm_token_type_ids[ids == token_id] = type_id
        batch["mm_token_type_ids"] = mm_token_type_ids
    device = base.device
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return inputs, labels.to(device)


def _answer_loss(base, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the answer tokens of a batch, and how many there are."""
    logits = base(**inputs, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


@torch.no_grad()
def answer_loss(model, processor: EmlocProcessor, demos, batch_size: int = 8) -> float:
    """Mean NLL per answer token of `demos`, each rendered as a training row (prefix + demonstration), under `model`
    (an Emloc model or a base model) — the quantity `train_lora` minimises."""
    base = _base_model(model)
    was_training = base.training
    base.eval()
    rows = training_rows(processor, demos)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        inputs, labels = _batch(processor, rows[start:start + batch_size], base)
        loss, n = _answer_loss(base, inputs, labels)
        total, count = total + float(loss), count + n
    base.train(was_training)
    return total / max(1, count)


def train_lora(model, processor: EmlocProcessor, demos, epochs: int = 3, rank: int = 8, alpha: int = 16,
               learning_rate: float = 5e-4, batch_size: int = 8,
               target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, seed: int = 0, dropout: float = 0.0,
               weight_decay: float = 0.0, progress: bool = False) -> tuple[EmlocForConditionalGeneration, dict]:
    """LoRA fine-tuning on demonstrations (the paper's training baseline), on a copy of the base model.

    Args:
        model: an `EmlocForConditionalGeneration` or its base model (`.model`); it is not modified.
        processor: the model's `EmlocProcessor`; it renders the training rows (see `training_rows`).
        demos: a JSONL path or a list of demonstration dicts (design §6).
        epochs / batch_size: passes over the demonstrations (reshuffled each epoch) and rows per AdamW step.
        rank / alpha / dropout / target_modules: the `peft.LoraConfig`.
        learning_rate / weight_decay: AdamW's (constant learning rate, no warm-up).
        seed: seeds the LoRA initialisation and the shuffling; the same seed gives the same weights.
    Returns:
        `(adapted, stats)`: `adapted` is a new `EmlocForConditionalGeneration` around a deep copy of the base with the
        LoRA weights merged in (float32, on the base's device), so `adapted.score_choices(queries, processor=...)`
        runs zero-shot on the adapted weights; `stats` holds `train_seconds`, `epochs`, `steps`, `trainable_params`,
        `final_loss` (mean answer-token loss of the last epoch, as trained) and `epoch_losses`.
    """
    from peft import LoraConfig, get_peft_model

    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be at least 1")
    rows = training_rows(processor, demos)
    started = time.perf_counter()
    # the caller's weights stay as they are: all training happens on a copy, in float32
    base = copy.deepcopy(_base_model(model)).to(torch.float32)
    base.__dict__.pop("_emloc_attention_configs", None)  # a cache of the original's config objects; rebuilt on demand
    torch.manual_seed(seed)  # LoRA's A matrices are initialised from the global generator
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=weight_decay)
    shuffle = torch.Generator().manual_seed(seed)
    peft_model.train()
    steps, epoch_losses = 0, []
    for epoch in range(epochs):
        order = torch.randperm(len(rows), generator=shuffle).tolist()
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            inputs, labels = _batch(processor, [rows[i] for i in order[start:start + batch_size]], peft_model)
            loss_sum, n = _answer_loss(peft_model, inputs, labels)
            optimizer.zero_grad(set_to_none=True)
            (loss_sum / n).backward()
            optimizer.step()
            steps += 1
            total, count = total + float(loss_sum.detach()), count + n
        epoch_losses.append(total / count)
        if progress:
            print(f"  epoch {epoch + 1}/{epochs}: answer loss {epoch_losses[-1]:.4f}", file=sys.stderr, flush=True)
    merged = peft_model.merge_and_unload()
    merged.eval()
    for parameter in merged.parameters():
        parameter.requires_grad_(False)
    adapted = EmlocForConditionalGeneration.from_base(merged)
    stats = {
        "train_seconds": time.perf_counter() - started,
        "epochs": epochs,
        "steps": steps,
        "trainable_params": trainable_params,
        "final_loss": epoch_losses[-1],
        "epoch_losses": epoch_losses,
        "params": {"rank": rank, "alpha": alpha, "learning_rate": learning_rate, "batch_size": batch_size,
                   "target_modules": list(target_modules), "seed": seed, "dropout": dropout,
                   "weight_decay": weight_decay, "num_demos": len(rows)},
    }
    return adapted, stats


def accuracy(model: EmlocForConditionalGeneration, processor: EmlocProcessor, queries, memory=None) -> float:
    """Share of queries whose highest-scored choice is their `answer`."""
    examples = load_examples(queries, require_answer=True)
    scores = model.score_choices(examples, memory=memory, processor=processor)
    hits = [q.choices[max(range(len(s)), key=s.__getitem__)] == q.answer for q, s in zip(examples, scores)]
    return sum(hits) / len(hits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demos", required=True, help="demonstrations (JSONL) to train on")
    parser.add_argument("--queries", required=True, help="held-out queries (JSONL) with 'answer' and 'choices'")
    parser.add_argument("--model", default="smollm2-135m", choices=("smollm2-135m", "gemma3-270m"))
    parser.add_argument("--template", default="plain", choices=("plain", "chat"))
    parser.add_argument("--epochs", type=int, nargs="+", default=[3], help="one run per value, each from the base")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is faster on a busy machine)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from offline_models import base_model_dir

    base_dir = str(base_model_dir(args.model))
    model = EmlocForConditionalGeneration.from_base(base_dir)
    processor = EmlocProcessor.from_base(base_dir, template=args.template)
    demos = load_examples(args.demos)
    queries = load_examples(args.queries)
    print(f"{args.model}: {len(demos)} demonstrations, {len(queries)} queries, {torch.get_num_threads()} CPU threads")

    started = time.perf_counter()
    before = accuracy(model, processor, queries)
    print(f"zero-shot accuracy {before:.3f}  (demo answer loss {answer_loss(model, processor, demos):.4f}; "
          f"scored in {time.perf_counter() - started:.1f} s)")
    results = {"model": args.model, "num_demos": len(demos), "num_queries": len(queries),
               "zero_shot_accuracy": before, "runs": []}
    print(f"\n{'epochs':>6} {'steps':>6} {'train s':>8} {'loss':>8} {'accuracy':>8}")
    for epochs in args.epochs:
        adapted, stats = train_lora(model, processor, demos, epochs=epochs, rank=args.rank, alpha=args.alpha,
                                    learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed)
        after = accuracy(adapted, processor, queries)
        print(f"{epochs:>6} {stats['steps']:>6} {stats['train_seconds']:>8.1f} {stats['final_loss']:>8.4f} {after:>8.3f}",
              flush=True)
        results["runs"].append({**stats, "accuracy": after})
        del adapted
    print(f"\nLoRA r={args.rank}, alpha={args.alpha}, lr={args.lr}, batch {args.batch_size}, seed {args.seed}; "
          f"trainable params {results['runs'][0]['trainable_params']:,}; loss = mean answer-token NLL of the last epoch")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
