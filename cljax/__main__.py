"""Command line: `python -m cljax` loads the task stream and summarises it (training: later)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

import numpy as np

from cljax import data, tasks
from cljax.errors import CljaxError

_PROG = "cljax"
_FIRST_TASKS_SHOWN = 3


class _Parser(argparse.ArgumentParser):
  """An ArgumentParser that raises CljaxError instead of printing usage and exiting."""

  def error(self, message: str):
    """Reports a bad command line as a CljaxError (one line, exit status 2 in `main`)."""
    raise CljaxError(f"{message} (see `python -m cljax --help`)")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog=_PROG,
    description="Continual learning with GEM / A-GEM in JAX. For now: load and summarise the "
    "task stream; the training engine is not implemented yet.",
    allow_abbrev=False,
  )
  p.add_argument("--dataset", default="fashion_mnist", choices=data.DATASETS)
  p.add_argument(
    "--data_path",
    default=None,
    help=f"directory of the 4 IDX files (default: ${data.DATA_PATH_ENV}, else "
    f"{data.DEFAULT_DATA_PATH} for fashion_mnist)",
  )
  p.add_argument(
    "--source",
    default="auto",
    choices=data.SOURCES,
    help="auto: IDX files when present, else TFDS when installed",
  )
  p.add_argument("--tfds_data_dir", default=None, help="TensorFlow Datasets data directory")
  p.add_argument("--protocol", default="permutations", choices=tasks.PROTOCOLS)
  p.add_argument("--n_tasks", type=int, default=10)
  p.add_argument("--samples_per_task", type=int, default=1000)
  p.add_argument(
    "--test_samples", type=int, default=None, help="test examples per task (default: all)"
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--model", default="agem_new", help="the GEM / A-GEM variant to train")
  return p


def _unknown_flags(extra: Sequence[str]) -> list[str]:
  flags = []
  for item in extra:
    if item.startswith("-") and len(item) > 1:
      flag = item.split("=", 1)[0]
      if flag not in flags:
        flags.append(flag)
  return flags


def _summary(args: argparse.Namespace, source: str, stream: tasks.TaskStream) -> list[str]:
  n_tasks, s = stream.train_idx.shape
  lines = [
    f"dataset:          {args.dataset} (source: {source}"
    + (f", {data.resolve_data_path(args.dataset, args.data_path)})" if source == "idx" else ")"),
    f"base images:      train {stream.train_x.shape[0]}, test {stream.test_x.shape[0]}, "
    f"{stream.train_x.shape[1]} pixels",
    f"protocol:         {args.protocol} (seed {args.seed})",
    f"tasks:            {n_tasks}",
    f"samples per task: {s} train, {stream.test_idx.shape[1]} test",
    f"stream memory:    {tasks.stream_nbytes(stream) / 2**20:.1f} MB "
    f"(pixel maps: {(stream.pix_idx.nbytes + stream.pix_w.nbytes) / 2**20:.1f} MB)",
  ]
  if args.protocol == "rotations":
    angles = tasks.rotation_angles(n_tasks, seed=args.seed)
    lines.append("angles (deg):     " + " ".join(f"{a:.1f}" for a in angles))
  train_y = np.asarray(stream.train_y)
  train_idx = np.asarray(stream.train_idx)
  shown = min(n_tasks, _FIRST_TASKS_SHOWN)
  lines.append(f"label histogram of the training examples (first {shown} tasks, classes 0-9):")
  for t in range(shown):
    counts = np.bincount(train_y[train_idx[t]], minlength=data.NUM_CLASSES)
    lines.append(f"  task {t}: " + " ".join(f"{c:4d}" for c in counts))
  lines.append(f"training engine: not implemented yet (variant asked for: {args.model})")
  return lines


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit status (2 for bad input, reported on one line)."""
  parser = _parser()
  try:
    try:
      args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # --help
      return int(e.code or 0)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", UserWarning)
      source = data.resolve_source(args.dataset, data_path=args.data_path, source=args.source)
      dataset = data.load_dataset(
        args.dataset, data_path=args.data_path, source=source, tfds_data_dir=args.tfds_data_dir
      )
      stream = tasks.make_stream(
        dataset,
        protocol=args.protocol,
        n_tasks=args.n_tasks,
        samples_per_task=args.samples_per_task,
        test_samples=args.test_samples,
        seed=args.seed,
      )
  except CljaxError as e:
    print(f"{_PROG}: error: {e}", file=sys.stderr)
    return 2
  for w in caught:
    if issubclass(w.category, UserWarning):
      print(f"{_PROG}: warning: {w.message}", file=sys.stderr)
    else:
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  for line in _summary(args, source, stream):
    print(line)
  flags = _unknown_flags(extra)
  if flags:
    print("not used yet: " + " ".join(flags))
  return 0


if __name__ == "__main__":
  sys.exit(main())
