"""The golden runs: every built-in variant's seed line on a short configuration of the real data.

`python tests/golden_runs.py` runs them through the CLI (`python -m cljax`'s `main`) and writes
`tests/golden_runs.json`: per run its command line, GEM's seed line, the (T, T) accuracy matrix
and the per-task projection counts, with the environment that computed them (jax / jaxlib
versions, CPU model, XLA_FLAGS). `tests/test_golden.py` runs them again: in the recording
environment the numbers must be the same bit for bit (the same program on the same CPU); on
another CPU or XLA version the kernels round differently, so only GEM's three numbers are
compared, within 0.005.

Recorded on the engine before the rules became pluggable pieces, so that the refactoring is
checked against the numbers it started from. The test suite compiles at LLVM optimisation level 1
(`SUITE_XLA_FLAG`, set by conftest: a third less compile time, the same run time), which rounds
one grouped run differently from the default level 2, so the file is recorded under it too
(`main` sets it); at level 2 the refactored engine reproduced the recording bit for bit as well.
gem and gem_grouped were recorded again when their QP moved out of the compiled slot counts (one
solve at size T with the future tasks masked, instead of one at each slot count): the same math,
rounded differently (gem: Final 0.4167 -> 0.4214, Forward -0.0282 -> -0.0269; gem_grouped: one
matrix entry in the fourth decimal); every other run stayed bit for bit. The baselines (ewc, er,
independent) came later and were recorded on another CPU with
`python tests/golden_runs.py --add NAME...`: such a run carries its own environment, which
decides whether it is compared bit for bit.
"""

import json
import os
import platform
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE_XLA_FLAG = "--xla_backend_optimization_level=1"
GOLDEN_JSON = os.path.join(HERE, "golden_runs.json")

# 3 tasks x 200 samples, seed 3, evaluations at task ends only.
SHORT = ["--n_tasks", "3", "--samples_per_task", "200", "--seed", "3", "--log_every", "0"]
RUNS = {
  "single": ["--model", "single"],
  "gem": ["--model", "gem"],
  "gem-explicit": ["--model", "gem", "--memory_grads", "explicit"],
  "agem": ["--model", "agem"],
  "agem-task_mean": ["--model", "agem", "--agem_ref", "task_mean"],
  "agem_old": ["--model", "agem_old"],
  "agem_old-reference_row-mean": ["--model", "agem_old", "--reference_row", "mean"],
  "agem_new": ["--model", "agem_new"],
  "agem_new-trigger-reference": ["--model", "agem_new", "--trigger", "reference"],
  "agem_new-projection-conditional": ["--model", "agem_new", "--projection", "conditional"],
  "agem_qp_mean": ["--model", "agem_qp_mean"],
  "gem_grouped": ["--model", "gem_grouped"],
  "agem_grouped": ["--model", "agem_grouped"],
  "agem_qp_grouped": ["--model", "agem_qp_grouped"],
  # Recorded later, on another CPU, each with its own environment (`main(["--add", ...])`).
  "ewc": ["--model", "ewc", "--memory_strength", "100"],
  "ewc-fisher-batch_squared": [
    "--model",
    "ewc",
    "--memory_strength",
    "100",
    "--fisher",
    "batch_squared",
  ],
  "er": ["--model", "er"],
  "er-replay_buffer-reservoir": ["--model", "er", "--replay_buffer", "reservoir"],
  "independent": ["--model", "independent"],
  "independent-finetune-yes": ["--model", "independent", "--finetune", "yes"],
}


def environment() -> dict:
  """What decides the rounding of a compiled run: the XLA version, the CPU and its vector ISA
  (a CPU model name can cover several generations), the XLA flags."""
  import jax
  import jaxlib

  cpu, isa = platform.processor(), []
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    isa = sorted(f for f in flags if f.startswith(("avx", "fma", "sse4", "f16c", "amx")))
  except OSError:
    pass
  return {
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "cpu": cpu,
    "cpu_isa": isa,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def run(name: str, save_path: str) -> dict:
  """Runs RUNS[name] through the CLI; its seed line, matrix and projection counts."""
  from cljax import __main__ as cli
  from cljax.run_folder import RESULTS_JSON

  argv = [*RUNS[name], *SHORT, "--save_path", save_path, "--no_plots"]
  before = set(os.listdir(save_path))
  status = cli.main(argv)
  if status != 0:
    raise RuntimeError(f"{name}: exit status {status}")
  (folder,) = set(os.listdir(save_path)) - before
  with open(os.path.join(save_path, folder, RESULTS_JSON)) as f:
    record = json.load(f)
  return {
    "argv": argv[:-3],
    "seed_line": record["seed_line"],
    "matrix": record["matrix"],
    "projections": changed_g(record["counters"]),
  }


def changed_g(counters: dict) -> list:
  """Per task, the steps whose gradient the rule changed: its projections (er: replayed), 0 for
  a rule that reports neither (single, independent, ewc): the file's "projections", recorded
  when every rule filled GEM's projection counters."""
  zeros = [0] * len(counters["steps"])
  return counters.get("projections", counters.get("replayed", zeros))


def with_suite_flag(xla_flags: str) -> str:
  """XLA_FLAGS with the suite's optimisation level, unless a level is set already."""
  if "xla_backend_optimization_level" in xla_flags:
    return xla_flags
  return f"{xla_flags} {SUITE_XLA_FLAG}".strip()


def main(argv: list[str] | None = None) -> int:
  """Records every run anew, or with --add NAME... only those runs, each with this environment
  (the other runs and the file's environment kept)."""
  argv = sys.argv[1:] if argv is None else argv
  add = argv[1:] if argv[:1] == ["--add"] else None
  os.environ["XLA_FLAGS"] = with_suite_flag(os.environ.get("XLA_FLAGS", ""))  # before jax starts
  golden = {"environment": environment(), "runs": {}}
  if add is not None:
    with open(GOLDEN_JSON) as f:
      golden = json.load(f)
  with tempfile.TemporaryDirectory() as tmp:
    for name in RUNS if add is None else add:
      os.makedirs(os.path.join(tmp, name))
      golden["runs"][name] = run(name, os.path.join(tmp, name))
      if add is not None:
        golden["runs"][name]["environment"] = environment()
  golden["runs"] = {name: golden["runs"][name] for name in RUNS if name in golden["runs"]}
  with open(GOLDEN_JSON + ".tmp", "w") as f:
    json.dump(golden, f, indent=1)
    f.write("\n")
  os.replace(GOLDEN_JSON + ".tmp", GOLDEN_JSON)
  print(f"wrote {GOLDEN_JSON}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
