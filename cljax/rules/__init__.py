"""Continual-learning rules as pluggable pieces (`Rule`: init / update / end_task).

    from cljax import rules
    rule = rules.agem_rule(rules.task_mean(), rules.per_task(), rules.unconditional())
    train = cljax.make_train(config, rule)
    train = cljax.make_train(config, rules.make("gem", eps=1e-4))   # a built-in one by name

Built in: `single`, `independent`, `gem`, the A-GEM family from its pieces (`agem_rule` of a
reference row, a trigger and a projection), the grouped variants (`grouped`), the baselines `ewc`
and `er`; `registry.VARIANTS` names them and `make` (`registry.make`) builds one by name with its
settings (`registry.SETTINGS`). What a rule needs of the network it declares
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
  Counters,
  HParams,
  Rule,
  StepContext,
  TaskEndContext,
  independent,
  projection_counters,
  qp_counters,
  single,
  stateless,
  when_past,
)
from cljax.rules.er import er
from cljax.rules.ewc import ewc
from cljax.rules.gem import gem
from cljax.rules.grouped import grouped
from cljax.rules.registry import make

__all__ = [
  "Counters",
  "HParams",
  "Projection",
  "Reference",
  "Rule",
  "StepContext",
  "TaskEndContext",
  "Trigger",
  "agem_rule",
  "conditional",
  "er",
  "ewc",
  "gem",
  "grouped",
  "independent",
  "make",
  "one_row_qp",
  "per_task",
  "pooled",
  "projection_counters",
  "qp",
  "qp_counters",
  "reference_trigger",
  "single",
  "stateless",
  "task_mean",
  "task_sum",
  "unconditional",
  "when_past",
]
