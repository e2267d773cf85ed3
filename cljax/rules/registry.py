"""The built-in variants: each name's rule factory, the settings it reads, its one-line help.

Everything that depends on the variant (the Config's checks, the CLI's `--help` and its report of
given flags a variant does not use, run names, sweep titles) asks this registry; nothing else
lists variants. A factory takes the run's `cljax.train.Config` and returns its `Rule`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

from cljax.rules import agem
from cljax.rules.base import Rule, independent, single
from cljax.rules.er import er
from cljax.rules.ewc import ewc
from cljax.rules.gem import gem
from cljax.rules.grouped import GROUPED_RULES, grouped

# The settings a variant may read besides the network, the data and the schedule (Config fields;
# "grouped" stands for all of `GroupedConfig`'s).
QP_SETTINGS = frozenset({"memory_strength", "eps", "qp_max_iter"})
RULE_SETTINGS = frozenset(
  {
    "n_memories",
    "memory_grads",
    "agem_ref",
    "replay_batch_size",
    "replay_buffer",
    "fisher",
    "finetune",
    "grouped",
    *QP_SETTINGS,
  }
)
AGEM_REFS = ("pooled", "task_mean")
# The task-mean A-GEM family: each variant is a (reference row, trigger, projection) preset.
AGEM_RULES = {
  "agem": ("mean", "reference", "conditional"),  # the A-GEM paper's rule (agem_ref task_mean)
  "agem_old": ("sum", "reference", "qp"),  # the seed's way 1
  "agem_new": ("mean", "per_task", "unconditional"),  # the seed's way 2
  "agem_qp_mean": ("mean", "per_task", "qp"),  # the seed's way 3
}


class Variant(NamedTuple):
  """A built-in variant (`VARIANTS`).

  make(config) -> Rule; reads(agem_ref, projection) -> the settings read. What a rule needs of
  the network it declares itself (`Rule.networks`, `Rule.hidden_units`).
  """

  name: str
  help: str
  make: Callable[[Any], Rule]
  reads: Callable[[str, str | None], frozenset[str]]


def agem_pieces(config: Any) -> tuple[str, str, str]:
  """(reference_row, trigger, projection) of a task-mean A-GEM family run: preset + overrides."""
  preset = AGEM_RULES[config.variant]
  overrides = (config.reference_row, config.trigger, config.projection)
  return tuple(o if o is not None else p for o, p in zip(overrides, preset, strict=True))


def composes(variant: str, agem_ref: str) -> bool:
  """Whether the variant is a (reference row, trigger, projection) composition to override."""
  return variant in AGEM_RULES and not (variant == "agem" and agem_ref == "pooled")


def _agem_family(config: Any) -> Rule:
  if config.variant == "agem" and config.agem_ref == "pooled":
    return agem.agem_rule(
      agem.pooled(config.replay_batch_size), agem.reference_trigger(), agem.conditional()
    )
  reference, trigger, projection = agem_pieces(config)
  qp_args = {"eps": config.eps, "max_iter": config.qp_max_iter} if projection == "qp" else {}
  return agem.agem_rule(
    agem.REFERENCES[reference](config.memory_grads),
    agem.TRIGGERS[trigger](),
    agem.PROJECTIONS[projection](**qp_args),
  )


def _family_reads(variant: str) -> Callable[[str, str | None], frozenset[str]]:
  def reads(agem_ref: str, projection: str | None) -> frozenset[str]:
    if variant == "agem" and agem_ref == "pooled":
      return frozenset({"n_memories", "agem_ref", "replay_batch_size"})
    qp = (projection or AGEM_RULES[variant][2]) == "qp"
    own = {"n_memories", "memory_grads", *(("agem_ref",) if variant == "agem" else ())}
    return frozenset(own | (QP_SETTINGS if qp else set()))

  return reads


def _grouped(kind: str) -> Callable[[Any], Rule]:
  def make(config: Any) -> Rule:
    return grouped(
      kind,
      config.grouped,
      config.n_hiddens,
      config.n_layers,
      eps=config.eps,
      max_iter=config.qp_max_iter,
    )

  return make


def _fixed(*names: str) -> Callable[[str, str | None], frozenset[str]]:
  return lambda agem_ref, projection: frozenset(names)


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

VARIANTS: dict[str, Variant] = {
  "single": Variant("single", "plain SGD on the current task", lambda c: single(), _fixed()),
  "independent": Variant(
    "independent",
    "one network of n_hiddens / n_tasks units per task, plain SGD (GEM's independent; "
    "--finetune yes starts network t from t - 1)",
    lambda c: independent(c.finetune == "yes"),
    _fixed("finetune"),
  ),
  "gem": Variant(
    "gem",
    "GEM: one row per past task, the dual QP (margin --memory_strength)",
    lambda c: gem(c.memory_grads, eps=c.eps, max_iter=c.qp_max_iter),
    _fixed("n_memories", "memory_grads", *QP_SETTINGS),
  ),
  "ewc": Variant(
    "ewc",
    "EWC: penalty --memory_strength / 2 * sum_k F_k (theta - theta_k)^2, F_k the diagonal Fisher "
    "on task k's memory (--fisher)",
    lambda c: ewc(c.fisher),
    _fixed("n_memories", "memory_strength", "fisher"),
  ),
  "er": Variant(
    "er",
    "experience replay: the batch joined with --replay_batch_size memory examples "
    "(--replay_buffer ring: past tasks' ring buffers; reservoir: one pool)",
    lambda c: er(c.replay_batch_size, c.replay_buffer),
    _fixed("n_memories", "replay_batch_size", "replay_buffer"),
  ),
  **{v: Variant(v, h, _agem_family, _family_reads(v)) for v, h in _FAMILY_HELP.items()},
  **{
    v: Variant(
      v,
      h,
      _grouped(v),
      _fixed("n_memories", "memory_grads", "grouped", "eps", "qp_max_iter")
      if v != "agem_grouped"
      else _fixed("n_memories", "memory_grads", "grouped"),
    )
    for v, h in _GROUPED_HELP.items()
  },
}
GROUPED_VARIANTS = GROUPED_RULES


def rule_for(config: Any) -> Rule:
  """The built-in rule of config.variant.

  memory_grads "auto" is taken as the MLP's "factored"; `cljax.train.make_train` resolves it for
  its network first (`cljax.train.resolve_config`).
  """
  if getattr(config, "memory_grads", None) == "auto":
    config = dataclasses.replace(config, memory_grads="factored")
  return VARIANTS[config.variant].make(config)


def settings_read(variant: str, agem_ref: str = "pooled", projection: str | None = None):
  """The RULE_SETTINGS the variant reads (with this agem_ref and projection override)."""
  return VARIANTS[variant].reads(agem_ref, projection)


def uses_qp(variant: str, projection: str | None = None) -> bool:
  """Whether a run reads GEM's QP margin memory_strength."""
  return "memory_strength" in settings_read(variant, "task_mean", projection)


def describe(variant: str, agem_ref: str | None) -> tuple[str, str]:
  """(the variant's name in run names, in titles): agem carries its reference gradient."""
  if variant == "agem" and agem_ref:
    return f"agem_{agem_ref}", f"agem (agem_ref {agem_ref})"
  return variant, variant
