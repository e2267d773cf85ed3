"""CIFAR-10 / CIFAR-100 through TFDS: colour images, their classes, split into tasks.

No CIFAR is reachable here: TFDS is mocked (`tfds.testing.mock_data`) with generated images, a
fixed pattern per class plus noise, so that a run can learn them; the adapter and the engine are
under test, not the dataset. Compared against: the generated arrays, the definition of the split
(task t holds the c classes at positions [t c, (t + 1) c) of the class order), the channel
normalisation written out in numpy, chance (1 / 5 within a task's head), and the one-line
refusals.
"""

import http.server
import json
import os
import threading
import time
import urllib.parse

import flax.linen as nn
import jax
import numpy as np
import pytest

from cljax import __main__ as cli
from cljax import data, networks, run_folder, tasks
from cljax.errors import CljaxError
from cljax.rules import registry
from cljax.sweep import stack_streams
from cljax.train import Config, make_evaluate, make_train

tfds = pytest.importorskip("tensorflow_datasets")

LEARNABLE = 10  # the mock's labels cycle over the first 10 classes: two tasks of 5
SIZES = {"train": 400, "test": 100}


def class_images(split):
  """(N, 32, 32, 3) uint8 images, labels cycling over LEARNABLE: a pattern per class + noise."""
  rng = np.random.default_rng(0 if split == "train" else 1)
  patterns = np.random.default_rng(2).uniform(0, 255, (LEARNABLE, 32, 32, 3))
  labels = np.arange(SIZES[split]) % LEARNABLE
  noise = rng.normal(0, 40, (SIZES[split], 32, 32, 3))
  return np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8), labels


def mock_source(self, split, decoders=None, deserialize_method=None, **kwargs):
  del decoders, deserialize_method, kwargs
  images, labels = class_images(split)
  extra = {"coarse_label": 0} if self.name == "cifar100" else {}
  return [
    {"image": x, "label": int(y), "id": str(i), **extra}
    for i, (x, y) in enumerate(zip(images, labels, strict=True))
  ]


@pytest.fixture
def mock_cifar():
  with tfds.testing.mock_data(as_data_source_fn=mock_source):
    yield


@pytest.mark.parametrize("name,n_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loads_through_tfds_as_colour_uint8(mock_cifar, name, n_classes):
  ds = data.load_dataset(name)  # source auto: CIFAR has no IDX files
  assert ds.train.images.shape == (SIZES["train"], 32, 32, 3) and ds.train.images.dtype == np.uint8
  assert ds.test.images.shape == (SIZES["test"], 32, 32, 3) and ds.test.labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train.images, class_images("train")[0])
  assert ds.spec.n_classes == n_classes and ds.spec.channels_last == (32, 32, 3)
  stream = tasks.make_stream(ds, protocol="split", n_tasks=2, samples_per_task=50, seed=0)
  assert stream.train_x.shape == (SIZES["train"], 3072)  # flat in height, width, channel order
  np.testing.assert_array_equal(stream.train_x[7], ds.train.images[7].reshape(-1))
  c = ds.spec.classes_per_task  # cifar10: 2 (5 tasks), cifar100: 5 (20 tasks, GEM's)
  assert stream.classes.shape == (2, n_classes)
  np.testing.assert_array_equal(np.flatnonzero(stream.classes[1]), np.arange(c, 2 * c))


def test_pixels_are_normalised_as_the_dataset_says(mock_cifar):
  ten = tasks.make_stream(
    data.load_dataset("cifar10"), protocol="split", n_tasks=1, samples_per_task=4, seed=0
  )
  x, _ = tasks.train_batch(ten, 0, 0, 4)
  raw = np.asarray(ten.train_x)[np.asarray(ten.train_idx[0, :4])].reshape(4, 32, 32, 3)
  mean, std = np.asarray(data.SPECS["cifar10"].mean), np.asarray(data.SPECS["cifar10"].std)
  want = ((raw / 255.0 - mean) / std).reshape(4, -1)
  np.testing.assert_allclose(np.asarray(x), want, rtol=0, atol=1e-5)  # |x| <= 2.2: float32 ulps
  hundred = tasks.make_stream(
    data.load_dataset("cifar100"), protocol="split", n_tasks=1, samples_per_task=4, seed=0
  )
  assert hundred.norm is None  # GEM's split CIFAR-100: pixels / 255


