"""The part of a HuggingFace causal LM that one rank runs: a pipeline stage's decoder layers, TP-sharded.

``build_stage`` makes the stage on the meta device (no time spent in HF's own init), allocates it with
``to_empty`` on the target device and fills every parameter with this rank's slice, drawn
deterministically (``hpi.executor.weights.RandomSource``) or read, planned up front, from a local safetensors
checkpoint (``hpi.executor.checkpoint.CheckpointReader``). Decoder layers are transformers' own classes, built
from a per-stage config whose head / kv-head / intermediate counts are the per-rank ones; row-parallel
projections are swapped for ``hpi.executor.tp.RowParallelLinear``.

Families: llama, mistral, qwen2 (the Llama layer layout), mixtral (the same attention; transformers' fused
experts, their FFN width split over TP and the block's output all-reduced), deepseek_v3 / kimi_k2 (MLA and
shared + routed experts, ``hpi.executor.deepseek``), opt, and bloom (ALiBi attention and its layer loop in
``hpi.executor.bloom``).

Attention runs through transformers' ``sdpa`` path. With no mask it is causal for a multi-token query and
full for a one-token decode, which is right for unpadded prompts prefilled in one go; the stage builds an
explicit boolean mask itself when that shortcut would be wrong (a multi-token chunk after a non-empty
cache, or a sequence longer than a sliding window). Left-padded prompts (``hpi.executor.generate.LeftPadding``)
come with a 2D padding mask and per-row position ids: the stage hands the mask to transformers' own
builders (``masking_utils.create_causal_mask`` / ``create_sliding_window_causal_mask``, what the HF
model's forward calls), so pads are masked exactly as ``generate`` masks them, sliding windows included.
With a ``StaticKVCache`` (CUDA-graphed decode, ``hpi.executor.graphs``) the keys span the whole generation and
the stage builds the mask on the device from the cache slots (``static_causal_mask``); padding then comes
as a slot mask over the cache's full length.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpi.executor import bloom, deepseek
from hpi.executor.attention import register as register_attention
from hpi.executor.checkpoint import CheckpointFiles, Target, open_checkpoint
from hpi.executor.experts import ExpertMLP, per_expert_modules
from hpi.executor.graphs import StaticKVCache
from hpi.executor.masks import built_once, causal_mask, padded_causal_mask, static_causal_mask
from hpi.executor.slots import SlotKVCache
from hpi.executor.tp import (
    COLUMN_PARALLEL,
    ROW_PARALLEL,
    RowParallelLinear,
    VocabParallelLMHead,
    all_reduce_output,
    check_tp,
    kv_heads_per_rank,
    shard_index,
    tp_allreduce_seconds,
)
from hpi.executor.weights import RandomSource, param_table, weights_of

ATTENTION = register_attention()  # transformers' sdpa, grouped-query decode kept grouped (hpi.executor.attention)

__all__ = [
    "SUPPORTED_FAMILIES",
    "ShardSpec",
    "StageModule",
    "build_stage",
    "family_of",
    "load_hf_config",
    "shard_config",
    "stage_config",
    "tp_allreduce_seconds",
]


# ---- what a rank holds -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardSpec:
    """One rank's part of the model: decoder layers ``[layer_start, layer_stop)`` of ``n_layers_total``,
    TP rank ``tp_rank`` of ``tp_size``. The first stage holds the embeddings, the last the final norm and
    the LM head."""

    n_layers_total: int
    layer_start: int
    layer_stop: int
    is_first: bool
    is_last: bool
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.layer_start <= self.layer_stop <= self.n_layers_total:
            raise ValueError(
                f"layers [{self.layer_start}, {self.layer_stop}) do not fit 0 <= start <= stop <= "
                f"n_layers_total({self.n_layers_total})"
            )
        if self.is_first != (self.layer_start == 0):
            raise ValueError(f"is_first({self.is_first}) must equal (layer_start({self.layer_start}) == 0)")
        if self.is_last != (self.layer_stop == self.n_layers_total):
            raise ValueError(
                f"is_last({self.is_last}) must equal (layer_stop({self.layer_stop}) == "
                f"n_layers_total({self.n_layers_total}))"
            )
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank({self.tp_rank}) must satisfy 0 <= tp_rank < tp_size({self.tp_size})")

    @property
    def n_layers(self) -> int:
        return self.layer_stop - self.layer_start

    @property
    def is_tensor_parallel(self) -> bool:
        return self.tp_size > 1

    @classmethod
    def whole(cls, n_layers_total: int, tp_rank: int = 0, tp_size: int = 1) -> "ShardSpec":
        """All layers on one stage."""
        return cls(n_layers_total, 0, n_layers_total, True, True, tp_rank, tp_size)

    @classmethod
    def for_stage(cls, stage_layers: Sequence[int], stage: int, tp_rank: int = 0, tp_size: int = 1) -> "ShardSpec":
        """Stage ``stage`` of a split with ``stage_layers[i]`` decoder layers on stage i."""
        if not 0 <= stage < len(stage_layers):
            raise ValueError(f"stage({stage}) is not in [0, pp({len(stage_layers)}))")
        start = sum(stage_layers[:stage])
        total = sum(stage_layers)
        return cls(total, start, start + stage_layers[stage], stage == 0, stage == len(stage_layers) - 1,
                   tp_rank, tp_size)


# ---- families ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """How one ``model_type`` maps onto transformers' classes and HF parameter names."""

    model_type: str
    module: str  # transformers.models.<module>.modeling_<module>
    layer_cls: str
    norm_cls: str | None  # the final norm (None: nn.LayerNorm)
    rotary_cls: str | None  # None: learned positions (OPT)
    prefix: str  # HF name prefix of the decoder ("model." / "model.decoder.")
    final_norm: str  # HF name of the final norm below the prefix
    learned_positions: bool = False
    llama_layout: bool = True  # layers built from the sharded config (vs. built whole, then rewritten)
    # transformers' fused routed-experts class and its FFN width field: built as hpi.executor.experts.RoutedExperts
    fused_experts: str | None = None
    expert_width: str = "intermediate_size"
    # (regex, replacement) rewrites of a layer's module names into the names checkpoints store them under
    stored_names: tuple[tuple[str, str], ...] = ()
    embed: str = "embed_tokens"  # HF name of the token embedding below the prefix
    layers: str = "layers"  # HF name of the decoder layer list below the prefix
    embedding_norm: str | None = None  # HF name of a norm right after the embedding (BLOOM), None: none
    alibi: bool = False  # positions as ALiBi biases (hpi.executor.bloom runs the layers)
    weight_buffers: tuple[str, ...] = ()  # buffers the checkpoint stores as weights (not counted as parameters)

    @property
    def embed_weight(self) -> str:
        """The global HF name of the token embedding matrix (the tied LM head's source)."""
        return f"{self.prefix}{self.embed}.weight"

    def cls(self, name: str):
        mod = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        return getattr(mod, name)

    def build_layer(self, config, index: int) -> nn.Module:
        """Decoder layer ``index`` of ``config``, routed experts one ``nn.Linear`` per projection per expert."""
        experts = (per_expert_modules(self.module, self.fused_experts, self.expert_width) if self.fused_experts
                   else contextlib.nullcontext())
        with experts:
            return self.cls(self.layer_cls)(config, index)

    def stored_name(self, local: str) -> str:
        """The name a layer's parameter ``local`` (below ``layers.<i>.``) has in the family's checkpoints."""
        for pattern, replacement in self.stored_names:
            local = re.sub(pattern, replacement, local)
        return local

    def layer_param_shapes(self, config, index: int = 0) -> dict[str, tuple[int, ...]]:
        """Stored names (below ``layers.<i>.``) and global shapes of decoder layer ``index``'s parameters (and
        weight buffers)."""
        cfg = copy.deepcopy(config)
        cfg._attn_implementation = ATTENTION
        with torch.device("meta"):
            layer = self.build_layer(cfg, index)
        return {self.stored_name(n): tuple(p.shape) for n, p in weights_of(layer, self.weight_buffers)}

    def final_norm_shapes(self, config) -> dict[str, tuple[int, ...]]:
        """Names (below the prefix) and shapes of the final norm, and of the embedding norm where there is one."""
        h = config.hidden_size
        norms = [self.final_norm] if self.embedding_norm is None else [self.embedding_norm, self.final_norm]
        if self.norm_cls is None:  # LayerNorm: weight and bias
            return {f"{n}.{leaf}": (h,) for n in norms for leaf in ("weight", "bias")}
        return {f"{n}.weight": (h,) for n in norms}


