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
    parts = [p for e in examples + ([query_example] if query_example else []) for p in e.content]
    images = [p["image"] for p in parts if p["type"] == "image"]
    videos = [_video_as_given(p["video"]) for p in parts if p["type"] == "video"]
    media = {"videos": [v for v, _ in videos], "video_metadata": [m for _, m in videos]} if videos else {}
    return dict(processor.base_processor(text=[text], images=images or None, add_special_tokens=False, return_tensors="pt",
                                         **media))


def _video_as_given(video):
    """`(frames [num_frames, height, width, 3], metadata)` as a user hands a video to the stock processor: a file decoded
    whole with PyAV (the video processor samples its frames), or the list of frames stacked (as transformers stacks
    one; the processor takes every video of a call in one format)."""
    import av
    import numpy as np

    if isinstance(video, (list, tuple)):
        return np.stack([np.asarray(frame) for frame in video]), {
            "total_num_frames": len(video), "fps": None, "frames_indices": list(range(len(video)))}
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        fps = float(stream.average_rate)
    return frames, {"total_num_frames": len(frames), "fps": fps, "frames_indices": list(range(len(frames)))}


@torch.no_grad()
def reference_logits(model, processor, demos, query) -> torch.Tensor:
    """Logits `[query_len, vocab]` of the query tokens when the whole conversation is fed to the stock base model (its
    inputs on the model's first device; a `device_map` model moves them on)."""
    inputs = full_inputs(processor, demos, query)
    if processor.template == "plain":  # the context's final "\n\n" tokenises differently at the end of a string
        query_text = load_examples([query], require_answer=False)[0].text + "\n"
        context = inputs["input_ids"].shape[1] - len(processor.tokenizer(query_text, add_special_tokens=False)["input_ids"])
    else:
        context = full_inputs(processor, demos)["input_ids"].shape[1]
    device = model.model.device
    logits = model.model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}).logits[0]
    return logits[context:]
