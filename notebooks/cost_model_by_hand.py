# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation: {extension: .py, format_name: percent}
# ---

# %% [markdown]
# # The cost model by hand: Llama-3-8B streamed from pinned CPU memory on one H100
#
# We rebuild hpi's decode-step prediction for `llama-3-8b` on `h100-sxm-1gpu` (offload cpu, pinned,
# 16-bit, batch 1, DeepSpeed's default knobs) from the profile's numbers alone, term by term, and check
# each against `hpi.planner.predict`. We measured this run at 0.483 s per decode step (docs/measured-facts.md)
# with DeepSpeed's stock fetch wait; hpi's executor, with its stream-ordered wait, at 0.371 s (H100 run 1).
# Run it as a script (`python notebooks/cost_model_by_hand.py`) or open it in Jupyter with jupytext.

# %%
from hpi.planner.catalog import load_model
from hpi.planner.predict import predict
from hpi.planner.profiles import load_profile
from hpi.planner.specs.plan import Plan
from hpi.planner.specs.workload import Workload

model = load_model("llama-3-8b")
hw = load_profile("h100-sxm-1gpu")
eff = hw.efficiency
plan = Plan(offload="cpu", pin_memory=True, weight_bits=16, batch_size=1)
est = predict(model, hw, Workload(512, 32, fetch_wait="host"), plan)  # DeepSpeed's stock wait, as in the measured run

# %% [markdown]
# ## 1. Bytes streamed per decode step
# ZeRO-3 gathers every module each forward, except tensors under the persistence threshold (1e5
# elements: the 4096-wide RMSNorm weights stay on the GPU). At 16 bits that is 2 bytes per weight.

# %%
norms = (2 * model.n_layers + 1) * model.hidden_size  # two per layer plus the final norm
streamed_bytes = 2 * (model.params_total - norms)
print(f"streamed per step: {streamed_bytes / 1e9:.3f} GB")
assert abs(streamed_bytes - est.decode_h2d_bytes) / streamed_bytes < 1e-9

# %% [markdown]
# ## 2. PCIe time
# The profile's pinned host-to-device ceiling times DeepSpeed's achieved fraction.

# %%
h2d = est.placement.h2d_pinned_bytes_s * eff.h2d_stream_pinned
t_pcie = streamed_bytes / h2d
print(f"pinned ceiling {est.placement.h2d_pinned_bytes_s / 1e9:.1f} GB/s x {eff.h2d_stream_pinned} "
      f"= {h2d / 1e9:.1f} GB/s -> {t_pcie * 1e3:.1f} ms")
assert abs(t_pcie - est.decode_link["h2d_s"]) / t_pcie < 1e-9

# %% [markdown]
# ## 3. Compute time
# Batch 1 decode is HBM-bound: every weight is read once (2 bytes), except the embedding, of which only
# the one row looked up is read; plus the KV cache: 2 * 8 KV heads * 128 * 2 bytes per token per layer
# over an average context of 512 + 31/2 + 1 tokens.

# %%
ctx = 512 + 31 / 2 + 1
kv_bytes = model.n_layers * model.kv_cache_elems_per_token_per_layer * 2 * ctx
hbm_bytes = 2 * (model.params_total - model.embedding_params) + 2 * model.hidden_size + kv_bytes
t_hbm = hbm_bytes / (hw.gpu.hbm_bandwidth_bytes_s * eff.hbm)
print(f"HBM reads {hbm_bytes / 1e9:.2f} GB -> {t_hbm * 1e3:.2f} ms")
assert abs(t_hbm - est.decode_link["hbm_s"]) / t_hbm < 1e-6

# %% [markdown]
# ## 4. The host, and how the terms add up
# The host's work per layer is its eager kernel launches plus ZeRO-3's fetch/release hooks. DeepSpeed's stock
# fetch wait synchronizes the host with the copy stream (`executor/zero3.py` explains it), so the host's work
# and the copies run in series, and the HBM reads hide under the copies. After each forward the executor
# synchronizes: one step overhead adds.

# %%
host_per_layer = eff.layer_overhead_s + eff.offload_layer_overhead_s
by_hand = t_pcie + model.n_layers * host_per_layer + eff.step_overhead_s
print(f"host per layer {host_per_layer * 1e3:.2f} ms; copies + host + step = {by_hand * 1e3:.1f} ms; "
      f"hpi says {est.decode_step_s * 1e3:.1f} ms")
assert t_hbm < t_pcie  # the reads hide under the copies
assert abs(est.decode_step_s / by_hand - 1) < 0.02
assert abs(sum(est.decode_exposed.values()) - est.decode_step_s) < 1e-12  # the breakdown sums to the step

# %% [markdown]
# ## 5. Against the measurements
# The profile's hook time (`offload_layer_overhead_s`) was derived from the measured 0.483 s run, so the
# first comparison checks the arithmetic, not the model. The held-out check is the stream-ordered run:
# there the host runs ahead of the GPU and only the copies should remain.

# %%
measured_host_wait = 0.483  # docs/measured-facts.md
measured_stream = 0.371  # benchmarks/results/2026-11-22-h100, run 1, 8b-cpu-pinned-dsdefaults-b1
stream = predict(model, hw, Workload(512, 32, fetch_wait="stream"), plan)
print(f"host wait: predicted {est.decode_step_s:.3f} s vs measured {measured_host_wait} s "
      f"({est.decode_step_s / measured_host_wait - 1:+.1%})")
print(f"stream-ordered: predicted {stream.decode_step_s:.3f} s vs measured {measured_stream} s "
      f"({stream.decode_step_s / measured_stream - 1:+.1%}, held out)")
assert abs(est.decode_step_s / measured_host_wait - 1) < 0.05
assert abs(stream.decode_step_s / measured_stream - 1) < 0.20
assert stream.decode_step_s < est.decode_step_s  # the fix the executor ships