# Mixtral's checkpoints keep the v0.1 names: the MoE block is ``block_sparse_moe``, an expert's gate / up / down
# projections are w1 / w3 / w2 (transformers' conversion_mapping.py renames them the same way on load).
_MIXTRAL_STORED = (
    (r"^mlp\.experts\.(\d+)\.gate_proj\.", r"block_sparse_moe.experts.\1.w1."),
    (r"^mlp\.experts\.(\d+)\.up_proj\.", r"block_sparse_moe.experts.\1.w3."),
    (r"^mlp\.experts\.(\d+)\.down_proj\.", r"block_sparse_moe.experts.\1.w2."),
    (r"^mlp\.gate\.", "block_sparse_moe.gate."),
)

_FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "llama", "LlamaDecoderLayer", "LlamaRMSNorm", "LlamaRotaryEmbedding", "model.", "norm"),
    "mistral": Family("mistral", "mistral", "MistralDecoderLayer", "MistralRMSNorm", "MistralRotaryEmbedding",
                      "model.", "norm"),
    "qwen2": Family("qwen2", "qwen2", "Qwen2DecoderLayer", "Qwen2RMSNorm", "Qwen2RotaryEmbedding", "model.", "norm"),
    "mixtral": Family("mixtral", "mixtral", "MixtralDecoderLayer", "MixtralRMSNorm", "MixtralRotaryEmbedding",
                      "model.", "norm", fused_experts="MixtralExperts", stored_names=_MIXTRAL_STORED),
    "deepseek_v3": Family("deepseek_v3", "deepseek_v3", "DeepseekV3DecoderLayer", "DeepseekV3RMSNorm",
                          "DeepseekV3RotaryEmbedding", "model.", "norm", fused_experts="DeepseekV3Experts",
                          expert_width="moe_intermediate_size", weight_buffers=deepseek.WEIGHT_BUFFERS),
    "opt": Family("opt", "opt", "OPTDecoderLayer", None, None, "model.decoder.", "final_layer_norm",
                  learned_positions=True, llama_layout=False),
    "bloom": Family("bloom", "bloom", "BloomBlock", None, None, "transformer.", "ln_f", llama_layout=False,
                    embed="word_embeddings", layers="h", embedding_norm="word_embeddings_layernorm", alibi=True),
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    fam = _FAMILIES.get(model_type)
    if fam is None:
        raise NotImplementedError(
            f"model_type {model_type!r} is not supported by the executor's stage builder "
            f"(supported: {', '.join(SUPPORTED_FAMILIES)}; kimi_k2 is read as deepseek_v3)"
        )
    if model_type == "opt":
        if config.word_embed_proj_dim != config.hidden_size:
            raise NotImplementedError("OPT with word_embed_proj_dim != hidden_size (project_in/out, OPT-350m) "
                                      "is not supported")
        if not config.do_layer_norm_before or getattr(config, "_remove_final_layer_norm", False):
            raise NotImplementedError("only pre-LN OPT with its final layer norm is supported (not OPT-350m)")
        if not getattr(config, "layer_norm_elementwise_affine", True):
            raise NotImplementedError("OPT without elementwise-affine layer norms is not supported")
    if fam.alibi:
        bloom.check_config(config)
    return fam


