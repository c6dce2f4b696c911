"""Memory on each GPU, in each node's CPU RAM (pinned and pageable) and on each node's NVMe.

GPU, per rank of a stage (the planner reports the fullest GPU):
- resident_weights: the stage's TP shard, partitioned 1/dp by ZeRO-3, when not offloaded
- persistent_weights: tensors under the persistence threshold, kept whole on every GPU when ZeRO-3 gathers,
  as stored (a quantized matrix packed, with its scales)
- quant_scales: fp16 scale + zero point per group of 64 weights (4/64 bytes per weight) of resident weights
- live_params: what ZeRO-3 has gathered at once, as stored (16-bit, or packed 8/4-bit with scales), at
  the moment's peak (``live_param_elems``: the largest module plus what the prefetch keeps in flight, up
  to ``stage3_max_live_parameters``)
- dequant_buffers: the 16-bit copy an 8/4-bit weight is dequantized into for its GEMM (``cost.dequant``)
- kv_cache: 2 * kv_heads/tp * head_dim (MLA: decompressed K and V) * cached tokens * sequences * 2 bytes
  per layer of the stage; with KV offload only the layer in use and the one being prefetched
- activations: the prefill's intermediates of one micro-batch (``_activation_elems_per_token``) while a
  layer runs; the hidden states and the fp32 logits of the last position while the head runs
Not everything peaks at once: the prefill holds the prompt's cache and its largest intermediates, the
last decode step the whole context's cache, and the vocabulary modules (the largest tensors of most
models) are gathered and dequantized while no layer's intermediates are alive. The GPU's peak is the
largest of these moments (``_gpu_parts``), and the parts are those of that moment.
- workspace: the cuBLAS/cuBLASLt workspace torch allocates (``Efficiency.gpu_workspace_bytes``)
- framework: CUDA context and allocator slack (``Efficiency.gpu_reserved_bytes``); the only part that
  ``torch.cuda.max_memory_allocated`` never counts (the others are tensors in torch's caching allocator)

CPU, per node (sum over the ranks placed on it): offloaded weights (cpu offload), what pinning them adds
(torch rounds each pinned partition up to a power of two: ``cost.pinned``), offloaded KV cache,
NVMe staging buffers (``buffer_count * buffer_size`` 16-bit elements per rank, pinned) and each rank's
process (``Efficiency.host_reserved_bytes``). Pinned: offloaded weights and KV when pin_memory, and
the NVMe buffers. NVMe: the node's weights when offloading to NVMe.
The build is its own moment (``cost.build``): the kept weights, the NVMe buffers and the processes, plus
what a rank holds only while it builds (``build_transient``); ``build_bytes`` is that moment's node total.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hpi.planner.cost.build import build_transient_bytes
from hpi.planner.cost.compute import stored_elems_per_rank
from hpi.planner.cost.dequant import dequant_buffer_bytes
from hpi.planner.cost.inputs import COMPUTE_BYTES, QUANT_META_BYTES_PER_GROUP, Arrangement, Knobs
from hpi.planner.cost.pinned import pinned_rounding_bytes
from hpi.planner.cost.shape import DENSE, EMBED, HEAD, MOE, module_table, per_rank
from hpi.planner.cost.streaming import fetches_weights, persistent_parts
from hpi.planner.specs.plan import QUANT_GROUP_SIZE

LOGIT_BYTES = 4.0  # transformers upcasts logits to fp32
LOGIT_COPIES = 2.0  # logits and the processed scores / probabilities sampled from

GPU_PARTS = (
    "resident_weights", "persistent_weights", "quant_scales", "live_params", "dequant_buffers", "kv_cache",
    "activations", "workspace", "framework",
)  # fmt: skip
ALLOCATED_PARTS = GPU_PARTS[:-1]  # what torch.cuda.max_memory_allocated sees: all but the framework part
CPU_PARTS = ("offloaded_weights", "pinned_rounding", "offloaded_kv_cache", "nvme_buffers", "process")


@dataclass(frozen=True)
class MemoryResult:
    gpu_parts: dict[str, np.ndarray]  # (N,) each, for the fullest GPU; they sum to gpu_peak_bytes
    gpu_peak_bytes: np.ndarray
    fullest_stage: np.ndarray  # (N,) stage index of the fullest GPU
    cpu_parts: dict[str, np.ndarray]  # (N,) each, for the fullest node; they sum to cpu_bytes
    cpu_bytes: np.ndarray
    pinned_bytes: np.ndarray  # (N,) the node with most pinned memory
    nvme_bytes: np.ndarray  # (N,) the node with most bytes on NVMe
    weight_bytes_total: np.ndarray  # (N,) every rank's weights together (model size at the plan's bits)
    build_bytes: np.ndarray  # (N,) host memory of the fullest node while its ranks build their stages
    build_transient_bytes: np.ndarray  # (N,) of build_bytes, what that node holds only during the build


def _activation_elems_per_token(arrangement: Arrangement) -> np.ndarray:
    """(kinds,) 16-bit activation elements alive per token at a module's peak, per TP rank.

    Inference frees each intermediate once its last use returns (no autograd graph keeps it), so the
    attention block and the FFN peak at different moments; a layer's peak is the larger of the two,
    both over the residual stream and its normed copy (2h):
    - attention: q, k, v, their rotated copies of q and k, and the attention output (heads * d_v);
    - gated FFN (act(gate(x)) * up(x)): act, up and their product (3f) at the multiply; plain: 2f.
    (The 1x H100 records of 2026-11-22: tuned offload at batch 64 allocated 13.3 GB, where summing
    both blocks' intermediates predicted 16.0 GB.)
    """
    m, tp = arrangement.model, arrangement.tp
    h = m.hidden_size
    if m.uses_mla:
        qkv = m.n_heads * (2 * m.attention_qk_dim + m.attention_v_dim) / tp + m.q_lora_rank + m.kv_lora_rank
        rotated = m.n_heads * m.attention_qk_dim / tp
    else:
        qkv = (m.n_heads + 2 * m.n_kv_heads) * m.head_dim / tp
        rotated = (m.n_heads + m.n_kv_heads) * m.head_dim / tp
    attention = 2 * h + qkv + rotated + m.n_heads * m.attention_v_dim / tp
    gate = 3 if m.gated_ffn else 2
    dense = max(attention, 2 * h + gate * m.ffn_hidden_size / tp)
    moe = max(attention, 2 * h + m.n_experts + gate * (m.n_shared_experts + 1) * m.moe_ffn_hidden_size / tp)
    return np.array([dense, moe if m.is_moe else 0.0, h, 0.0])


def _modules_fetched(arrangement: Arrangement, knobs: Knobs) -> np.ndarray:
    """(N, kinds) leaf modules per module of each kind that gather anything (a tensor above the persistence
    threshold), at each plan's leaf granularity (``Arrangement.by_leaf``)."""
    threshold = knobs.persistence_threshold_elems[:, None]
    matrix_threshold = knobs.zero3_weights(knobs.persistence_threshold_elems)[:, None]  # ds_numel (Knobs)

    def counts(table) -> np.ndarray:
        out = np.zeros((knobs.n, len(table.module_largest_matrix)))
        for kind, (matrix, vector) in enumerate(zip(table.module_largest_matrix, table.module_largest_vector)):
            out[:, kind] = ((matrix[None, :] > matrix_threshold) | (vector[None, :] > threshold)).sum(axis=1)
        return out

    out, layer = counts(arrangement.table), knobs.zero3_leaf_layer
    if layer.any():
        out = np.where(layer[:, None], counts(module_table(arrangement.model, "layer")), out)
    return out


def _stage_max(per_kind: np.ndarray, present: np.ndarray) -> np.ndarray:
    """(kinds,) or (N, kinds) per-kind sizes -> (N or 1, pp) the largest over the kinds each stage holds."""
    per_kind = np.atleast_2d(per_kind)
    return np.max(np.where(present[None, :, :], per_kind[:, None, :], 0.0), axis=2)


@dataclass(frozen=True)
class LayerPrefetch:
    """What ZeRO-3's prefetch holds while a stage's decoder layers run, each (N, pp) in weight elements per rank
    (``live_param_elems`` states the regimes)."""

    bucket: np.ndarray  # (N, 1) the prefetch bucket, as weight elements
    max_live: np.ndarray  # (N, 1)
    nvme: np.ndarray  # (N, 1) bool
    nvme_in_flight: np.ndarray  # (N, pp) what the swap buffers let fly besides the module in use
    pace: np.ndarray  # the module in use and one bucket ahead
    climbs: np.ndarray  # bool: each fetch prefetches more than a forward releases, so the queue climbs to max live
    reach: np.ndarray  # the one tensor the prefetch that crosses max live takes beyond it
    cap: np.ndarray  # what the stage can have gathered at once
    nvme_layers: np.ndarray
    largest_gather: np.ndarray  # (N, kinds) the largest leaf module of each kind, gathered at once
    all_total: np.ndarray  # what the stage gathers per forward
    layer_total: np.ndarray  # what its decoder layers gather per forward
    mean_gather: np.ndarray  # what one fetch gathers, on average over the layers' leaf modules

    def _bounded(self, climbed: np.ndarray) -> np.ndarray:
        regime = np.where(self.climbs, np.maximum(self.pace, climbed), self.pace)
        return np.minimum(np.where(self.nvme, self.nvme_layers, regime), self.all_total)

    @property
    def live(self) -> np.ndarray:
        """At the peak: max live plus the tensor that crosses it."""
        return self._bounded(np.minimum(self.max_live + self.reach, self.cap))

    @property
    def in_flight(self) -> np.ndarray:
        """In the steady state of a forward: gathered or queued, the module in use included, without the crossing
        tensor (it is released as the next is gathered)."""
        return self._bounded(np.minimum(self.max_live, self.cap))


def layer_prefetch(arrangement: Arrangement, knobs: Knobs, fetched: np.ndarray) -> LayerPrefetch:
    """DeepSpeed's prefetch while the layers run (``live_param_elems``); ``fetched``: (N, kinds) elements one module
    of each kind gathers, per TP rank."""
    t, counts = arrangement.table, arrangement.stage_counts
    # DeepSpeed counts both in ds_numel: as weight elements, quantized matrices fill them 1/0.28 (4-bit) times over.
    bucket = knobs.zero3_weights(knobs.prefetch_bucket_elems)[:, None]
    max_live = knobs.zero3_weights(knobs.max_live_elems)[:, None]
    present = counts > 0  # (pp, kinds)
    is_layer = t.is_layer > 0
    layers_present = present & is_layer[None, :]
    gather = arrangement.by_leaf(knobs, lambda table: per_rank(table, table.largest_gather, arrangement.tp))
    tensor = per_rank(t, t.largest_tensor, arrangement.tp)
    largest_layer_tensor = _stage_max(tensor, layers_present)  # (1, pp)
    nvme = knobs.offload_nvme[:, None]
    nvme_in_flight = np.maximum(knobs.nvme_buffer_count[:, None] - 1, 0) * largest_layer_tensor

    layer_counts = counts * is_layer[None, :]
    stage_total = fetched @ layer_counts.T  # (N, pp): what the layers gather per forward
    all_total = fetched @ counts.T
    gathers = _modules_fetched(arrangement, knobs) @ layer_counts.T
    mean_gather = stage_total / np.maximum(gathers, 1.0)
    largest = _stage_max(gather, layers_present)
    pace = largest + np.minimum(bucket, np.maximum(max_live - largest, 0.0))
    # The head is prefetched only if the module before it leaves room under max_live.
    last_gather = arrangement.by_leaf(knobs, lambda table: per_rank(table, table.last_gather, arrangement.tp))
    last_layer = _stage_max(last_gather, layers_present)
    has_head = present[:, HEAD][None, :]
    head = np.where(has_head & (last_layer < max_live), fetched[:, HEAD][:, None], 0.0)
    opening = fetched[:, EMBED][:, None] * counts[:, EMBED][None, :]  # (N, pp)
    return LayerPrefetch(
        bucket=bucket, max_live=max_live, nvme=nvme, nvme_in_flight=nvme_in_flight, pace=pace,
        climbs=bucket > mean_gather, reach=np.maximum(largest_layer_tensor, head),
        cap=np.where(bucket >= all_total - opening, all_total, all_total - opening),
        nvme_layers=np.maximum(largest, head) + np.minimum(bucket, nvme_in_flight), largest_gather=gather,
        all_total=all_total, layer_total=stage_total, mean_gather=mean_gather)


def live_param_elems(arrangement: Arrangement, knobs: Knobs, fetched: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(while the decoder layers run, while the embedding or the head runs), each (N, pp): elements ZeRO-3
    holds gathered at its peak on a rank of each stage (0 where the stage has no vocabulary module).

    DeepSpeed's ``PartitionedParameterCoordinator.fetch_sub_module`` gathers the module about to run,
    then prefetches from the recorded trace ``min(bucket, max_live - available)`` elements more, adding
    whole parameters while its count is below that limit (so it overshoots by up to one tensor, and
    prefetches nothing while what is available already fills ``max_live``); ``release_sub_module`` frees
    a module's parameters after its forward. Two regimes follow while the layers run:

    - bucket <= c, the mean a fetch gathers (stage elements / modules that gather): prefetching keeps
      pace with use and nothing accumulates:  live = L + min(bucket, max(max_live - L, 0)),  L the
      largest layer module;
    - bucket > c: each fetch prefetches more than a forward releases, so what is in flight climbs to
      max_live, and the prefetch that crosses it takes one more tensor:  live = min(max_live + T, cap),
      T the largest tensor a prefetch can reach: a layer's, or the LM head's when the module gathered just
      before it (the last layer's FFN output projection) leaves room under max_live (else the head is
      gathered on demand, alone); cap what the stage gathers per forward, less the opening embedding
      when the bucket cannot take the rest at once (it is released before the prefetch gets there).
    While the embedding or the head runs: live = V + min(bucket, max(max_live - V, 0)), V its size.

    NVMe: DeepSpeed's swapper gives each swapped-in parameter its own staging buffer, so besides the
    module in use at most ``nvme_buffer_count`` - 1 parameters are in flight, and a prefetch that finds no
    free buffer waits instead of overshooting: live = M + min(bucket, (buffer_count - 1) x T), T the largest
    layer tensor, M the module in use or the one that takes the most room: the largest layer module, the
    head when the last layer's prefetch reaches it, or the vocabulary module in its own moment (1x H100,
    8B, 4e8 bucket, 3e9 max live: 1.54 GB allocated with 5 buffers, 2.05 GB with 16, where max live would
    give 7 GB; at bs 16 3.25 GB, the head in flight beside the prefill's intermediates; SUMMARY.md
    session 3, runs 6 and 7).

    The 2x H200 records (2026-11-22, 8B, offload cpu) show both regimes: DeepSpeed's defaults (bucket 5e7
    > c = 3.6e7, max_live 1e9) peaked at 3.17 GB allocated = 2 x (1e9 + the 5.3e8-element LM head) plus
    activations, DeepSpeedExamples' knobs (bucket = max_live = 2h^2 < c) at 1.18 GB = the embedding,
    bucket 4e8 / max_live 3e9 at 7.08 GB (TP 2: 6.54 GB, the head split in two); the 4x H200 70B offload
    records with DeepSpeedExamples' knobs (max_live 2h^2 = 1.3e8 below the 2.3e8-element down_proj) at
    2.2 GB = the 2.1 GB head alone.
    ``fetched``: (N, kinds) elements one module of each kind gathers, per TP rank.
    """
    q = layer_prefetch(arrangement, knobs, fetched)
    t, counts = arrangement.table, arrangement.stage_counts
    present, is_layer = counts > 0, t.is_layer > 0
    bucket, max_live, nvme, nvme_in_flight = q.bucket, q.max_live, q.nvme, q.nvme_in_flight
    live_layers = q.live

    vocab_present = present & ~is_layer[None, :]
    vocab = _stage_max(np.minimum(fetched, q.largest_gather), vocab_present)  # (N, pp): one module at a time
    room = np.where(nvme, nvme_in_flight, np.maximum(max_live - vocab, 0.0))
    live_vocab = np.where(vocab > 0, vocab + np.minimum(bucket, room), 0.0)
    return live_layers, np.minimum(live_vocab, q.all_total)


def _per_stage(per_kind: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(N, kinds) per module x (pp, kinds) counts -> (N, pp) per stage."""
    return per_kind @ counts.T


