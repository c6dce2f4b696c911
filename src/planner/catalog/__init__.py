"""The model catalogue: HuggingFace ``config.json`` files in, frozen ``ModelSpec`` records out.

Each catalogue model is one file in ``models/`` written exactly as its hub ``config.json`` (same field
names, so a user's own config.json goes through the same code), plus a top-level ``"_hpi"`` object with
the published parameter counts and where they come from. The tests hold every computed count to its
published figure and, where transformers is importable, to the count of the real module tree.

Every failure is a ``ModelConfigError`` whose one-line message names the file (or the model, for a dict)
and the field, because a config error found later, in the cost model, no longer says which file was bad.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hpi.planner.specs.model import ModelSpec

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ModelConfigError",
    "load_model",
    "model_from_hf_config",
    "model_names",
]

_MODELS_DIR = Path(__file__).parent / "models"
_MISSING = object()


class ModelConfigError(ValueError):
    """A model config that cannot become a ModelSpec; the message names the file or model and the field."""


# ---- typed field access ---------------------------------------------------------------------------
class _Fields:
    """Typed reads from one config dict; each failure names where the config came from and the field."""

    def __init__(self, config: Mapping[str, Any], where: str, model_type: str) -> None:
        self.config, self.where, self.model_type = config, where, model_type

    def error(self, message: str) -> ModelConfigError:
        return ModelConfigError(f"{self.where}: {message}")

    def _find(self, keys: tuple[str, ...]) -> tuple[str, Any]:
        """The first of ``keys`` present and not null (HF writes null for "use the default")."""
        for key in keys:
            if self.config.get(key) is not None:
                return key, self.config[key]
        return keys[0], _MISSING

    def _missing(self, keys: tuple[str, ...]) -> ModelConfigError:
        also = f"; {', '.join(repr(k) for k in keys[1:])} is read too" if len(keys) > 1 else ""
        return self.error(f"field {keys[0]!r} is missing (needed for {self.model_type} models{also})")

    def integer(self, *keys: str, default: Any = _MISSING, minimum: int = 1) -> int:
        key, value = self._find(keys)
        if value is _MISSING:
            if default is _MISSING:
                raise self._missing(keys)
            return default
        # bool is an int subclass in Python; `"hidden_size": true` is a broken config, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"field {key!r} must be an integer, got {value!r} ({type(value).__name__})")
        if value < minimum:
            raise self.error(f"field {key!r} must be >= {minimum}, got {value}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        _, value = self._find((key,))
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise self.error(f"field {key!r} must be true or false, got {value!r} ({type(value).__name__})")
        return value

    def text(self, *keys: str, default: str) -> str:
        key, value = self._find(keys)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise self.error(f"field {key!r} must be a string, got {value!r} ({type(value).__name__})")
        return value

    def require(self, key: str, expected: Any, default: Any, why: str) -> None:
        """Reject a variant whose parameters the ModelSpec cannot count (better than a wrong count)."""
        _, value = self._find((key,))
        value = default if value is _MISSING else value
        if value != expected:
            raise self.error(f"field {key!r} = {json.dumps(value)} is not supported: {why}")


# ---- shared pieces of the family readers ---------------------------------------------------------
def _head_dim(f: _Fields, hidden: int, heads: int) -> int:
    """``head_dim`` when the config states it (Mistral-Nemo: 128 != 5120/32), else hidden / heads."""
    explicit = f.integer("head_dim", default=0)
    if explicit:
        return explicit
    if hidden % heads:
        raise f.error(
            f"field 'hidden_size' ({hidden}) is not a multiple of 'num_attention_heads' ({heads}) "
            "and no 'head_dim' is given"
        )
    return hidden // heads


def _gqa_decoder(f: _Fields) -> dict[str, Any]:
    """Fields every Llama-shaped config (Llama, Mistral, Qwen2, Mixtral) states the same way."""
    hidden, heads = f.integer("hidden_size"), f.integer("num_attention_heads")
    return {
        "n_layers": f.integer("num_hidden_layers"),
        "hidden_size": hidden,
        "n_heads": heads,
        # HF's rule for all of these families: no num_key_value_heads means plain multi-head attention.
        "n_kv_heads": f.integer("num_key_value_heads", default=heads),
        "head_dim": _head_dim(f, hidden, heads),
        "ffn_hidden_size": f.integer("intermediate_size"),
        "vocab_size": f.integer("vocab_size"),
        "max_position_embeddings": f.integer("max_position_embeddings"),
        "tied_embeddings": f.flag("tie_word_embeddings", False),
    }


# ---- one reader per model_type ---------------------------------------------------------------------
def _llama(f: _Fields) -> dict[str, Any]:
    # LlamaAttention puts attention_bias on q, k, v *and* o_proj; LlamaMLP puts mlp_bias on all three.
    attention_bias = f.flag("attention_bias", False)
    return {
        **_gqa_decoder(f),
        "family": "llama",
        "qkv_bias": attention_bias,
        "out_bias": attention_bias,
        "ffn_bias": f.flag("mlp_bias", False),
    }


def _mistral(f: _Fields) -> dict[str, Any]:
    return {**_gqa_decoder(f), "family": "mistral"}


def _qwen2(f: _Fields) -> dict[str, Any]:
    # Qwen2Attention: bias on q, k, v projections, none on o_proj; no config field switches it.
    return {**_gqa_decoder(f), "family": "qwen2", "qkv_bias": True}


def _mixtral(f: _Fields) -> dict[str, Any]:
    # Every layer is MoE; each expert is a SwiGLU of width intermediate_size; no shared expert.
    base = _gqa_decoder(f)
    return {
        **base,
        "family": "mixtral",
        "n_experts": f.integer("num_local_experts"),
        "n_experts_active": f.integer("num_experts_per_tok"),
        "moe_ffn_hidden_size": base["ffn_hidden_size"],
        "first_dense_layers": 0,
    }


def _opt(f: _Fields) -> dict[str, Any]:
    hidden, heads = f.integer("hidden_size"), f.integer("num_attention_heads")
    # OPT-350m projects a 512-wide embedding to 1024 and is post-LN: extra tensors the spec has no part for.
    f.require("word_embed_proj_dim", hidden, hidden, f"it must equal hidden_size ({hidden}); "
              "the project_in/project_out matrices of OPT-350m are not counted")
    f.require("do_layer_norm_before", True, True, "only pre-LN OPT (final layer norm present) is counted")
    f.require("_remove_final_layer_norm", False, False, "only OPT with its final layer norm is counted")
    f.require("layer_norm_elementwise_affine", True, True, "layer norms are counted with weight and bias")
    max_pos = f.integer("max_position_embeddings")
    bias = f.flag("enable_bias", True)
    return {
        "family": "opt",
        "n_layers": f.integer("num_hidden_layers"),
        "hidden_size": hidden,
        "n_heads": heads,
        "n_kv_heads": heads,
        "head_dim": _head_dim(f, hidden, heads),
        "ffn_hidden_size": f.integer("ffn_dim"),
        "vocab_size": f.integer("vocab_size"),
        "max_position_embeddings": max_pos,
        # OPTLearnedPositionalEmbedding keeps 2 extra rows (fairseq's padding offset).
        "learned_positions": max_pos + 2,
        "tied_embeddings": f.flag("tie_word_embeddings", True),
        "gated_ffn": False,
        "norm": "layernorm",
        "qkv_bias": bias,
        "out_bias": bias,
        "ffn_bias": bias,
    }


def _bloom(f: _Fields) -> dict[str, Any]:
    # Hub BLOOM configs spell these n_layer / n_head (and the oldest n_embed); BloomConfig maps both.
    hidden = f.integer("hidden_size", "n_embed")
    heads = f.integer("n_head", "num_attention_heads")
    return {
        "family": "bloom",
        "n_layers": f.integer("n_layer", "num_hidden_layers"),
        "hidden_size": hidden,
        "n_heads": heads,
        "n_kv_heads": heads,
        "head_dim": _head_dim(f, hidden, heads),
        # BloomMLP is always 4 * hidden wide (it ignores n_inner).
        "ffn_hidden_size": 4 * hidden,
        "vocab_size": f.integer("vocab_size"),
        # ALiBi has no position table and no hard limit; BLOOM was trained on 2048-token sequences.
        "max_position_embeddings": f.integer("seq_length", default=2048),
        "tied_embeddings": f.flag("tie_word_embeddings", True),
        "gated_ffn": False,
        "norm": "layernorm",
        "qkv_bias": True,
        "out_bias": True,
        "ffn_bias": True,
        "embedding_norm": True,
    }


def _deepseek_v3(f: _Fields) -> dict[str, Any]:
    f.require("moe_layer_freq", 1, 1, "only every-layer MoE (after first_k_dense_replace) is counted")
    f.require("attention_bias", False, False, "MLA projections are counted without biases")
    n_layers = f.integer("num_hidden_layers")
    first_dense = f.integer("first_k_dense_replace", minimum=0)
    if first_dense > n_layers:
        raise f.error(f"field 'first_k_dense_replace' ({first_dense}) exceeds 'num_hidden_layers' ({n_layers})")
    heads = f.integer("num_attention_heads")
    qk_nope, qk_rope = f.integer("qk_nope_head_dim"), f.integer("qk_rope_head_dim")
    # num_nextn_predict_layers (multi-token prediction) is deliberately not read: the MTP module is a
    # training/speculative add-on that the causal-LM forward never runs, and the published 671B for
    # DeepSeek-V3 excludes its 14B (the hub's 685B includes it).
    return {
        "family": "deepseek_v3",
        "n_layers": n_layers,
        "hidden_size": f.integer("hidden_size"),
        "n_heads": heads,
        "n_kv_heads": f.integer("num_key_value_heads", default=heads),
        # MLA has no single head width; the query·key width is the one attention cost scales with.
        "head_dim": qk_nope + qk_rope,
        "ffn_hidden_size": f.integer("intermediate_size"),
        "vocab_size": f.integer("vocab_size"),
        "max_position_embeddings": f.integer("max_position_embeddings"),
        "tied_embeddings": f.flag("tie_word_embeddings", False),
        "n_experts": f.integer("n_routed_experts"),
        "n_experts_active": f.integer("num_experts_per_tok"),
        "n_shared_experts": f.integer("n_shared_experts", minimum=0),
        "moe_ffn_hidden_size": f.integer("moe_intermediate_size"),
        "first_dense_layers": first_dense,
        # q_lora_rank null means queries are not compressed (DeepSeek-V2-Lite): a plain q_proj.
        "q_lora_rank": f.integer("q_lora_rank", default=0),
        "kv_lora_rank": f.integer("kv_lora_rank"),
        "qk_nope_head_dim": qk_nope,
        "qk_rope_head_dim": qk_rope,
        "v_head_dim": f.integer("v_head_dim"),
    }


_READERS: dict[str, Callable[[_Fields], dict[str, Any]]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "opt": _opt,
    "bloom": _bloom,
    "mixtral": _mixtral,
    "deepseek_v3": _deepseek_v3,
    # Kimi-K2 ships the DeepSeek-V3 architecture under its own model_type (so engines can tell them apart).
    "kimi_k2": _deepseek_v3,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_READERS)

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _checkpoint_bytes(f: _Fields) -> int:
    """Bytes per weight as the checkpoint stores them (DeepSeek-V3 and Kimi-K2 ship FP8 block-quantized)."""
    quant = f.config.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, Mapping) else None
        if method != "fp8":
            raise f.error(
                f"field 'quantization_config.quant_method' = {json.dumps(method)} is not supported "
                "(only 'fp8'); give the unquantized model's config.json"
            )
        return 1
    dtype = f.text("torch_dtype", "dtype", default="bfloat16")
    if dtype not in _DTYPE_BYTES:
        raise f.error(f"field 'torch_dtype' = {dtype!r} is not one of {', '.join(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[dtype]


def _published(f: _Fields) -> dict[str, Any]:
    """The ``_hpi`` block: published counts and their source (optional for a user's own config)."""
    hpi = f.config.get("_hpi", {})
    if not isinstance(hpi, Mapping):
        raise f.error(f"field '_hpi' must be an object, got {type(hpi).__name__}")
    out: dict[str, Any] = {"source": hpi.get("source", "")}
    for key in ("published_params_total", "published_params_active"):
        value = hpi.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise f.error(f"field '_hpi.{key}' must be a number, got {value!r}")
        out[key] = value
    if not isinstance(out["source"], str):
        raise f.error("field '_hpi.source' must be a string")
    return out


def _build(config: Mapping[str, Any], name: str, where: str) -> ModelSpec:
    model_type = config.get("model_type")
    if model_type not in _READERS:
        stated = "is missing" if model_type is None else f"= {json.dumps(model_type)} is not supported"
        raise ModelConfigError(f"{where}: field 'model_type' {stated} (supported: {', '.join(_READERS)})")
    f = _Fields(config, where, model_type)
    fields = {**_READERS[model_type](f), **_published(f), "checkpoint_dtype_bytes": _checkpoint_bytes(f)}
    try:
        return ModelSpec(name=name, **fields)
    except ValueError as exc:  # cross-field rules the spec itself checks (e.g. heads % kv_heads)
        raise ModelConfigError(f"{where}: {exc}") from None


# ---- public API ------------------------------------------------------------------------------------
def model_from_hf_config(config: Mapping[str, Any], name: str) -> ModelSpec:
    """A ModelSpec from a parsed HuggingFace config.json (errors name the model, there being no file)."""
    if not isinstance(config, Mapping):
        raise ModelConfigError(f"model {name!r}: config must be a JSON object, got {type(config).__name__}")
    return _build(config, name, where=f"model {name!r}")


def model_names() -> list[str]:
    """Names of the catalogue models, sorted (what ``load_model`` accepts besides a path)."""
    return sorted(_catalogue())


def load_model(name_or_path: str) -> ModelSpec:
    """A catalogue model by name (any case), or a config.json by path (file, or a directory holding one)."""
    text = str(name_or_path)
    catalogue = _catalogue()
    key = text.strip().lower()
    if key in catalogue:
        return _load_file(catalogue[key], name=key)
    path = Path(text).expanduser()
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelConfigError(f"{text}: directory has no config.json")
            path = path / "config.json"
        if path.is_file():
            return _load_file(path, name=_name_from_path(path))
    except OSError as exc:  # a name too long for a path, a folder it may not enter
        raise ModelConfigError(f"{text}: {exc.strerror}: not a catalogue model nor a readable config.json") from None
    if "/" in text or "\\" in text or text.endswith(".json"):
        raise ModelConfigError(f"{text}: no such file or directory")
    raise ModelConfigError(
        f"unknown model {text!r}: not a catalogue model ({', '.join(sorted(catalogue))}) "
        "nor a path to a config.json"
    )


# ---- files -----------------------------------------------------------------------------------------
def _catalogue() -> dict[str, Path]:
    return {p.stem.lower(): p for p in _MODELS_DIR.glob("*.json")}


def _name_from_path(path: Path) -> str:
    """``models/foo/config.json`` is model ``foo``; ``foo.json`` is ``foo``."""
    return path.resolve().parent.name if path.name == "config.json" else path.stem


def _load_file(path: Path, name: str) -> ModelSpec:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path}: cannot read: {exc}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path}: top level must be a JSON object, got {type(config).__name__}")
    return _build(config, name, where=str(path))