# ---- configs -----------------------------------------------------------------------------------------
def _config_from_dict(d: dict[str, Any], where: str):
    from transformers import CONFIG_MAPPING

    d = {k: v for k, v in d.items() if k != "_hpi"}
    if d.get("model_type") in deepseek.MODEL_TYPE_ALIASES:  # an architecture transformers knows by another name
        d["model_type"] = deepseek.MODEL_TYPE_ALIASES[d["model_type"]]
    model_type = d.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{where}: model_type {model_type!r} is not known to transformers")
    return CONFIG_MAPPING[model_type].from_dict(d)


def load_hf_config(model: str | None, checkpoint: str | None = None):
    """The transformers config of ``model``: a catalogue name (planner catalogue JSON, ``_hpi`` dropped),
    a path to a config.json, or a directory holding one. With ``checkpoint`` its config.json wins."""
    if checkpoint is not None:
        path = Path(checkpoint).expanduser() / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{checkpoint}: checkpoint directory has no config.json")
        return _config_from_dict(json.loads(path.read_text()), str(path))
    if model is None:
        raise ValueError("give a model (catalogue name or config path) or a checkpoint directory")
    import hpi.planner.catalog as catalog

    catalogue = {p.stem.lower(): p for p in (Path(catalog.__file__).parent / "models").glob("*.json")}
    key = str(model).strip().lower()
    if key in catalogue:
        path = catalogue[key]
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{model}: not a catalogue model ({', '.join(sorted(catalogue))}) nor a config.json path")
    return _config_from_dict(json.loads(path.read_text()), str(path))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _ffn(config) -> int:
    if config.model_type == "bloom":
        return 4 * config.hidden_size  # BloomMLP is always 4 * hidden wide
    return config.ffn_dim if config.model_type == "opt" else config.intermediate_size


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def shard_config(config, tp_size: int):
    """A copy of ``config`` with the per-rank head, kv-head and intermediate counts; ``head_dim`` pinned to
    the original (so ``hidden_size // heads`` is never used to re-derive it). For tp > kv heads each rank
    holds one replicated kv head."""
    family_of(config)
    heads, kv, ffn = config.num_attention_heads, _kv_heads(config), _ffn(config)
    check_tp(heads, kv, ffn, tp_size, where=str(getattr(config, "model_type", "model")))
    cfg = copy.deepcopy(config)
    head_dim = _head_dim(config)
    cfg.head_dim = head_dim
    cfg.num_attention_heads = heads // tp_size
    if config.model_type == "opt":
        cfg.ffn_dim = ffn // tp_size
    elif config.model_type != "bloom":  # BloomBlock is built whole, then cut: it reads neither count
        cfg.num_key_value_heads = kv_heads_per_rank(kv, tp_size)
        cfg.intermediate_size = ffn // tp_size
    if config.model_type == deepseek.MODEL_TYPE:
        deepseek.shard_widths(cfg, config, tp_size)
    return cfg


