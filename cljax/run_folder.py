"""A run as files: results.json (config, matrix, curves, counters, stats) and PNG plots."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import jax
import numpy as np

from cljax import metrics, train
from cljax.rules import registry

RESULTS_JSON = "results.json"
MATRIX_PNG = "accuracy_matrix.png"
CURVES_PNG = "accuracy_curves.png"
SCHEMA_VERSION = 2  # 2: the rule's settings in rule_settings, no longer in train_config
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "cljax")
_ANNOTATE_MAX_TASKS = 20  # above this, the heatmap's cells are too small for their values


def run_name(
  variant: str,
  dataset: str,
  protocol: str,
  seed: int,
  *,
  agem_ref: str | None = None,
  rule: Mapping[str, Any] | None = None,
) -> str:
  """The results folder's name: "{variant}_{dataset}_{protocol}_seed{seed}".

  For variant "agem" the reference gradient is part of the name ("agem_pooled_..."), since the
  two references are different methods; so are the settings in `rule` that are not None (the A-GEM
  rule overrides, the grouped variants' non-default flags), e.g. {"trigger": "reference"} ->
  "agem_new-trigger-reference_...".
  """
  head, _ = registry.describe(variant, agem_ref)
  head += "".join(f"-{k}-{v}" for k, v in (rule or {}).items() if v is not None)
  return f"{head}_{dataset}_{protocol}_seed{seed}"


def diverged_at(finite: Sequence[bool] | np.ndarray) -> int | None:
  """The first task after which the parameters were non-finite, or None if they stayed finite.

  Args:
    finite: (T,) `RunResult.finite`.
  """
  bad = np.flatnonzero(~np.asarray(finite, dtype=bool))
  return int(bad[0]) if bad.size else None


def versions() -> dict[str, str | None]:
  """Python's and the packages' versions (None for a package that is not installed)."""
  out: dict[str, str | None] = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def device_info(device: Any | None = None) -> dict[str, Any]:
  """The device a run used: platform ("cpu", "gpu", "tpu"), kind, name, and the device count."""
  device = jax.devices()[0] if device is None else device
  return {
    "platform": device.platform,
    "device_kind": device.device_kind,
    "name": str(device),
    "device_count": jax.device_count(),
  }


def make_record(
  result: train.RunResult,
  config: train.Config,
  *,
  settings: Mapping[str, Any],
  timings: Mapping[str, float],
  device: Mapping[str, Any],
  **extra: Any,
) -> dict[str, Any]:
  """A run as a JSON-ready dict (the content of results.json).

  Keys: schema, variant, config (`settings`: every flag's value), train_config (the `Config`),
  n_tasks, matrix (T, T), baseline (T,), curves {accuracy (T, C, T), step (T, C)}, counters
  {name: (T,)} (the engine's steps and mean_loss, then the rule's own: `RunResult.counters`),
  finite (T,), diverged_at_task (int or null), gem_stats {final, backward, forward},
  paper_stats {acc, bwt, fwt, forgetting}, seed_line, versions, timings (seconds), device, then
  `extra` (e.g. stream, schedule, unused_flags, compile_cache).

  Non-finite numbers (e.g. the loss of a diverged run) become null, so the file is strict JSON.

  Args:
    result: the run's `RunResult` (host or device arrays).
    config: the run's `Config`.
    settings: the resolved command-line settings.
    timings: wall times in seconds (e.g. data_load, compile, run, total).
    device: `device_info()`.
    **extra: more top-level entries.
  """
  R, b = np.asarray(result.acc), np.asarray(result.baseline)
  gem = metrics.gem_stats(R, b)
  paper = metrics.paper_stats(R, b)
  record = {
    "schema": SCHEMA_VERSION,
    "variant": settings.get("model"),
    "config": dict(settings),
    "train_config": dataclasses.asdict(config),
    "n_tasks": int(R.shape[0]),
    "matrix": R,
    "baseline": b,
    "curves": {"accuracy": np.asarray(result.curve), "step": np.asarray(result.curve_step)},
    "counters": {k: np.asarray(v) for k, v in result.counters.items()},
    "finite": np.asarray(result.finite),
    "diverged_at_task": diverged_at(result.finite),
    "gem_stats": gem._asdict(),
    "paper_stats": paper._asdict(),
    "seed_line": metrics.format_seed_line(R, b),
    "versions": versions(),
    "timings": dict(timings),
    "device": dict(device),
    **extra,
  }
  return _jsonable(record)


def dumps(record: Mapping[str, Any]) -> str:
  """Strict JSON, indented, with each list of numbers on one line (a matrix row per line)."""
  return _dumps(record, 0) + "\n"


def write_atomic(path: str | os.PathLike, content: bytes) -> None:
  """Writes a file atomically: a temporary file in the same folder, then `os.replace`.

  A reader sees the old file or the new one, never a partial one; on failure the temporary file
  is removed.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(content)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def plotting_available() -> bool:
  """Whether matplotlib (the optional extra `plot`) can be imported."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    return False
  return True


def plot_matrix(R: Any, *, title: str = "") -> bytes:
  """The accuracy matrix as a PNG heatmap, with its values written in the cells.

  Args:
    R: (T, T) R[i, j] = accuracy on task j after training task i.
    title: the figure's title.

  Returns:
    The PNG's bytes (rendered with matplotlib's Agg backend, no global state).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  R = np.asarray(R, dtype=np.float64)
  T = R.shape[0]
  side = max(4.0, 0.55 * T + 2.0)
  fig = Figure(figsize=(side + 1.0, side))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  image = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
  fig.colorbar(image, ax=ax, label="test accuracy")
  if T <= _ANNOTATE_MAX_TASKS:
    size = 9 if T <= 10 else 6
    for (i, j), v in np.ndenumerate(R):
      color = "black" if v > 0.6 else "white"
      ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=size, color=color)
  ticks = np.arange(T) if T <= _ANNOTATE_MAX_TASKS else np.arange(0, T, max(1, T // 10))
  ax.set_xticks(ticks)
  ax.set_yticks(ticks)
  ax.set_xlabel("evaluated on task j")
  ax.set_ylabel("after training task i")
  ax.set_title(title or "accuracy matrix R[i, j]")
  fig.tight_layout()
  return figure_png(fig)


def plot_curves(curve: Any, curve_step: Any, baseline: Any, *, title: str = "") -> bytes:
  """Each task's test accuracy over training, as a PNG: one line per task, x the global step.

  The lines start at step 0 with the accuracy before training; dashed vertical lines mark the
  ends of tasks.

  Args:
    curve: (T, C, T) accuracy on every task after each of task i's C evaluation chunks.
    curve_step: (T, C) the global step of each curve point.
    baseline: (T,) accuracies before training.
    title: the figure's title.

  Returns:
    The PNG's bytes.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  curve = np.asarray(curve, dtype=np.float64)
  steps = np.asarray(curve_step, dtype=np.float64)
  baseline = np.asarray(baseline, dtype=np.float64)
  T = curve.shape[0]
  fig = Figure(figsize=(10.0, 5.0))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  x = np.concatenate([[0.0], steps.reshape(-1)])
  for j in range(T):
    y = np.concatenate([[baseline[j]], curve[:, :, j].reshape(-1)])
    ax.plot(x, y, lw=1.2, label=f"task {j}")
  for end in steps[:-1, -1]:
    ax.axvline(end, color="gray", ls="--", lw=0.8)
  ax.set_xlabel("global training step")
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0.0, 1.0)
  ax.set_xlim(0.0, max(float(x[-1]), 1.0))
  ax.set_title(title or "test accuracy of each task during training")
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, ncol=1 if T <= 20 else 2)
  fig.tight_layout()
  return figure_png(fig)


def write_results(
  directory: str | os.PathLike, record: Mapping[str, Any], *, plots: bool = True
) -> list[str]:
  """Writes a run's files into directory (created if needed), each atomically.

  Files: MATRIX_PNG and CURVES_PNG (when `plots`; needs matplotlib, see `plotting_available`),
  then RESULTS_JSON, last, so that a complete results.json means a complete folder.

  Args:
    directory: the run's results folder (see `run_name`).
    record: `make_record`'s dict.
    plots: whether to write the PNGs.

  Returns:
    The paths written.
  """
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  written = []
  if plots:
    variant, what = record["variant"], _describe(record.get("config", {}))
    curves = record["curves"]
    files = {
      MATRIX_PNG: plot_matrix(record["matrix"], title=f"{variant}\n{what}"),
      CURVES_PNG: plot_curves(
        curves["accuracy"], curves["step"], record["baseline"], title=f"{variant}: {what}"
      ),
    }
    for name, content in files.items():
      path = os.path.join(directory, name)
      write_atomic(path, content)
      written.append(path)
  path = os.path.join(directory, RESULTS_JSON)
  write_atomic(path, dumps(record).encode())
  written.append(path)
  return written


def _describe(settings: Mapping[str, Any]) -> str:
  """E.g. "fashion_mnist permutations, seed 3"."""
  what = " ".join(str(settings[k]) for k in ("dataset", "protocol") if k in settings)
  return f"{what}, seed {settings['seed']}" if "seed" in settings else what


def figure_png(fig) -> bytes:
  """A matplotlib Figure as PNG bytes (100 dpi)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  return buffer.getvalue()


def _float(v: float) -> float | None:
  return float(v) if math.isfinite(v) else None


def _jsonable(x: Any) -> Any:
  """Numpy/JAX values to JSON types: arrays to nested lists, float32 by their shortest repr."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, np.generic, jax.Array)):
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.floating):
      return a.tolist()
    # Each value by its shortest repr in its own precision: 0.7113, not 0.7113000154495239.
    values = [_float(float(str(v))) for v in a.ravel()]
    return np.array(values, dtype=object).reshape(a.shape).tolist()
  if isinstance(x, float):
    return _float(x)
  return x


def _dumps(x: Any, level: int) -> str:
  pad, inner = "  " * level, "  " * (level + 1)
  if isinstance(x, Mapping) and x:
    items = [f"{inner}{json.dumps(k)}: {_dumps(v, level + 1)}" for k, v in x.items()]
    return "{\n" + ",\n".join(items) + "\n" + pad + "}"
  if isinstance(x, list) and x and any(isinstance(v, (list, Mapping)) for v in x):
    return "[\n" + ",\n".join(inner + _dumps(v, level + 1) for v in x) + "\n" + pad + "]"
  return json.dumps(x, allow_nan=False, separators=(", ", ": "))
