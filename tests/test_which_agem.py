"""The math behind "which A-GEM is correct" (experiments/which_agem.py), statement by statement.

The paper's A-GEM is the conditional projection g~ = g - min(0, <g, r>) / |r|^2 r. The seed's
three ways differ from it in (a) the reference row (sum vs mean), (b) the QP's margin,
(c) the trigger (any per-task conflict vs conflict with the reference) and (d) unconditional vs
conditional projection. Each test below checks one statement of the report; the run-level tests
check that the engine's rule presets compose exactly these parts.
"""

import conftest
import jax
import jax.numpy as jnp
import numerics
import numpy as np
import pytest

from cljax import run_setup as setup
from cljax.errors import CljaxError
from cljax.projections import agem_project, gem_project, project_orthogonal
from cljax.rules import registry
from cljax.rules.registry import AGEM_RULES

P = 50


def _vectors(seed, n=1):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=P), jnp.float32) for _ in range(n)]


def _conflicting(seed):
  """(g, r) with <g, r> < 0."""
  g, r = _vectors(seed, 2)
  return (g, r) if jnp.vdot(g, r) < 0 else (-g, r)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("scale", [0.1, 3.0, 9.0])
def test_a_projection_depends_on_the_reference_direction_only(seed, scale):
  # (a) the sum of t per-task rows is t x their mean: the same direction, the same projection.
  g, r = _vectors(seed, 2)
  for fn in (agem_project, project_orthogonal):
    np.testing.assert_allclose(fn(g, scale * r), fn(g, r), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_a_b_one_row_qp_is_the_conditional_projection_at_margin_zero(seed):
  # (a, b) GEM's QP on one row r: v* = max(m, -<g, r> / (|r|^2 + eps)), g~ = g + v* r. At m = 0,
  # eps = 0 it is A-GEM's conditional projection, whatever r's scale (sum or mean).
  g, r = _conflicting(seed)
  for scale in (1.0, 9.0):
    g_qp, info = gem_project(g, (scale * r)[None], margin=0.0, eps=0.0)
    assert bool(info.projected)
    np.testing.assert_allclose(g_qp, agem_project(g, r), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("margin", [0.5, 10.0])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_b_one_row_qp_closed_form(seed, margin, eps):
  # (b) the margin: v* = max(m, -<g, r> / (|r|^2 + eps)); a sum row c r gets a push m c r, i.e.
  # t times the mean row's when c = t.
  g, r = _conflicting(seed)
  for scale in (1.0, 9.0):
    row = scale * r
    v = max(margin, float(-jnp.vdot(g, row) / (jnp.vdot(row, row) + eps)))
    g_qp, _ = gem_project(g, row[None], margin=margin, eps=eps)
    np.testing.assert_allclose(g_qp, g + v * row, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", range(5))
def test_b_margin_moves_a_gradient_without_conflict(seed):
  # (b) when the QP runs on a non-conflicting g (<g, r> >= 0, e.g. under GEM's per-task trigger),
  # v >= m > 0 adds m r: the update moves along the memory gradient although nothing conflicts.
  g, r = _conflicting(seed)
  g = -g  # now <g, r> > 0
  g_qp, info = gem_project(g, r[None], margin=10.0, eps=1e-3, trigger=jnp.asarray(True))
  assert not bool(info.violated) and bool(info.projected)
  np.testing.assert_allclose(g_qp, g + 10.0 * r, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(agem_project(g, r), g)  # the paper's rule leaves it alone


@pytest.mark.parametrize("seed", range(20))
def test_c_a_reference_conflict_implies_a_per_task_conflict(seed):
  # (c) <g, mean_k r_k> < 0 means sum_k <g, r_k> < 0, so some <g, r_k> < 0: GEM's per-task trigger
  # fires whenever the reference trigger does (and, below, also when it does not).
  rng = np.random.default_rng(seed)
  rows = rng.normal(size=(int(rng.integers(2, 8)), P))
  g = rng.normal(size=P)
  reference = g @ rows.mean(0) < 0
  per_task = np.any(rows @ g < 0)
  assert per_task or not reference


def test_c_per_task_trigger_fires_without_a_reference_conflict():
  g = jnp.asarray([1.0, 0.0])
  rows = jnp.asarray([[-0.2, 1.0], [3.0, 0.0]])  # <g, r_0> < 0, <g, mean> > 0
  assert bool(jnp.any(rows @ g < 0)) and float(g @ rows.mean(0)) > 0
  np.testing.assert_array_equal(agem_project(g, rows.mean(0)), g)  # the paper: no change


@pytest.mark.parametrize("seed", range(5))
def test_d_unconditional_removal_equals_the_projection_on_conflict(seed):
  # (d) with <g, r> < 0 the two rules agree ...
  g, r = _conflicting(seed)
  np.testing.assert_allclose(project_orthogonal(g, r), agem_project(g, r), rtol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_d_unconditional_removal_discards_helpful_transfer(seed):
  # (d) ... with <g, r> > 0 the unconditional rule removes a component that lowers the memory loss
  # to first order (<g~, r> = 0 < <g, r>); the conditional rule keeps g.
  g, r = _conflicting(seed)
  g = -g
  g_new = project_orthogonal(g, r)
  assert float(jnp.vdot(g, r)) > 0
  assert abs(float(jnp.vdot(g_new, r))) < 1e-4 * float(jnp.linalg.norm(g) * jnp.linalg.norm(r))
  np.testing.assert_array_equal(agem_project(g, r), g)


# Run level: the engine's presets are compositions of (a)-(d).


@pytest.fixture(scope="module")
def stream(real_stream):
  return real_stream


def _run(stream, **kw):
  """The engine tests' run (`conftest.engine_config`, margin 0.5), task-mean reference."""
  ref = {"agem_ref": "task_mean"} if kw["variant"] == "agem" else {}
  return conftest.engine_run(stream, conftest.engine_config(**ref, **kw))


# Two programs computing the same update agree to rounding only: runs are compared over their
# 900 steps with `numerics.trajectory_atol`, and their projection counts exactly (no trigger
# flipped, so the trajectories did not branch apart).
STEPS = conftest.ENGINE_TASKS * conftest.ENGINE_SAMPLES


def _same_run(a, b, *, same_triggers=True):
  numerics.assert_trees_close_after(a.params, b.params, steps=STEPS)
  if same_triggers:
    np.testing.assert_array_equal(a.counters["projections"], b.counters["projections"])


def _different_runs(a, b):
  """Further apart than rounding can explain, somewhere."""
  far = [
    np.max(np.abs(np.asarray(x) - np.asarray(y))) > numerics.trajectory_atol(y, STEPS)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True)
  ]
  assert any(far)


def test_presets_are_the_documented_parts():
  assert AGEM_RULES == {
    "agem": ("mean", "reference", "conditional"),
    "agem_old": ("sum", "reference", "qp"),
    "agem_new": ("mean", "per_task", "unconditional"),
    "agem_qp_mean": ("mean", "per_task", "qp"),
  }


@pytest.mark.realdata
@pytest.mark.parametrize("override", [{"trigger": "reference"}, {"projection": "conditional"}])
def test_way_2_with_either_part_fixed_is_the_papers_rule(stream, override):
  # (c) + (d): under the reference trigger the unconditional removal is the conditional
  # projection; and the conditional projection changes g only on a reference conflict, which
  # implies a per-task conflict, so under GEM's per-task trigger it is the paper's rule too.
  paper = _run(stream, variant="agem")
  ablated = _run(stream, variant="agem_new", **override)
  _same_run(ablated, paper)
  assert int(paper.counters["projections"].sum()) > 0
  way2 = _run(stream, variant="agem_new")  # both changes together: a different rule
  assert int(way2.counters["projections"].sum()) > int(paper.counters["projections"].sum())


@pytest.mark.realdata
@pytest.mark.parametrize("way", ["agem_old", "agem_qp_mean"])
def test_ways_1_and_3_at_margin_zero_are_the_papers_rule(stream, way):
  # (a) + (b) for way 1: the summed row in a margin-0, ridge-0 QP is the paper's projection; (b)
  # + (c) for way 3: without its margin the one-row QP is the conditional projection, and the
  # per-task trigger only adds steps where it returns v = 0. With the margin: other runs.
  # Way 3 counts those v = 0 steps as projections, so only way 1's counters match the paper's.
  paper = _run(stream, variant="agem")
  at_zero = _run(stream, variant=way, memory_strength=0.0, eps=0.0)
  _same_run(at_zero, paper, same_triggers=way == "agem_old")
  _different_runs(_run(stream, variant=way), paper)


@pytest.mark.realdata
def test_the_papers_rule_is_neither_gem_nor_way_2(stream):
  paper = _run(stream, variant="agem")
  _different_runs(_run(stream, variant="gem", memory_strength=0.0), paper)
  _different_runs(_run(stream, variant="agem_new"), paper)


@pytest.mark.realdata
def test_sum_and_mean_rows_differ_only_through_the_margin(stream):
  # (a) with a margin the sum row pushes t times harder: different runs; at margin 0, the same.
  for ms, same in ((0.0, True), (0.5, False)):
    s = _run(stream, variant="agem_old", memory_strength=ms, eps=0.0)
    m = _run(stream, variant="agem_old", reference_row="mean", memory_strength=ms, eps=0.0)
    (_same_run if same else _different_runs)(s, m)


@pytest.mark.parametrize(
  "kw,message",
  [
    ({"variant": "gem", "trigger": "reference"}, "applies to the task-mean A-GEM family"),
    ({"variant": "agem", "agem_ref": "pooled", "projection": "qp"}, r"to agem \(agem_ref pooled"),
    ({"variant": "agem_new", "projection": "sideways"}, "unknown projection 'sideways'"),
    ({"variant": "agem_old", "reference_row": "median"}, "unknown reference_row 'median'"),
  ],
)
def test_rule_overrides_refuse_what_means_nothing(kw, message):
  with pytest.raises(CljaxError, match=message):
    registry.make(**kw)


def test_a_qp_override_makes_memory_strength_used():
  assert "memory_strength" in setup.unused_dests("agem_new", "pooled")
  assert "memory_strength" not in setup.unused_dests("agem_new", "pooled", "qp")
  assert "memory_strength" in setup.unused_dests("agem_qp_mean", "pooled", "conditional")
