"""Fit the cost model's coefficients (``Efficiency``) to measured RunRecords.

    records = load_records(["benchmarks/results/2026-11-22-h200x2"])   # hpi.records: files, bundles, folders
    prior = load_profile("h200-2gpu", calibrated=False)                 # probed ceilings, default efficiencies
    cal = fit(prior, records)                                           # Calibration: values, ids, errors
    profile = apply(prior, cal)                                         # or calibrate(prior, records)

What a record measures and what the model predicts for it (``METRICS``):
- ``decode_step_s``: the median decode step (the record's ``decode_step_s.median``) against the model's
  decode step;
- ``prefill_s``: the first forward (prefill = TTFT) against the model's prefill;
- ``peak_gpu_bytes``: the largest ``torch.cuda.max_memory_allocated`` over ranks against the GPU parts
  the caching allocator holds (``cost.memory.ALLOCATED_PARTS``: the model's ``gpu_peak_bytes`` less its
  ``framework`` part, CUDA context and allocator slack, which ``max_memory_allocated`` never counts).
  Reserved bytes are not used: under ZeRO-3 the allocator caches every gathered buffer it saw (19.6 GB reserved
  for 3.2 GB allocated on the 8B offload records), and it hands that cache back before it reports out-of-memory.

Method: every record is re-predicted from its plan and workload on the given profile (the prediction
stored in the record is ignored: it may come from another profile or an older model). The coefficients
in ``CANDIDATES`` are fitted in log space (a coefficient c = prior * exp(theta)) by
``scipy.optimize.least_squares`` on the log ratios predicted / measured of every record and metric,
within physical bounds (fractions in (0, 1], times and bytes in [prior/1000, prior*1000]), with a
Cauchy loss (robust to a run the model cannot explain) and a ridge pull toward the prior whose weight
depends on the prior's provenance (``prior_weight``: a measured number weighs more than an assumed
default), so that a coefficient the records barely constrain stays near its prior. A coefficient is
*fitted* when some record's prediction would move by ``SENSITIVITY_MIN`` (5%) somewhere within the
coefficient's bounds, and stays exactly at its prior otherwise (e.g. ``nvme_read`` without an NVMe
record): ``Calibration.support`` counts the records that move when the fitted value goes 10x either way,
``unidentified`` lists the rest.

Modules: ``measurements`` (a RunRecord's figures, re-predicted, and the errors), ``fit`` (the coefficients, their
priors and bounds, the fit, the held-out split), ``section`` (the profile's ``calibrated:`` block). Records are
read by ``hpi.records`` (``load_records``, ``RunRecord``).
"""

from hpi.planner.calibrate.fit import (
    CANDIDATES,
    Calibration,
    apply,
    calibrate,
    fit,
    prior_weight,
    split_by_plan,
)
from hpi.planner.calibrate.measurements import (
    METRICS,
    CalibrationError,
    ErrorSummary,
    Measurement,
    Prediction,
    measurement,
    plan_key,
    predict_measurements,
    run_conditions,
    summarize,
)
from hpi.planner.calibrate.section import render_section, replace_section, write_section, write_text_atomic

__all__ = [
    "CANDIDATES",
    "METRICS",
    "Calibration",
    "CalibrationError",
    "ErrorSummary",
    "Measurement",
    "Prediction",
    "apply",
    "calibrate",
    "fit",
    "measurement",
    "plan_key",
    "predict_measurements",
    "prior_weight",
    "run_conditions",
    "render_section",
    "replace_section",
    "split_by_plan",
    "summarize",
    "write_section",
    "write_text_atomic",
]
