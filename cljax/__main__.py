"""Command line: `python -m cljax` trains one variant and writes its results folder.

The flags, their checks and the data loading are `cljax.run_setup`'s (shared with the sweeps).
Compiled programs are kept in JAX's persistent compilation cache (`cljax.compile_cache`), so a
run of the same shapes loads its program; JAX does not cache a program with host callbacks, so
with the cache the progress lines are printed when the run ends (live with --no_compile_cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import tqdm

from cljax import checkpoints, compile_cache, run_folder, tasks, train
from cljax import run_setup as setup
from cljax.errors import CljaxError
from cljax.networks import Network
from cljax.rules.base import Rule


class _Prepared(NamedTuple):
  """Everything a run needs, checked before compiling."""

  args: argparse.Namespace
  config: train.Config
  network: Network | None  # None: the config's MLP
  rule: Rule  # --model's with its settings, or --rule's
  hparams: train.HParams  # the traced hyper-parameters (--lr, --memory_strength, --hparam)
  stream: tasks.TaskStream
  source: str  # "idx" or "tfds"
  directory: str | None  # the IDX folder read
  folder: str  # the results folder
  schedule: tuple[int, int, int]  # train.schedule
  cache: compile_cache.CacheStatus


def _prepare(argv: Sequence[str] | None) -> _Prepared:
  """Parses, checks and loads the data, printing notes and warnings as they come (CljaxError)."""
  args, notes = setup.parse_args(argv)
  for message in notes:
    setup.note(message)
  network = setup.network_for(args)
  config = setup.train_config(args, network)
  rule = setup.rule_for(args, config, network)
  hparams = setup.run_hparams(config, rule, setup.hparam_values(args))
  name = setup.run_name(args, args.seed)
  cache = setup.use_compile_cache(args)  # before JAX compiles anything
  data_path, note = setup.data_path_for(args)
  if note:
    setup.note(note)
  stream, source, directory, load_warnings = setup.load_stream(args, data_path)
  for message in load_warnings:
    setup.warning(message)
  schedule = train.schedule(config, stream)
  folder = os.path.join(args.save_path, name)
  return _Prepared(
    args, config, network, rule, hparams, stream, source, directory, folder, schedule, cache
  )


def _progress_line(t: int, n_tasks: int, acc_row, seconds: float | None = None) -> str:
  """The line printed when task t ends; acc_row (T,): the accuracies on every task then."""
  acc = np.asarray(acc_row)
  when = "" if seconds is None else f"{seconds:.1f} s, "
  return (
    f"task {t} done ({t + 1}/{n_tasks}): {when}accuracy {acc[t]:.4f} on task {t}, "
    f"mean {acc[: t + 1].mean():.4f} on tasks 0-{t}"
  )


def _train(p: _Prepared) -> tuple[train.RunResult, float, float, compile_cache.Compiles]:
  """Compiles and drives the run, a line per task as it ends; (result, compile s, run s, counts).

  The run's pieces (`train.make_task_runner`) are compiled once each and called from here, so
  the lines come live with the compilation cache on; on a terminal a progress bar (tqdm) shows
  the run's steps, the current task, the elapsed and the remaining time.
  """
  n_tasks = p.stream.train_idx.shape[0]
  steps, chunk, n_chunks = p.schedule
  key = jax.random.key(p.args.seed)
  hp = p.hparams  # an argument, as in a sweep: the same compiled program
  runner = train.make_task_runner(p.config, p.rule, network=p.network)
  t0 = time.perf_counter()
  pieces = _compile(runner, key, p.stream, hp, n_chunks)
  compile_seconds, compiles = time.perf_counter() - t0, pieces.compiles
  fp = checkpoints.fingerprint(
    {
      "config": dataclasses.asdict(p.config),
      "seed": p.args.seed,
      "network": p.args.network,
      "rule": p.args.rule,
      "rule_settings": setup.rule_record(p.args),
      "hparams": setup.hparam_values(p.args),
    },
    p.stream,
  )
  state, baseline, outputs = _resume(p, pieces, fp) if p.args.resume else (None, None, [])
  print(
    f"compiled in {compile_seconds:.1f} s{' (from cache)' if compiles.from_cache else ''}; "
    f"training {n_tasks} tasks x {steps} steps",
    flush=True,
  )
  t1 = time.perf_counter()
  bar = tqdm.tqdm(
    total=n_tasks * steps,
    unit="step",
    disable=not sys.stderr.isatty(),
    leave=False,
    dynamic_ncols=True,
  )
  with bar:
    if state is None:
      state, baseline = pieces.start(key, p.stream, hp)
    bar.update(len(outputs) * steps)
    for t in range(len(outputs), n_tasks):
      t_ = np.int32(t)
      bar.set_description(f"task {t}/{n_tasks}")
      state = pieces.start_task(state, t_, key, p.stream, hp)
      chunks = []
      for c in range(n_chunks):
        state, out = pieces.chunk(state, t_, np.int32(c), key, p.stream, hp)
        chunks.append(jax.device_get(out))
        bar.update(min(chunk, steps - c * chunk))
      state, output = pieces.end_task(state, t_, train.stack(chunks), key, p.stream, hp)
      outputs.append(jax.device_get(output))
      payload = {"state": state, "baseline": baseline, "outputs": train.stack(outputs)}
      checkpoints.save(p.folder, t + 1, payload, fp)
      line = _progress_line(t, n_tasks, outputs[-1].curve[-1], time.perf_counter() - t1)
      bar.write(line, file=sys.stdout)
      sys.stdout.flush()
  result = runner.finish(jax.device_get(baseline), outputs, jax.device_get(state))
  return result, compile_seconds, time.perf_counter() - t1, compiles


def _resume(p: _Prepared, pieces: _Pieces, fp: str):
  """(state, baseline, outputs so far) from the run folder's newest checkpoint.

  (None, None, []) without one: a note says the run starts afresh.
  """
  found = checkpoints.latest(p.folder)
  if found is None:
    setup.note(f"--resume: no checkpoint in {p.folder}; starting afresh")
    return None, None, []
  done, path = found
  stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct((done, *a.shape), a.dtype), pieces.output)
  like = {"state": pieces.state, "baseline": pieces.baseline, "outputs": stacked}
  payload = checkpoints.restore(path, like, fp)
  outputs = [jax.tree.map(lambda a, i=i: a[i], payload["outputs"]) for i in range(done)]
  print(f"resuming after task {done - 1} ({done} of {p.stream.train_idx.shape[0]} done): {path}")
  return payload["state"], payload["baseline"], outputs


class _Pieces(NamedTuple):
  """The runner's pieces compiled, the compile counts of all four, and their outputs' shapes."""

  start: Any
  start_task: Any
  chunk: Any
  end_task: Any
  compiles: compile_cache.Compiles
  state: Any  # the TrainState's shapes
  baseline: Any
  output: Any  # a TaskOutput's shapes


def _compile(runner: train.TaskRunner, key, stream, hp, n_chunks: int) -> _Pieces:
  """The runner's four pieces compiled, each once (t and c are arguments)."""
  t, c = np.int32(0), np.int32(0)
  with compile_cache.count_compiles() as compiles:
    start = jax.jit(runner.start).lower(key, stream, hp).compile()
    state, baseline = jax.eval_shape(runner.start, key, stream, hp)
    start_task = jax.jit(runner.start_task).lower(state, t, key, stream, hp).compile()
    run_chunk = jax.jit(runner.chunk).lower(state, t, c, key, stream, hp).compile()
    chunk_out = jax.eval_shape(runner.chunk, state, t, c, key, stream, hp)[1]
    stacked = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n_chunks, *a.shape), a.dtype), chunk_out)
    end_task = jax.jit(runner.end_task).lower(state, t, stacked, key, stream, hp).compile()
    output = jax.eval_shape(runner.end_task, state, t, stacked, key, stream, hp)[1]
  return _Pieces(start, start_task, run_chunk, end_task, compiles, state, baseline, output)


