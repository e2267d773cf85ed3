"""The projections as optax gradient transformations, for a user's own training loop.

    tx = optax.chain(cljax.transforms.agem(), optax.sgd(lr))
    updates, opt_state = tx.update(g, opt_state, params, reference=ref)

    tx = optax.chain(cljax.transforms.gem(margin=0.5), optax.sgd(lr))
    updates, opt_state = tx.update(g, opt_state, params, memory_grads=rows, mask=past)

The memory gradients come as optax extra args (`optax.GradientTransformationExtraArgs`; `chain`
passes them to every transformation that takes them): `reference` a pytree like g, `memory_grads`
a pytree of (t, ...) rows. Both transformations keep no state.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from cljax.projections import agem_project, gem_project, project_orthogonal

PyTree = Any


def agem(*, conditional: bool = True) -> optax.GradientTransformationExtraArgs:
  """A-GEM: g - min(0, <g, ref>) / |ref|^2 ref (conditional=False: remove the ref component).

  Extra arg: reference, the reference gradient (a pytree like the updates).
  """

  def update(updates, state, params=None, *, reference: PyTree, **extra):
    del params, extra
    project = agem_project if conditional else project_orthogonal
    return project(updates, reference), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def gem(
  *, margin: float | jax.Array = 0.5, eps: float = 1e-3, max_iter: int = 1000
) -> optax.GradientTransformationExtraArgs:
  """GEM: g + R'v, v the dual QP's solution (`cljax.projections.gem_project`), v >= margin.

  Extra args: memory_grads, the rows R (a pytree of (t, ...) leaves); mask, optional (t,) bool
  of the rows in use; margin, optional, overrides the one given here (e.g. a traced one).
  """

  def update(updates, state, params=None, *, memory_grads: PyTree, mask=None, **extra):
    del params
    m = extra.get("margin", margin)
    g_new, _ = gem_project(updates, memory_grads, margin=m, mask=mask, eps=eps, max_iter=max_iter)
    return g_new, state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
