# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
Emloc: a base language or vision-language model that answers queries from a compressed task memory.

EMLoC (Ma, Zhang, Wei, Tian, "Efficient Multi-Modal Long Context Learning for Training-free Adaptation", ICML 2025,
arXiv 2505.19812) compresses the KV cache of many demonstrations chunk by chunk with layer-wise adaptive pruning held
under a Jensen-Shannon divergence bound. This file holds what a transformers user looks for: the model families (what
differs between bases) and `EmlocForConditionalGeneration` with its public methods. Each method delegates to one
sibling module:

- `memory_emloc`: the memory itself (tensors, format on disk, card, Hub, retrieval index);
- `cache_emloc`, `running_emloc`: running the base model against a memory (cache, attention functions, passes);
- `building_emloc`: building a memory (compression methods, probe, builder, checkpoints);
- `scoring_emloc`: scoring choices and calibration;
- `processing_emloc` (with `demonstrations_emloc`, `rendering_emloc`): demonstrations and queries → model inputs.
"""

from __future__ import annotations

import copy
import functools
import os
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # loaded as remote code: transformers makes a package of the repository's modules
    from .building_emloc import COMPRESSION_METHODS, MemoryBuilder, method_params_for
    from .certificate_emloc import Recipe, certified_build
    from .configuration_emloc import EmlocConfig
    from .memory_emloc import (MemoryLoadError, TaskMemory, base_model_fingerprint, check_rendering,
                               config_sliding_windows, hub_name, push_memory_to_hub)
    from .processing_emloc import EmlocProcessor, _copy_remote_code, load_examples
    from .running_emloc import EmlocCache, MemoryRunner, run_layers
    from .scoring_emloc import calibrated_scores, choice_priors, estimate_choice_prior, score_examples
except ImportError:  # imported from the repository root as flat modules
    from building_emloc import COMPRESSION_METHODS, MemoryBuilder, method_params_for
    from certificate_emloc import Recipe, certified_build
    from configuration_emloc import EmlocConfig
    from memory_emloc import (MemoryLoadError, TaskMemory, base_model_fingerprint, check_rendering,
                              config_sliding_windows, hub_name, push_memory_to_hub)
    from processing_emloc import EmlocProcessor, _copy_remote_code, load_examples
    from running_emloc import EmlocCache, MemoryRunner, run_layers
    from scoring_emloc import calibrated_scores, choice_priors, estimate_choice_prior, score_examples


# ---------------------------------------------------------------------------------------------------------------------
# Model families: what differs between Llama-style, Gemma 3 and Qwen2(.5)-VL bases
# ---------------------------------------------------------------------------------------------------------------------


class TextFamily:
    """Llama-style decoder-only models (Llama, SmolLM2, Qwen2, Mistral, Gemma 3 text, ...): `model.model` holds
    `embed_tokens`, `layers`, `norm`, `rotary_emb`; `model.lm_head` the output projection."""

    def __init__(self, model: PreTrainedModel, decoder: torch.nn.Module | None = None):
        self.model = model
        self.decoder = decoder if decoder is not None else model.model
        self.text_config = model.config.get_text_config()
        self.layer_types = getattr(self.text_config, "layer_types", None) or ["full_attention"] * self.num_layers
        self._rotary_takes_layer_type = "layer_type" in _parameters(self.decoder.rotary_emb.forward)

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.decoder.layers

    def layer_device(self, layer: int) -> torch.device:
        """Where a decoder layer's weights live (layers differ when `device_map` shards the base model)."""
        return next(self.layers[layer].parameters()).device

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.text_config.hidden_size // self.num_heads

    def sliding_window(self, layer: int) -> int | None:
        """The window of a sliding-window layer, None for a global one (`memory_emloc.config_sliding_windows`)."""
        return self.sliding_windows[layer]

    @functools.cached_property
    def sliding_windows(self) -> list[int | None]:
        return config_sliding_windows(self.text_config)

    def embed(self, inputs: dict) -> torch.Tensor:
        """`input_ids [batch, seq]` → `[batch, seq, hidden]`."""
        return self.decoder.embed_tokens(inputs["input_ids"])

    def relative_positions(self, inputs: dict) -> torch.Tensor:
        """RoPE positions counted from 0 at each row's first real token: `[batch, seq]`."""
        mask = inputs["attention_mask"]
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def text_positions(self, rope_positions: torch.Tensor) -> torch.Tensor:
        return rope_positions

    def position_embeddings(self, hidden: torch.Tensor, rope_positions: torch.Tensor) -> list:
        """One `(cos, sin)` per layer (Gemma 3 has separate local and global RoPE)."""
        if self._rotary_takes_layer_type:
            by_type = {t: self.decoder.rotary_emb(hidden, rope_positions, t) for t in set(self.layer_types)}
            return [by_type[t] for t in self.layer_types]
        shared = self.decoder.rotary_emb(hidden, rope_positions)
        return [shared] * self.num_layers

    def repeat_media(self, input_ids: torch.Tensor, media: dict, times: int) -> dict:
        raise ValueError(f"{type(self.model).__name__} is a text model: it takes no images or videos ({sorted(media)})")

    def logits(self, hidden: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[..., vocab]` from last-layer hidden states `[..., hidden]`; with `vocab_ids` (`[n]`) only those
        columns `[..., n]`. The head is the largest matrix of a small model (Gemma 3 270M: 262k × 640), and reading
        it is most of a probe evaluation's cost when the probe compares a few choices."""
        head = self.model.lm_head
        hidden = hidden.to(head.weight.device)
        normed = self.decoder.norm(hidden.to(self.decoder.norm.weight.device)).to(hidden.device)
        if vocab_ids is not None and type(head) is torch.nn.Linear:
            vocab_ids = vocab_ids.to(head.weight.device)
            bias = None if head.bias is None else head.bias[vocab_ids]
            logits = torch.nn.functional.linear(normed, head.weight[vocab_ids], bias)
        else:  # the whole head (a wrapped or quantised head has no rows to take)
            logits = head(normed)
            if vocab_ids is not None:
                logits = logits[..., vocab_ids.to(logits.device)]
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


class QwenVLFamily(TextFamily):
    """Qwen2-VL and Qwen2.5-VL: a vision tower whose outputs replace the image/video placeholder embeddings, and
    3-D multimodal RoPE (temporal, height, width) from the model's own `get_rope_index`."""

    def __init__(self, model: PreTrainedModel):
        super().__init__(model, decoder=model.model.language_model)
        self.vl_model = model.model

    def embed(self, inputs: dict) -> torch.Tensor:
        embeds = self.decoder.embed_tokens(inputs["input_ids"])
        for pixels, grid, getter, pick in (
            ("pixel_values", "image_grid_thw", self.vl_model.get_image_features, 0),
            ("pixel_values_videos", "video_grid_thw", self.vl_model.get_video_features, 1),
        ):
            if inputs.get(pixels) is None:
                continue
            features = getter(inputs[pixels], inputs[grid], return_dict=True).pooler_output
            features = torch.cat(features, dim=0).to(embeds.device, embeds.dtype)
            masks = self.vl_model.get_placeholder_mask(inputs["input_ids"], inputs_embeds=embeds,
                                                       **{("image_features" if pick == 0 else "video_features"): features})
            embeds = embeds.masked_scatter(masks[pick], features)
        return embeds

    def relative_positions(self, inputs: dict) -> torch.Tensor:
        """`[3, batch, seq]` M-RoPE positions from `get_rope_index`, starting at 0 for each row."""
        if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
            return super().relative_positions(inputs).unsqueeze(0).expand(3, -1, -1)
        config = self.vl_model.config
        ids = inputs["input_ids"]
        mm_token_type_ids = torch.zeros_like(ids, dtype=torch.int)
        mm_token_type_ids[ids == config.image_token_id] = 1
        mm_token_type_ids[ids == config.video_token_id] = 2
        extra = {}
        if "second_per_grid_ts" in _parameters(self.vl_model.get_rope_index) and inputs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = inputs["second_per_grid_ts"]
        positions, _ = self.vl_model.get_rope_index(
            ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"), attention_mask=inputs["attention_mask"], **extra,
        )
        return positions

    def text_positions(self, rope_positions: torch.Tensor) -> torch.Tensor:
        return rope_positions[0]

    def repeat_media(self, input_ids: torch.Tensor, media: dict, times: int) -> dict:
        """The images and videos of a batch with each row's own repeated `times` times, in row order (what `generate`
        does to the rows for beams and `num_return_sequences`). `pixel_values` `[patches, dim]` and `image_grid_thw`
        `[images, 3]` are not per row, so they are cut by each row's count of placeholder tokens (`input_ids`
        `[batch, seq]`): an image of grid `(t, h, w)` has `t·h·w` patches and `t·h·w / merge²` placeholders."""
        config = self.vl_model.config
        merge = config.vision_config.spatial_merge_size ** 2
        repeated = dict(media)
        kinds = (("pixel_values", "image_grid_thw", config.image_token_id, None),
                 ("pixel_values_videos", "video_grid_thw", config.video_token_id, "second_per_grid_ts"))
        for pixels, grid, token_id, per_item in kinds:
            if media.get(grid) is None:
                continue
            patches = media[grid].prod(-1).tolist()
            items, item = [], 0
            for count in (input_ids == token_id).sum(-1).tolist():
                mine = []
                while count > 0:
                    mine.append(item)
                    count -= patches[item] // merge
                    item += 1
                items.append(mine)
            starts = [0]
            for count in patches:
                starts.append(starts[-1] + count)
            order = [index for mine in items for _ in range(times) for index in mine]
            repeated[grid] = media[grid][order]
            repeated[pixels] = torch.cat([media[pixels][starts[i]:starts[i + 1]] for i in order])
            if per_item is not None and media.get(per_item) is not None:
                values = media[per_item]
                repeated[per_item] = values[order] if isinstance(values, torch.Tensor) else [values[i] for i in order]
        return repeated

    def position_embeddings(self, hidden: torch.Tensor, rope_positions: torch.Tensor) -> list:
        return [self.decoder.rotary_emb(hidden, rope_positions)] * self.num_layers


def model_family(model: PreTrainedModel) -> TextFamily:
    """The family adapter for a loaded base model."""
    if hasattr(model.config, "vision_config") and hasattr(model.model, "language_model"):
        if not hasattr(model.model, "get_rope_index"):
            raise NotImplementedError(f"{type(model).__name__}: only Qwen2-VL-style vision-language models are supported")
        return QwenVLFamily(model)
    return TextFamily(model)


def _parameters(function) -> set[str]:
    import inspect

    return set(inspect.signature(function).parameters)


# ---------------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------------


class EmlocPreTrainedModel(PreTrainedModel):
    config_class = EmlocConfig
    base_model_prefix = "emloc"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        base = getattr(self, "model", None)
        if base is not None and hasattr(base, "_init_weights"):
            base._init_weights(module)


class EmlocMemoryMixin:
    """Named task memories on a model, as transformers' `PeftAdapterMixin` keeps named adapters: load one from a
    directory or the Hub (checked against the base model and the processor's rendering), choose the one `generate` and
    `score_choices` use by default, delete one, push one to the Hub."""

    def load_memory(self, path_or_repo_id: str | os.PathLike | TaskMemory, name: str = "default", revision: str | None = None,
                    activate: bool = True, processor: EmlocProcessor | None = None, **hub_kwargs) -> TaskMemory:
        """Loads a memory from a directory or Hub repo (or registers a `TaskMemory`) under `name`, checking that it was
        made for this base model and, given the `processor` that will render the queries, that its demonstrations were
        rendered and tokenised the same way (`MemoryLoadError` naming the difference otherwise)."""
        if isinstance(path_or_repo_id, TaskMemory):
            memory = path_or_repo_id
        else:
            directory = Path(path_or_repo_id)
            if not directory.is_dir():
                from huggingface_hub import snapshot_download

                directory = Path(snapshot_download(str(path_or_repo_id), revision=revision, **hub_kwargs))
            memory = TaskMemory.from_pretrained(directory)
            expected = memory.stats.get("base_model", {}).get("fingerprint")
            if expected != self.fingerprint():
                raise MemoryLoadError(
                    f"{path_or_repo_id}: memory was made for another base model "
                    f"({memory.stats.get('base_model', {}).get('name_or_path') or 'unknown'}, fingerprint {expected}); "
                    f"this model's fingerprint is {self.fingerprint()}"
                )
        self.runner.check_fits(memory)
        if processor is not None:
            try:
                check_rendering(memory.stats, processor.rendering())
            except MemoryLoadError as error:
                if isinstance(path_or_repo_id, TaskMemory):
                    raise
                raise MemoryLoadError(f"{path_or_repo_id}: {error}") from None
        self._memories[name] = memory
        if activate:
            self._active_memory = name
        return memory

    def set_memory(self, name: str | None) -> None:
        """Makes a loaded memory the one `generate`/`score_choices` use by default (None: zero-shot)."""
        if name is not None:
            self._loaded(name)
        self._active_memory = name

    def delete_memory(self, name: str) -> None:
        self._loaded(name)
        del self._memories[name]
        if self._active_memory == name:
            self._active_memory = None

    @property
    def memories(self) -> dict[str, TaskMemory]:
        return dict(self._memories)

    @property
    def active_memory(self) -> str | None:
        return self._active_memory

    def push_memory_to_hub(self, repo_id: str, memory: TaskMemory | str | None = None, private: bool | None = None,
                           commit_message: str = "Upload task memory", revision: str | None = None, token: str | None = None,
                           create_pr: bool = False) -> str:
        """Pushes a memory to a Hub repo like an adapter: `memory.safetensors`, `memory_config.json`, `README.md` (a card
        with the code that loads it from `repo_id`); returns the commit URL. See `memory_emloc.push_memory_to_hub`."""
        memory = self._resolve_memory(memory)
        if memory is None:
            raise ValueError("no memory given and none is active")
        return push_memory_to_hub(memory, repo_id, private=private, commit_message=commit_message, revision=revision,
                                  token=token, create_pr=create_pr)

    def _loaded(self, name: str) -> TaskMemory:
        if name not in self._memories:
            raise KeyError(f"no memory named {name!r} is loaded (loaded: {sorted(self._memories)})")
        return self._memories[name]

    def _resolve_memory(self, memory: TaskMemory | str | list | None) -> TaskMemory | list[TaskMemory] | None:
        """A memory given, a loaded one by name, or (None) the active one if any; a list, one per row."""
        if isinstance(memory, (list, tuple)):  # one per row
            if not memory or any(each is None for each in memory):
                raise ValueError("memory= as a list takes a memory (or a loaded memory's name) for every row")
            return [self._resolve_memory(each) for each in memory]
        if isinstance(memory, str):
            return self._loaded(memory)
        if memory is None and self._active_memory is not None:
            return self._memories[self._active_memory]
        return memory

    def _memory_for(self, memory: TaskMemory | str | None, processor: EmlocProcessor | None,
                    caller: str) -> TaskMemory | None:
        """The memory that queries rendered by `processor` are asked of (`_resolve_memory`); refuses a missing
        processor, or a memory rendered otherwise (`MemoryLoadError`)."""
        if processor is None:
            raise ValueError(f"{caller} needs the processor")
        if isinstance(memory, (list, tuple)):
            raise ValueError(f"{caller} takes one memory; a list of memories (one per row) is for generate and forward")
        memory = self._resolve_memory(memory)
        if memory is not None:
            check_rendering(memory.stats, processor.rendering())
        return memory


class EmlocForConditionalGeneration(EmlocMemoryMixin, EmlocPreTrainedModel, GenerationMixin):
    r"""
    A base causal LM or vision-language model with EMLoC task memories.

    The Emloc repository stores the base weights itself (under `model.`), rather than pointing at a base repo as an
    adapter does: `AutoModel.from_pretrained(repo, trust_remote_code=True)` then needs nothing but that repo, works
    offline once cached and yields exactly the weights the memories' fingerprints were taken on. Memories are the small,
    adapter-like artefacts; see `load_memory` and `push_memory_to_hub`.

    Example:

    ```python
    >>> model = EmlocForConditionalGeneration.from_base("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> processor = EmlocProcessor.from_base("HuggingFaceTB/SmolLM2-135M-Instruct", template="plain")
    >>> memory = model.build_memory("demos.jsonl", processor=processor)
    >>> inputs = processor([{"question": "..."}], return_tensors="pt")
    >>> out = model.generate(**inputs, memory=memory, max_new_tokens=8)  # the query, then the answer
    >>> processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    ```
    """

    def __init__(self, config: EmlocConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        if base_model is None:
            auto = AutoModelForImageTextToText if config.is_multimodal else AutoModelForCausalLM
            base_model = auto.from_config(config.base_config)
        self.model = base_model
        self._memories: dict[str, TaskMemory] = {}
        self._active_memory: str | None = None
        self._runner = None
        self._from_base = False  # `from_base` wrapped a base model (else: loaded from an Emloc repo)
        self.post_init()
        # generation follows the base model's defaults (eos, pad, sampling); a saved generation_config.json overrides
        if getattr(base_model, "generation_config", None) is not None:
            self.generation_config = copy.deepcopy(base_model.generation_config)

    # -- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_base(cls, base: str | os.PathLike | PreTrainedModel, **load_kwargs) -> "EmlocForConditionalGeneration":
        """Wraps a base model: a Hub id, a local directory, a GGUF file (`gguf_file=` with a directory or repo), or a
        loaded `PreTrainedModel`. Compression defaults may be given as `delta=`, `ratios=`, `chunk_size=`, `probe=`."""
        emloc_kwargs = {k: load_kwargs.pop(k) for k in ("delta", "ratios", "chunk_size", "probe", "pool_width") if k in load_kwargs}
        if not isinstance(base, PreTrainedModel):
            config = AutoConfig.from_pretrained(base, **{k: v for k, v in load_kwargs.items() if k in ("gguf_file", "revision", "token", "trust_remote_code")})
            auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
            load_kwargs.setdefault("dtype", torch.float32)
            base = auto.from_pretrained(base, **load_kwargs)
        # initialising the wrapper resets the attention implementation of its sub-configs: keep the base's own
        base_attention = base.config._attn_implementation or "sdpa"
        config = EmlocConfig(base_config=base.config, **emloc_kwargs)
        config.name_or_path = getattr(base.config, "_name_or_path", "")
        with torch.device("meta"):
            model = cls(config, base_model=torch.nn.Identity())
        model.model = base
        model._from_base = True
        if getattr(base, "generation_config", None) is not None:
            model.generation_config = copy.deepcopy(base.generation_config)
        config._attn_implementation = base_attention
        model.eval()
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Writes the weights and config, plus the remote-code modules and an `auto_map`, so that `AutoConfig`,
        `AutoModel` and `AutoProcessor` load the directory with `trust_remote_code=True`."""
        self.config.auto_map = {
            "AutoConfig": "configuration_emloc.EmlocConfig",
            "AutoModel": "modeling_emloc.EmlocForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_emloc.EmlocForConditionalGeneration",
            "AutoProcessor": "processing_emloc.EmlocProcessor",
        }
        self.config.architectures = [type(self).__name__]
        result = super().save_pretrained(save_directory, *args, **kwargs)
        _copy_remote_code(save_directory)
        return result

    @property
    def family(self) -> TextFamily:
        return self.runner.family

    @property
    def runner(self) -> MemoryRunner:
        """The passes of the base model against memories (`running_emloc.MemoryRunner`)."""
        if self._runner is None or self._runner.family.model is not self.model:
            try:
                family = model_family(self.model)
            except AttributeError as error:  # nn.Module would report it as a missing `runner` attribute
                raise NotImplementedError(f"unsupported base model {type(self.model).__name__}: {error}") from error
            self._runner = MemoryRunner(family, self.config.pool_width)
        return self._runner

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    # -- answering ------------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: EmlocCache | None = None, memory: TaskMemory | str | None = None,
                select: float | None = None, retrieve: int | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.LongTensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.LongTensor | None = None, second_per_grid_ts: torch.Tensor | None = None,
                mm_token_type_ids: torch.Tensor | None = None, token_types: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """Runs `input_ids` against a memory; what `generate` calls at every step.

        Args:
            input_ids: `[batch, seq]` queries as the processor returns them (left-padded), or the tokens fed since
                `past_key_values`.
            attention_mask: `[batch, seq]`, or `[batch, past + seq]` as `generate` extends it (its last `seq` columns
                are read).
            past_key_values: the `EmlocCache` returned by an earlier call: the tokens continue from it (the memory and
                the query are in it). None starts from `memory`.
            memory: a `TaskMemory`, the name of a loaded one, or None for the active memory; the base model alone if
                there is none (then pass `processor(..., add_template_prefix=True)` inputs for zero-shot answers in the
                full context's format). A list gives each row its own memory (see `generate`).
            select, retrieve: see `generate`; fixed by the first pass, kept by the cache.
            pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts: the query's images
                and videos (vision-language bases); `mm_token_type_ids` and `token_types` are accepted and unused
                (the positions come from the model's own rope index).
            logits_to_keep: if > 0, logits of the last `logits_to_keep` positions only.
        Returns:
            `CausalLMOutputWithPast` with `logits` `[batch, seq | logits_to_keep, vocab]` and, unless
            `use_cache=False`, `past_key_values` (the `EmlocCache`).
        """
        if input_ids is None:
            raise ValueError("EmlocForConditionalGeneration.forward needs input_ids (inputs_embeds are not supported)")
        mask = attention_mask[:, -input_ids.shape[1]:] if attention_mask is not None else torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        # images belong to the pass that feeds their placeholder tokens; `generate` keeps the grids after the prefill
        if pixel_values is not None:
            inputs.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        if pixel_values_videos is not None:
            inputs.update(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                          second_per_grid_ts=second_per_grid_ts)
        if past_key_values is not None and not isinstance(past_key_values, EmlocCache):
            if past_key_values.get_seq_length() > 0:
                raise TypeError(f"past_key_values must be an EmlocCache returned by this model, got "
                                f"{type(past_key_values).__name__} holding tokens")
            past_key_values = None  # an empty cache made by a caller: start from the memory
        if past_key_values is None:
            logits, cache, _ = self.runner.query_pass(self._resolve_memory(memory), inputs, select=select,
                                                      logits_to_keep=logits_to_keep, retrieve=retrieve)
        else:
            cache = past_key_values
            segment = self.runner.segment(inputs, start_position=cache.next_position)
            hidden, _ = run_layers(self.family, segment, cache)
            logits = self.family.logits(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache if use_cache is not False else None)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, memory: TaskMemory | str | None = None,
                 select: float | None = None, processor: EmlocProcessor | None = None, retrieve: int | None = None,
                 recipe: str | None = None, **kwargs):
        """transformers' `GenerationMixin.generate`, answering from a task memory.

        Every `GenerationConfig` field and `generate` argument works as for any causal LM (`max_new_tokens`,
        `do_sample`, `num_beams`, `num_return_sequences`, `streamer`, `logits_processor`, `stopping_criteria`,
        `return_dict_in_generate`, ...). The memory rides in the model's cache (`EmlocCache`): the first pass puts the
        queries after it, with positions continuing from its `next_position`, and transformers' loop decodes,
        reorders beams and stops as usual.

        Args:
            input_ids / attention_mask (keywords): `[batch, seq]` queries as the processor returns them (left-padded,
                rendered as they follow the demonstrations), plus their images for vision-language bases.
            memory: a `TaskMemory`, the name of a loaded one, or None for the active memory (`set_memory`); with no
                memory at all, the base model's plain zero-shot generation on `input_ids`. A list (one memory or name
                per row) answers each row from its own memory in the same passes, exactly as alone (`rows_prefix`;
                not with `select` or `retrieve`).
            select: per-query selection: keep, per layer and KV head, the fraction (or, if > 1, the number) of memory
                tokens each query attends to most (`MemorySelector`). The stored memory is unchanged.
            retrieve: retrieval inside the memory: each query attends, in every layer, only to the template prefix and
                the kept tokens of its `retrieve` nearest demonstrations (by the memory's `RetrievalIndex`), at no
                extra prefill. Combines with `select`; needs a memory with a retrieval index. When not given, the
                retrieval of the memory's recipe (`recipe`, else the one its certificate chose; calibration applies
                to `score_choices` only).
            processor: the `EmlocProcessor` that rendered the queries. Given it, a memory whose demonstrations were
                rendered otherwise is refused (`MemoryLoadError` naming the difference), and a row that starts with
                the template prefix (a chat template's system turn, a tokenizer's BOS) has it masked out, since the
                memory holds it — so prompts rendered by `tokenizer.apply_chat_template` or a pipeline answer exactly
                as the processor's queries do.
        Returns:
            What transformers returns for the same call: token ids `[batch * num_return_sequences, seq + new]`, the
            prompt followed by the generated tokens (the memory is not part of them), or a `GenerateDecoderOnlyOutput`
            / `GenerateBeamDecoderOnlyOutput` with `return_dict_in_generate=True`.
        """
        memory = self._resolve_memory(memory)
        if retrieve is None and not isinstance(memory, list):
            _, retrieve = _asked(memory, recipe, None, None)
        kwargs.pop("token_types", None)  # the processor's span types: the memory builder's, not the model's
        if processor is not None and memory is not None:
            for each in memory if isinstance(memory, list) else [memory]:
                check_rendering(each.stats, processor.rendering())
            input_ids = kwargs.get("input_ids", inputs)
            if input_ids is not None:
                kwargs["attention_mask"] = _mask_template_prefix(input_ids, kwargs.get("attention_mask"), processor)
        return super().generate(inputs, generation_config, memory=memory, select=select, retrieve=retrieve, **kwargs)

    def adjust_generation_fn(self, *args, **kwargs):
        """Loads the repo's `generation_config.json` as any model does. Without one (an Emloc repo saved before it was
        written), the base model's defaults (eos, pad, bos) apply rather than a config derived from ours."""
        super().adjust_generation_fn(*args, **kwargs)
        base = getattr(self.model, "generation_config", None)
        if base is not None and self.generation_config.eos_token_id is None \
                and getattr(self.generation_config, "_from_model_config", False):
            self.generation_config = copy.deepcopy(base)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """No cache before the first pass: that pass builds the `EmlocCache` from the memory, for the rows `generate`
        has expanded (beams, `num_return_sequences`). A cache given by the caller must be one this model returned."""
        cache = model_kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, EmlocCache):
            raise TypeError(f"past_key_values must be an EmlocCache returned by this model, got {type(cache).__name__}")
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported: an Emloc model "
                f"keeps its memory in its own cache (EmlocCache); leave cache_implementation unset"
            )
        if cache is not None:
            cache._is_user_defined = True

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """Repeats every row `expand_size` times (beams, `num_return_sequences`). Images and videos are not per row
        (`pixel_values` is `[patches, dim]`, `image_grid_thw` `[images, 3]`), so each row's own are repeated with it."""
        media = {key: model_kwargs.pop(key) for key in _MEDIA_KEYS if model_kwargs.get(key) is not None}
        if isinstance(model_kwargs.get("memory"), list):  # a memory per row: each copy of a row keeps its memory
            model_kwargs["memory"] = [each for each in model_kwargs["memory"] for _ in range(expand_size)]
        if media and expand_size > 1 and input_ids is not None:
            media = self.family.repeat_media(input_ids, media, expand_size)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        model_kwargs.update(media)
        return input_ids, model_kwargs

    @torch.no_grad()
    def score_choices(self, queries, memory: TaskMemory | str | None = None, processor: EmlocProcessor | None = None,
                      history=None, select: float | None = None, batch_size: int = 8, retrieve: int | None = None,
                      calibrate: bool | list[dict] | None = None, recipe: str | None = None) -> list[list[float]]:
        """Per query, the summed log-probability of each of its `choices` as the start of the assistant reply — or,
        calibrated, its log-probabilities over its choices.

        `tokenizer(choice, add_special_tokens=False)` is scored after the query's generation prompt; `batch_size`
        queries share one pass (`scoring_emloc`), with the numbers of one query at a time. A memory whose
        demonstrations were rendered otherwise than `processor` renders the queries is refused (`MemoryLoadError`).

        How the memory is asked: as its certificate chose (`stats["certificate"]["recipe"]`, e.g. `"calibrated"` or
        `"retrieve@8"`), unless told otherwise — by `recipe` (`"scored"`, `"calibrated"`, `"retrieve@K"`,
        `"retrieve@K+calibrated"`), or by `calibrate` / `retrieve` themselves, which then say all of it.
        `calibrate=True` divides out the label prior the memory recorded when it was built (`calibration_rows` of
        `build_memory`); a list of priors (`estimate_choice_prior`) calibrates with those instead. `retrieve=k` reads
        only the `k` nearest demonstrations; `select` as in `generate`.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        memory = self._memory_for(memory, processor, "score_choices")
        calibrate, retrieve = _asked(memory, recipe, calibrate, retrieve)
        examples = load_examples(queries, require_answer=False)
        for query in examples:
            if not query.choices:
                raise ValueError(f"{query.where}: score_choices needs 'choices' on every query")
        priors = None
        if calibrate is not False:  # looked up before any work, so that a missing prior fails at once
            priors = choice_priors(_recorded_priors(memory, calibrate, retrieve), [query.choices for query in examples],
                                   [query.where for query in examples])
        history = load_examples(history) if history is not None else None
        results = score_examples(self.runner, examples, memory, processor, history, select, batch_size, retrieve)
        if priors is not None:
            results = [calibrated_scores(scores, priors[tuple(query.choices)]) for scores, query in zip(results, examples)]
        return results

    @torch.no_grad()
    def estimate_choice_prior(self, demos, memory: TaskMemory | str | None = None,
                              processor: EmlocProcessor | None = None, rows: int = 16) -> list[dict]:
        """The label prior a memory (None: zero-shot) puts on each set of choices among `demos`, from the questions of
        up to `rows` of them asked of it (contextual calibration; `scoring_emloc.estimate_choice_prior`). Returns
        `[{"choices": [...], "log_prior": [...], "rows": n}, ...]`, the form `score_choices(calibrate=...)` takes."""
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be a positive integer, got {rows!r}")
        memory = self._memory_for(memory, processor, "estimate_choice_prior")
        return estimate_choice_prior(self.runner, demos, memory, processor, rows)

    # -- building memories ----------------------------------------------------------------------------------------

    def build_memory(self, demos, processor: EmlocProcessor, method: str | None = None, chunk_size: int | None = None,
                     append_to: TaskMemory | None = None, progress: bool = False,
                     checkpoint_dir: str | os.PathLike | None = None, retrieval: bool = True,
                     retrieval_layer: int | None = None, drop_unreadable: bool = True, calibration_rows: int = 16,
                     validation: int = 16, target: float | None = 0.9, **method_params) -> TaskMemory:
        """Compresses demonstrations into a task memory that checks itself (docs/options.md describes every option).

        Args:
            demos: a JSONL path or a list of demonstration dicts (design §6).
            processor: the model's `EmlocProcessor`.
            method: a registered compression method (`COMPRESSION_METHODS`). Default: the config's `method`,
                `"emloc-query"` — the paper's rule with the repairs the benchmark chose (docs/method.md). `"emloc"` is
                the paper's rule exactly, `"full"` keeps everything, `"random"` is the baseline.
            chunk_size: demonstrations per chunk (default: the config's, 4).
            append_to: an existing memory to extend with new chunks instead of building from scratch.
            progress: a progress bar, or a callable `progress(chunks_done, chunks_total)` called after each chunk.
            checkpoint_dir: record each completed chunk here (crash-safe); a rerun with the same arguments continues
                there, to the same memory bytes. A directory holding another build is refused (`CheckpointError`).
            retrieval: record a retrieval index (where each demonstration sits, and its key) for `retrieve=k`.
            retrieval_layer: the layer whose entering hidden state keys each demonstration (default: the config's,
                half the decoder layers).
            drop_unreadable: drop from each sliding-window layer the tokens no query can read (every answer stays the
                same, the memory is smaller); False keeps them.
            calibration_rows: record the memory's label prior over each set of `choices` among the demonstrations,
                from this many of their questions (`estimate_choice_prior`); 0 records none.
            validation: hold out this many demonstrations (spread over the file), build the memory from the others
                and certify it on them against the uncompressed context and zero-shot; the rows then join the memory
                (`certificate_emloc`). The certificate, and the way of asking it chose, are in `stats["certificate"]`.
                0 builds without one (and keeps the file's order), as does `method="full"` (nothing is pruned).
            target: the retained gain the certificate must show without collapsing; below it the build climbs the
                repair ladder (`certificate_emloc.LADDER`). None certifies without repairing.
            **method_params: the method's parameters, e.g. `delta=0.005, ratios=(0.1, 0.2, 0.5), budget=0.2`.
        """
        started = time.perf_counter()
        method = method or self.config.method
        params = method_params_for(method, method_params, self.config)
        for name, value in (("calibration_rows", calibration_rows), ("validation", validation)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if append_to is not None:
            self.runner.check_fits(append_to)
            check_rendering(append_to.stats, processor.rendering())
        examples = load_examples(demos, require_answer=True, decode=False)  # a bad line fails here, before any work
        layer = self._retrieval_layer(retrieval_layer) if retrieval else None

        def build(name: str, options: dict, demonstrations: list, extend: TaskMemory | None, step: str | None = None):
            directory = None if checkpoint_dir is None else Path(checkpoint_dir) / step if step else checkpoint_dir
            builder = MemoryBuilder(self.runner, processor, COMPRESSION_METHODS[name](**method_params_for(name, options, self.config)),
                                    chunk_size or self.config.chunk_size, self.config.pool_width, progress=progress,
                                    checkpoint_dir=directory, retrieval_layer=layer, drop_unreadable=drop_unreadable,
                                    base_model=self._base_model_record())
            return builder.build(demonstrations, append_to=extend)

        if validation and append_to is None and method != "full":  # nothing pruned: the full context, exactly
            memory, order = certified_build(build, examples, self.runner, processor, method, params, validation,
                                            target, calibration_rows)
            examples = [examples[index] for index in order]  # the memory's order: the held-out rows last
        else:
            memory = build(method, params, examples, append_to)
        memory.stats["rendering"] = processor.rendering()  # queries must be rendered the same way (design §7)
        if calibration_rows:
            first = memory.retrieval.num_demos - len(examples) if memory.retrieval is not None else None
            recipe = Recipe.parse(memory.stats.get("certificate", {}).get("recipe", "scored"))
            priors = estimate_choice_prior(self.runner, examples, memory, processor, calibration_rows)
            if priors:
                memory.stats["calibration"] = {"rows": calibration_rows, "priors": priors}
                if recipe.calibrate and recipe.retrieve:  # the prior of the recipe's retrieval, as its queries read
                    memory.stats["calibration"]["retrieve"] = {str(recipe.retrieve): estimate_choice_prior(
                        self.runner, examples, memory, processor, calibration_rows, recipe.retrieve, first)}
        # what the user waited for: every build of the ladder, the certificate and the priors (and the memory extended)
        previous = append_to.stats.get("build", {}).get("seconds", 0.0) if append_to is not None else 0.0
        memory.stats["build"]["seconds"] = round(previous + time.perf_counter() - started, 3)
        return memory

    @torch.no_grad()
    def index_memory(self, memory: TaskMemory, demos, processor: EmlocProcessor, retrieval_layer: int | None = None) -> TaskMemory:
        """Gives `memory` a retrieval index (for `retrieve=`): where each of `demos` sits and its key. For memories
        without one — saved in memory format 1, or made by another tool (kvpress presses) from the same
        demonstrations rendered by `processor`. `build_memory` does this itself. Returns `memory`."""
        check_rendering(memory.stats, processor.rendering())
        layer = self._retrieval_layer(retrieval_layer)
        context = processor.stream_context(demos, cache_size=2 * self.config.chunk_size)
        index = self.runner.retrieval_index(context, processor, layer, 0, with_prefix=True,
                                            batch_size=self.config.chunk_size)
        end = int(index.ends[-1]) if index.num_demos else 0
        if end != memory.next_position:
            raise ValueError(f"these {index.num_demos} demonstrations end at position {end}, the memory at "
                             f"{memory.next_position}: it was not made from them")
        memory.retrieval = index
        return memory

    def _retrieval_layer(self, layer: int | None) -> int:
        """`layer`, else the config's `retrieval_layer`, else half the decoder layers."""
        layer = layer if layer is not None else self.config.retrieval_layer
        layer = self.family.num_layers // 2 if layer is None else int(layer)
        if not 0 <= layer <= self.family.num_layers:
            raise ValueError(f"retrieval_layer must lie in [0, {self.family.num_layers}], got {layer}")
        return layer

    def fingerprint(self) -> str:
        """Hash of the base model's config and weights; memories record it and loading checks it. Recomputed at each
        call (a strided sample per tensor, milliseconds), so it follows the weights if they change."""
        return base_model_fingerprint(self.model, self.model.config)

    def _base_model_record(self) -> dict:
        """`memory_config.json`'s `base_model`: the fingerprint, and how a Hub user gets this model back —
        `name_or_path` (a Hub id; None for a local directory, whose path means nothing elsewhere) and `emloc_repo`
        (True: an Emloc repo, loaded with `AutoModel...trust_remote_code=True`; False: a base model, wrapped with
        `from_base`)."""
        name = self.config.name_or_path or getattr(self.model.config, "_name_or_path", "")
        return {"name_or_path": hub_name(name), "emloc_repo": not self._from_base, "fingerprint": self.fingerprint()}


def _asked(memory: TaskMemory | None, recipe: str | None, calibrate, retrieve) -> tuple:
    """`(calibrate, retrieve)` for a question to `memory`: what the caller says (`calibrate`, `retrieve`), else the
    `recipe` named, else the one the memory's certificate chose, else as scored."""
    if calibrate is not None or retrieve is not None:
        return (False if calibrate is None else calibrate), retrieve
    if recipe is None:
        recipe = ((memory.stats.get("certificate") or {}).get("recipe") if memory is not None else None) or "scored"
    chosen = Recipe.parse(recipe)
    return chosen.calibrate, chosen.retrieve


def _recorded_priors(memory: TaskMemory | None, calibrate: bool | list[dict], retrieve: int | None) -> list[dict]:
    """The priors of `score_choices(calibrate=...)`: given, or (True) recorded in the memory — for `retrieve=k` the
    prior estimated with that retrieval."""
    if calibrate is True:
        recorded = None if memory is None else memory.stats.get("calibration")
        if recorded is None:
            raise ValueError("score_choices(calibrate=True): the memory records no label prior; build it with "
                             "calibration_rows > 0 from demonstrations with 'choices', or pass "
                             "calibrate=model.estimate_choice_prior(demos, memory, processor)")
        if retrieve is not None:
            if str(retrieve) not in recorded.get("retrieve", {}):
                raise ValueError(f"score_choices(calibrate=True, retrieve={retrieve}): the memory records no label prior "
                                 f"estimated with retrieve={retrieve} (it records one for "
                                 f"{sorted(recorded.get('retrieve', {})) or 'none'}); pass calibrate=PRIORS")
            return recorded["retrieve"][str(retrieve)]
        calibrate = recorded["priors"]
    if not isinstance(calibrate, list):
        raise ValueError(f"calibrate must be False, True or a list of priors, got {type(calibrate).__name__}")
    return calibrate


# what `generate` must hand to the first pass only, and repeat per row rather than per tensor row
_MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def _mask_template_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          processor: EmlocProcessor) -> torch.Tensor:
    """`attention_mask` `[batch, seq]` with the template prefix (`processor.encode_prefix()`) masked out of every row
    whose first real token starts it: a memory already holds that prefix, so a prompt rendered as a whole
    conversation (a chat template's system turn, a tokenizer's BOS) reads as the processor's query does."""
    mask = attention_mask.clone() if attention_mask is not None else torch.ones_like(input_ids)
    prefix = processor.encode_prefix().input_ids.to(input_ids.device)
    length = prefix.shape[0]
    if length == 0:
        return mask
    for row in range(input_ids.shape[0]):
        real = mask[row].nonzero().flatten()
        if len(real) < length:
            continue
        first = int(real[0])
        window = slice(first, first + length)
        if bool(mask[row, window].all()) and torch.equal(input_ids[row, window], prefix):
            mask[row, window] = 0
    return mask


__all__ = ["EmlocForConditionalGeneration", "EmlocPreTrainedModel", "COMPRESSION_METHODS"]