def stage_config(config, shard: ShardSpec):
    """The config a stage's modules are built from: per-rank counts (``shard_config``), only this stage's
    layers (``num_hidden_layers`` and ``layer_types`` sliced, so local layer index j is global
    ``layer_start + j``) and the sdpa attention path (``hpi.executor.attention``). A
    ``DynamicCache(config=stage_config(...))`` has exactly one layer per local layer."""
    cfg = shard_config(config, shard.tp_size)
    cfg.num_hidden_layers = shard.n_layers
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)):
        cfg.layer_types = list(layer_types[shard.layer_start:shard.layer_stop])
    if config.model_type == deepseek.MODEL_TYPE:
        deepseek.stage_dense_layers(cfg, config, shard.layer_start)
    cfg._attn_implementation = ATTENTION
    return cfg


def _sliding_windows(config, shard: ShardSpec) -> list[int | None]:
    """Sliding window of each local layer (None: full attention), as transformers' masks apply it."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)):
        return [window if t == "sliding_attention" else None for t in layer_types[shard.layer_start:shard.layer_stop]]
    return [window] * shard.n_layers  # mistral: one window for every layer (None: none)


# ---- the stage ---------------------------------------------------------------------------------------
class StageModule(nn.Module):
    """One rank's stage: ``embed_tokens`` (+ ``embed_positions`` for OPT, ``embed_norm`` for BLOOM) on the first
    stage, ``layers`` (transformers decoder layers, local index 0..n-1), ``rotary_emb`` (RoPE families, every
    stage), ``norm`` and ``lm_head`` on the last stage.

    ``forward(inputs, cache, cache_position, attention_mask=None, position_ids=None)``: first stage takes
    token ids [b, s], others hidden states [b, s, h]; the last stage returns float32 logits of the last
    position over the full vocabulary [b, vocab], the others hidden states [b, s, h]. ``cache`` is this
    stage's own ``DynamicCache()`` (or None); ``cache_position`` the absolute cache slots [s] of the new
    tokens.
    Left-padded batches also pass ``attention_mask`` [b, past + s] (1: real token, 0: pad; every TP rank
    and stage the same) and ``position_ids`` [b, s] (each row's own positions, for RoPE or OPT's learned
    embeddings); without them every row's positions are ``cache_position``.
    """

    def __init__(self, config, shard: ShardSpec, tp_group=None):
        super().__init__()
        self.family = family_of(config)
        self.shard = shard
        self.config = stage_config(config, shard)  # what the layers were built from
        self.full_config = config
        self.tp_group = tp_group
        self.windows = _sliding_windows(config, shard)
        fam, cfg, tp = self.family, self.config, shard.tp_size
        h, vocab = config.hidden_size, config.vocab_size

        self.embed_tokens = nn.Embedding(vocab, h) if shard.is_first else None
        self.embed_positions = (nn.Embedding(config.max_position_embeddings + 2, h)
                                if shard.is_first and fam.learned_positions else None)
        self.embed_norm = (nn.LayerNorm(h, eps=config.layer_norm_epsilon)
                           if shard.is_first and fam.embedding_norm else None)
        layer_cls = fam.cls(fam.layer_cls)
        if fam.llama_layout:
            layers = [fam.build_layer(cfg, j) for j in range(shard.n_layers)]
        else:  # OPT derives head_dim from hidden / heads: build whole, then cut the linears
            whole = copy.deepcopy(config)
            whole._attn_implementation = ATTENTION
            layers = [fam.build_layer(whole, j) for j in range(shard.n_layers)]
        if tp > 1:
            for layer in layers:
                _tensor_parallel(layer, tp, tp_group, already_sharded=fam.llama_layout)
                if not fam.llama_layout:  # OPT: self_attn, BLOOM: self_attention
                    attn = layer.self_attention if fam.alibi else layer.self_attn
                    attn.num_heads = config.num_attention_heads // tp
        self.layers = nn.ModuleList(layers)
        # transformers >= 5.2x names the layer's cache argument ``cache`` (``past_key_values`` warns, then goes)
        self._cache_kwarg = "cache" if "cache" in inspect.signature(layer_cls.forward).parameters else "past_key_values"
        self.rotary_emb = None  # made on the real device in build_stage (its buffer is not a weight)
        if shard.is_last:
            self.norm = (fam.cls(fam.norm_cls)(h, eps=config.rms_norm_eps) if fam.norm_cls is not None
                         else nn.LayerNorm(h, eps=getattr(config, "layer_norm_epsilon", 1e-5)))
            self.lm_head = (VocabParallelLMHead(h, vocab, tp, tp_group) if tp > 1
                            else nn.Linear(h, vocab, bias=False))
        else:
            self.norm = self.lm_head = None

    # names -------------------------------------------------------------------------------------------
    def hf_name(self, name: str) -> str:
        """The global HF parameter name of this module's parameter ``name``."""
        fam = self.family
        parts = [p for p in name.split(".") if p != "linear"]  # RowParallelLinear / VocabParallelLMHead inner
        head = parts[0]
        if head == "layers":
            index = self.shard.layer_start + int(parts[1])
            return f"{fam.prefix}{fam.layers}.{index}.{fam.stored_name('.'.join(parts[2:]))}"
        if head in ("embed_tokens", "embed_positions", "embed_norm"):
            parts[0] = {"embed_tokens": fam.embed, "embed_norm": fam.embedding_norm}.get(head, head)
            return fam.prefix + ".".join(parts)
        if head == "norm":
            return fam.prefix + ".".join([fam.final_norm, *parts[1:]])
        if head == "lm_head":
            return "lm_head.weight"
        raise KeyError(name)

    @cached_property
    def hf_names(self) -> dict[str, str]:
        """Every parameter (and weight buffer) of this stage -> its global HF name."""
        return {n: self.hf_name(n) for n, _ in weights_of(self, self.family.weight_buffers)}

    # forward -----------------------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, cache, cache_position: torch.LongTensor | None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                logits_index: torch.LongTensor | None = None) -> torch.Tensor:
        if isinstance(cache, SlotKVCache):  # serving: the bound step says where each token sits
            position_ids = cache.step.position_ids
        elif position_ids is None:
            position_ids = cache_position.unsqueeze(0)  # [1, s]: every row at the same positions
        if self.embed_tokens is not None:
            hidden = self.embed_tokens(inputs)
            if self.embed_positions is not None:
                hidden = hidden + self.embed_positions(position_ids + 2)  # OPT's learned offset
            if self.embed_norm is not None:
                hidden = self.embed_norm(hidden)
        else:
            hidden = inputs
        if self.layers:
            hidden = self._layers(hidden, cache, cache_position, position_ids, attention_mask)
        if self.lm_head is None:
            return hidden
        if logits_index is not None:  # the logits of chosen tokens [n, vocab] (serving: the sampled positions)
            return self.lm_head(self.norm(hidden.reshape(-1, hidden.shape[-1])[logits_index])).float()
        last = self.norm(hidden[:, -1:, :])
        return self.lm_head(last)[:, 0, :].float()

    def _layers(self, hidden, cache, cache_position, position_ids, attention_mask):
        if self.family.alibi:
            return bloom.alibi_layers(self, hidden, cache, cache_position, attention_mask)
        if isinstance(cache, SlotKVCache):  # the step object is the mask: hpi.executor.slots.ragged_attention
            masks = {w: cache.step.with_window(w) for w in set(self.windows)}
        elif isinstance(cache, StaticKVCache):
            masks = self._bind_static(hidden, cache, cache_position, position_ids, attention_mask)
        else:
            masks = self._dynamic_masks(hidden, cache, cache_position, position_ids, attention_mask)
        kwargs: dict[str, Any] = {"position_ids": position_ids, self._cache_kwarg: cache,
                                  "use_cache": cache is not None, "cache_position": cache_position}
        if self.rotary_emb is not None:
            kwargs["position_embeddings"] = self.rotary_emb(hidden, position_ids)
        for layer, window in zip(self.layers, self.windows):
            out = layer(hidden, attention_mask=masks[window], **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _window_masks(self, hidden, past: int, attention_mask, cache, cache_position, position_ids) -> dict:
        """One mask per window size, shared by its layers: ``causal_mask`` without padding, else
        transformers' own (``padded_causal_mask``) for the 2D padding mask [b, past + s]."""
        if attention_mask is None:
            return {w: causal_mask(past, hidden.shape[1], w, hidden.device) for w in set(self.windows)}
        return {w: padded_causal_mask(self.config, hidden, attention_mask, cache, cache_position, position_ids, w)
                for w in set(self.windows)}

    def _dynamic_masks(self, hidden, cache, cache_position, position_ids, attention_mask) -> dict:
        past = cache.get_seq_length() if cache is not None else 0
        if past and any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())):
            raise ValueError("the cache has sliding-window layers (DynamicCache(config=...) of a sliding-window "
                             "model): give the stage a plain DynamicCache(); it applies windows by mask over a "
                             "full cache")
        return self._window_masks(hidden, past, attention_mask, cache, cache_position, position_ids)

    def _bind_static(self, hidden, cache: StaticKVCache, cache_position, position_ids, slot_mask) -> dict:
        """Bind a static cache's slots for this forward and return its masks. ``slot_mask`` [b, max_len]
        (1: a real token's slot) or None.

        A one-token step (what a CUDA graph captures) reads every slot behind a mask built on the device, with
        no host synchronization. The prompt (several tokens, eager) must come first, from slot 0: it reads only
        the slots it writes, with the masks an empty dynamic cache would get."""
        seq = hidden.shape[1]
        if seq > 1 and not cache.is_empty:
            raise ValueError("a StaticKVCache takes the prompt in one forward from slot 0, then one token per step")
        cache.bind(cache_position, visible=seq if seq > 1 else None)
        if seq > 1:
            prompt_mask = None if slot_mask is None else slot_mask[:, :seq]
            return self._window_masks(hidden, 0, prompt_mask, None, cache_position, position_ids)
        return {w: built_once(static_causal_mask(cache_position, cache.max_len, w, slot_mask))
                for w in set(self.windows)}


