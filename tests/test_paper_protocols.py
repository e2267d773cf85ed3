"""experiments/paper_protocols.py: its records are resumable and its report reads them.

Compared against: the records it wrote (reused, not recomputed, on a second call) and the
metrics of their own matrices (`cljax.metrics.paper_stats`).
"""

import os
import sys
import types

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
import paper_protocols

from cljax.metrics import paper_stats


@pytest.fixture
def args(tmp_path):
  return types.SimpleNamespace(seeds=2, runs_dir=str(tmp_path / "runs"), samples_per_task=10)


def test_records_are_written_once_and_reused(small_dataset, args):
  first = paper_protocols.run_cell(args, small_dataset, "split", "er")
  assert [r["seed"] for r in first] == [0, 1] and all(r["finite"] for r in first)
  for r in first:
    want = paper_stats(np.asarray(r["matrix"]), np.asarray(r["baseline"]))._asdict()
    assert r["paper_stats"] == pytest.approx({k: float(v) for k, v in want.items()})
    assert len(r["matrix"]) == 5  # split: all 10 / 2 tasks
  path = paper_protocols.record_path(args.runs_dir, "split", "er", 1)
  mtime = os.stat(path).st_mtime_ns
  again = paper_protocols.run_cell(args, small_dataset, "split", "er")
  assert again == first and os.stat(path).st_mtime_ns == mtime  # read back, not run again


def test_the_report_has_a_row_per_method_and_protocol(small_dataset, args):
  records = paper_protocols.run_cell(args, small_dataset, "split", "single")  # one real cell,
  table = {p: dict.fromkeys(paper_protocols.METHODS, records) for p in paper_protocols.PROTOCOLS}
  text = paper_protocols.report(table, args.seeds)  # in every place of the table
  for p in paper_protocols.PROTOCOLS:
    assert f"## {p}" in text
  for m in paper_protocols.METHODS:
    assert text.count(f"| {m} |") == len(paper_protocols.PROTOCOLS)
  acc = np.mean([r["paper_stats"]["acc"] for r in records])
  assert f"| single | {acc:.3f} +- " in text
  assert "GEM 77 s vs single 11 s" in text and "A-GEM 89.1" in text
  # The training time per step: the run less its T + 1 evaluations, over its steps.
  timed = paper_protocols.report(table, args.seeds, dict.fromkeys(paper_protocols.PROTOCOLS, 0.01))
  r = records[0]
  run_s = float(np.median([x["run_s"] for x in records]))
  per_step = 1000 * (run_s - (len(r["matrix"]) + 1) * 0.01) / r["steps"]
  assert f"| {run_s:.1f} | {per_step:.2f} |" in timed
