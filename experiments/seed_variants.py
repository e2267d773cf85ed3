"""Faithfulness: the seed note's three A-GEM ways (and GEM, A-GEM, single) over seeds 0-4.

Runs each variant on the seed's configuration (Fashion-MNIST permutations, 10 tasks, 1000 samples
per task, lr 0.01, n_memories 10, memory_strength 10, MLP 2 x 100, batch 1, log_every 100) for
several seeds and prints GEM's Final / Backward / Forward as mean +- std next to the numbers the
seed note printed (one seed, the PyTorch code). One compiled program per variant serves all seeds
(the key and the stream are arguments). Writes a JSON record atomically with --out.

    python experiments/seed_variants.py [--seeds 0 1 2 3 4] [--variants ...] [--out FILE]
"""

import argparse
import json
import time

import jax
import numpy as np

from cljax import data, metrics, tasks
from cljax.rules import registry
from cljax.run_folder import write_atomic
from cljax.train import Config, make_train

SEED_NOTE = {  # printed in the seed note (PyTorch, seed 3)
  "agem_old": (0.4992, -0.1820, 0.0152),
  "agem_new": (0.6100, -0.0781, 0.0161),
  "agem_qp_mean": (0.5804, -0.1134, 0.0081),
}
DEFAULT_VARIANTS = ["agem_old", "agem_new", "agem_qp_mean", "gem", "agem", "single"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
  parser.add_argument("--agem_ref", default="task_mean", choices=["pooled", "task_mean"])
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  dataset = data.load_dataset("fashion_mnist")
  streams = {
    s: tasks.make_stream(
      dataset, protocol="permutations", n_tasks=10, samples_per_task=1000, seed=s
    )
    for s in args.seeds
  }
  records = []
  print(f"{'variant':14s} {'Final':>15s} {'Backward':>16s} {'Forward':>15s}   seed note (seed 3)")
  for variant in args.variants:
    ref = {"agem_ref": args.agem_ref} if variant == "agem" else {}
    run = jax.jit(make_train(Config(), registry.make(variant, **ref)))  # the seed's defaults
    stats = []
    for s in args.seeds:
      t0 = time.perf_counter()
      result = jax.block_until_ready(run(jax.random.key(s), streams[s]))
      R, b = np.asarray(result.acc), np.asarray(result.baseline)
      final, backward, forward = (float(x) for x in metrics.gem_stats(R, b))
      stats.append((final, backward, forward))
      records.append(
        {
          "variant": variant,
          "seed": s,
          "final": final,
          "backward": backward,
          "forward": forward,
          "finite": bool(np.all(result.finite)),
          "projections": np.asarray(  # 0 for the rules that never change g
            result.counters.get("projections", 0 * result.counters["steps"])
          ).tolist(),
          "seconds": time.perf_counter() - t0,
          "matrix": R.tolist(),
        }
      )
    a = np.array(stats)
    cells = [f"{m:.4f} +- {sd:.4f}" for m, sd in zip(a.mean(0), a.std(0), strict=True)]
    note = SEED_NOTE.get(variant)
    note_s = " / ".join(f"{x:.4f}" for x in note) if note else "-"
    print(f"{variant:14s} {cells[0]:>15s} {cells[1]:>16s} {cells[2]:>15s}   {note_s}", flush=True)
    print(f"{'':14s} per seed Final: " + " ".join(f"{x:.4f}" for x in a[:, 0]), flush=True)
    if args.out:  # after every variant, so an interrupted sweep keeps what it computed
      record = {"agem_ref": args.agem_ref, "seeds": args.seeds, "runs": records}
      write_atomic(args.out, (json.dumps(record, indent=1) + "\n").encode())


if __name__ == "__main__":
  main()
