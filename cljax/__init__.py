"""cljax: continual learning with GEM and A-GEM, functional and jit-compiled in JAX.

    stream = cljax.make_stream(cljax.load_dataset("fashion_mnist"), protocol="permutations",
                               n_tasks=10, samples_per_task=1000, seed=3)
    train = cljax.make_train(cljax.Config(), cljax.rules.make("agem_new"))
    result = jax.jit(train)(jax.random.key(3), stream)

The engine's settings are the `Config`; a rule's are its factory's arguments (the built-in ones
by name: `cljax.rules.make`). Any `cljax.rules.Rule` runs in the same engine:
`cljax.make_train(config, rule)`, and any Flax module: `cljax.make_train(config, rule,
network=cljax.networks.from_module(module, input_shape=(28, 28, 1), n_classes=10))`.
"""

from cljax import networks, rules, transforms
from cljax.data import Dataset, Split, load_dataset
from cljax.errors import CljaxError
from cljax.grouped.groups import group_param_weights, make_groupings
from cljax.grouped.relatedness import relatedness_divergence, von_neumann_divergence
from cljax.grouped.state import GroupedConfig
from cljax.metrics import format_seed_line, gem_stats, paper_stats
from cljax.models import MLP, make_mlp, param_count
from cljax.networks import Network, from_module
from cljax.projections import (
  GEMInfo,
  agem_project,
  gem_dual,
  gem_project,
  gem_terms,
  project_orthogonal,
  ravel,
  ravel_rows,
  tree_vdot,
  unravel_rows,
)
from cljax.qp import QPInfo, kkt_residuals, solve_box_qp
from cljax.rules import HParams, Rule, StepContext
from cljax.sweep import make_sweep
from cljax.tasks import TaskStream, eval_set, make_stream, train_batch
from cljax.train import Config, RunResult, make_train

__version__ = "0.1.0"

__all__ = [
  "MLP",
  "CljaxError",
  "Config",
  "Dataset",
  "GEMInfo",
  "GroupedConfig",
  "HParams",
  "Network",
  "QPInfo",
  "Rule",
  "RunResult",
  "Split",
  "StepContext",
  "TaskStream",
  "agem_project",
  "eval_set",
  "format_seed_line",
  "from_module",
  "gem_dual",
  "gem_project",
  "gem_stats",
  "gem_terms",
  "group_param_weights",
  "kkt_residuals",
  "load_dataset",
  "make_groupings",
  "make_mlp",
  "make_stream",
  "make_sweep",
  "make_train",
  "networks",
  "paper_stats",
  "param_count",
  "project_orthogonal",
  "ravel",
  "ravel_rows",
  "relatedness_divergence",
  "rules",
  "solve_box_qp",
  "train_batch",
  "transforms",
  "tree_vdot",
  "unravel_rows",
  "von_neumann_divergence",
]
