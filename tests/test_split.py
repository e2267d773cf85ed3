"""Task-incremental split protocols (`tasks.make_stream(protocol="split")`, the engine's heads).

Compared against: the definition (task t holds classes [t c, (t + 1) c), trains on their examples
and is scored on them with its own classes' logits), numpy argmax over the masked logits, and
the exact zero gradient a head's mask gives the classes outside every trained task.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax import __main__ as cli
from cljax import data, tasks
from cljax.errors import CljaxError
from cljax.models import make_mlp
from cljax.rules import registry
from cljax.train import Config, make_evaluate, make_train


@pytest.fixture(scope="module")
def real_split(real_fashion_dir):
  dataset = data.load_dataset("fashion_mnist", data_path=real_fashion_dir, source="idx")
  return tasks.make_stream(
    dataset, protocol="split", n_tasks=None, samples_per_task=300, test_samples=2000, seed=0
  )


@pytest.mark.realdata
def test_split_fashion_mnist_tasks_hold_disjoint_classes(real_split):
  s = real_split
  classes = np.asarray(s.classes)
  assert classes.shape == (5, 10)  # 10 classes / 2 per task
  np.testing.assert_array_equal(classes.sum(0), 1)  # every class in exactly one task
  train_y = np.asarray(s.train_y)
  for t in range(5):
    np.testing.assert_array_equal(np.flatnonzero(classes[t]), [2 * t, 2 * t + 1])
    labels = set(train_y[np.asarray(s.train_idx[t])].tolist())
    assert labels == {2 * t, 2 * t + 1}  # both classes drawn, nothing else
  assert len(set(np.asarray(s.train_idx).ravel().tolist())) == 5 * 300  # disjoint examples
  np.testing.assert_array_equal(np.asarray(s.pix_idx)[:, :, 0], np.arange(784)[None].repeat(5, 0))


def test_split_task_counts_and_bad_counts(small_dataset):
  three = tasks.make_stream(
    small_dataset, protocol="split", n_tasks=None, samples_per_task=5, classes_per_task=3
  )
  assert three.classes.shape == (3, 10)  # 10 // 3 tasks; class 9 in none
  assert not np.asarray(three.classes)[:, 9].any()
  two = tasks.make_stream(small_dataset, protocol="split", n_tasks=2, samples_per_task=5)
  assert two.classes.shape == (2, 10)
  with pytest.raises(CljaxError, match=r"at most 5 tasks \(10 classes\), got n_tasks 6"):
    tasks.make_stream(small_dataset, protocol="split", n_tasks=6, samples_per_task=5)
  with pytest.raises(CljaxError, match="n_tasks is needed for protocol permutations"):
    tasks.make_stream(small_dataset, protocol="permutations", n_tasks=None, samples_per_task=5)
  with pytest.warns(UserWarning, match="samples_per_task=1000 exceeds"):
    clamped = tasks.make_stream(small_dataset, protocol="split", n_tasks=5, samples_per_task=1000)
  counts = [(np.asarray(small_dataset.train.labels) // 2 == t).sum() for t in range(5)]
  assert clamped.train_idx.shape == (5, min(counts))  # the smallest task's examples


def test_each_task_is_scored_on_its_classes_with_its_head(small_dataset):
  stream = tasks.make_stream(small_dataset, protocol="split", n_tasks=5, samples_per_task=5)
  config = Config(n_hiddens=16, eval_batch_size=16)  # several batches + padding
  model = make_mlp(16, 2, init="torch")
  params = model.init(jax.random.key(1), jnp.zeros((1, 784)))["params"]
  got = np.asarray(jax.jit(make_evaluate(config))(params, stream))
  x = np.asarray(stream.test_x, np.float32) * tasks.PIXEL_SCALE
  logits = np.asarray(model.apply({"params": params}, jnp.asarray(x)))
  y = np.asarray(stream.test_y)
  for t in range(5):
    mine = np.flatnonzero(np.asarray(stream.classes[t]))
    rows = np.isin(y, mine)
    head = logits[rows][:, mine]
    want = np.sum(mine[np.argmax(head, 1)] == y[rows])  # correct examples
    # The evaluation's first layer is the folded (identity) one, another program: an example
    # whose two logits are within float32 rounding (1e-4 here) may go either way.
    ties = np.sum(np.abs(head[:, 0] - head[:, 1]) < 1e-4)
    assert abs(round(float(got[t]) * rows.sum()) - want) <= ties


@pytest.mark.parametrize("variant", ["single", "gem", "er", "ewc"])
def test_heads_leave_the_classes_of_untrained_tasks_untouched(small_dataset, variant):
  """Tasks 0 and 1 (classes 0-3) trained: the output units of classes 4-9 get exactly zero
  gradient from the batch, the memory (gem, er) and the Fisher (ewc), so they keep their init."""
  stream = tasks.make_stream(small_dataset, protocol="split", n_tasks=2, samples_per_task=20)
  config = Config(n_hiddens=16, n_memories=4, log_every=0, lr=0.1)
  result = jax.jit(make_train(config, registry.make(variant)))(jax.random.key(0), stream)
  init = make_mlp(16, 2, init="gem").init(
    jax.random.split(jax.random.key(0))[0], jnp.zeros((1, 784))
  )
  out, out0 = result.params["out"], init["params"]["out"]
  np.testing.assert_array_equal(np.asarray(out["kernel"])[:, 4:], np.asarray(out0["kernel"])[:, 4:])
  np.testing.assert_array_equal(np.asarray(out["bias"])[4:], np.asarray(out0["bias"])[4:])
  assert not np.array_equal(np.asarray(out["kernel"])[:, :4], np.asarray(out0["kernel"])[:, :4])
  if variant == "gem":
    assert int(result.counters["projections"][1]) > 0  # the memory's gradients were used


def test_grouped_variants_refuse_split_in_one_line(small_dataset):
  stream = tasks.make_stream(small_dataset, protocol="split", n_tasks=2, samples_per_task=20)
  config = Config(n_hiddens=20, log_every=0)
  with pytest.raises(CljaxError, match="the rule reads the network's hidden units") as err:
    jax.jit(make_train(config, registry.make("gem_grouped")))(jax.random.key(0), stream)
  assert "\n" not in str(err.value)


def test_the_cli_refuses_a_grouped_variant_on_split_by_name_before_loading_data():
  from cljax import run_setup

  args, _ = run_setup.parse_args(["--model", "agem_grouped", "--protocol", "split"])
  with pytest.raises(CljaxError, match="agem_grouped reads the network's hidden units") as err:
    run_setup.rule_for(args, run_setup.train_config(args))
  assert "\n" not in str(err.value)


def test_cli_split_defaults_to_all_tasks_and_records_them(idx_dir, tmp_path, capsys):
  directory, _ = idx_dir
  argv = ["--protocol", "split", "--data_path", directory, "--samples_per_task", "2"]
  argv += [
    "--n_hiddens",
    "8",
    "--log_every",
    "0",
    "--no_plots",
    "--save_path",
    str(tmp_path / "runs"),
  ]
  assert cli.main(argv) == 0
  (folder,) = os.listdir(tmp_path / "runs")
  with open(tmp_path / "runs" / folder / "results.json") as f:
    record = json.load(f)
  assert record["n_tasks"] == 5 and record["config"]["n_tasks"] == 5
  assert cli.main([*argv, "--n_tasks", "7"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].endswith(
    "at most 5 tasks (10 classes), got n_tasks 7: lower n_tasks or classes_per_task."
  )


def test_classes_per_task_without_split_is_a_note():
  from cljax import run_setup

  _, notes = run_setup.parse_args(["--classes_per_task", "5"])
  assert notes == ["--classes_per_task is read by --protocol split only, not permutations"]
  _, notes = run_setup.parse_args(["--classes_per_task", "5", "--protocol", "split"])
  assert notes == []
