"""hpi's planner: pure, fast, no torch. Name a model, a machine and a workload; get ranked plans.

    from hpi.planner import load_model, load_profile, Workload, Plan, predict, search
    est = predict(load_model("llama-3-70b"), load_profile("a6000-workstation"), Workload(), Plan(offload="cpu"))
"""

from hpi.planner.catalog import ModelConfigError, load_model, model_names
from hpi.planner.predict import Estimate, PlanError, predict, predict_many
from hpi.planner.profiles import ProfileError, load_profile, profile_names
from hpi.planner.search import SearchResult, SearchSpace, search
from hpi.planner.specs import ModelSpec, Plan, Workload
from hpi.planner.specs.hardware import HardwareProfile

__all__ = [
    "Estimate",
    "HardwareProfile",
    "ModelConfigError",
    "ModelSpec",
    "Plan",
    "PlanError",
    "ProfileError",
    "SearchResult",
    "SearchSpace",
    "Workload",
    "load_model",
    "load_profile",
    "model_names",
    "predict",
    "predict_many",
    "profile_names",
    "search",
]
