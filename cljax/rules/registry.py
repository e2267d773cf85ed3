"""The built-in rules by name: each name's factory, the settings it reads, its one-line help.

    rule = registry.make("gem", eps=1e-4)              # any setting not given: its default
    rule = registry.make("agem", agem_ref="task_mean")
    train = cljax.make_train(config, rule)

A built-in rule's settings are its factory's arguments; `SETTINGS` declares each once (default,
help, choices), and the command line takes them as its flags. Everything that depends on the
name (the command line's flags, its report of given flags a rule does not read, run names,
sweep titles) asks this registry; nothing else lists the built-in rules.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from cljax.errors import CljaxError
from cljax.grouped.state import GroupedConfig
from cljax.rules import agem
from cljax.rules.base import Rule, independent, single
from cljax.rules.er import BUFFERS as ER_BUFFERS
from cljax.rules.er import er
from cljax.rules.ewc import FISHERS, ewc
from cljax.rules.gem import gem
from cljax.rules.grouped import GROUPED_RULES, grouped

AGEM_REFS = ("pooled", "task_mean")
# The task-mean A-GEM family: each variant is a (reference row, trigger, projection) preset.
AGEM_RULES = {
  "agem": ("mean", "reference", "conditional"),  # the A-GEM paper's rule (agem_ref task_mean)
  "agem_old": ("sum", "reference", "qp"),  # the seed's way 1
  "agem_new": ("mean", "per_task", "unconditional"),  # the seed's way 2
  "agem_qp_mean": ("mean", "per_task", "qp"),  # the seed's way 3
}
REFERENCE_ROWS = tuple(agem.REFERENCES)
TRIGGERS = tuple(agem.TRIGGERS)
PROJECTIONS = tuple(agem.PROJECTIONS)
OVERRIDES = ("reference_row", "trigger", "projection")  # the A-GEM family's piece overrides


class Setting(NamedTuple):
  """A built-in rule's setting: its default, its flag's help text and choices.

  gem: one of GEM's own flags (listed with the seed's command line); minimum: the least value
  of a number (None: any finite one).
  """

  default: Any
  help: str
  choices: tuple[str, ...] | None = None
  gem: bool = False
  minimum: float | None = None


SETTINGS: dict[str, Setting] = {
  "agem_ref": Setting(
    "pooled",
    "agem's reference gradient: a sample of the pooled memory (the A-GEM paper) or the mean of "
    "the per-task memory gradients",
    AGEM_REFS,
  ),
  "replay_batch_size": Setting(
    10, "agem with --agem_ref pooled and er: examples sampled from the memory", gem=True, minimum=1
  ),
  "finetune": Setting(
    "no",
    "independent: network t starts as network t - 1 (yes) or from its own init",
    ("yes", "no"),
    gem=True,
  ),
  "replay_buffer": Setting(
    "ring",
    "er: GEM's ring buffer per task, sampled from the past tasks, or one reservoir over the stream",
    ER_BUFFERS,
  ),
  "fisher": Setting(
    "empirical",
    "ewc: the diagonal Fisher as the mean of squared per-example gradients (the EWC paper's) or "
    "the square of the mean memory gradient (the GEM code's)",
    FISHERS,
  ),
  "eps": Setting(1e-3, "ridge on the QP's Gram matrix (official GEM code: 1e-3)", minimum=0),
  "qp_max_iter": Setting(1000, "iteration cap of the QP solver", minimum=1),
  "reference_row": Setting(
    None,
    "A-GEM family: the reference row, the mean or the sum of the per-task memory gradients "
    "(default: the variant's preset, "
    + ", ".join(f"{v} = {'/'.join(r)}" for v, r in AGEM_RULES.items())
    + " as reference_row/trigger/projection)",
    REFERENCE_ROWS,
  ),
  "trigger": Setting(
    None,
    "A-GEM family: when g may change: <g, ref> < 0 (reference) or GEM's per-task check (per_task)",
    TRIGGERS,
  ),
  "projection": Setting(
    None,
    "A-GEM family: the paper's conditional projection, the unconditional removal of the ref "
    "component, or GEM's QP on the one row (margin --memory_strength)",
    PROJECTIONS,
  ),
  # Not a flag itself: the command line's grouped flags are GroupedConfig's fields.
  "grouped": Setting(
    GroupedConfig(), "the grouped variants' groups and relatedness (a GroupedConfig)"
  ),
}
# The engine's settings (`cljax.train.Config` fields) that only some rules read: a command line
# that gives one to a rule that does not read it is told so.
ENGINE_SETTINGS = frozenset({"n_memories", "memory_grads", "memory_strength"})
QP_SETTINGS = frozenset({"memory_strength", "eps", "qp_max_iter"})


class Variant(NamedTuple):
  """A built-in rule (`VARIANTS`).

  build(settings) -> Rule, settings every `SETTINGS` name -> value; reads(settings) -> the names
  (of SETTINGS and ENGINE_SETTINGS) it reads with these settings. What a rule needs of the
  network it declares itself (`Rule.networks`, `Rule.hidden_units`).
  """

  name: str
  help: str
  build: Callable[[Mapping[str, Any]], Rule]
  reads: Callable[[Mapping[str, Any]], frozenset[str]]


def agem_pieces(variant: str, settings: Mapping[str, Any]) -> tuple[str, str, str]:
  """(reference_row, trigger, projection) of a task-mean A-GEM family rule: preset + overrides."""
  preset = AGEM_RULES[variant]
  return tuple(
    settings.get(name) if settings.get(name) is not None else p
    for name, p in zip(OVERRIDES, preset, strict=True)
  )


def composes(variant: str, agem_ref: str) -> bool:
  """Whether the variant is a (reference row, trigger, projection) composition to override."""
  return variant in AGEM_RULES and not (variant == "agem" and agem_ref == "pooled")


def _agem_family(variant: str) -> Callable[[Mapping[str, Any]], Rule]:
  def build(s: Mapping[str, Any]) -> Rule:
    if not composes(variant, s["agem_ref"]):
      return agem.agem_rule(
        agem.pooled(s["replay_batch_size"]), agem.reference_trigger(), agem.conditional()
      )
    reference, trigger, projection = agem_pieces(variant, s)
    qp_args = {"eps": s["eps"], "max_iter": s["qp_max_iter"]} if projection == "qp" else {}
    return agem.agem_rule(
      agem.REFERENCES[reference](),
      agem.TRIGGERS[trigger](),
      agem.PROJECTIONS[projection](**qp_args),
    )

  return build


def _family_reads(variant: str) -> Callable[[Mapping[str, Any]], frozenset[str]]:
  def reads(s: Mapping[str, Any]) -> frozenset[str]:
    if not composes(variant, s["agem_ref"]):
      return frozenset({"n_memories", "agem_ref", "replay_batch_size"})
    qp = agem_pieces(variant, s)[2] == "qp"
    own = {"n_memories", "memory_grads", *OVERRIDES, *(("agem_ref",) if variant == "agem" else ())}
    return frozenset(own | (QP_SETTINGS if qp else set()))

  return reads


def _fixed(*names: str) -> Callable[[Mapping[str, Any]], frozenset[str]]:
  return lambda s: frozenset(names)


_FAMILY_HELP = {
  "agem": "A-GEM (the paper's): conditional projection on a pooled memory sample's gradient "
  "(--agem_ref pooled) or the mean of the per-task memory gradients (task_mean)",
  "agem_old": "the seed's way 1: GEM's QP on the sum of the per-task memory gradients",
  "agem_new": "the seed's way 2: remove the mean row's component when some <g, r_k> < 0",
  "agem_qp_mean": "the seed's way 3: GEM's QP on the mean row under GEM's per-task check",
}
_GROUPED_HELP = {
  "gem_grouped": "GEM's QP (margin 0) over the relatedness-weighted grouped rows",
  "agem_grouped": "A-GEM's conditional projection on the mean grouped row",
  "agem_qp_grouped": "the seed's grouped attempt: the mean grouped row into GEM's QP",
}
_GROUPED_QP = ("n_memories", "memory_grads", "grouped", "eps", "qp_max_iter")

VARIANTS: dict[str, Variant] = {
  "single": Variant("single", "plain SGD on the current task", lambda s: single(), _fixed()),
  "independent": Variant(
    "independent",
    "one network of n_hiddens / n_tasks units per task, plain SGD (GEM's independent; "
    "--finetune yes starts network t from t - 1)",
    lambda s: independent(s["finetune"] == "yes"),
    _fixed("finetune"),
  ),
  "gem": Variant(
    "gem",
    "GEM: one row per past task, the dual QP (margin --memory_strength)",
    lambda s: gem(eps=s["eps"], max_iter=s["qp_max_iter"]),
    _fixed("n_memories", "memory_grads", *QP_SETTINGS),
  ),
  "ewc": Variant(
    "ewc",
    "EWC: penalty --memory_strength / 2 * sum_k F_k (theta - theta_k)^2, F_k the diagonal Fisher "
    "on task k's memory (--fisher)",
    lambda s: ewc(s["fisher"]),
    _fixed("n_memories", "memory_strength", "fisher"),
  ),
  "er": Variant(
    "er",
    "experience replay: the batch joined with --replay_batch_size memory examples "
    "(--replay_buffer ring: past tasks' ring buffers; reservoir: one pool)",
    lambda s: er(s["replay_batch_size"], s["replay_buffer"]),
    _fixed("n_memories", "replay_batch_size", "replay_buffer"),
  ),
  **{v: Variant(v, h, _agem_family(v), _family_reads(v)) for v, h in _FAMILY_HELP.items()},
  **{
    v: Variant(
      v,
      h,
      lambda s, v=v: grouped(v, s["grouped"], eps=s["eps"], max_iter=s["qp_max_iter"]),
      _fixed(*_GROUPED_QP) if v != "agem_grouped" else _fixed(*_GROUPED_QP[:3]),
    )
    for v, h in _GROUPED_HELP.items()
  },
}
GROUPED_VARIANTS = GROUPED_RULES


def _check(name: str, value: Any) -> None:
  setting = SETTINGS[name]
  if setting.choices is not None:
    if value not in setting.choices and not (value is None and setting.default is None):
      raise CljaxError(f"unknown {name} {value!r}: choose one of {', '.join(setting.choices)}.")
  elif isinstance(setting.default, GroupedConfig):
    if not isinstance(value, GroupedConfig):
      raise CljaxError(
        f"grouped must be a cljax.grouped.state.GroupedConfig, got {type(value).__name__}."
      )
  else:  # a number; non-finite refused: nan passes every comparison and the run would diverge
    whole = isinstance(setting.default, int)
    kind = "an int" if whole else "a finite number"
    ok = isinstance(value, numbers.Integral if whole else numbers.Real)
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value < setting.minimum:
      raise CljaxError(f"{name} must be {kind} >= {setting.minimum:g}, got {value!r}.")


def _with_defaults(given: Mapping[str, Any]) -> dict[str, Any]:
  return {**{name: s.default for name, s in SETTINGS.items()}, **given}


def settings(variant: str, **given: Any) -> dict[str, Any]:
  """Every `SETTINGS` name -> its value for a rule: the given ones checked, the rest defaults.

  Raises:
    CljaxError: an unknown variant or setting, a bad value, or a setting the variant does not
      read with these settings (one line).
  """
  if variant not in VARIANTS:
    raise CljaxError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}.")
  unknown = sorted(set(given) - set(SETTINGS))
  if unknown:
    raise CljaxError(
      f"{variant} has no setting {unknown[0]!r}: the built-in rules' settings are "
      f"{', '.join(SETTINGS)}."
    )
  for name, value in given.items():
    _check(name, value)
  full = _with_defaults(given)
  reads = VARIANTS[variant].reads(full)
  for name in given:
    if name not in reads and given[name] != SETTINGS[name].default:
      what = describe(variant, full["agem_ref"])[1]
      if name in OVERRIDES:
        raise CljaxError(
          f"{name} applies to the task-mean A-GEM family ({', '.join(AGEM_RULES)}; agem with "
          f"agem_ref task_mean), not to {what}."
        )
      own = sorted(reads & set(SETTINGS))
      raise CljaxError(f"{what} does not read {name} (it reads {', '.join(own) or 'none'}).")
  return full


def make(variant: str, **given: Any) -> Rule:
  """The built-in rule `variant` with the given settings (`SETTINGS`; the rest at defaults).

  Raises:
    CljaxError: as `settings`, one line.
  """
  full = settings(variant, **given)  # checks the name first
  return VARIANTS[variant].build(full)


def settings_read(variant: str, **given: Any) -> frozenset[str]:
  """The SETTINGS and ENGINE_SETTINGS names the variant reads with these settings."""
  return VARIANTS[variant].reads(_with_defaults(given))


def uses_qp(variant: str, projection: str | None = None) -> bool:
  """Whether a run reads GEM's QP margin memory_strength."""
  return "memory_strength" in settings_read(variant, agem_ref="task_mean", projection=projection)


def describe(variant: str, agem_ref: str | None) -> tuple[str, str]:
  """(the variant's name in run names, in titles): agem carries its reference gradient."""
  if variant == "agem" and agem_ref:
    return f"agem_{agem_ref}", f"agem (agem_ref {agem_ref})"
  return variant, variant
