"""Reference inputs built without the Emloc span code: the base processor or tokenizer on the whole rendering."""

import torch

from processing_emloc import load_examples


def _message(processor, example, role="user"):
    if processor.is_multimodal:
        return {"role": role, "content": [p if p["type"] == "text" else {"type": p["type"]} for p in example.content]}
    return {"role": role, "content": example.text}


def full_inputs(processor, demos, query=None) -> dict:
    """`input_ids` (and media) of the full conversation — demonstrations then, optionally, the query with the
    generation prompt — rendered and tokenised in one go, batch 1."""
    examples = load_examples(demos)
    query_example = load_examples([query], require_answer=False)[0] if query is not None else None
    if processor.template == "plain":
        text = processor.instruction + "\n\n" if processor.instruction else ""
        text += "".join(f"{e.text}\n{e.answer}\n\n" for e in examples)
        if query_example is not None:
            text += query_example.text + "\n"
        # as plain transformers reads a prompt: with whatever the tokenizer puts in front (Gemma's <bos>)
        ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    messages = []
    for example in examples:
        messages += [_message(processor, example), {"role": "assistant", "content": example.answer}]
    if query_example is not None:
        messages.append(_message(processor, query_example))
    text = processor.base_processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=query is not None)
    if not processor.is_multimodal:
        ids = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    images = [p["image"] for e in examples + ([query_example] if query_example else []) for p in e.content if p["type"] == "image"]
    return dict(processor.base_processor(text=[text], images=images or None, add_special_tokens=False, return_tensors="pt"))


@torch.no_grad()
def reference_logits(model, processor, demos, query) -> torch.Tensor:
    """Logits `[query_len, vocab]` of the query tokens when the whole conversation is fed to the stock base model."""
    inputs = full_inputs(processor, demos, query)
    if processor.template == "plain":  # the context's final "\n\n" tokenises differently at the end of a string
        query_text = load_examples([query], require_answer=False)[0].text + "\n"
        context = inputs["input_ids"].shape[1] - len(processor.tokenizer(query_text, add_special_tokens=False)["input_ids"])
    else:
        context = full_inputs(processor, demos)["input_ids"].shape[1]
    logits = model.model(**inputs).logits[0]
    return logits[context:]