def test_a_random_class_order_is_seeded_and_splits_the_classes(mock_cifar):
  ds = data.load_dataset("cifar100")

  def classes(seed, order):
    s = tasks.make_stream(
      ds, protocol="split", n_tasks=None, samples_per_task=1, seed=seed, class_order=order
    )
    return np.asarray(s.classes)

  with pytest.warns(UserWarning):  # the mock holds examples of 10 classes only
    a, b, other, label = (
      classes(3, "random"),
      classes(3, "random"),
      classes(4, "random"),
      classes(3, "label"),
    )
  assert a.shape == (20, 100)
  np.testing.assert_array_equal(a.sum(0), 1)  # every class in exactly one task
  np.testing.assert_array_equal(a.sum(1), 5)
  np.testing.assert_array_equal(a, b)  # the same seed, the same order
  assert not np.array_equal(a, other) and not np.array_equal(a, label)
  with pytest.raises(CljaxError, match="unknown class_order 'sorted'"):
    tasks.make_stream(ds, protocol="split", n_tasks=2, samples_per_task=1, class_order="sorted")


def test_split_cifar100_trains_and_scores_per_task_through_the_cli(mock_cifar, tmp_path, capsys):
  argv = ["--dataset", "cifar100", "--protocol", "split", "--model", "agem", "--n_tasks", "2"]
  argv += ["--samples_per_task", "150", "--batch_size", "10", "--lr", "0.05", "--log_every", "0"]
  argv += ["--network", "mlp"]
  status = cli.main([*argv, "--save_path", str(tmp_path), "--no_plots"])
  err = capsys.readouterr().err
  assert status == 0, err
  folder = tmp_path / run_folder.run_name("agem", "cifar100", "split", 3, agem_ref="pooled")
  with open(folder / run_folder.RESULTS_JSON) as f:
    record = json.load(f)
  matrix = np.asarray(record["matrix"])  # matrix[i, j]: task j after training task i
  assert matrix.shape == (2, 2)
  assert matrix[0, 0] > 0.5 and matrix[1, 1] > 0.5, matrix  # chance within a head: 0.2
  assert record["config"]["classes_per_task"] is None  # the dataset's: 5
  assert record["train_config"]["memory_grads"] == "factored"  # the MLP, 3072 inputs


@pytest.mark.parametrize(
  "argv,match",
  [
    (["--dataset", "cifar10", "--protocol", "permutations"], "cifar10 has colour images"),
    (["--dataset", "cifar10", "--protocol", "split", "--n_tasks", "6"], "at most 5 tasks"),
    (["--dataset", "cifar100", "--protocol", "split", "--n_tasks", "21"], "at most 20 tasks"),
    (["--dataset", "cifar100", "--protocol", "split", "--source", "idx"], "has no IDX files"),
  ],
)
def test_what_cifar_cannot_do_is_refused_in_one_line(mock_cifar, tmp_path, capsys, argv, match):
  status = cli.main([*argv, "--save_path", str(tmp_path)])
  err = capsys.readouterr().err
  lines = [x for x in err.splitlines() if x.startswith("cljax: error: ")]
  assert status == 2 and len(lines) == 1 and match in lines[0] and "Traceback" not in err, err
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", data.DATASETS)
def test_missing_tfds_data_offline_is_one_line_within_seconds(tmp_path, monkeypatch, name):
  probed = []

  def offline(url, **kw):
    probed.append(url)
    return False

  monkeypatch.setattr(data, "_reachable", offline)
  start = time.perf_counter()
  with pytest.raises(CljaxError) as info:
    data.load_tfds(name, data_dir=str(tmp_path))
  assert time.perf_counter() - start < 30  # no download retries (they took minutes)
  message = str(info.value)
  host = urllib.parse.urlsplit(data.SPECS[name].download).hostname
  assert "\n" not in message and f"{name} is not prepared in {tmp_path}" in message
  assert f"{host} cannot be reached" in message and "--tfds_data_dir" in message
  assert probed == [data.SPECS[name].download]


