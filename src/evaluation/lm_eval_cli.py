"""``hpi-lm-eval``: lm-eval's own command line, with the models that installed packages declare in the
``lm_eval.models`` entry-point group registered first (hpi declares ``hpi``: pyproject.toml).

lm-eval releases that carry its plugin discovery (upstream pull request #4013, "runtime plugin registration for
model backends", group ``lm_eval.models``) find ``hpi`` by themselves, so ``lm_eval --model hpi`` works there.
lm-eval 0.4.13, the newest release on the package index, reads no entry points: its ``get_model`` only knows the
models its own ``lm_eval.models`` imports. This command registers the group's models in lm-eval's own registry
as lazy placeholders (the ``"module:attr"`` form 0.4.13 resolves, and upgrades to the class when the module's
``@register_model`` runs) and then hands the untouched command line to lm-eval's CLI, so every lm-eval flag
works as lm-eval documents it::

    hpi-lm-eval --model hpi --model_args url=http://127.0.0.1:8000,tokenizer=CKPT --tasks hpi_arith_mc \
        --include_path "$(python -c 'from hpi.evaluation.offline_tasks import TASKS_DIR; print(TASKS_DIR)')"
"""

from __future__ import annotations

ENTRY_POINT_GROUP = "lm_eval.models"


def register_entry_point_models() -> list[str]:
    """Register every ``lm_eval.models`` entry point lm-eval does not know yet; the names added."""
    from importlib.metadata import entry_points

    import lm_eval.models  # noqa: F401 - lm-eval's own models first: get_model imports them only into an empty registry
    from lm_eval.api.registry import model_registry

    added = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in model_registry:
            model_registry.register(ep.name, target=f"{ep.module}:{ep.attr}")
            added.append(ep.name)
    return added


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    register_entry_point_models()
    cli_evaluate()


if __name__ == "__main__":
    main()
