"""Named torch.compile (inductor) option sets and the strict ``--option-sets`` syntax of
``benchmarks/compile_decode.py``, which compiles the decode step under each of them from scratch (issue 20).

Option sets (``OPTION_SETS``; ``--option-sets`` names them, or writes new ones, see ``parse_option_sets``). Each
changes ``torch/_inductor/config.py`` settings on top of nothing (torch.compile's ``options=``):
- ``cdt``: ``coordinate_descent_tuning`` (what ``hpi run`` compiled with until 2026-12-05). A batch-1 matrix
  product becomes a tuned reduction (``decomposition.py``, ``mm``), and every Triton kernel's config is walked one
  field at a time to the fastest neighbour.
- ``cdt-all``: also ``coordinate_descent_check_all_directions``: when the walk stops, every combination of the
  fields' neighbour values is timed too (``check_all_tuning_directions``): a wider search that can leave a
  local optimum a noisy timing stopped at. What ``hpi run`` compiled with from the compiles of
  benchmarks/results/2026-12-05-h200-issue20 until 2026-12-08.
- ``cdt-r2``: also ``coordinate_descent_search_radius`` 2: each field's neighbours reach two powers of two
  away instead of one (``get_neighbour_values``): a wider walk.
- ``cdt-maxpw``: also ``max_autotune_pointwise``: the walk starts from the fastest of inductor's longer list of
  pointwise and reduction configs (``runtime/triton_heuristics.py``) instead of its first heuristic config.
- ``cdt-prof``: also ``use_torch_profiler_benchmarker``: each tuning timing is the kernel's device time from the
  profiler (``TorchProfilerBenchmarker``) instead of the least of up to 100 CUDA-event pairs around single
  launches of a 5-20 µs kernel (``InductorBenchmarker.benchmark_gpu``): less noisy timings, so the 0.1% steps
  of the walk follow the kernel more than the timer. Inductor reads this setting once, at import
  (``runtime/benchmarking.py``, ``benchmarker``), so compile_decode.py swaps the tuning's benchmarker for the compile
  itself (``_benchmarker``).
- ``cdt-all-mm``: ``cdt-all`` and ``max_autotune_gemm``: every matrix product with more than one row (a batch-16
  step's) is timed against inductor's Triton GEMM templates besides cuBLAS and the fastest kept
  (``max_autotune_gemm_backends``, ATEN and TRITON by default). Why: on one H100 the compiled batch-16 step's GEMMs
  ran in cuBLAS's 16-row kernels with split-K reductions at 0.83 of the HBM copy rate, where batch 1's tuned
  reductions ran near it: 7.51 against 5.84 ms (benchmarks/results/2026-12-05-issue20-leaf-agreement,
  call1/kernels.txt). Not yet compiled on a GPU: longer compiles (each GEMM shape is benchmarked).
- ``cdt-all-pdl``: ``cdt-all`` and ``triton.enable_pdl``: on Hopper and later every inductor kernel is a
  programmatic dependent launch that waits (``gdc_wait``) before its first load of what the kernel before wrote and
  signals its own dependents after its loads (``codegen/triton.py``): a decode step of ~20 small kernels a layer
  pays each kernel's ramp and tail less, and hpi's few-row products (``compiled_skinny_pdl``) may start reading
  their weights while the kernel before still finishes. On one H100 the 8B's compiled batch-16 step took 6.648 ms
  under it against 6.639 under ``cdt-all`` (benchmarks/results/2026-12-06-pdl, call 1): no gain. torch 2.11 (the
  device image) and 2.13 have the setting; a torch without it is refused by name (``_check``).
- ``cdt-all-combo``: ``cdt-all`` and ``combo_kernels``: inductor's scheduler joins independent kernels of a graph
  (no data flows between them) into one launch whose programs branch on their id to each one's code
  (``codegen/triton_combo_kernel.py``, ``ComboKernel``). On one H100 it joined each layer's two rotary kernels, the
  cache write and the mask into one: the 8B's compiled batch-1 step ran 299 launches instead of 390 and took 5.638
  against 5.738 ms (benchmarks/results/2026-12-07-fewer-kernels, call 2, one compile each), then 5.619 against 5.665
  ms, and at batch 16 6.508 against 6.507 ms (benchmarks/results/2026-12-08-combo). ``hpi.executor.graphs.
  COMPILE_OPTIONS`` (what ``hpi run`` compiles with; ``DEFAULT_SET``, the default) since then.
- ``plain``: no option: cuBLAS for the batch-1 products and heuristic kernel configs (a reduction with several
  candidate configs is still timed once among them): the control for how much of the step, and of the
  spread, the tuning brings.
No repetition knob helps: ``inductor_default_autotune_rep`` exists, but ``CachingAutotuner.bench`` passes
``rep=40`` and ``InductorBenchmarker.benchmark_gpu`` ignores it (up to 100 launches, 25 ms at most).
"""

from __future__ import annotations

import contextlib
import re

import torch

from hpi.executor.graphs import COMPILE_OPTIONS

