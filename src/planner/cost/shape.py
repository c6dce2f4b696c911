"""The model as the cost model sees it: four kinds of module, each a list of tensors.

ZeRO-3 fetches, releases and persists parameters tensor by tensor, tensor parallelism splits matrices but
replicates vectors, and weight quantization touches matrices only; so every cost term starts from the
tensors of a module, not from a single parameter count.

Module kinds (columns of every per-module array in the cost model):
  0 DENSE  decoder layer with a dense FFN
  1 MOE    decoder layer with routed (+ shared) experts
  2 EMBED  token embedding, learned position table, embedding norm (replicated across TP ranks)
  3 HEAD   final norm and LM head (the head is column-sharded across TP ranks)
Pipeline stages are counts of these kinds (``hpi.planner.cost.pipeline.stage_module_counts``).

ZeRO-3 gathers parameters one *module* at a time (a module's own parameters, ``recurse=False``). hpi's
executor holds each routed expert as a ZeRO-3 *leaf* module of three ``nn.Linear`` projections
(``hpi.executor.experts``; transformers >= 5 would fuse a layer's experts into 3-D ``gate_up_proj`` /
``down_proj`` tensors that DeepSpeed cannot quantize) and enters every expert's module on every forward
under ZeRO-3, so every expert of a layer is gathered whenever the layer runs, whatever the router picks
(``EXPERTS_GATHERED_WHOLE``), one expert at a time, each projection its own parameter
(``held_parameters``): its own partition, persistence decision and NVMe swap buffer; except where DeepSpeed
makes the whole MoE block the leaf (``MOE_BLOCK_LEAF_FAMILIES``: Mixtral), which gathers the router and every
expert at once on entering the block. The GEMMs (and the dequantization of quantized weights) touch only the
experts tokens were routed to.

ZeRO-3 counts what it gathers in ``ds_numel``, the elements of each parameter as stored: a quantized matrix is
its packed bytes and scales viewed as 16-bit elements, so its counters (bucket, max live, persistence) see fewer
elements than the matrix has (``Knobs.ds_numel_per_matrix_weight``); the table's sizes are weight elements.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from hpi.planner.specs.model import ModelSpec
from hpi.planner.specs.plan import ZERO3_LEAVES

DENSE, MOE, EMBED, HEAD = range(4)
EXPERTS_GATHERED_WHOLE = True  # every routed expert of a layer is gathered on every forward (see above)
N_KINDS = 4
EXPERT_LEAF = "experts.e"  # the leaf module name one routed expert's tensors list (one such leaf per expert)
LAYER_LEAF = "layer"  # the leaf module of a decoder layer's tensors where the layer is one leaf (``leaf_module``)
MOE_BLOCK_LEAF = "moe_block"  # the leaf module of a layer's router and experts where their block is one leaf
# Families whose MoE block DeepSpeed flags a ZeRO-3 leaf by default: ``zero_optimization.leaf_module.classes``
# defaults to transformers' MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock and Qwen3MoeSparseMoeBlock
# (runtime/zero/leaf_module_config.py, DEFAULT_LEAF_MODULE_CLASSES), and hpi's config keeps that default
# (``hpi.executor.render``; tests/planner/cost/test_memory_vs_deepspeed.py applies DeepSpeed's own leaf config to
# hpi's model and compares the largest gather). So
# with per-module leaves a Mixtral layer's router and all its routed experts are one leaf, gathered at once on
# entering the block: the H200 runs of 2026-12-05 hooked 510 modules (9 a layer), and allocated 1.76-1.86 GB at
# DeepSpeed's 5e7 bucket, a layer's 1.36 GB of packed experts gathered at once
# (benchmarks/results/2026-12-05-issue20-leaf-agreement, ``zero3_hooked_modules``, ``peak_allocated_bytes``).
MOE_BLOCK_LEAF_FAMILIES = ("mixtral",)
KIND_NAMES = ("dense_layer", "moe_layer", "embedding", "lm_head")


@dataclass(frozen=True)
class Tensor:
    name: str
    numel: int
    matrix: bool  # an nn.Linear / nn.Embedding weight: what DeepSpeed quantizes
    tp_sharded: bool  # split across the TP group (column/row parallel); else replicated
    expert: bool = False  # belongs to one routed expert (listed once; the layer holds n_experts of them)
    tied: bool = False  # re-uses another module's tensor: fetched and computed with, not stored again
    module: str = ""  # the leaf module owning it: ZeRO-3's unit of gathering


def _norm(model: ModelSpec, name: str, width: int) -> list[Tensor]:
    out = [Tensor(f"{name}.weight", width, False, False, module=name)]
    if model.norm == "layernorm":
        out.append(Tensor(f"{name}.bias", width, False, False, module=name))
    return out


def _linear(name: str, n_in: int, n_out: int, bias: bool, column: bool, expert: bool = False) -> list[Tensor]:
    """A TP-sharded linear; a row-parallel bias is replicated (added after the all-reduce)."""
    module = EXPERT_LEAF if expert else name
    out = [Tensor(f"{name}.weight", n_in * n_out, True, True, expert, module=module)]
    if bias:
        out.append(Tensor(f"{name}.bias", n_out, False, column, expert, module=module))
    return out


def _attention(model: ModelSpec) -> list[Tensor]:
    h, H = model.hidden_size, model.n_heads
    if model.uses_mla:
        qk = model.qk_nope_head_dim + model.qk_rope_head_dim
        out: list[Tensor] = []
        if model.q_lora_rank:
            # The low-rank down-projections are not split by heads: replicated across TP.
            out.append(Tensor("q_a_proj.weight", h * model.q_lora_rank, True, False, module="q_a_proj"))
            out += [Tensor("q_a_layernorm.weight", model.q_lora_rank, False, False, module="q_a_layernorm")]
            out += _linear("q_b_proj", model.q_lora_rank, H * qk, False, True)
        else:
            out += _linear("q_proj", h, H * qk, False, True)
        kv_a = h * (model.kv_lora_rank + model.qk_rope_head_dim)
        out.append(Tensor("kv_a_proj_with_mqa.weight", kv_a, True, False, module="kv_a_proj_with_mqa"))
        out.append(Tensor("kv_a_layernorm.weight", model.kv_lora_rank, False, False, module="kv_a_layernorm"))
        out += _linear("kv_b_proj", model.kv_lora_rank, H * (model.qk_nope_head_dim + model.v_head_dim), False, True)
        out += _linear("o_proj", H * model.v_head_dim, h, False, False)
        return out
    q, kv = H * model.head_dim, model.n_kv_heads * model.head_dim
    return (
        _linear("q_proj", h, q, model.qkv_bias, True)
        + _linear("k_proj", h, kv, model.qkv_bias, True)
        + _linear("v_proj", h, kv, model.qkv_bias, True)
        + _linear("o_proj", q, h, model.out_bias, False)
    )


def _ffn(model: ModelSpec, prefix: str, width: int, expert: bool = False) -> list[Tensor]:
    h, b = model.hidden_size, model.ffn_bias
    if model.gated_ffn:
        return (
            _linear(f"{prefix}.gate_proj", h, width, b, True, expert)
            + _linear(f"{prefix}.up_proj", h, width, b, True, expert)
            + _linear(f"{prefix}.down_proj", width, h, b, False, expert)
        )
    return _linear(f"{prefix}.fc1", h, width, b, True, expert) + _linear(f"{prefix}.fc2", width, h, b, False, expert)


def module_tensors(model: ModelSpec, kind: int) -> list[Tensor]:
    """The tensors of one module of ``kind``. Routed experts are listed once (one expert's tensors)."""
    h = model.hidden_size
    norms = _norm(model, "input_layernorm", h) + _norm(model, "post_attention_layernorm", h)
    if kind == DENSE:
        return _attention(model) + _ffn(model, "mlp", model.ffn_hidden_size) + norms
    if kind == MOE:
        if not model.is_moe:
            return []
        shared = []
        for i in range(model.n_shared_experts):
            shared += _ffn(model, f"shared_experts.{i}", model.moe_ffn_hidden_size)
        # The router is transformers' own module holding a bare weight, not an nn.Linear: DeepSpeed leaves it at
        # 16 bits (``hpi.planner.cost.dequant``: only nn.Linear / nn.Embedding weights are quantized).
        router = [Tensor("gate.weight", model.n_experts * h, False, False, module="gate")]
        block = router + shared + _ffn(model, EXPERT_LEAF, model.moe_ffn_hidden_size, True)
        if model.family in MOE_BLOCK_LEAF_FAMILIES:
            block = [replace(t, module=MOE_BLOCK_LEAF) for t in block]
        return _attention(model) + block + norms
    if kind == EMBED:
        out = [Tensor("embed_tokens.weight", model.vocab_size * h, True, False, module="embed_tokens")]
        if model.learned_positions:
            positions = model.learned_positions * h
            out.append(Tensor("embed_positions.weight", positions, True, False, module="embed_positions"))
        if model.embedding_norm:
            out += _norm(model, "word_embeddings_layernorm", h)
        return out
    if kind == HEAD:
        # A tied head re-uses the embedding matrix: fetched (and computed with) again, stored once.
        head = Tensor("lm_head.weight", model.vocab_size * h, True, True, tied=model.tied_embeddings, module="lm_head")
        return _norm(model, "norm", h) + [head]
    raise ValueError(f"unknown module kind {kind}")


@dataclass(frozen=True)
class ModuleTable:
    """Per-kind arrays (length 4) of what one module holds and does, before TP/DP division.

    ``*_sharded`` parts divide by tp; ``*_replicated`` parts do not. Expert parts are *per expert*.
    """

    sharded: np.ndarray  # elements of TP-sharded non-expert tensors
    replicated: np.ndarray  # elements of replicated non-expert tensors
    expert_sharded: np.ndarray  # elements of one routed expert (all sharded)
    n_experts: np.ndarray  # routed experts in the module (0 except MOE)
    experts_active: np.ndarray  # routed experts each token uses
    tied_sharded: np.ndarray  # elements of tied (fetched, not stored) sharded tensors: a tied LM head
    matrix_fraction: np.ndarray  # share of stored elements that are quantizable matrices (memory)
    fetch_matrix_fraction: np.ndarray  # the same over what a forward gathers and reads: a tied head's matrix too
    matrix_tensor_sizes: tuple[np.ndarray, ...]  # per kind: sorted numels of the matrices (persistence threshold,
    #                                             counted by ``ds_numel``)
    vector_tensor_sizes: tuple[np.ndarray, ...]  # per kind: the same, of the other tensors (kept 16-bit)
    largest_tensor: np.ndarray  # per kind: largest single tensor (NVMe swap buffers hold one partition)
    largest_gather: np.ndarray  # per kind: largest leaf module's own parameters (gathered at once)
    module_largest_matrix: tuple[np.ndarray, ...]  # per kind: each leaf module's largest matrix (0: none)
    module_largest_vector: tuple[np.ndarray, ...]  # per kind: the same leaf modules' largest other tensor (0: none)
    last_gather: np.ndarray  # per kind: the last matrix-holding leaf module's own parameters (a layer's FFN
    #                          output projection, or its experts): what is gathered just before the head
    leaf_sharded: np.ndarray  # (kinds, J): each matrix-holding leaf module's TP-sharded elements (0-padded)
    leaf_replicated: np.ndarray  # (kinds, J): the same, replicated elements (routed experts: all of them)
    matrix_counts: np.ndarray  # per kind: quantizable matrices (a routed expert's counted once; dequant launches)
    is_layer: np.ndarray  # 1 for decoder layers (per-layer overheads and all-reduces)
    attn_flops_per_ctx_token: float  # 2*H*(d_qk + d_v): FLOPs per query token per cached token, all heads
    kv_elems_per_token: float  # per layer
    kv_expand_flops_per_cached_token: float  # MLA: re-expanding one cached latent through kv_b_proj, all heads
    kv_shard_limit: int  # TP can split K/V at most this many ways (KV heads); beyond, K/V is replicated
    hidden_size: int
    vocab_size: int

    @property
    def routed(self) -> np.ndarray:
        """Per kind: whether the module routes tokens to experts (its host reads the router's counts mid-layer)."""
        return self.n_experts > 0


def held_parameters(t: Tensor, n_routed: int) -> tuple[int, int]:
    """(elements of one parameter, parameters of that shape a module holds) for a listed tensor: a routed
    expert's tensor stands for ``n_routed`` parameters, one per expert."""
    return (t.numel, n_routed) if t.expert else (t.numel, 1)


def _sum(ts: list[Tensor], **match) -> int:
    return sum(t.numel for t in ts if all(getattr(t, k) == v for k, v in match.items()))


def leaf_module(t: Tensor, kind: int, leaf: str) -> str:
    """The ZeRO-3 leaf module holding ``t`` at the plan's leaf granularity (``Plan.zero3_leaf``): the module that
    lists it (``module``: DeepSpeed's hooks on every submodule), or, for a decoder layer's tensors with ``layer``,
    the layer itself (``hpi.executor.render``: DeepSpeed's ``leaf_module`` config names each layer, so entering
    it gathers every parameter inside at once, routed experts included, and hooks nothing inside)."""
    if leaf == "layer" and kind in (DENSE, MOE):
        return LAYER_LEAF
    return t.module


@lru_cache(maxsize=64)
def module_table(model: ModelSpec, leaf: str = "module") -> ModuleTable:
    """The per-kind arrays of ``model`` with ZeRO-3 leaf modules at ``leaf`` granularity (``leaf_module``)."""
    if leaf not in ZERO3_LEAVES:
        raise ValueError(f"zero3 leaf {leaf!r} is not one of {', '.join(ZERO3_LEAVES)}")
    per_kind = [module_tensors(model, k) for k in range(N_KINDS)]
    sharded, replicated, expert, tied, matrix_frac, fetch_frac = [], [], [], [], [], []
    matrix_sizes, vector_sizes, largest, gather = [], [], [], []
    module_matrix, module_vector, last, leaf_parts = [], [], [], []
    for kind, ts in enumerate(per_kind):
        shared_ts = [t for t in ts if not t.expert]
        n_routed = model.n_experts if kind == MOE else 0
        sharded.append(_sum(shared_ts, tp_sharded=True))
        replicated.append(_sum(shared_ts, tp_sharded=False))
        expert.append(_sum(ts, expert=True))
        tied.append(_sum(shared_ts, tied=True))
        stored = _sum(shared_ts, tied=False) + n_routed * expert[-1]
        stored_matrix = _sum(shared_ts, matrix=True, tied=False) + n_routed * _sum(ts, expert=True, matrix=True)
        matrix_frac.append(stored_matrix / stored if stored else 0.0)
        used = _sum(shared_ts) + n_routed * expert[-1]
        used_matrix = _sum(shared_ts, matrix=True) + n_routed * _sum(ts, expert=True, matrix=True)
        fetch_frac.append(used_matrix / used if used else 0.0)
        params = [held_parameters(t, n_routed) for t in ts]  # (elements of one parameter, how many of them)
        for out, matrix in ((matrix_sizes, True), (vector_sizes, False)):
            out.append(np.sort(np.array([n for t, (n, copies) in zip(ts, params) if t.matrix == matrix
                                         for _ in range(copies)], dtype=np.float64)))
        largest.append(max((n for n, _ in params), default=0))
        held = [n * copies for n, copies in params]  # what a module holds of each listed tensor
        per_module: dict[str, int] = {}
        module_max: dict[tuple[str, bool], int] = {}  # (leaf, matrix) -> its largest such tensor
        module_copies: dict[str, int] = {}  # leaf modules of that name: one per routed expert for EXPERT_LEAF
        owners = [leaf_module(t, kind, leaf) for t in ts]
        for m, t, (one, copies) in zip(owners, ts, params):  # an expert's leaf holds one of each parameter it
            each = copies if m == EXPERT_LEAF else 1  # lists; any other leaf holds all of them (a layer: every expert)
            per_module[m] = per_module.get(m, 0) + one * copies // each
            module_max[m, t.matrix] = max(module_max.get((m, t.matrix), 0), one)
            module_copies[m] = each
        gather.append(max(per_module.values(), default=0))
        for out, matrix in ((module_matrix, True), (module_vector, False)):
            out.append(np.array([module_max.get((m, matrix), 0) for m in per_module for _ in range(module_copies[m])],
                                dtype=np.float64))
        last_matrix = [m for m, t in zip(owners, ts) if t.matrix]
        last.append(per_module[last_matrix[-1]] if last_matrix else 0)
        # matrix-holding leaf modules, in order; a layer's routed experts as one leaf holding all of them (the
        # overlap rule splits a module's work over its leaves by weight: their E leaves in a row are one span)
        leaves = list(dict.fromkeys(last_matrix))
        leaf_parts.append([(sum(n for o, t, n in zip(owners, ts, held) if o == m and t.tp_sharded),
                            sum(n for o, t, n in zip(owners, ts, held) if o == m and not t.tp_sharded))
                           for m in leaves])
    width = max(1, max(len(p) for p in leaf_parts))
    leaf = np.zeros((N_KINDS, width, 2))
    for kind, parts in enumerate(leaf_parts):
        if parts:
            leaf[kind, : len(parts)] = parts
    return ModuleTable(
        leaf_sharded=leaf[:, :, 0],
        leaf_replicated=leaf[:, :, 1],
        sharded=np.array(sharded, dtype=np.float64),
        replicated=np.array(replicated, dtype=np.float64),
        expert_sharded=np.array(expert, dtype=np.float64),
        n_experts=np.array([0, model.n_experts, 0, 0], dtype=np.float64),
        experts_active=np.array([0, model.n_experts_active, 0, 0], dtype=np.float64),
        tied_sharded=np.array(tied, dtype=np.float64),
        matrix_fraction=np.array(matrix_frac),
        fetch_matrix_fraction=np.array(fetch_frac),
        matrix_tensor_sizes=tuple(matrix_sizes),
        vector_tensor_sizes=tuple(vector_sizes),
        largest_tensor=np.array(largest, dtype=np.float64),
        largest_gather=np.array(gather, dtype=np.float64),
        module_largest_matrix=tuple(module_matrix),
        module_largest_vector=tuple(module_vector),
        last_gather=np.array(last, dtype=np.float64),
        matrix_counts=np.array([sum(1 for t in ts if t.matrix) for ts in per_kind], dtype=np.float64),
        is_layer=np.array([1.0, 1.0, 0.0, 0.0]),
        attn_flops_per_ctx_token=2.0 * model.n_heads * (model.attention_qk_dim + model.attention_v_dim),
        kv_elems_per_token=float(model.kv_cache_elems_per_token_per_layer),
        # transformers' DeepseekV3 attention caches the 576-wide latent and multiplies every cached token
        # by kv_b_proj again at each decode step: 2 * kv_lora * H * (d_nope + d_v) FLOPs per cached token.
        kv_expand_flops_per_cached_token=(
            2.0 * model.kv_lora_rank * model.n_heads * (model.qk_nope_head_dim + model.v_head_dim)
            if model.uses_mla else 0.0
        ),
        kv_shard_limit=model.kv_heads_for_sharding,
        hidden_size=model.hidden_size,
        vocab_size=model.vocab_size,
    )


def tp_split(t: Tensor, kind: int, tp: int) -> int:
    """How many ways TP cuts tensor ``t`` of a module of ``kind``: tp where it is sharded, except the replicated
    embedding's (``per_rank``); 1 elsewhere."""
    return tp if t.tp_sharded and kind != EMBED else 1


def stored_elements(table: ModuleTable) -> np.ndarray:
    """Elements each kind stores (a tied head only its norm), summing with the stage counts to the total."""
    return table.sharded - table.tied_sharded + table.replicated + table.n_experts * table.expert_sharded


def per_rank(table: ModuleTable, per_kind: np.ndarray, tp: int) -> np.ndarray:
    """Divide per-kind sizes of single tensors/modules by tp, except the replicated embedding's."""
    return np.where(np.arange(N_KINDS) == EMBED, per_kind, per_kind / tp)


# ---- what ZeRO-3 swaps to and from NVMe ---------------------------------------------------------------------
# DeepSpeed swaps a partition to NVMe only from max(1 MiB, aio.block_size) up (swap_tensor/utils.py
# MIN_AIO_BYTES, partitioned_param_swapper.py ``min_aio_bytes`` and ``swappable_tensor``); smaller ones stay in
# CPU memory. The planner counts the partitions from 1 MiB up as swapped, so a plan's aio block size may not
# exceed the smallest of them (``smallest_swapped_partition``, feasibility's ``aio_block_size``).
MIN_SWAPPED_BYTES = 1024**2


def _leaf_modules(t: Tensor, n_routed: int) -> list[str]:
    """The leaf module holding each parameter ``t`` stands for: a routed expert's, one per expert (unless its
    MoE block is the leaf: ``MOE_BLOCK_LEAF_FAMILIES``)."""
    if t.module == EXPERT_LEAF:
        return [f"experts.{e}" for e in range(n_routed)]
    return [t.module] * (n_routed if t.expert else 1)


@lru_cache(maxsize=256)
def swapped_partitions(model: ModelSpec, tp: int, dp: int) -> tuple[tuple[str, float], ...]:
    """(leaf module, 16-bit elements) of every parameter partition one rank swaps in from NVMe, as the modules
    hold their parameters (``module_tensors``; a routed expert's projections in the expert's own leaf module).
    TP splits what it shards (the embedding is replicated, as ``per_rank`` has it), ZeRO-3 partitions each
    parameter 1/dp, and a partition below ``MIN_SWAPPED_BYTES`` is not swapped."""
    out = []
    for kind in range(N_KINDS):
        n_routed = model.n_experts if kind == MOE else 0
        for t in module_tensors(model, kind):
            elems = t.numel / tp_split(t, kind, tp) / dp
            if elems * 2 >= MIN_SWAPPED_BYTES:
                out += [(f"{KIND_NAMES[kind]}.{module}", elems) for module in _leaf_modules(t, n_routed)]
    return tuple(out)


def largest_swapped_partition(model: ModelSpec, tp: int, dp: int) -> float:
    """The elements of the largest partition one rank swaps (``swapped_partitions``): what every NVMe swap buffer
    must hold."""
    return max((elems for _, elems in swapped_partitions(model, tp, dp)), default=0.0)


def smallest_swapped_partition(model: ModelSpec, tp: int, dp: int) -> float:
    """The elements of the smallest partition one rank swaps (``swapped_partitions``): an aio block size above
    its bytes would keep it in CPU memory."""
    return min((elems for _, elems in swapped_partitions(model, tp, dp)), default=0.0)


@lru_cache(maxsize=256)
def swaps_per_module(model: ModelSpec, tp: int, dp: int) -> int:
    """The most partitions one leaf module swaps in from NVMe at once: the fewest swap buffers DeepSpeed can run
    with. Fetching a module swaps in all its partitions together, each into its own buffer, held until the module
    is released after its forward (partitioned_param_swapper.py ``swap_in``: ``assert len(swap_in_paths) <=
    len(self.available_buffer_ids)``, "Not enough buffers")."""
    per_module = Counter(module for module, _ in swapped_partitions(model, tp, dp))  # one pass (kimi-k2: 60k)
    return max(per_module.values(), default=1)
