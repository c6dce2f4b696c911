"""Where a stage's weights come from: deterministic random values, or a local HF safetensors checkpoint.

Every value is addressed by its *global* HuggingFace parameter name (``model.layers.17.mlp.up_proj.weight``)
so every layout of the same model (any tp, any pipeline split) sees the same numbers:

- random: ``normal(0, initializer_range)`` for matrices and embeddings, ones for norm weights, zeros for
  biases; each tensor drawn from its own ``torch.Generator`` seeded by a stable hash of ``f"{seed}:{name}"``.
  The full global tensor is drawn on the init device in the target dtype, this rank's slice is copied out
  and the full tensor dropped at once. The numbers depend on the generator's device type (CPU and CUDA
  generators differ), so a reference must be drawn on the same kind of device as the run it checks.
- checkpoint: ``hpi.executor.checkpoint.CheckpointReader`` plans every slice of the stage up front and reads
  each file once, in order, with large reads; a process reads only the tensors it holds (a row-parallel slice
  whole, then cut: ``hpi.executor.readplan`` says why). ``SliceReader``, the first reader (safetensors'
  ``get_slice`` per parameter), stays for comparison.

``full_state_dict`` and ``save_checkpoint`` give the same random values HF-named, for references and for
writing test checkpoints that go through the real loading path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from hpi import atomic
from hpi.executor.checkpoint import INDEX_NAME, SINGLE_NAME, CheckpointFiles, CheckpointReader, fill_by_reads
from hpi.executor.tp import Slice

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "CheckpointReader",
    "ParamInfo",
    "RandomSource",
    "full_state_dict",
    "param_table",
    "save_checkpoint",
    "SliceReader",
    "stable_seed",
    "weights_of",
    "write_checkpoint",
]


def stable_seed(seed: int, name: str) -> int:
    """A 63-bit seed from ``f"{seed}:{name}"`` that is the same in every process and Python version."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class ParamInfo:
    shape: tuple[int, ...]
    init: str  # "normal" | "ones" | "zeros"
    source: str  # the name whose values it takes (lm_head.weight -> the embedding when tied)


def weights_of(module: nn.Module, weight_buffers: tuple[str, ...]):
    """(name, tensor) of every value a checkpoint holds for ``module``: its parameters, then the buffers whose
    last name component is in ``weight_buffers`` (DeepSeek's router bias: ``Family.weight_buffers``)."""
    yield from module.named_parameters()
    yield from ((n, b) for n, b in module.named_buffers() if n.rsplit(".", 1)[-1] in weight_buffers)


def _init_kind(name: str, ndim: int) -> str:
    if name.endswith(".e_score_correction_bias"):  # DeepSeek's router bias steers expert choice: a constant would
        return "normal"  # shift every expert alike and leave a misread one unseen
    if name.endswith(".bias"):
        return "zeros"
    if ndim == 1:
        return "ones"  # RMSNorm / LayerNorm weights
    return "normal"


def param_table(config) -> dict[str, ParamInfo]:
    """Every parameter of the full HF causal LM, by its HF name, with its global shape and init rule.

    ``lm_head.weight`` is always listed (the stage needs it); with tied embeddings its source is the
    embedding, and checkpoints are expected not to store it.
    """
    from hpi.executor.modeling import family_of  # the family registry lives with the module builders

    fam = family_of(config)
    table: dict[str, tuple[int, ...]] = {}
    hidden, vocab = config.hidden_size, config.vocab_size
    table[fam.embed_weight] = (vocab, hidden)
    if fam.learned_positions:
        table[f"{fam.prefix}embed_positions.weight"] = (config.max_position_embeddings + 2, hidden)
    layers = _layer_shapes(fam, config)
    for local in dict.fromkeys(name for shapes in layers for name in shapes):
        for i, shapes in enumerate(layers):
            if local in shapes:
                table[f"{fam.prefix}{fam.layers}.{i}.{local}"] = shapes[local]
    for local, shape in fam.final_norm_shapes(config).items():
        table[f"{fam.prefix}{local}"] = shape
    table["lm_head.weight"] = (vocab, hidden)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = {}
    for name, shape in table.items():
        source = fam.embed_weight if (name == "lm_head.weight" and tied) else name
        out[name] = ParamInfo(tuple(shape), _init_kind(name, len(shape)), source)
    return out


def _layer_shapes(fam, config) -> list[dict[str, tuple[int, ...]]]:
    """Each decoder layer's parameter shapes, one meta build per kind of layer: DeepSeek's first
    ``first_k_dense_replace`` layers hold a dense MLP, the others experts; every other family has one kind."""
    first_moe = getattr(config, "first_k_dense_replace", None) or 0
    kinds: dict[bool, dict[str, tuple[int, ...]]] = {}
    for i in range(config.num_hidden_layers):
        if (i < first_moe) not in kinds:
            kinds[i < first_moe] = fam.layer_param_shapes(config, i)
    return [kinds[i < first_moe] for i in range(config.num_hidden_layers)]


