"""A plan knob, declared once: the metadata of one ``Plan`` field that everything else derives from.

Each field of ``hpi.planner.specs.plan.Plan`` is declared with ``knob(default, ...)``, which attaches a
``Knob`` to the dataclass field. From it come, with no second list of fields anywhere:

- the plan's own validation (``choices``, ``minimum``) and its label (``label``, in ``display_order``);
- the cost model's arrays (``vector``: ``hpi.planner.cost.inputs.Knobs`` holds one column per knob, a
  bool column per choice for a choice knob, none for a degree, which an arrangement shares);
- the search grid's columns (``hpi.planner.search``) and which knobs it may leave at their default
  (``applies``: a knob that changes nothing in a plan, like pinning where nothing is copied from host memory);
- the command line (``flag``, ``help``, ``metavar``, ``flag_derived``, ``search_axis``, ``named``: the
  plan flags of ``hpi.cli.args`` and their inverse, ``plan_flags``).

So adding a knob is one field with its ``knob(...)`` declaration, plus the cost term that reads its column.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import Any, Callable

KNOB = "knob"  # the key of a field's metadata that holds its Knob

GROUPS = ("build", "target", "runtime")
VECTORS = ("number", "switch", "one_hot", "degree")
NAMED = ("always", "changed", "applies", "never")


@dataclass(frozen=True)
class Knob:
    """What the planner, the cost model's arrays, the search and the command line know of one plan field."""

    # build: a run must be rebuilt for it (autotune's discrete plan); target: named with the workload on
    # the command line (``hpi.cli.args.add_target``: --batch); runtime: the rest. Labels and plan_flags list
    # the groups in this order, each in field order.
    group: str
    help: str | None = None  # the flag's help text (None: argparse shows none)
    unit: str = ""  # of the value: ranks, bits, sequences, elements, buffers; "" for a choice or a switch
    choices: tuple = ()  # the valid values, where they are a fixed set
    minimum: int | None = None  # the smallest valid value, where bounded
    flag: str | None = None  # on hpi's plan commands; a switch's "--x" comes with "--no-x"
    metavar: str | None = None
    flag_derived: bool = False  # the flag defaults to None and hpi.cli.args.plan_from_args derives the value
    search_axis: str | None = None  # the SearchSpace axis the flag restricts in hpi plan / hpi autotune
    vector: str = "number"  # number (float64 column), switch (bool column), one_hot, degree (no column)
    named: str = "changed"  # when plan_flags names it: always, changed (from the default), applies, never
    applies: str | None = None  # a Plan property: where it is False the knob changes nothing (None: always)
    label: str | Callable[[Any], str] | None = None  # the label's token: "tp{}" of the value, or of the plan

    def __post_init__(self) -> None:
        for name, value, allowed in (("group", self.group, GROUPS), ("vector", self.vector, VECTORS),
                                     ("named", self.named, NAMED)):
            if value not in allowed:
                raise ValueError(f"knob {name} {value!r} is not one of {', '.join(allowed)}")
        if self.vector == "one_hot" and not self.choices:
            raise ValueError("a one_hot knob needs its choices: one bool column per choice but the default")
        if self.named == "applies" and self.applies is None:
            raise ValueError("a knob named where it applies needs `applies`, the Plan property that says where")


def knob(default: Any, **spec: Any) -> Any:
    """A dataclass field declared as a plan knob: ``tp: int = knob(1, group="build", flag="--tp", ...)``."""
    return field(default=default, metadata={KNOB: Knob(**spec)})


@dataclass(frozen=True)
class KnobField:
    """One declared knob: its field's name and default, and its Knob."""

    name: str
    default: Any
    spec: Knob

    @property
    def one_hot(self) -> tuple[tuple[str, Any], ...]:
        """A choice knob's (column, choice) pairs: ``name_choice`` for each choice but the default."""
        return tuple((f"{self.name}_{c}", c) for c in self.spec.choices if c != self.default)

    @property
    def columns(self) -> tuple[str, ...]:
        """Its columns in ``hpi.planner.cost.inputs.Knobs``: one, one per choice but the default for a choice
        knob (``offload_cpu``, ``offload_nvme``), none for a degree."""
        if self.spec.vector == "degree":
            return ()
        if self.spec.vector == "one_hot":
            return tuple(col for col, _ in self.one_hot)
        return (self.name,)

    @property
    def dest(self) -> str:
        """Where argparse keeps its flag's value (``--quant-bits`` -> ``quant_bits``)."""
        return self.spec.flag.removeprefix("--").replace("-", "_") if self.spec.flag else self.name


@functools.cache
def knob_fields(plan_type: type) -> tuple[KnobField, ...]:
    """The knobs of a Plan dataclass, in field order; every field must be declared with ``knob``."""
    out = []
    for f in fields(plan_type):
        if KNOB not in f.metadata:
            raise TypeError(f"{plan_type.__name__}.{f.name} has no knob metadata: declare it with knob(default, ...)")
        out.append(KnobField(f.name, f.default, f.metadata[KNOB]))
    return tuple(out)


@functools.cache
def display_order(plan_type: type) -> tuple[KnobField, ...]:
    """The knobs by group (build, target, runtime), each group in field order: how labels and flags read."""
    return tuple(sorted(knob_fields(plan_type), key=lambda k: GROUPS.index(k.spec.group)))


@functools.cache
def degree_names(plan_type: type) -> tuple[str, ...]:
    """The knobs an arrangement shares (tp, pp, dp): no column in Knobs."""
    return tuple(k.name for k in knob_fields(plan_type) if k.spec.vector == "degree")


@functools.cache
def _by_name(plan_type: type) -> dict[str, KnobField]:
    return {k.name: k for k in knob_fields(plan_type)}


def knob_named(plan_type: type, name: str) -> KnobField:
    """The knob ``name`` of a Plan dataclass."""
    try:
        return _by_name(plan_type)[name]
    except KeyError:
        raise KeyError(f"{plan_type.__name__} has no knob {name!r}; knobs: {', '.join(_by_name(plan_type))}") from None
