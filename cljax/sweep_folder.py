"""A sweep's results folder: a manifest, one record per (setting, seed), resume, and a summary.

    folder/
      sweep.json                      the manifest: the fixed settings of every record
      runs/lr0.01_ms10_seed3.json     one run: `run_folder.make_record` + "sweep" + "checksum"
      summary.md, summary.json        mean +- std per setting, over the folder's records
      summary.png                     Final / Backward / Forward per setting, with error bars

Records are written atomically as each run finishes. A record is reused only when it parses,
its checksum matches its content, and it names this manifest's fingerprint, its setting and its
seed; anything else is reported and run again (never silently reused). A folder whose manifest
differs from the current settings is refused: a sweep never mixes configurations.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from cljax.errors import CljaxError
from cljax.run_folder import dumps, figure_png, write_atomic

SWEEP_JSON = "sweep.json"
RUNS_DIR = "runs"
SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
SUMMARY_PNG = "summary.png"
SCHEMA_VERSION = 1
METRICS = ("final", "backward", "forward")  # GEM's printed statistics (cljax.metrics.gem_stats)


class Setting(NamedTuple):
  """One grid point: the traced hyper-parameters (`cljax.train.HParams`) of a run.

  extra: a --rule's own (`Rule.hparams`), ((name, value), ...) sorted by name; () for none.
  """

  lr: float
  memory_strength: float
  extra: tuple[tuple[str, float], ...] = ()

  @property
  def name(self) -> str:
    """E.g. "lr0.01_ms10", "lr0.01_ms10_scale0.5" (a file-name-safe label)."""
    own = "".join(f"_{k}{v:g}" for k, v in self.extra)
    return f"lr{self.lr:g}_ms{self.memory_strength:g}{own}"

  def key(self) -> dict[str, Any]:
    """The setting as JSON: {lr, memory_strength} and, with a rule's own, {"hparams": {...}}."""
    key: dict[str, Any] = {"lr": self.lr, "memory_strength": self.memory_strength}
    if self.extra:
      key["hparams"] = dict(self.extra)
    return key

  @classmethod
  def from_key(cls, key: Mapping[str, Any]) -> Setting:
    """The inverse of `key`."""
    extra = tuple(sorted((key.get("hparams") or {}).items()))
    return cls(key["lr"], key["memory_strength"], extra)


def fingerprint(fixed: Mapping[str, Any]) -> str:
  """A short hash of the fixed settings (canonical JSON): equal settings, equal fingerprint."""
  return _sha256(fixed)[:16]


def open_folder(folder: str | os.PathLike, fixed: Mapping[str, Any]) -> str:
  """Creates the folder and its manifest, or checks that an existing one has the same settings.

  Args:
    folder: the sweep's folder.
    fixed: the settings every record of the folder shares (JSON-ready; not the swept ones).

  Returns:
    The fingerprint of `fixed`.

  Raises:
    CljaxError: the folder holds a sweep of other settings (the differences are named), or its
      manifest is unreadable.
  """
  folder = os.fspath(folder)
  path = os.path.join(folder, SWEEP_JSON)
  manifest = {"schema": SCHEMA_VERSION, "fingerprint": fingerprint(fixed), "fixed": dict(fixed)}
  manifest = json.loads(json.dumps(manifest))  # tuples -> lists, as read back
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
      old_fixed = old["fixed"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CljaxError(
        f"{path} is unreadable ({e}): remove the folder or choose another --sweep_dir."
      ) from None
    if old_fixed != manifest["fixed"]:
      diffs = _differences(old_fixed, manifest["fixed"])
      raise CljaxError(
        f"{folder} holds a sweep with other settings ({'; '.join(diffs[:6])}): refusing to mix "
        "configurations; choose another --sweep_dir (or remove that folder)."
      )
    return manifest["fingerprint"]
  try:
    os.makedirs(os.path.join(folder, RUNS_DIR), exist_ok=True)
    write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())
  except OSError as e:
    raise CljaxError(f"cannot create the sweep folder {folder}: {e.strerror or e}") from None
  return manifest["fingerprint"]


def record_path(folder: str | os.PathLike, setting: Setting, seed: int) -> str:
  """Where the record of (setting, seed) lives."""
  return os.path.join(os.fspath(folder), RUNS_DIR, f"{setting.name}_seed{seed}.json")


def write_record(
  folder: str | os.PathLike, record: Mapping[str, Any], setting: Setting, seed: int, fp: str
) -> str:
  """Writes one run's record atomically, with its sweep key and a checksum; returns its path."""
  content = dict(record)
  content["sweep"] = {"fingerprint": fp, "setting": setting.key(), "seed": int(seed)}
  content = json.loads(dumps(content))  # the values exactly as a reader will see them
  content["checksum"] = _sha256(content)
  path = record_path(folder, setting, seed)
  write_atomic(path, dumps(content).encode())
  return path


