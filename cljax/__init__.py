"""cljax: continual learning with GEM and A-GEM, functional and jit-compiled in JAX."""

from cljax.data import Dataset, Split, load_dataset
from cljax.errors import CljaxError
from cljax.grouped_state import GroupedConfig
from cljax.groups import group_param_weights, make_groupings
from cljax.metrics import format_seed_line, gem_stats, paper_stats
from cljax.models import MLP, make_mlp, param_count
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
from cljax.relatedness import relatedness_divergence, von_neumann_divergence
from cljax.tasks import TaskStream, eval_set, make_stream, train_batch

__version__ = "0.1.0"

__all__ = [
  "MLP",
  "CljaxError",
  "Dataset",
  "GEMInfo",
  "GroupedConfig",
  "QPInfo",
  "Split",
  "TaskStream",
  "agem_project",
  "eval_set",
  "format_seed_line",
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
  "paper_stats",
  "param_count",
  "project_orthogonal",
  "ravel",
  "ravel_rows",
  "relatedness_divergence",
  "solve_box_qp",
  "train_batch",
  "tree_vdot",
  "unravel_rows",
  "von_neumann_divergence",
]
