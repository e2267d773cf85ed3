"""Continual-learning rules as pluggable pieces (`Rule`: init / update / end_task).

    from cljax import rules
    rule = rules.agem_rule(rules.task_mean(), rules.per_task(), rules.unconditional())
    train = cljax.make_train(config, rule=rule)

Built in: `single`, `independent`, `gem`, the A-GEM family from its pieces (`agem_rule` of a
reference row, a trigger and a projection), the grouped variants (`grouped`), the baselines `ewc`
and `er`; `registry.VARIANTS` names them. What a rule needs of the network it declares
(`Rule.networks`, `Rule.hidden_units`): the engine never asks for a rule's name.
"""

from cljax.rules.agem import (
  Projection,
  Reference,
  Trigger,
  agem_rule,
  conditional,
  one_row_qp,
  per_task,
  pooled,
  qp,
  reference_trigger,
  task_mean,
  task_sum,
  unconditional,
)
from cljax.rules.base import (
  HParams,
  ProjectionStats,
  Rule,
  StepContext,
  TaskEndContext,
  closed_form_stats,
  independent,
  no_projection,
  qp_stats,
  single,
  stateless,
  when_past,
)
from cljax.rules.er import er
from cljax.rules.ewc import ewc
from cljax.rules.gem import gem
from cljax.rules.grouped import grouped

__all__ = [
  "HParams",
  "Projection",
  "ProjectionStats",
  "Reference",
  "Rule",
  "StepContext",
  "TaskEndContext",
  "Trigger",
  "agem_rule",
  "closed_form_stats",
  "conditional",
  "er",
  "ewc",
  "gem",
  "grouped",
  "independent",
  "no_projection",
  "one_row_qp",
  "per_task",
  "pooled",
  "qp",
  "qp_stats",
  "reference_trigger",
  "single",
  "stateless",
  "task_mean",
  "task_sum",
  "unconditional",
  "when_past",
]