def _record(p: _Prepared, result, timings, device, argv, compiles) -> dict[str, Any]:
  settings = {k: v for k, v in vars(p.args).items() if k != "given"}
  settings["given_flags"] = [f"--{d}" for d in p.args.given]
  steps, chunk, n_chunks = p.schedule
  return run_folder.make_record(
    result,
    p.config,
    settings=settings,
    timings=timings,
    device=device,
    argv=list(sys.argv[1:] if argv is None else argv),
    rule_settings=setup.rule_record(p.args),
    unused_flags=setup.unused_flags(p.args),
    stream={
      "source": p.source,
      "data_path": p.directory,
      "n_tasks": int(p.stream.train_idx.shape[0]),
      "samples_per_task": int(p.stream.train_idx.shape[1]),
      "test_samples": int(p.stream.test_x.shape[0]),
      "train_images": int(p.stream.train_x.shape[0]),
    },
    schedule={"steps_per_task": steps, "steps_per_chunk": chunk, "chunks_per_task": n_chunks},
    compile_cache=compile_cache.record(p.cache, compiles),
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit status.

  0: done; 1: the run diverged (results kept); 2: bad input (reported on one line).
  """
  start = time.perf_counter()
  try:
    p = _prepare(argv)
  except SystemExit as e:  # --help
    return int(e.code or 0)
  except CljaxError as e:
    setup.error(e)
    return 2
  data_seconds = time.perf_counter() - start
  args = p.args
  device = run_folder.device_info()
  if "cuda" in args.given:
    setup.note(
      f"--cuda {args.cuda}: JAX picks the device itself; running on {device['platform']} "
      f"({device['device_kind']})"
    )
  plots = not args.no_plots
  if plots and not run_folder.plotting_available():
    setup.note("matplotlib is not installed (pip install 'cljax[plot]'): no PNGs will be written")
    plots = False
  try:
    os.makedirs(p.folder, exist_ok=True)
  except OSError as e:
    setup.error(f"cannot create the results folder {p.folder}: {e.strerror or e}")
    return 2

  n_tasks, samples = (int(n) for n in p.stream.train_idx.shape)
  where = f"{p.source}: {p.directory}" if p.directory else p.source
  print(
    f"{args.model} on {args.dataset} {args.protocol} ({where}): {n_tasks} tasks x {samples} "
    f"samples, {p.stream.test_x.shape[0]} test; seed {args.seed}; device {device['platform']}",
    flush=True,
  )
  try:
    result, compile_seconds, run_seconds, compiles = _train(p)
  except CljaxError as e:
    setup.error(e)
    return 2
  seconds = {
    "data_load": data_seconds,
    "compile": compile_seconds,
    "run": run_seconds,
    "total": time.perf_counter() - start,
  }
  timings = {k: round(v, 4) for k, v in seconds.items()}
  record = _record(p, result, timings, device, argv, compiles)
  hit = record["compile_cache"]["hit"]
  print(record["seed_line"])
  print(
    f"wall time: {timings['total']:.1f} s (data {timings['data_load']:.1f} s, compile "
    f"{timings['compile']:.1f} s{' (from cache)' if hit else ''}, run {timings['run']:.1f} s)"
  )
  try:
    run_folder.write_results(p.folder, record, plots=plots)
  except OSError as e:
    setup.error(f"cannot write the results to {p.folder}: {e.strerror or e}")
    return 2
  if not args.keep_checkpoints:
    checkpoints.remove(p.folder)
  print(f"results: {p.folder}")
  diverged = record["diverged_at_task"]
  if diverged is not None:
    setup.error(setup.divergence_message(diverged, n_tasks, args.model, p.folder, args.projection))
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