def test_the_probe_needs_an_http_answer():
  # A server that answers (any status) is reachable; a closed port is not, at once.
  server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
  thread = threading.Thread(target=server.handle_request, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{server.server_port}/"
  try:
    assert data._reachable(url, timeout=5)  # 501: HEAD not implemented, but an answer
  finally:
    thread.join(5)
    server.server_close()
  start = time.perf_counter()
  assert not data._reachable(url, timeout=0.5)  # nothing listens now
  assert not data._reachable("not a url")
  assert time.perf_counter() - start < 5


# --- split CIFAR-100 on GEM's ResNet-18 (networks with state), epochs ---------------------------


class BatchNormCNN(nn.Module):
  """A small stateful network from outside cljax: convolution, BatchNorm, Dense."""

  n_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), strides=(2, 2), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return nn.Dense(self.n_classes)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def grey_split(small_dataset):
  return tasks.make_stream(small_dataset, protocol="split", n_tasks=2, samples_per_task=20, seed=0)


@pytest.mark.parametrize("variant", ["single", "gem"])
def test_batch_statistics_are_learned_in_training_and_read_unchanged_in_evaluation(
  grey_split, variant
):
  net = networks.from_module(BatchNormCNN(), input_shape=(28, 28, 1), n_classes=10)
  assert net.state == ("batch_stats",) and not net.dense_only and net.first_dense is None
  config = Config(batch_size=5, lr=0.05, log_every=0, n_memories=5)
  result = jax.jit(make_train(config, registry.make(variant), network=net))(
    jax.random.key(0), grey_split
  )
  initial = net.init_state()
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), result.model_state, initial)
  assert all(jax.tree.leaves(moved))  # every running mean and variance
  evaluate = jax.jit(make_evaluate(config, net))
  np.testing.assert_array_equal(
    evaluate(result.params, grey_split, result.model_state), result.acc[-1]
  )
  assert not np.array_equal(evaluate(result.params, grey_split), result.acc[-1])  # initial ones
  # Evaluation mode: an example's logits do not depend on the batch it comes in.
  x, _ = tasks.eval_set(grey_split, 0)
  one = net.apply_eval(result.params, result.model_state, x[:1])
  np.testing.assert_allclose(
    one, net.apply_eval(result.params, result.model_state, x[:7])[:1], atol=1e-5
  )