def load_record(
  folder: str | os.PathLike, setting: Setting, seed: int, fp: str
) -> tuple[dict[str, Any] | None, str | None]:
  """(record, None) for a valid record of (setting, seed); (None, why) when it is absent or bad."""
  path = record_path(folder, setting, seed)
  if not os.path.exists(path):
    return None, None
  try:
    with open(path) as f:
      record = json.load(f)
    checksum = record.pop("checksum")
  except (OSError, ValueError, KeyError, AttributeError) as e:
    return None, f"{path}: unreadable ({type(e).__name__}: {e})"
  if checksum != _sha256(record):
    return None, f"{path}: checksum mismatch (truncated or edited)"
  key = record.get("sweep", {})
  expected = {"fingerprint": fp, "setting": setting.key(), "seed": int(seed)}
  if key != expected:
    return None, f"{path}: made for {key}, expected {expected}"
  if not all(k in record for k in ("matrix", "gem_stats", "counters")):
    return None, f"{path}: incomplete record"
  return record, None


def plan(
  folder: str | os.PathLike, settings: Sequence[Setting], seeds: Sequence[int], fp: str
) -> tuple[list[tuple[Setting, int]], list[tuple[Setting, int]], list[str]]:
  """(finished, to_run, problems): which (setting, seed) pairs have valid records.

  problems: one line per record that exists but cannot be reused (it is in to_run).
  """
  finished, to_run, problems = [], [], []
  for setting in settings:
    for seed in seeds:
      record, problem = load_record(folder, setting, seed, fp)
      (finished if record is not None else to_run).append((setting, seed))
      if problem:
        problems.append(problem)
  return finished, to_run, problems


def folder_records(folder: str | os.PathLike, fp: str) -> list[dict[str, Any]]:
  """Every valid record in the folder's runs/ (of any setting and seed), in file-name order."""
  runs = os.path.join(os.fspath(folder), RUNS_DIR)
  out = []
  for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
    if not name.endswith(".json"):
      continue
    try:
      with open(os.path.join(runs, name)) as f:
        key = json.load(f)["sweep"]
      setting, seed = Setting.from_key(key["setting"]), int(key["seed"])
    except (OSError, ValueError, KeyError, TypeError):
      continue
    record, _ = load_record(folder, setting, seed, fp)
    if record is not None:
      out.append(record)
  return out


ENGINE_COUNTERS = ("steps", "mean_loss")  # `cljax.train.ENGINE_COUNTERS`: not the rule's


def counter_value(record: Mapping[str, Any], name: str) -> float:
  """One run's value of its rule's counter `name` (`cljax.rules.Counters`) over tasks 1...

  Tasks 1.. are those with past tasks. A `*_max` counter's largest, a `*_mean` counter's mean,
  any other per step (its sum over the steps; a count of steps, e.g. projections, is the
  fraction of steps).
  """
  counters = record["counters"]
  values = np.asarray(counters[name][1:], dtype=np.float64)
  if not values.size:
    return 0.0
  if name.endswith("_max"):
    return float(values.max())
  if name.endswith("_mean"):
    return float(values.mean())
  steps = float(np.sum(counters["steps"][1:]))
  return float(values.sum()) / steps if steps else 0.0


def rule_counters(records: Iterable[Mapping[str, Any]]) -> list[str]:
  """The names of the counters the records' rule reported (sorted)."""
  return sorted({k for r in records for k in r["counters"]} - set(ENGINE_COUNTERS))


