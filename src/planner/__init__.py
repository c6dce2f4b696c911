"""hpi's planner: pure, fast, no torch. Name a model, a machine and a workload; get ranked plans.

    from planner import load_model, load_profile, Workload, Plan, predict, search
    est = predict(load_model("llama-3-70b"), load_profile("a6000-workstation"), Workload(), Plan(offload="cpu"))
"""

from planner.catalog import ModelConfigError, load_model, model_names
from planner.predict import Estimate, PlanError, predict, predict_many
from planner.profiles import ProfileError, load_profile, profile_names
from planner.search import SearchResult, SearchSpace, search
from planner.specs import ModelSpec, Plan, Workload
from planner.specs.hardware import HardwareProfile

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