def _prefill_layer_peak(arrangement: Arrangement, knobs: Knobs, fetched: np.ndarray, live: np.ndarray,
                        kv_prefill: np.ndarray, act: np.ndarray,
                        gathered_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(KV cache, gathered bytes), each (N, pp), at the prefill's fullest layer of each stage.

    The prefill builds the cache layer by layer, and ZeRO-3 can hold in flight no more than what is left
    of the forward to gather: at layer i of L, the cache is i/L of the prompt's and the gathered bytes
    min(live, (L - i + 1) x the mean layer + the head). The sum peaks where the prefetch stops being
    capped by ``live`` or at the last layer (candidates i1, i1 + 1 and L of a piecewise-linear sum).
    (1x H100, 8B offload, 3e9 max live: bs 64 allocated 13.3 GB and bs 256 34.5 GB, where the full cache
    and intermediates beside a full climb to max live would be 14.7 and 40.6 GB.) An offloaded KV cache
    holds two layers throughout.
    """
    counts, t = arrangement.stage_counts, arrangement.table
    layers = counts[:, DENSE] + counts[:, MOE]  # (pp,)
    n_layers = np.maximum(layers, 1.0)[None, :]
    per_layer = (fetched @ (counts * t.is_layer[None, :]).T) / n_layers  # (N, pp) elements gathered per layer
    head = fetched[:, HEAD][:, None] * (counts[:, HEAD] > 0)[None, :]
    growing = ~knobs.kv_offload[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        turn = np.floor(n_layers + 1.0 - np.divide(live - head, per_layer, out=np.full_like(live, np.inf),
                                                   where=per_layer > 0))
    best_total = np.full_like(live, -np.inf)
    kv_at, live_at = np.zeros_like(live), np.zeros_like(live)
    for i in (np.clip(turn, 1.0, n_layers), np.clip(turn + 1.0, 1.0, n_layers), np.broadcast_to(n_layers, live.shape)):
        kv_i = np.where(growing, kv_prefill * i / n_layers, kv_prefill)
        live_i = np.minimum(live, (n_layers - i + 1.0) * per_layer + head) * gathered_bytes
        total = kv_i + act + live_i
        better = total > best_total
        best_total = np.where(better, total, best_total)
        kv_at, live_at = np.where(better, kv_i, kv_at), np.where(better, live_i, live_at)
    return kv_at, live_at


def _gpu_parts(arrangement: Arrangement, knobs: Knobs, bpw: np.ndarray, meta: np.ndarray) -> dict[str, np.ndarray]:
    """Each GPU part as (N, pp), at the moment of the stage's peak.

    A stage's allocations peak at one of two kinds of moment, and the parts are those of the larger:
    - a decoder layer running: the KV cache (the prompt's in prefill, the whole context's in the last
      decode step), the prefill's intermediates, what ZeRO-3 holds gathered while layers run, and the
      dequantized copy of the largest layer tensor;
    - the embedding or the head running (stages holding one): the KV cache, the hidden states and fp32
      logits, the vocabulary module gathered (and what its prefetch adds) and its dequantized copy.
    (4x H200, 70B offload, bs 32: 3.56 GB allocated = the 2.1 GB head + the 1.4 GB cache + logits, while
    the layers' moment, cache + 0.9 GB of intermediates + 0.7 GB gathered, stays below; 1x H100, 8B with
    8-bit weights offloaded: 1.76 GB = the embedding packed (0.56 GB) + its bf16 copy (1.05 GB) + cache.)
    """
    t, counts, wl = arrangement.table, arrangement.stage_counts, arrangement.workload
    fetching = fetches_weights(arrangement, knobs)[:, None]
    offloaded = knobs.offloaded[:, None]
    stored = np.broadcast_to(stored_elems_per_rank(arrangement), (knobs.n, 4))
    persistent_matrices, persistent_others = persistent_parts(arrangement, knobs)
    all_persistent = persistent_matrices + persistent_others
    persistent = np.where(fetching, np.minimum(all_persistent, stored), 0.0)
    # Persistent matrices stay as stored (packed 8/4-bit with their scales), the other tensors 16-bit.
    matrix_bytes = knobs.ds_numel_per_matrix_weight[:, None] * COMPUTE_BYTES
    persistent_bytes = np.divide(persistent_matrices * matrix_bytes + persistent_others * COMPUTE_BYTES, all_persistent,
                                 out=np.full_like(all_persistent, COMPUTE_BYTES), where=all_persistent > 0)
    partitioned = np.where(offloaded, 0.0, (stored - persistent) / arrangement.dp)
    # A forward gathers every tensor it uses that does not persist, a tied head's included.
    used = t.sharded / arrangement.tp + t.replicated + t.n_experts * t.expert_sharded / arrangement.tp
    fetched = np.maximum(used[None, :] - all_persistent, 0.0)
    # Gathered parameters are held as stored: packed, with their scales, for 8/4-bit weights.
    bits = knobs.weight_bits[:, None]
    gathered_bytes = np.where(bits < 16, bits / 8.0 + QUANT_META_BYTES_PER_GROUP / QUANT_GROUP_SIZE, COMPUTE_BYTES)
    live_l, live_v = live_param_elems(arrangement, knobs, fetched)
    live_l = np.where(fetching, live_l, 0.0)
    live_v = np.where(fetching, live_v, 0.0) * gathered_bytes

    present = counts > 0
    is_layer = t.is_layer > 0
    buffer = dequant_buffer_bytes(knobs.weight_bits, wl.compute_dtype, wl.fused_dequant)[:, None]
    tensor = per_rank(t, t.largest_tensor, arrangement.tp)
    temp_l = _stage_max(tensor, present & is_layer[None, :]) * buffer
    temp_v = _stage_max(tensor, present & ~is_layer[None, :]) * buffer

    layers = counts[:, DENSE] + counts[:, MOE]  # (pp,)
    batch = knobs.batch_size / arrangement.dp
    mb = batch / knobs.micro_batches

    def kv_of(tokens: int) -> np.ndarray:
        per_layer_seq = t.kv_elems_per_token / arrangement.kv_split * tokens * COMPUTE_BYTES
        resident = layers[None, :] * (batch * per_layer_seq)[:, None]
        offloaded = np.minimum(layers, 2.0)[None, :] * (mb * per_layer_seq)[:, None]
        return np.where(knobs.kv_offload[:, None], offloaded, resident)

    act_per_token = _activation_elems_per_token(arrangement)
    stage_act = np.max(np.where(counts > 0, act_per_token, 0.0), axis=1)  # (pp,)
    act = (mb * wl.prompt_len_tokens)[:, None] * stage_act[None, :] * COMPUTE_BYTES
    has_head = (counts[:, HEAD] > 0)[None, :]
    has_vocab = (counts[:, EMBED] + counts[:, HEAD] > 0)[None, :]
    logits = (mb * t.vocab_size * LOGIT_BYTES * LOGIT_COPIES)[:, None] * has_head
    hidden = (mb * wl.prompt_len_tokens * t.hidden_size * COMPUTE_BYTES)[:, None] * has_vocab
    kv_prefill, kv_decode = kv_of(wl.prompt_len_tokens), kv_of(wl.context_len_tokens)
    kv_sweep, live_sweep = _prefill_layer_peak(arrangement, knobs, fetched, live_l, kv_prefill, act, gathered_bytes)
    # The four moments' (kv, activations, gathered, dequantized) parts; the prefill's head sees the
    # prompt's cache, an embedding-only stage opens the prefill with none.
    zero = np.zeros_like(kv_prefill)
    moments = [
        (kv_sweep, act, live_sweep, temp_l * (layers > 0)[None, :]),
        (kv_decode, zero, live_l * gathered_bytes, temp_l * (layers > 0)[None, :]),
        (np.where(has_head, kv_prefill, 0.0), hidden + logits, live_v, temp_v),
        (kv_decode, logits, live_v, temp_v),
    ]
    valid = [np.ones_like(has_vocab), np.ones_like(has_vocab), has_vocab, has_vocab]
    totals = np.stack([np.where(ok, sum(m), -np.inf) for m, ok in zip(moments, valid)])  # (4, N, pp)
    peak = np.argmax(totals, axis=0)

    def pick(i: int) -> np.ndarray:
        return np.choose(peak, [np.broadcast_to(m[i], peak.shape) for m in moments])

    return {
        "resident_weights": _per_stage(partitioned * (bpw - meta), counts),
        "persistent_weights": _per_stage(persistent * persistent_bytes, counts),
        "quant_scales": _per_stage(partitioned * meta, counts),
        "live_params": pick(2),
        "dequant_buffers": pick(3),
        "kv_cache": pick(0),
        "activations": pick(1),
        "workspace": np.full((knobs.n, arrangement.pp), arrangement.hardware.efficiency.gpu_workspace_bytes),
        "framework": np.full((knobs.n, arrangement.pp), arrangement.hardware.efficiency.gpu_reserved_bytes),
    }


def _cpu_parts_per_rank(arrangement: Arrangement, knobs: Knobs, bpw: np.ndarray) -> dict[str, np.ndarray]:
    """Each CPU part a rank of each stage adds to its node, as (N, pp)."""
    t, counts, wl = arrangement.table, arrangement.stage_counts, arrangement.workload
    stored = stored_elems_per_rank(arrangement)
    weights = _per_stage(stored * bpw / arrangement.dp, counts)
    layers = counts[:, DENSE] + counts[:, MOE]
    kv_per_seq = t.kv_elems_per_token / arrangement.kv_split * wl.context_len_tokens * COMPUTE_BYTES
    kv = layers[None, :] * (knobs.batch_size / arrangement.dp * kv_per_seq)[:, None]
    buffers = knobs.nvme_buffer_count * knobs.nvme_buffer_elems * COMPUTE_BYTES
    ones = np.ones((knobs.n, arrangement.pp))
    return {
        "weights_any": weights,
        "offloaded_weights": np.where(knobs.offload_cpu[:, None], weights, 0.0),
        "pinned_rounding": _per_stage(pinned_rounding_bytes(arrangement, knobs), counts),
        "offloaded_kv_cache": np.where(knobs.kv_offload[:, None], kv, 0.0),
        "nvme_buffers": np.where(knobs.offload_nvme[:, None], buffers[:, None] * ones, 0.0),
        "process": arrangement.hardware.efficiency.host_reserved_bytes * ones,
        "build_transient": build_transient_bytes(arrangement, knobs),
    }


def memory(arrangement: Arrangement, knobs: Knobs) -> MemoryResult:
    bpw = knobs.bytes_per_weight(arrangement.table.matrix_fraction)
    meta = knobs.quant_meta_share(arrangement.table.matrix_fraction)
    rows = np.arange(knobs.n)

    gpu = _gpu_parts(arrangement, knobs, bpw, meta)
    gpu_total = sum(gpu.values())
    fullest = np.argmax(gpu_total, axis=1)

    per_rank = _cpu_parts_per_rank(arrangement, knobs, bpw)
    nodes = arrangement.ranks_per_node_stage  # (nodes, pp)
    per_node = {name: part @ nodes.T for name, part in per_rank.items()}  # (N, nodes)
    cpu_total = sum(per_node[p] for p in CPU_PARTS)
    fullest_node = np.argmax(cpu_total, axis=1)
    pin = knobs.pin_memory[:, None]
    pinned = (np.where(pin, per_node["offloaded_weights"] + per_node["offloaded_kv_cache"], 0.0)
              + per_node["pinned_rounding"] + per_node["nvme_buffers"])
    nvme = np.where(knobs.offload_nvme[:, None], per_node["weights_any"], 0.0)
    build = (per_node["offloaded_weights"] + per_node["pinned_rounding"] + per_node["nvme_buffers"]
             + per_node["process"] + per_node["build_transient"])
    build_node = np.argmax(build, axis=1)

    return MemoryResult(
        gpu_parts={name: part[rows, fullest] for name, part in gpu.items()},
        gpu_peak_bytes=gpu_total[rows, fullest],
        fullest_stage=fullest,
        cpu_parts={name: per_node[name][rows, fullest_node] for name in CPU_PARTS},
        cpu_bytes=cpu_total[rows, fullest_node],
        pinned_bytes=pinned.max(axis=1),
        nvme_bytes=nvme.max(axis=1),
        weight_bytes_total=per_node["weights_any"].sum(axis=1),
        build_bytes=build[rows, build_node],
        build_transient_bytes=per_node["build_transient"][rows, build_node],
    )