def test_memory_passes_update_the_averages_as_the_gem_codes_observe(grey_split):
  # With memory, each past task's memory passes through the network before the batch (GEM's
  # observe): with lr 0 the parameters stay, and the averages after task 1's first step are the
  # momentum updates by task 0's memory, then by the batch.
  net = networks.from_module(BatchNormCNN(), input_shape=(28, 28, 1), n_classes=10)
  config = Config(batch_size=20, lr=1e-30, log_every=0, n_memories=5)
  result = jax.jit(make_train(config, registry.make("agem"), network=net))(
    jax.random.key(0), grey_split
  )
  tagged = networks.task_network(net, n_tasks=2, classes=grey_split.classes)
  state = net.init_state()
  x0, _ = tasks.train_batch(grey_split, 0, 0, 20)
  _, state = tagged.apply_train(result.params, state, tagged.tag(x0, 0))  # task 0: the batch only
  memory = tagged.tag(x0[:5], 0)  # its ring buffer kept the first 5 examples (GEM's)
  _, state = tagged.apply_train(result.params, state, memory)
  x1, _ = tasks.train_batch(grey_split, 1, 0, 20)
  _, state = tagged.apply_train(result.params, state, tagged.tag(x1, 1))
  for a, b in zip(jax.tree.leaves(result.model_state), jax.tree.leaves(state), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_n_epochs_visits_every_sample_once_per_epoch_reshuffled(grey_split):
  key = jax.random.key(5)
  steps = 20 // 4
  rows = np.stack(
    [np.asarray(tasks.batch_rows(grey_split, 1, j, 4, shuffle_key=key)) for j in range(2 * steps)]
  )
  first, second = rows[:steps].ravel(), rows[steps:].ravel()
  np.testing.assert_array_equal(first, np.asarray(grey_split.train_idx[1]))  # epoch 0: as stored
  np.testing.assert_array_equal(np.sort(second), np.sort(first))  # every sample again
  assert not np.array_equal(second, first)  # in another order
  config = Config(batch_size=4, n_epochs=2, log_every=0)
  result = jax.jit(make_train(config, registry.make("single")))(jax.random.key(0), grey_split)
  np.testing.assert_array_equal(result.counters["steps"], [2 * steps, 2 * steps])


@pytest.mark.parametrize("variant", ["single", "er", "agem", "gem"])
def test_split_cifar100_on_gems_resnet18_through_the_cli(mock_cifar, tmp_path, capsys, variant):
  argv = ["--preset", "gem_paper_cifar", "--model", variant, "--n_tasks", "2"]
  argv += ["--samples_per_task", "30", "--n_memories", "10", "--replay_batch_size", "10"]
  status = cli.main([*argv, "--log_every", "0", "--save_path", str(tmp_path), "--no_plots"])
  err = capsys.readouterr().err
  assert status == 0, err
  (folder,) = os.listdir(tmp_path)
  with open(tmp_path / folder / run_folder.RESULTS_JSON) as f:
    record = json.load(f)
  assert np.asarray(record["matrix"]).shape == (2, 2) and all(record["finite"])
  assert record["config"]["network"] == "resnet18" and record["config"]["dataset"] == "cifar100"
  assert record["train_config"]["memory_grads"] == "explicit"  # convolutions: not factored
  assert record["counters"]["steps"] == [3, 3]


@pytest.mark.parametrize(
  "argv,match",
  [
    (["--network", "resnet18"], "resnet18 reads 32 x 32 x 3 colour images"),
    (["--n_epochs", "0"], "n_epochs must be >= 1, got 0"),
    (["--preset", "gem_paper_cifar", "--model", "independent"], "independent trains one ResNet18"),
    (["--preset", "gem_paper_cifar", "--model", "gem_grouped"], "groups the hidden Dense units"),
  ],
)
def test_what_the_resnet_cannot_do_is_refused_in_one_line(
  mock_cifar, tmp_path, capsys, argv, match
):
  argv = [*argv, "--n_tasks", "2", "--samples_per_task", "30"]  # what the mock holds
  status = cli.main([*argv, "--save_path", str(tmp_path)])
  err = capsys.readouterr().err
  lines = [x for x in err.splitlines() if x.startswith("cljax: error: ")]
  assert status == 2 and len(lines) == 1 and match in lines[0] and "Traceback" not in err, err
  assert os.listdir(tmp_path) == []


def test_a_sweep_refuses_seeds_with_their_own_random_class_orders(small_dataset):
  streams = [
    tasks.make_stream(
      small_dataset,
      protocol="split",
      n_tasks=2,
      samples_per_task=5,
      seed=seed,
      class_order="random",
    )
    for seed in (0, 1)
  ]
  assert not np.array_equal(streams[0].classes, streams[1].classes)
  with pytest.raises(CljaxError, match=r"differ in their split's classes \(a random class order"):
    stack_streams(streams)
