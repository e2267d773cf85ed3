"""Every built-in variant's seed line against the golden file recorded before the rules were pieces.

`tests/golden_runs.py` says how the file was made. In the recording environment (same jax, jaxlib,
CPU model and XLA_FLAGS) the same program runs on the same CPU, so the accuracy matrix and the
projection counts must be identical. Elsewhere XLA's kernels round differently (vector width, FMA
contraction) and 600 SGD steps carry those differences into a few test predictions: then GEM's
three numbers are compared within 0.005 (50 of the 10,000 test images of a task), and the counts
not at all.
"""

import json
import re

import golden_runs
import pytest

with open(golden_runs.GOLDEN_JSON) as f:
  GOLDEN = json.load(f)
SAME_ENVIRONMENT = GOLDEN["environment"] == golden_runs.environment()


def numbers(seed_line):
  return [float(v) for v in re.findall(r"-?\d+\.\d+", seed_line)]


def test_the_golden_file_covers_every_built_in_variant():
  from cljax.rules import registry

  variants = {run["argv"][1] for run in GOLDEN["runs"].values()}
  assert variants == set(registry.VARIANTS)
  assert set(GOLDEN["runs"]) == set(golden_runs.RUNS)


@pytest.mark.parametrize("name", list(golden_runs.RUNS))
def test_seed_line_equals_the_golden_run(name, real_fashion_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("CLJAX_DATA", real_fashion_dir)
  got, want = golden_runs.run(name, str(tmp_path)), GOLDEN["runs"][name]
  assert got["argv"] == want["argv"]
  if SAME_ENVIRONMENT:
    assert got["seed_line"] == want["seed_line"]
    assert got["matrix"] == want["matrix"]
    assert got["projections"] == want["projections"]
  else:
    assert numbers(got["seed_line"]) == pytest.approx(numbers(want["seed_line"]), abs=0.005)
