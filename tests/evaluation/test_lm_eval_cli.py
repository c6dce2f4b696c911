"""The hpi model reaches lm-eval through the lm_eval.models entry-point group: declared in the installed metadata,
registered by hpi-lm-eval beside lm-eval's own models (which stay)."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

pytest.importorskip("lm_eval")


def test_the_installed_distribution_declares_the_hpi_model_in_lm_evals_group():
    (ep,) = [ep for ep in entry_points(group="lm_eval.models") if ep.name == "hpi"]
    from hpi.evaluation.lm import HpiLM

    assert ep.value == "hpi.evaluation.lm:HpiLM" and ep.load() is HpiLM


def test_registering_the_group_adds_hpi_and_keeps_lm_evals_own_models():
    from lm_eval.api.registry import get_model, model_registry

    from hpi.evaluation.lm import HpiLM
    from hpi.evaluation.lm_eval_cli import register_entry_point_models

    register_entry_point_models()
    assert get_model("hpi") is HpiLM
    assert get_model("hf").__name__ == "HFLM" and "local-completions" in model_registry
    assert register_entry_point_models() == []  # known names are left alone
