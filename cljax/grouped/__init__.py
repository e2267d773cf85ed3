"""Grouped GEM with task relatedness: the pieces of the grouped rules (`cljax.rules.grouped`).

- `relatedness`: von Neumann divergences of the tasks' covariances, per group of hidden units;
- `groups`: groups of hidden units (clusters of similar units, random, one per unit) and the
  per-parameter weights they give;
- `rows`: the grouped rows g_k * w_k from per-example gradient factors, never formed;
- `state`: `GroupedConfig` and the run's `GroupedState` (observed each step, frozen per task).
"""
