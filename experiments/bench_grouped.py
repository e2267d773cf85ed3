"""Grouped GEM's projection: factored rows (cljax.grouped.rows) against a dense construction.

One projection of the grouped method at the last task of the seed's run: t = 9 past tasks with
n_memories 10 each, an MLP 784-H-H-10 whose 2 hidden layers are split into G groups each, one
current example. Per past task i the constraint row is row_i = g_i * w_i (its memory gradient
weighted through the unit-to-group index map by h[i]); GEM's dual QP over the t rows (margin 0,
eps 1e-3) and g~ = g + sum_i v_i row_i.

- factored: `grouped.rows.grouped_terms` / `grouped_row_sum` from per-example gradient factors,
  never a (rows, p) array.
- dense: the research code's shape, the 1 + 2G group rows of every past task as a dense
  (t, 1 + 2G, p) array (`groups.dense_group_rows`), rows_i = their h-weighted sum, P = R R'.

Each case runs in its own process: time per projection (median of --repeats jitted calls after a
warm-up, compile separately), XLA's temporary buffers of the compiled step, and the process's peak
RSS. A dense case whose rows exceed --dense_budget_gb is not run (its size is reported).

    python experiments/bench_grouped.py [--out experiments/results/bench_grouped.md]
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time

CASES = [(100, 20), (100, 100), (1000, 1000)]  # (hidden units H, groups per layer G)
T, M, D, C = 9, 10, 784, 10  # past tasks, memories per task, inputs, classes


def param_count(h: int) -> int:
  return D * h + h + h * h + h + h * C + C


def run_case(hidden: int, groups: int, method: str, repeats: int) -> dict:
  """Runs one case in this process; returns its measurements."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from cljax.example_grads import example_grads
  from cljax.grouped.groups import dense_group_rows, random_groups
  from cljax.grouped.rows import example_scales, grouped_row_sum, grouped_terms
  from cljax.models import make_mlp
  from cljax.projections import gem_dual

  model = make_mlp(hidden, 2)
  key = jax.random.key(0)
  params = model.init(key, jnp.zeros((1, D)))["params"]
  rng = np.random.default_rng(0)
  mem_x = jnp.asarray(rng.random((T * M, D)), jnp.float32)
  mem_y = jnp.asarray(rng.integers(0, C, T * M), jnp.int32)
  x = jnp.asarray(rng.random((1, D)), jnp.float32)
  y = jnp.asarray([3], jnp.int32)
  assignments = [random_groups(jax.random.key(k), hidden, groups) for k in (1, 2)]
  h = jnp.asarray(1.0 + 0.1 * rng.standard_normal((T, 2, groups)), jnp.float32)
  task = jnp.repeat(jnp.arange(T), M)
  S = jax.nn.one_hot(task, T).T / M  # (T, T*M): mean memory loss per task

  def apply(p, inputs):
    return model.apply({"params": p}, inputs)

  def factored(params, h):
    mem = example_grads(apply, params, mem_x, mem_y)
    batch = example_grads(apply, params, x, y)
    scales = example_scales(params, assignments, h, task)
    P, q = grouped_terms(params, mem, scales, S, batch)
    v, _ = gem_dual(P, q, margin=0.0, eps=1e-3, only_if_violated=False)
    update = grouped_row_sum(params, mem, scales, S, v)
    g = jax.grad(lambda p: jnp.mean(loss(p, x, y)))(params)
    return jax.tree.map(jnp.add, g, update)

  def loss(p, xs, ys):
    logits = apply(p, xs)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), ys[:, None], axis=1)[:, 0]

  def dense(params, h):
    def task_grad(i):
      w = S[i]
      return jax.grad(lambda p: jnp.sum(w * loss(p, mem_x, mem_y)))(params)

    grads = jax.vmap(task_grad)(jnp.arange(T))
    budget = 1 << 62
    rows = jax.vmap(lambda gr: dense_group_rows(gr, assignments, groups, max_bytes=budget))(grads)
    coef = jnp.concatenate([jnp.ones((T, 1)), h.reshape(T, -1)], axis=1)  # (T, 1 + 2G)
    R = jnp.einsum("tr,trp->tp", coef, rows)
    g = jax.flatten_util.ravel_pytree(jax.grad(lambda p: jnp.mean(loss(p, x, y)))(params))[0]
    v, _ = gem_dual(R @ R.T, R @ g, margin=0.0, eps=1e-3, only_if_violated=False)
    return g + R.T @ v

  fn = {"factored": factored, "dense": dense}[method]
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(params, h).compile()
  compile_s = time.perf_counter() - t0
  analysis = compiled.memory_analysis()
  temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
  jax.block_until_ready(compiled(params, h))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, h))
    times.append(time.perf_counter() - t0)
  return {
    "compile_s": compile_s,
    "ms": 1e3 * statistics.median(times),
    "xla_temp_mb": None if temp is None else temp / 2**20,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


RECOMPUTE_CASES = [  # (label, GroupedConfig kwargs): the seed's H = 100, G = 20 unless said
  ("cluster, S = 10 (default cap)", {}),
  ("cluster, S = 100 (uncapped)", {"cluster_max_size": 100}),
  ("random, S = 5", {"grouping": "random"}),
  ("unit, G = 100, S = 1", {"grouping": "unit", "num_groups": 100}),
]


def recompute_rows(repeats: int) -> list[str]:
  """One relatedness recompute (`grouped.state.relatedness_h`) at the seed's last task.

  T = 10 task slots, 9 past tasks, 2 hidden layers of 100 units: the (S + 1) x (S + 1)
  covariance and its activations block, of the current task per (layer, group) and of every
  task slot per (slot, layer, group), in one batched eigh.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from cljax.grouped.groups import random_groups
  from cljax.grouped.relatedness import cov_from_buffer
  from cljax.grouped.state import GroupedConfig, grouped_init, relatedness_h

  rows = []
  for label, kwargs in RECOMPUTE_CASES:
    config = GroupedConfig(**kwargs)
    state = grouped_init(config, 10, 100, 2, C)
    G = state.past_cov.count.shape[-1]
    n = state.cur_cov.mean.shape[-1]
    rng = np.random.default_rng(0)
    past, cur = (
      cov_from_buffer(jnp.asarray(rng.standard_normal((50, *lead, n)), jnp.float32))
      for lead in ((10, 2, G), (2, G))
    )
    groups = jnp.stack([random_groups(jax.random.key(k), 100, G) for k in (1, 2)])
    state = state._replace(
      assignments=groups, formed=jnp.ones((), bool), past_cov=past, cur_cov=cur
    )
    fn = jax.jit(functools.partial(relatedness_h, config=config, t=jnp.int32(9)))
    t0 = time.perf_counter()
    compiled = fn.lower(state).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(state))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(state))
      times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    rows.append(
      f"| {label} | {G} | {n} x {n} | {2 * 2 * G * (1 + 10):,} | {compile_s:.1f} | {ms:.2f} | "
      f"{ms / config.cov_recompute_every:.3f} |"
    )
    print(rows[-1], flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--dense_budget_gb", type=float, default=8.0)
  parser.add_argument("--out", default=None)
  parser.add_argument("--case", nargs=3, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.case:  # a child process: one measurement, as JSON on stdout
    hidden, groups, method = int(args.case[0]), int(args.case[1]), args.case[2]
    print(json.dumps(run_case(hidden, groups, method, args.repeats)))
    return

  lines = [
    f"Grouped GEM projection, t = {T} past tasks x {M} memories, MLP 784-H-H-10, one current "
    f"example; medians of {args.repeats} calls; each case in its own process. dense rows: the "
    "(t, 1 + 2G, p) float32 group rows; research-code P: the (p, p) float64 matrix that its "
    "mean-row path built (pp as a (p, 1) column), for scale.",
    "",
    "| H | G per layer | p | rows per task | method | compile s | ms per projection | XLA temp MB "
    "| peak RSS MB | dense rows GB | research-code P GB |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for hidden, groups in CASES:
    p = param_count(hidden)
    dense_gb = T * (1 + 2 * groups) * p * 4 / 2**30
    research_gb = p * p * 8 / 2**30
    for method in ("factored", "dense"):
      cells = ["-"] * 4
      if method == "dense" and dense_gb > args.dense_budget_gb:
        cells = ["not run", "-", "-", "-"]
      else:
        cmd = [sys.executable, __file__, "--case", str(hidden), str(groups), method]
        done = subprocess.run(
          [*cmd, "--repeats", str(args.repeats)], capture_output=True, text=True, timeout=1800
        )
        if done.returncode != 0:
          cells = [f"failed ({done.stderr.strip().splitlines()[-1][:60]})", "-", "-", "-"]
        else:
          r = json.loads(done.stdout.strip().splitlines()[-1])
          temp = "-" if r["xla_temp_mb"] is None else f"{r['xla_temp_mb']:.1f}"
          cells = [f"{r['compile_s']:.1f}", f"{r['ms']:.2f}", temp, f"{r['peak_rss_mb']:.0f}"]
      lines.append(
        f"| {hidden} | {groups} | {p:,} | {1 + 2 * groups} | {method} | "
        + " | ".join(cells)
        + f" | {dense_gb:.2f} | {research_gb:.1f} |"
      )
      print(lines[-1], flush=True)
  lines += [
    "",
    "Relatedness recompute (`grouped.state.relatedness_h`, every cov_recompute_every = 20 steps): "
    "T = 10 task slots at the last task, 2 hidden layers of 100 units; one batched eigh of 2 "
    "matrices per (layer, group) for the current task and 2 per (task slot, layer, group); "
    f"median of {args.repeats} calls, in this process.",
    "",
    "| groups | G per layer | covariance | matrices decomposed | compile s | ms per recompute "
    "| ms per step (/ 20) |",
    "| --- | --- | --- | --- | --- | --- | --- |",
    *recompute_rows(args.repeats),
  ]
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    from cljax.run_folder import write_atomic

    write_atomic(args.out, text.encode())


if __name__ == "__main__":
  main()
