# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""Emloc configuration: the base model's config plus the defaults of task-memory compression."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig


class EmlocConfig(PreTrainedConfig):
    r"""
    Configuration of an [`EmlocForConditionalGeneration`]: a base causal or vision-language model that answers
    queries from a compressed task memory (EMLoC, Ma et al., ICML 2025, arXiv 2505.19812).

    Args:
        base_config (`PreTrainedConfig` or `dict`):
            Config of the wrapped base model (Llama-family, Gemma 3 text, Qwen2-VL, Qwen2.5-VL, ...).
        delta (`float`, *optional*, defaults to 0.005):
            Jensen-Shannon bound a layer's pruning must meet on the probe (paper, Eq. 5).
        ratios (`list[float]`, *optional*, defaults to `[0.1, 0.2, 0.5]`):
            Candidate keep ratios, tried in ascending order for every layer.
        chunk_size (`int`, *optional*, defaults to 4):
            Demonstrations per chunk.
        probe (`str`, *optional*, defaults to `"self"`):
            `"self"` probes a chunk with its own demonstrations (as the paper); `"future"` with the demonstrations
            that follow it (`building_emloc.EmlocMethod`).
        pool_width (`int`, *optional*, defaults to 5):
            Width of the average pool that smooths token importance along the sequence.
        method (`str`, *optional*, defaults to `"emloc-query"`):
            The compression method `build_memory` uses when none is given. `delta`, `ratios` and `probe` above are
            the settings of `"emloc"`, the paper's rule; `"emloc-query"` brings its own (docs/method.md).
        retrieval_layer (`int`, *optional*):
            Memories built by `build_memory` record a retrieval key per demonstration (for `retrieve=k`): its
            rendering as a query, run alone through the decoder layers below this one and mean-pooled; a query's key
            costs the same partial pass. 0 is the input embeddings (no pass). Defaults to half the decoder layers
            (docs/method.md: nearly as good as the last layer on the selection split at half the cost, far better than
            the embeddings).
    """

    model_type = "emloc"
    sub_configs = {"base_config": AutoConfig}

    def __init__(
        self,
        base_config: PreTrainedConfig | dict | None = None,
        delta: float = 0.005,
        ratios: list[float] | tuple[float, ...] = (0.1, 0.2, 0.5),
        chunk_size: int = 4,
        probe: str = "self",
        pool_width: int = 5,
        method: str = "emloc-query",
        retrieval_layer: int | None = None,
        **kwargs,
    ):
        if isinstance(base_config, dict):
            base_config = dict(base_config)
            base_config = AutoConfig.for_model(base_config.pop("model_type"), **base_config)
        self.base_config = base_config
        self.delta = float(delta)
        self.ratios = [float(r) for r in ratios]
        self.chunk_size = int(chunk_size)
        self.probe = probe
        self.pool_width = int(pool_width)
        self.method = method
        self.retrieval_layer = None if retrieval_layer is None else int(retrieval_layer)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def text_config(self) -> PreTrainedConfig:
        """The config of the base model's language model (the base config itself for text models)."""
        if self.base_config is None:
            raise ValueError("EmlocConfig has no base_config.")
        return self.base_config.get_text_config()

    @property
    def is_multimodal(self) -> bool:
        return self.base_config is not None and hasattr(self.base_config, "vision_config")


__all__ = ["EmlocConfig"]