def summarize(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per setting: n, seeds, mean and sample std (ddof 1) of each metric, diverged runs.

  Metrics: GEM's Final / Backward / Forward, the average forgetting (Chaudhry et al. 2018,
  `metrics.paper_stats`), and under "counters" each counter the rule reported
  (`counter_value`: e.g. projections, the fraction of steps projected). Diverged runs
  (non-finite parameters) are counted and left out of the means.
  """
  records = list(records)
  names = rule_counters(records)
  groups: dict[Setting, list[Mapping[str, Any]]] = {}
  for r in records:
    groups.setdefault(Setting.from_key(r["sweep"]["setting"]), []).append(r)
  rows = []
  for setting, rs in sorted(groups.items()):
    ok = [r for r in rs if r.get("diverged_at_task") is None]
    row: dict[str, Any] = {
      "setting": setting.key(),
      "n": len(ok),
      "seeds": sorted(r["sweep"]["seed"] for r in rs),
      "diverged": len(rs) - len(ok),
    }
    values = {m: [r["gem_stats"][m] for r in ok] for m in METRICS}
    values["forgetting"] = [r["paper_stats"]["forgetting"] for r in ok]
    counters = {n: [counter_value(r, n) for r in ok if n in r["counters"]] for n in names}
    for name, v in values.items():
      row[name] = _mean_std(v)
    row["counters"] = {name: _mean_std(v) for name, v in counters.items()}
    rows.append(row)
  return rows


def _mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
  a = np.asarray([x for x in values if x is not None], dtype=np.float64)
  return {
    "mean": float(a.mean()) if a.size else None,
    "std": float(a.std(ddof=1)) if a.size > 1 else None,
  }


def format_mean_std(cell: Mapping[str, float | None], digits: int = 4) -> str:
  """'0.6082 +- 0.0230' (or '-' when there is no value)."""
  if cell["mean"] is None:
    return "-"
  std = "" if cell["std"] is None else f" +- {cell['std']:.{digits}f}"
  return f"{cell['mean']:.{digits}f}{std}"


def summary_markdown(rows: Sequence[Mapping[str, Any]], title: str) -> str:
  """The summary table: one line per setting, a column per counter the rule reported."""
  names = sorted({n for row in rows for n in row.get("counters", {})})
  own = sorted({n for row in rows for n in row["setting"].get("hparams", {})})  # a rule's own
  head = ["lr", "memory_strength", *own, "n", "Final", "Backward", "Forward", "forgetting", *names]
  lines = [
    f"# {title}",
    "",
    "Mean +- sample std (ddof 1) over seeds; GEM's Final / Backward / Forward (cljax.metrics); "
    "forgetting: mean over past tasks of the best earlier accuracy minus the final one "
    "(Chaudhry et al. 2018)"
    + (
      "; then the rule's counters over tasks 1..: per step (a count of steps, e.g. projections: "
      "the fraction of steps), the largest for *_max, the mean for *_mean."
      if names
      else "."
    ),
    "",
    "| " + " | ".join([*head, "diverged"]) + " |",
    "| " + " | ".join(["---"] * (len(head) + 1)) + " |",
  ]
  for row in rows:
    s = row["setting"]
    cells = [format_mean_std(row[m]) for m in (*METRICS, "forgetting")]
    cells += [format_mean_std(row["counters"].get(n, _mean_std([]))) for n in names]
    grid = [f"{s['lr']:g}", f"{s['memory_strength']:g}"]
    grid += [f"{s['hparams'][n]:g}" if n in s.get("hparams", {}) else "-" for n in own]
    lines.append(
      f"| {' | '.join(grid)} | {row['n']} | " + " | ".join(cells) + f" | {row['diverged']} |"
    )
  return "\n".join(lines) + "\n"


def plot_bars(
  labels: Sequence[str], rows: Sequence[Mapping[str, Any]], *, title: str = ""
) -> bytes:
  """A PNG bar chart: Final / Backward / Forward per label with +- std error bars."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  n = len(rows)
  fig = Figure(figsize=(max(6.0, 0.9 * n + 2.5), 4.8))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  x, width = np.arange(n), 0.27
  for k, metric in enumerate(METRICS):
    means = [r[metric]["mean"] if r[metric]["mean"] is not None else math.nan for r in rows]
    stds = [r[metric]["std"] or 0.0 for r in rows]
    ax.bar(x + (k - 1) * width, means, width, yerr=stds, capsize=3, label=metric.capitalize())
  ax.axhline(0.0, color="black", lw=0.8)
  ax.set_xticks(x)
  ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("accuracy / transfer")
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return figure_png(fig)


def write_summary(
  folder: str | os.PathLike, fp: str, *, title: str, plots: bool = True
) -> tuple[list[dict[str, Any]], list[str]]:
  """Summarizes the folder's valid records into summary.md / .json (/ .png); (rows, paths)."""
  folder = os.fspath(folder)
  rows = summarize(folder_records(folder, fp))
  written = []
  path = os.path.join(folder, SUMMARY_JSON)
  write_atomic(path, dumps({"fingerprint": fp, "rows": rows}).encode())
  written.append(path)
  path = os.path.join(folder, SUMMARY_MD)
  write_atomic(path, summary_markdown(rows, title).encode())
  written.append(path)
  if plots and rows:
    labels = [Setting.from_key(r["setting"]).name for r in rows]
    path = os.path.join(folder, SUMMARY_PNG)
    write_atomic(path, plot_bars(labels, rows, title=title))
    written.append(path)
  return rows, written


def _sha256(obj: Any) -> str:
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
  return hashlib.sha256(text.encode()).hexdigest()


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
  """'key: old -> new' for every differing (nested) key."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += _differences(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: {a} -> {b}")
  return out