def _tensor_parallel(layer: nn.Module, tp: int, tp_group, already_sharded: bool) -> None:
    """gpt-fast style: rewrite one decoder layer's Linears for TP (on the meta device; no data moves).
    Column-parallel Linears shrink their output features (unless built sharded already), row-parallel
    ones become ``RowParallelLinear`` over the sharded input features, except inside a mixture of experts:
    its output is all-reduced once, so a row-parallel Linear there (DeepSeek's shared experts) stays plain."""
    moe = getattr(layer, "mlp", None)
    moe = moe if moe is not None and hasattr(moe, "experts") else None
    partial_sums = {id(m) for m in moe.modules()} if moe is not None else set()
    for parent_name, parent in list(layer.named_modules()):
        if isinstance(parent, ExpertMLP):  # built with f / tp; its partial sums meet in the block's all-reduce
            continue
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if child_name in ROW_PARALLEL and id(parent) in partial_sums:
                continue
            bias = child.bias is not None
            dev, dt = child.weight.device, child.weight.dtype
            if child_name in COLUMN_PARALLEL and not already_sharded:
                new = nn.Linear(child.in_features, child.out_features // tp, bias=bias, device=dev, dtype=dt)
            elif child_name in ROW_PARALLEL:
                n_in = child.in_features if already_sharded else child.in_features // tp
                new = RowParallelLinear(n_in, child.out_features, bias, tp_group, device=dev, dtype=dt)
            else:
                continue
            setattr(parent, child_name, new)
    if moe is not None:  # mixtral, deepseek: experts built with f / tp hidden units
        all_reduce_output(moe, tp_group)


# ---- build -------------------------------------------------------------------------------------------
def build_stage(config, shard: ShardSpec, *, tp_group=None, dtype: torch.dtype = torch.bfloat16,
                device: torch.device | str = "cpu", seed: int = 0, checkpoint: str | CheckpointFiles | None = None,
                init_device: torch.device | str | None = None, framework_init: bool = False) -> StageModule:
    """This rank's stage, in eval mode with ``requires_grad`` off, parameters in ``dtype`` on ``device``.

    Weights: with ``checkpoint`` (a local HF safetensors directory, or a reader made for it, e.g.
    ``CheckpointReader(path, config, direct=True)``) this rank's slices are read from it in one planned pass;
    otherwise deterministic random values of ``seed`` (see ``hpi.executor.weights``), drawn on ``init_device``
    (default: ``device``; e.g. ``device="cpu", init_device="cuda"`` draws on the GPU and keeps the stage in
    host memory for ZeRO offload). ``device="meta"`` returns the stage unmaterialized (shapes only).
    ``tp_group`` is the TP process group (unused, may be None, at tp 1; None at tp > 1: the default group).

    ``framework_init=True`` constructs the modules for real with their own initializers and fills nothing:
    the path for DeepSpeed's ``zero.Init`` context, which quantizes and partitions each weight as its
    module is constructed (``weight_quantization.quantized_initialization``) and cannot see a meta build.
    Those weights are not the seeded ones: use it for performance runs, not for parity.
    """
    fam = family_of(config)
    if shard.n_layers_total != config.num_hidden_layers:
        raise ValueError(f"shard.n_layers_total({shard.n_layers_total}) != "
                         f"config.num_hidden_layers({config.num_hidden_layers})")
    if shard.tp_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        # (Without an initialized process group the stage still builds, e.g. to inspect a rank's weights;
        # its forward then fails at the first all-reduce.)
        group_size = torch.distributed.get_world_size(tp_group)
        if group_size != shard.tp_size:
            raise ValueError(f"tp_group has {group_size} ranks but shard.tp_size = {shard.tp_size}")
    device = torch.device(device)
    init_device = torch.device(init_device) if init_device is not None else device
    if framework_init:
        with torch.device(device):
            stage = StageModule(config, shard, tp_group)
            if fam.rotary_cls is not None:
                stage.rotary_emb = fam.cls(fam.rotary_cls)(stage.config)
        return stage.eval().requires_grad_(False)

    with torch.device("meta"):
        stage = StageModule(config, shard, tp_group)
    stage.to(dtype=dtype)
    if device.type == "meta":  # shapes only: count a rank's parameters and bytes without allocating
        with torch.device("meta"):
            stage.rotary_emb = fam.cls(fam.rotary_cls)(stage.config) if fam.rotary_cls is not None else None
        return stage.eval().requires_grad_(False)
    stage.to_empty(device=device)

    table = param_table(config)
    source = (open_checkpoint(checkpoint, config) if checkpoint is not None
              else RandomSource(config, seed, dtype, init_device))
    cut = dict(n_heads=config.num_attention_heads, n_kv_heads=_kv_heads(config), head_dim=_head_dim(config),
               tp_rank=shard.tp_rank, tp_size=shard.tp_size)
    names = stage.hf_names
    try:
        with torch.no_grad():
            source.fill([Target(name, names[name], shard_index(names[name], table[names[name]].shape, **cut), param)
                         for name, param in weights_of(stage, fam.weight_buffers)])
    finally:
        source.close()

    if fam.rotary_cls is not None:
        stage.rotary_emb = fam.cls(fam.rotary_cls)(stage.config).to(device)  # inv_freq stays float32
    stage.eval()
    stage.requires_grad_(False)
    return stage