# Named inductor option sets (the module docstring says what each changes); DEFAULT_SET is hpi run's own.
CDT = {"coordinate_descent_tuning": True}
OPTION_SETS: dict[str, dict] = {
    "cdt": dict(CDT),
    "cdt-all": {**CDT, "coordinate_descent_check_all_directions": True},
    "cdt-r2": {**CDT, "coordinate_descent_search_radius": 2},
    "cdt-maxpw": {**CDT, "max_autotune_pointwise": True},
    "cdt-prof": {**CDT, "use_torch_profiler_benchmarker": True},
    "cdt-all-mm": {**CDT, "coordinate_descent_check_all_directions": True, "max_autotune_gemm": True},
    "cdt-all-pdl": {**CDT, "coordinate_descent_check_all_directions": True, "triton.enable_pdl": True},
    "cdt-all-combo": {**CDT, "coordinate_descent_check_all_directions": True, "combo_kernels": True},
    "plain": {},
}
DEFAULT_SET = next(name for name, options in OPTION_SETS.items() if options == COMPILE_OPTIONS)
# The tuning's timer, swapped per compile by compile_decode.py (``_benchmarker``): inductor reads the setting once, at
# import (torch/_inductor/runtime/benchmarking.py, ``benchmarker = _make_default_benchmarker()``).
PROFILER = "use_torch_profiler_benchmarker"
# Settings read once at import that this script cannot change per compile: set them for the whole call instead.
IMPORT_TIME = {"use_experimental_benchmarker": "TORCHINDUCTOR_USE_EXPERIMENTAL_BENCHMARKER"}

_NAME = re.compile(r"[A-Za-z0-9_-]+")
SYNTAX = 'NAME or NAME={KEY:VALUE,...} separated by ";", e.g. "cdt;r3={coordinate_descent_tuning:true,' \
         'coordinate_descent_search_radius:3};plain"'


# ---- option sets ----------------------------------------------------------------------------------------------
def _value(key: str, text: str, default):
    """``text`` as the type of the config's ``default``: true/false for a bool, a literal for a number."""
    if isinstance(default, bool) or (default is None and text in ("true", "false")):
        if text not in ("true", "false"):
            raise ValueError(f"{key}:{text}: {key} is a bool: write {key}:true or {key}:false")
        return text == "true"
    if isinstance(default, (int, float)) or default is None:
        for kind in ((int,) if isinstance(default, int) else (int, float)):
            with contextlib.suppress(ValueError):
                return kind(text)
        if default is not None:
            kind = "an integer" if isinstance(default, int) else "a number"
            raise ValueError(f"{key}:{text}: {key} takes {kind}: write one, e.g. {key}:{default}")
    if isinstance(default, str) or default is None:
        return text
    raise ValueError(f"{key}: a {type(default).__name__} setting cannot be written here: choose a bool, number "
                     "or string setting of torch/_inductor/config.py")


def _options(name: str, body: str, known: dict) -> dict:
    """``KEY:VALUE,...`` (the text between the braces) as torch.compile options, each key a setting of
    ``torch._inductor.config`` (``known``) and each value of its type."""
    options: dict = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, text = (s.strip() for s in item.partition(":"))
        if not sep or not key or not text:
            raise ValueError(f"{name}: {item!r} is not KEY:VALUE: write e.g. coordinate_descent_tuning:true")
        if key in options:
            raise ValueError(f"{name}: {key} is given twice: keep one")
        options[key] = _value(key, text, known.get(key))
    return options


def _check(name: str, options: dict, known: dict) -> dict:
    """``options`` if this torch can apply each of them to one compile; else ValueError naming the fix."""
    for key in options:
        if key not in known:
            raise ValueError(f"{name}: {key} is not a setting of torch._inductor.config (torch "
                             f"{torch.__version__}): check the spelling in torch/_inductor/config.py")
        if key in IMPORT_TIME:
            raise ValueError(f"{name}: {key} is read once, at import, so it cannot change per compile: drop it and "
                             f"set {IMPORT_TIME[key]} in the environment of the whole call")
    if options.get(PROFILER):
        from torch._inductor.runtime import benchmarking

        if not hasattr(benchmarking, "TorchProfilerBenchmarker"):
            raise ValueError(f"{name}: torch {torch.__version__} has no TorchProfilerBenchmarker "
                             f"(torch/_inductor/runtime/benchmarking.py): drop the set, or {PROFILER}")
    return options


def parse_option_sets(text: str) -> dict[str, dict]:
    """``--option-sets``: entries separated by ``;``, each a name of ``OPTION_SETS`` or ``NAME={KEY:VALUE,...}``
    (``NAME={}``: no option). Raises ValueError naming the fix, also for a setting this torch lacks."""
    from torch._inductor import config

    known = config.get_config_copy()
    sets: dict[str, dict] = {}
    entries = [e.strip() for e in text.split(";")]
    if not any(entries):
        raise ValueError(f"{text!r} names no set: write {SYNTAX}")
    for entry in entries:
        name, sep, body = (s.strip() for s in entry.partition("="))
        if not _NAME.fullmatch(name):
            raise ValueError(f"{entry!r}: a set's name is letters, digits, '-' or '_': write {SYNTAX}")
        if name in sets:
            raise ValueError(f"{name} is named twice: give each set its own name")
        if not sep:
            if name not in OPTION_SETS:
                raise ValueError(f"{name} is not a named set ({', '.join(OPTION_SETS)}): name one, or write "
                                 f"{name}={{KEY:VALUE,...}}")
            sets[name] = _check(name, dict(OPTION_SETS[name]), known)
            continue
        if not (body.startswith("{") and body.endswith("}")):
            raise ValueError(f"{entry!r}: the options go between braces: write {name}={{KEY:VALUE,...}}")
        sets[name] = _check(name, _options(name, body[1:-1], known), known)
    return sets