def _init_std(config) -> float:
    for key in ("initializer_range", "init_std"):
        value = getattr(config, key, None)
        if value:
            return float(value)
    return 0.02


class RandomSource:
    """Deterministic values: ``read(name, slice)`` draws the full global tensor on ``init_device`` and
    returns only the slice (on ``init_device``)."""

    def __init__(self, config, seed: int, dtype: torch.dtype, init_device: torch.device | str = "cpu"):
        self.table = param_table(config)
        self.seed, self.dtype = seed, dtype
        self.device = torch.device(init_device)
        self.std = _init_std(config)

    def full(self, name: str) -> torch.Tensor:
        info = self.table[name]
        if info.init == "ones":
            return torch.ones(info.shape, dtype=self.dtype, device=self.device)
        if info.init == "zeros":
            return torch.zeros(info.shape, dtype=self.dtype, device=self.device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(stable_seed(self.seed, info.source))
        out = torch.empty(info.shape, dtype=self.dtype, device=self.device)
        return out.normal_(0.0, self.std, generator=gen)

    def read(self, name: str, part: Slice | None) -> torch.Tensor:
        info = self.table[name]
        if part is None:
            return self.full(name)
        if info.init != "normal":  # constants: make the slice directly
            shape = list(info.shape)
            shape[part.dim] = part.stop - part.start
            fill = torch.ones if info.init == "ones" else torch.zeros
            return part.pad(fill(shape, dtype=self.dtype, device=self.device))
        full = self.full(name)
        out = part.apply(full)
        del full
        return out

    def fill(self, targets) -> None:
        fill_by_reads(self, targets)

    def close(self) -> None:
        pass


def full_state_dict(config, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The whole model's random weights, HF-named (what ``AutoModelForCausalLM.load_state_dict`` takes).

    Same values as ``build_stage(..., seed=seed)`` when drawn on the same kind of device. With tied
    embeddings ``lm_head.weight`` is the embedding tensor itself.
    """
    src = RandomSource(config, seed, dtype, device)
    out: dict[str, torch.Tensor] = {}
    for name, info in src.table.items():
        out[name] = out[info.source] if info.source != name and info.source in out else src.full(name)
    return out


# ---- checkpoints ------------------------------------------------------------------------------------


def write_checkpoint(state_dict: dict[str, torch.Tensor], config, out_dir: str | os.PathLike,
                     shard_size_bytes: int = 5 * 2**30) -> Path:
    """Write an HF-format checkpoint: config.json, model-0000i-of-0000n.safetensors (greedy shards of at
    most ``shard_size_bytes``, a tensor never split) and model.safetensors.index.json. A tied
    ``lm_head.weight`` is left out, as HF does."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    items = [(k, v) for k, v in state_dict.items() if not (tied and k == "lm_head.weight")]
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    weight_map: dict[str, str] = {}
    n = len(shards)
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in shard}, str(out / fname),
                  metadata={"format": "pt"})
        weight_map.update({k: fname for k, _ in shard})
    total = sum(v.numel() * v.element_size() for _, v in items)
    atomic.write_json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2,
                      sort_keys=True)
    config.to_json_file(str(out / "config.json"))
    return out


def save_checkpoint(config, seed: int, out_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                    shard_size_bytes: int = 5 * 2**30) -> Path:
    """The random model of ``seed`` as an HF checkpoint directory (tokenizer not written)."""
    return write_checkpoint(full_state_dict(config, seed, dtype), config, out_dir, shard_size_bytes)


class SliceReader(CheckpointFiles):
    """The first reader, kept for comparison (benchmarks/load_device.py): each parameter's slice read on its own
    with safetensors' ``get_slice`` from a memory-mapped file. A row-parallel slice touches every page of the
    tensor and read-ahead does the rest, so a tp-2 rank reads most of every file; ``CheckpointReader`` plans.

    Files are opened lazily with ``safe_open(..., framework="pt", device="cpu")`` and kept open until
    ``close``. ``read(name, part)`` returns a CPU tensor in the checkpoint's dtype.
    """

    def __init__(self, path: str | os.PathLike, config=None):
        super().__init__(path, config)
        self._stack = contextlib.ExitStack()
        self._files: dict[str, Any] = {}

    def _file(self, fname: str):
        if fname not in self._files:
            self._files[fname] = self._stack.enter_context(
                safe_open(str(self.path / fname), framework="pt", device="cpu"))
        return self._files[fname]

    def read(self, name: str, part: Slice | None) -> torch.Tensor:
        stored = self.resolve(name)
        f = self._file(self.weight_map[stored])
        if part is None:
            return f.get_tensor(stored)
        return part.pad(f.get_slice(stored)[part.index()])

    def close(self) -> None:
        self._stack.close()
        self._files.clear()
