"""Shared helpers of the report scripts (which_agem.py, grouped.py): rows of sweeps and their seeds.

A row is one resumable sweep (`cljax.sweep_cli`) at one grid point; its records over seeds are
compared with another row's by the mean difference and its standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NamedTuple

import numpy as np

from cljax import sweep_cli, sweep_folder
from cljax.run_folder import write_atomic


class Row(NamedTuple):
  """One line of the report's table: a sweep's flags and grid point."""

  key: str
  label: str
  flags: tuple[str, ...]  # python -m cljax flags (one sweep each)
  memory_strength: float  # the row's grid point
  parts: str  # (reference row, trigger, projection) in words
  role: str  # what the row is or isolates


def row_folder(runs_dir: str, row: Row) -> str:
  return os.path.join(runs_dir, "_".join(f.lstrip("-") for f in row.flags))


def run_sweeps(args: argparse.Namespace, rows: list[Row]) -> None:
  """One resumable sweep per distinct flag set; margin 0 and 10 share a compiled grid."""
  grids: dict[tuple[str, ...], list[float]] = {}
  for row in rows:
    grids.setdefault(row.flags, [])
    if row.memory_strength not in grids[row.flags]:
      grids[row.flags].append(row.memory_strength)
  for flags, margins in grids.items():
    argv = [*flags, "--seeds", str(args.seeds), "--log_every", "0", "--no_plots"]
    argv += ["--memory_strength", ",".join(f"{m:g}" for m in margins)]
    argv += ["--sweep_dir", row_folder(args.runs_dir, rows[[r.flags for r in rows].index(flags)])]
    print("\n$ python -m cljax.sweep_cli " + " ".join(argv), flush=True)
    status = sweep_cli.main(argv + args.extra)
    if status != 0:
      sys.exit(status)


def row_records(runs_dir: str, row: Row) -> list[dict]:
  folder = row_folder(runs_dir, row)
  with open(os.path.join(folder, sweep_folder.SWEEP_JSON)) as f:
    fp = json.load(f)["fingerprint"]
  out = [
    r
    for r in sweep_folder.folder_records(folder, fp)
    if r["sweep"]["setting"]["memory_strength"] == row.memory_strength
  ]
  return sorted(out, key=lambda r: r["sweep"]["seed"])


def diff(a: dict, b: dict, metric: str = "final") -> tuple[float, float]:
  """(mean difference a - b, its standard error) of a metric over two rows' seeds."""
  xa = np.array([r["gem_stats"][metric] for r in a["records"]])
  xb = np.array([r["gem_stats"][metric] for r in b["records"]])
  se = np.sqrt(xa.var(ddof=1) / len(xa) + xb.var(ddof=1) / len(xb))
  return float(xa.mean() - xb.mean()), float(se)


def fmt_diff(d: tuple[float, float]) -> str:
  mean, se = d
  verdict = "significant" if abs(mean) > 2 * se else "within noise"
  return f"{mean:+.4f} +- {2 * se:.4f} (2 SE; {verdict})"


def row_table(runs_dir: str, rows: list[Row]) -> tuple[dict[str, dict], int]:
  """{row key: {row, records, summary}} and the smallest number of seeds of a row."""
  table = {}
  for row in rows:
    recs = row_records(runs_dir, row)
    (summary,) = sweep_folder.summarize(recs)
    table[row.key] = {"row": row, "records": recs, "summary": summary}
  return table, min(t["summary"]["n"] for t in table.values())


def bars_png(table: dict[str, dict], path: str) -> list[dict]:
  """Writes the Final / Backward / Forward bars of a row table; returns its summaries."""
  labels = [t["row"].label for t in table.values()]
  rows = [t["summary"] for t in table.values()]
  png = sweep_folder.plot_bars(
    labels, rows, title="Final / Backward / Forward, mean +- std over seeds"
  )
  write_atomic(path, png)
  return rows
