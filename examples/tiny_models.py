"""Tiny random-initialised transformers checkpoints, one per supported architecture.

Tests need every architecture family without downloading anything, and need it fast: a few
million float32 parameters run on a CPU in milliseconds. :func:`build_tiny_base` writes such a
checkpoint, seeded so that the same seed always gives the same weights, together with a working
tokenizer (text families) or processor (vision-language families):

* ``llama``: ``LlamaForCausalLM``, 3 layers.
* ``gemma3``: ``Gemma3ForCausalLM`` (``gemma3_text``), 4 layers mixing sliding-window
  (window 16, so short tests exceed it) and full attention.
* ``qwen2-vl`` / ``qwen2.5-vl``: ``Qwen2VLForConditionalGeneration`` /
  ``Qwen2_5_VLForConditionalGeneration`` with a 2-layer text model using M-RoPE and a 2-layer
  vision tower; a 56x56 image becomes 4 visual tokens.

The tokenizer is SmolLM2's (a real BPE vocabulary, from :mod:`offline_models`) with a ChatML
chat template of our own; the vision families add Qwen's vision tokens to it and ship transformers'
own Qwen processor with an image and a video processor (56x56 pixels: a 4-frame clip is 8 visual
tokens). Video processors need torchvision; where it does not load (absent, or built for another
torch), they ship an image-only Qwen processor as remote code instead.

Usage: ``python examples/tiny_models.py FAMILY OUTDIR`` writes an Emloc repo (:func:`build_tiny_emloc`) and prints
OUTDIR; ``--base`` writes the plain base checkpoint instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys

import torch
from transformers import AutoTokenizer, GenerationConfig

FAMILIES = ("llama", "gemma3", "qwen2-vl", "qwen2.5-vl")

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# ChatML; message content is a string or a list of typed parts. Vision parts are rendered only
# by the vision template; a system message is optional (none is injected).
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
_TEXT_CHAT_TEMPLATE = _CHAT_TEMPLATE.replace(
    "{%- elif part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}",
    "",
)

# Shared sizes of the text models.
_HIDDEN, _HEADS, _KV_HEADS, _HEAD_DIM, _INTERMEDIATE = 64, 4, 2, 16, 128
_MAX_POSITIONS = 8192
_IMAGE_PIXELS = 56 * 56  # one 56x56 image -> 4x4 patches of 14 -> 2x2 merged = 4 tokens


def _offline_models():
    """Import the sibling ``offline_models.py`` whether or not ``examples`` is on ``sys.path``."""
    if "offline_models" in sys.modules:
        return sys.modules["offline_models"]
    path = pathlib.Path(__file__).with_name("offline_models.py")
    spec = importlib.util.spec_from_file_location("offline_models", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["offline_models"] = module
    spec.loader.exec_module(module)
    return module


def _tokenizer(vision: bool):
    """SmolLM2's tokenizer with our chat template (and Qwen's vision tokens if ``vision``)."""
    tokenizer = AutoTokenizer.from_pretrained(_offline_models().base_model_dir("smollm2-135m"))
    if vision:
        tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    tokenizer.chat_template = _CHAT_TEMPLATE if vision else _TEXT_CHAT_TEMPLATE
    return tokenizer


def _special_ids(tokenizer) -> dict:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _text_sizes(tokenizer, num_layers: int) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=_HIDDEN,
        intermediate_size=_INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=_HEADS,
        num_key_value_heads=_KV_HEADS,
        max_position_embeddings=_MAX_POSITIONS,
        **_special_ids(tokenizer),
    )


def _llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**_text_sizes(tokenizer, 3), head_dim=_HEAD_DIM, tie_word_embeddings=True)
    return LlamaForCausalLM, config


def _gemma3(tokenizer):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        **_text_sizes(tokenizer, 4),
        head_dim=_HEAD_DIM,
        query_pre_attn_scalar=_HEAD_DIM,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        tie_word_embeddings=True,
    )
    return Gemma3ForCausalLM, config


def _vision_ids(tokenizer) -> dict:
    start, end, image, video = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    return dict(vision_start_token_id=start, vision_end_token_id=end, image_token_id=image, video_token_id=video)


def _qwen_text_config(tokenizer) -> dict:
    # head_dim = 64 / 4 = 16; M-RoPE splits its 8 rotary frequencies over (time, height, width).
    return dict(
        **_text_sizes(tokenizer, 2),
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
    )


def _qwen2_vl(tokenizer):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vision = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=_HIDDEN,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=_qwen_text_config(tokenizer), vision_config=vision, **_vision_ids(tokenizer))
    return Qwen2VLForConditionalGeneration, config


def _qwen2_5_vl(tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # window_size is in pixels: 112 = 4 patches of 14 = 2 merged tokens per side; layer 1 attends fully.
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=_HIDDEN,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=_qwen_text_config(tokenizer), vision_config=vision, **_vision_ids(tokenizer))
    return Qwen2_5_VLForConditionalGeneration, config


# transformers 5.x builds Qwen2VLProcessor / Qwen2_5_VLProcessor only with a video processor, and
# its video processors need torchvision. Where torchvision does not load (not installed, or a build
# for another torch, whose operators fail to register), the VL checkpoints ship these image-only
# subclasses as remote code: same text and image pipeline, no videos. Load with
# AutoProcessor.from_pretrained(dir, trust_remote_code=True).
_PROCESSOR_MODULE = "processing_tiny_qwen_vl"
_PROCESSOR_CLASSES = {"qwen2-vl": "TinyQwen2VLProcessor", "qwen2.5-vl": "TinyQwen2_5_VLProcessor"}
_PROCESSOR_SOURCE = '''"""Image-only Qwen2-VL / Qwen2.5-VL processors (written by emloc's examples/tiny_models.py).

transformers cannot build Qwen2VLProcessor or Qwen2_5_VLProcessor without torchvision: both take a
video processor, and video processors need torchvision. These subclasses take no video processor,
so text and images go through the unchanged Qwen pipeline; videos are not supported.
"""

from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin


def _init_image_only(processor, image_processor, tokenizer, chat_template):
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    processor.video_token_id = tokenizer.convert_tokens_to_ids(processor.video_token)
    ProcessorMixin.__init__(processor, image_processor, tokenizer, chat_template=chat_template)


class _ImageOnly:
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        _init_image_only(self, image_processor, tokenizer, chat_template)

    def __call__(self, *args, videos=None, **kwargs):
        if videos is not None:  # the base class would silently leave the video tokens unexpanded
            raise ValueError("this processor has no video processor (transformers needs torchvision for one)")
        return super().__call__(*args, **kwargs)


class TinyQwen2VLProcessor(_ImageOnly, Qwen2VLProcessor):
    pass


class TinyQwen2_5_VLProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    pass
'''


def torchvision_loads() -> bool:
    """Whether torchvision imports with this torch (transformers' video processors need it)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent (ImportError), or built for another torch: its operators fail to register (RuntimeError)
        return False
    return True


def _save_qwen_processor(family: str, tokenizer, out: pathlib.Path) -> None:
    """Write the processor: tokenizer, 56x56-pixel image and video processors, as transformers' own Qwen processor
    where torchvision loads, else an image-only remote-code class.

    Qwen2.5-VL uses the Qwen2-VL image and video processor classes in transformers 5.x (it maps
    ``qwen2_5_vl`` to ``Qwen2VLImageProcessor`` and ``Qwen2VLVideoProcessor``), so both families share them.
    """
    from transformers import Qwen2VLImageProcessor

    size = {"shortest_edge": _IMAGE_PIXELS, "longest_edge": _IMAGE_PIXELS}
    image_processor = Qwen2VLImageProcessor(size=size)
    if torchvision_loads():
        from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        processor_class = Qwen2VLProcessor if family == "qwen2-vl" else Qwen2_5_VLProcessor
        processor = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    # the per-frame cap of the reference implementation, which transformers
                                    # warns will become its default (a 56x56 frame is under it either way)
                                    video_processor=Qwen2VLVideoProcessor(size=size, cap_pixels_per_frame=True),
                                    chat_template=tokenizer.chat_template)
        processor.save_pretrained(out)
        tokenizer.save_pretrained(out)  # the chat template as the tokenizer's too (AutoTokenizer users)
        return
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)  # also writes the chat template (chat_template.jinja)
    (out / f"{_PROCESSOR_MODULE}.py").write_text(_PROCESSOR_SOURCE)
    name = _PROCESSOR_CLASSES[family]
    processor_config = {"processor_class": name, "auto_map": {"AutoProcessor": f"{_PROCESSOR_MODULE}.{name}"}}
    (out / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")


_BUILDERS = {"llama": _llama, "gemma3": _gemma3, "qwen2-vl": _qwen2_vl, "qwen2.5-vl": _qwen2_5_vl}


def build_tiny_base(family: str, outdir: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write a seeded, random-initialised, float32 tiny checkpoint of ``family`` to ``outdir``.

    ``outdir`` then holds config.json, model.safetensors, generation_config.json (eos/pad from the
    tokenizer) and the tokenizer, plus the processor files for the vision families. It loads
    offline with ``AutoModelForCausalLM`` / ``AutoTokenizer`` (llama, gemma3) or
    ``AutoModelForImageTextToText`` / ``AutoProcessor`` (qwen2-vl, qwen2.5-vl; ``trust_remote_code=True`` where
    torchvision does not load and the processor is the image-only remote-code class; ``AutoTokenizer`` works too).
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    vision = family in ("qwen2-vl", "qwen2.5-vl")
    tokenizer = _tokenizer(vision)
    model_class, config = _BUILDERS[family](tokenizer)

    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(**_special_ids(tokenizer))

    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if vision:
        _save_qwen_processor(family, tokenizer, out)
    else:
        tokenizer.save_pretrained(out)
    return out


def build_tiny_emloc(family: str, outdir: str | os.PathLike, seed: int = 0, template: str = "chat") -> pathlib.Path:
    """Write a tiny Emloc repo of ``family``: the seeded base wrapped by ``EmlocForConditionalGeneration``, with an
    ``EmlocProcessor`` and the remote code, loadable with ``AutoModel/AutoProcessor(..., trust_remote_code=True)``."""
    import tempfile

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from modeling_emloc import EmlocForConditionalGeneration
    from processing_emloc import EmlocProcessor

    with tempfile.TemporaryDirectory() as base_dir:
        build_tiny_base(family, base_dir, seed)
        model = EmlocForConditionalGeneration.from_base(base_dir)
        processor = EmlocProcessor.from_base(base_dir, template=template, trust_remote_code=True)
        out = pathlib.Path(outdir)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("outdir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", action="store_true", help="write the plain base checkpoint, not an Emloc repo")
    args = parser.parse_args()
    build = build_tiny_base if args.base else build_tiny_emloc
    print(build(args.family, args.outdir, args.seed))


if __name__ == "__main__":
    main()
