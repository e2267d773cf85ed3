"""Tests for cljax.tasks (protocols as pixel maps, the stream, batching)."""

import chex
import jax
import jax.numpy as jnp
import numerics
import numpy as np
import pytest

from cljax import data, tasks
from cljax.errors import CljaxError

D = 784


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def _apply(images, pix):
  """apply_transform on (N, 28, 28) uint8 images, back as (N, 28, 28) float32."""
  x = images.reshape(images.shape[0], -1)
  return np.asarray(tasks.apply_transform(x, jnp.asarray(pix[0]), jnp.asarray(pix[1]))).reshape(
    images.shape
  )


def _reference(stream, x_rows, t):
  """numpy reference for task t's transform of base rows x_rows (N, D) uint8."""
  idx, w = np.asarray(stream.pix_idx[t]), np.asarray(stream.pix_w[t])
  return (x_rows[:, idx].astype(np.float64) * w).sum(-1) / 255.0


# --- pixel maps -----------------------------------------------------------------------------------


def test_permutation_transform_permutes_exactly():
  perm = np.random.default_rng(0).permutation(D)
  pix_idx, pix_w = tasks.permutation_transform(perm)
  assert pix_idx.shape == (D, 1) and pix_idx.dtype == np.int32
  assert pix_w.shape == (D, 1) and pix_w.dtype == np.float32 and np.all(pix_w == 1)
  images = _images(5)
  x = images.reshape(5, D)
  out = np.asarray(tasks.apply_transform(x, pix_idx, pix_w))
  np.testing.assert_array_equal(out, x[:, perm].astype(np.float32) * tasks.PIXEL_SCALE)
  # A bijection: undoing it with the inverse permutation recovers the image exactly.
  inverse = np.argsort(perm)
  back = np.asarray(
    tasks.apply_transform(
      (out * 255).round().astype(np.uint8), *tasks.permutation_transform(inverse)
    )
  )
  np.testing.assert_array_equal(back, x * tasks.PIXEL_SCALE)


@pytest.mark.parametrize(
  "bad", [np.array([0, 0, 1]), np.arange(4).reshape(2, 2), np.array([0.0, 1])]
)
def test_permutation_transform_rejects_non_permutations(bad):
  with pytest.raises(CljaxError, match="permutation"):
    tasks.permutation_transform(bad)


@pytest.mark.parametrize("interpolation,k", [("bilinear", 4), ("nearest", 1)])
def test_rotation_by_zero_is_identity(interpolation, k):
  pix_idx, pix_w = tasks.rotation_transform(0.0, interpolation=interpolation)
  assert pix_idx.shape == (D, k) and pix_w.shape == (D, k)
  images = _images(4)
  np.testing.assert_array_equal(_apply(images, (pix_idx, pix_w)), images * tasks.PIXEL_SCALE)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
@pytest.mark.parametrize("angle,k", [(90, 1), (180, 2), (270, 3), (-90, 3), (360, 0)])
def test_rotation_multiples_of_90_match_rot90(interpolation, angle, k):
  # Positive angles turn the picture counter-clockwise, as np.rot90 and PIL's Image.rotate.
  images = _images(3, seed=angle % 7)
  pix = tasks.rotation_transform(angle, interpolation=interpolation)
  expected = np.rot90(images, k=k, axes=(1, 2)) * tasks.PIXEL_SCALE
  np.testing.assert_array_equal(_apply(images, pix), expected)


@pytest.mark.parametrize("angle", [7.3, 33.0, 45.0, 128.9])
def test_bilinear_rotation_matches_scipy(angle):
  ndimage = pytest.importorskip("scipy.ndimage")
  images = _images(3)
  theta = np.radians(angle)
  c, s = np.cos(theta), np.sin(theta)
  matrix = np.array([[c, s], [-s, c]])  # output (row, col) -> input (row, col)
  centre = np.array([13.5, 13.5])
  expected = np.stack(
    [
      ndimage.affine_transform(
        im.astype(np.float64),
        matrix,
        offset=centre - matrix @ centre,
        order=1,
        mode="grid-constant",
      )
      for im in images
    ]
  )
  np.testing.assert_allclose(
    _apply(images, tasks.rotation_transform(angle)), expected / 255, atol=1e-6
  )


@pytest.mark.parametrize("angle", [13.7, 100.3, 171.2])
def test_nearest_rotation_matches_gem_pil(angle):
  # GEM rotated with PIL's Image.rotate (nearest-neighbour by default).
  pil = pytest.importorskip("PIL.Image")
  images = _images(3)
  expected = np.stack([np.asarray(pil.fromarray(im, mode="L").rotate(angle)) for im in images])
  out = _apply(images, tasks.rotation_transform(angle, interpolation="nearest"))
  np.testing.assert_array_equal(np.round(out * 255).astype(np.uint8), expected)


def test_rotation_reads_zero_outside_and_weights_sum_to_one_inside():
  pix_idx, pix_w = tasks.rotation_transform(45.0)
  total = pix_w.sum(-1).reshape(28, 28)
  assert np.all(total <= 1 + 1e-6)
  np.testing.assert_allclose(total[10:18, 10:18], 1.0, atol=1e-6)  # centre: fully inside
  assert total[0, 0] == 0  # corner of a 45-degree rotation samples outside the image
  ones = np.full((1, 28, 28), 255, np.uint8)
  assert _apply(ones, (pix_idx, pix_w))[0, 0, 0] == 0


def test_rotation_bad_arguments():
  with pytest.raises(CljaxError, match="unknown interpolation 'cubic': choose one of bilinear"):
    tasks.rotation_transform(10.0, interpolation="cubic")
  with pytest.raises(CljaxError, match="finite"):
    tasks.rotation_transform(float("nan"))


def test_rotation_angles_follow_gem_bins():
  angles = tasks.rotation_angles(20, seed=3)
  width = 180 / 20
  bins = np.floor(angles / width)
  np.testing.assert_array_equal(bins, np.arange(20))
  np.testing.assert_array_equal(angles, tasks.rotation_angles(20, seed=3))
  assert not np.allclose(angles, tasks.rotation_angles(20, seed=4))
  shifted = tasks.rotation_angles(4, seed=0, min_rot=10, max_rot=50)
  np.testing.assert_array_equal(np.floor((shifted - 10) / 10), np.arange(4))


def test_task_permutations():
  perms = tasks.task_permutations(5, D, seed=0)
  assert perms.shape == (5, D)
  for p in perms:
    np.testing.assert_array_equal(np.sort(p), np.arange(D))
  assert not np.array_equal(perms[0], np.arange(D))  # GEM: task 0 is permuted too
  assert len({p.tobytes() for p in perms}) == 5
  np.testing.assert_array_equal(tasks.task_permutations(3, D, seed=0), perms[:3])


# --- make_stream ----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol,k", [("permutations", 1), ("rotations", 4)])
def test_make_stream_shapes(small_dataset, protocol, k):
  stream = tasks.make_stream(small_dataset, protocol=protocol, n_tasks=3, samples_per_task=40)
  chex.assert_shape(stream.train_x, (300, D))
  chex.assert_shape(stream.test_x, (50, D))
  chex.assert_shape(stream.train_idx, (3, 40))
  chex.assert_shape([stream.pix_idx, stream.pix_w], (3, D, k))
  assert stream.train_x.dtype == jnp.uint8 and stream.train_y.dtype == jnp.int32
  assert stream.train_idx.dtype == jnp.int32 and stream.pix_w.dtype == jnp.float32
  np.testing.assert_array_equal(stream.train_x, small_dataset.train.images.reshape(300, D))
  for row in np.asarray(stream.train_idx):
    assert len(set(row.tolist())) == 40 and row.min() >= 0 and row.max() < 300  # no replacement
  # Default: the full test split for every task, as GEM.
  np.testing.assert_array_equal(stream.test_x, small_dataset.test.images.reshape(50, D))


@pytest.mark.parametrize("protocol", ["permutations", "rotations"])  # split: test_split.py
def test_tasks_differ(small_dataset, protocol):
  stream = tasks.make_stream(small_dataset, protocol=protocol, n_tasks=3, samples_per_task=20)
  x = np.asarray(stream.test_x)
  outs = [np.asarray(tasks.eval_set(stream, t)[0]) for t in range(3)]
  assert not np.allclose(outs[0], outs[1]) and not np.allclose(outs[1], outs[2])
  assert not np.array_equal(np.asarray(stream.train_idx[0]), np.asarray(stream.train_idx[1]))
  for t in range(3):
    np.testing.assert_allclose(outs[t], _reference(stream, x, t), atol=1e-6)
    np.testing.assert_array_equal(tasks.eval_set(stream, t)[1], stream.test_y)


def test_determinism(small_dataset):
  kwargs = dict(protocol="rotations", n_tasks=4, samples_per_task=30, test_samples=20)
  a = tasks.make_stream(small_dataset, seed=5, **kwargs)
  b = tasks.make_stream(small_dataset, seed=5, **kwargs)
  c = tasks.make_stream(small_dataset, seed=6, **kwargs)
  chex.assert_trees_all_equal(a, b)
  for name in ("train_idx", "test_x", "pix_w"):
    assert not np.array_equal(getattr(a, name), getattr(c, name)), name
  # The transforms do not depend on samples_per_task (independent RNG streams).
  d = tasks.make_stream(small_dataset, seed=5, **{**kwargs, "samples_per_task": 10})
  np.testing.assert_array_equal(a.pix_w, d.pix_w)


def test_test_samples_subset_shared_by_tasks(small_dataset):
  stream = tasks.make_stream(
    small_dataset, protocol="permutations", n_tasks=3, samples_per_task=5, test_samples=12
  )
  base = small_dataset.test.images.reshape(50, D)
  assert stream.test_x.shape == (12, D) and stream.test_y.shape == (12,)
  # Which base examples were kept: a sorted random subset, not the first 12.
  rows = [int(np.flatnonzero((base == x).all(axis=1))[0]) for x in np.asarray(stream.test_x)]
  assert np.all(np.diff(rows) > 0) and rows != list(range(12))
  np.testing.assert_array_equal(stream.test_y, small_dataset.test.labels[rows])


def test_stream_memory_does_not_scale_with_tasks():
  # Full-size MNIST shapes, 20 permuted tasks: the images are held once.
  zeros = data.Dataset(
    "mnist",
    data.Split(np.zeros((60000, 28, 28), np.uint8), np.zeros(60000, np.int32)),
    data.Split(np.zeros((10000, 28, 28), np.uint8), np.zeros(10000, np.int32)),
  )
  kwargs = dict(protocol="permutations", samples_per_task=1000)
  one = tasks.make_stream(zeros, n_tasks=1, **kwargs)
  many = tasks.make_stream(zeros, n_tasks=20, **kwargs)
  for name in ("train_x", "train_y", "test_x", "test_y"):
    assert getattr(one, name).shape == getattr(many, name).shape, name
  per_task = 1000 * 4 + D * 1 * (4 + 4)  # train_idx, pix_idx + pix_w
  assert tasks.stream_nbytes(many) - tasks.stream_nbytes(one) == 19 * per_task
  assert tasks.stream_nbytes(many) < 60 * 2**20  # vs 20 float32 copies: 4.4 GiB


# --- batching -------------------------------------------------------------------------------------


@pytest.fixture
def stream(small_dataset):
  return tasks.make_stream(small_dataset, protocol="rotations", n_tasks=4, samples_per_task=40)


def test_train_batch_matches_reference(stream):
  x_base = np.asarray(stream.train_x)
  for t, step in [(0, 0), (2, 3), (3, 9)]:
    x, y = tasks.train_batch(stream, t, step, 4)
    rows = np.asarray(stream.train_idx[t, step * 4 : (step + 1) * 4])
    np.testing.assert_allclose(x, _reference(stream, x_base[rows], t), atol=1e-6)
    np.testing.assert_array_equal(y, np.asarray(stream.train_y)[rows])
    assert x.shape == (4, D) and x.dtype == jnp.float32


def test_train_batch_jit_with_traced_task_and_step(stream):
  @jax.jit
  @chex.assert_max_traces(n=1)
  def batch(stream, t, step):
    return tasks.train_batch(stream, t, step, 5)

  for t in range(4):
    for step in (0, 7):
      x, y = batch(stream, jnp.int32(t), jnp.int32(step))
      x_ref, y_ref = tasks.train_batch(stream, t, step, 5)
      np.testing.assert_allclose(x, x_ref, atol=1e-6)  # jit may fuse multiply-adds
      np.testing.assert_array_equal(y, y_ref)


def test_train_batch_vmap_over_tasks_and_scan_over_steps(stream):
  xs, ys = jax.vmap(lambda t: tasks.train_batch(stream, t, 2, 8))(jnp.arange(4))
  assert xs.shape == (4, 8, D) and ys.shape == (4, 8)
  for t in range(4):
    np.testing.assert_allclose(xs[t], tasks.train_batch(stream, t, 2, 8)[0], atol=1e-6)

  def body(total, step):
    x, y = tasks.train_batch(stream, 1, step, 10)
    return total + x.sum(), y

  total, labels = jax.jit(lambda: jax.lax.scan(body, 0.0, jnp.arange(4)))()
  np.testing.assert_array_equal(labels.reshape(-1), np.asarray(stream.train_y)[stream.train_idx[1]])
  expected = sum(float(tasks.train_batch(stream, 1, s, 10)[0].sum()) for s in range(4))
  np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_eval_set_jit_vmap(stream):
  xs, ys = jax.jit(jax.vmap(lambda t: tasks.eval_set(stream, t)))(jnp.arange(4))
  assert xs.shape == (4, 50, D) and ys.shape == (4, 50)
  np.testing.assert_allclose(xs[2], _reference(stream, np.asarray(stream.test_x), 2), atol=1e-6)


@pytest.mark.parametrize("protocol", ["permutations", "rotations"])
def test_folded_first_layer_and_evaluation_equal_transforming_the_images(small_dataset, protocol):
  """x (A' W) = (A x) W for every task's map, and make_evaluate's accuracies are the plain ones.

  Both sides sum the same D x K products pix_w * x * W in another order (the fold first adds the
  weights of the output pixels that read an input pixel), so they differ by rounding only: the
  bound is `numerics.sum_atol` of those products (all x, pix_w >= 0).
  """
  from cljax.models import make_mlp
  from cljax.train import Config, make_evaluate

  stream = tasks.make_stream(
    small_dataset, protocol=protocol, n_tasks=4, samples_per_task=10, max_rot=180.0, seed=2
  )
  model = make_mlp(100, 2)
  params = model.init(jax.random.key(0), jnp.zeros((1, D)))["params"]
  kernel = params["hidden_0"]["kernel"]
  base = np.asarray(stream.test_x, np.float32) * tasks.PIXEL_SCALE
  K = stream.pix_idx.shape[-1]
  plain_acc, ties = [], []
  for t in range(4):
    x, y = tasks.eval_set(stream, t)
    folded = tasks.fold_pixel_map(kernel, stream.pix_idx[t], stream.pix_w[t])
    h_plain, h_folded = np.asarray(x @ kernel), np.asarray(base @ folded)
    atol = numerics.sum_atol(np.asarray(x) @ np.abs(np.asarray(kernel)), 2 * D * K)
    np.testing.assert_allclose(h_folded, h_plain, rtol=0, atol=atol)
    if protocol == "permutations":  # W' is W with its rows moved: the products are the same
      np.testing.assert_array_equal(np.asarray(folded)[stream.pix_idx[t, :, 0]], kernel)
    # The measured first-layer difference reaches the logits through |W_1| |W_out| at most (ReLU
    # is 1-Lipschitz), plus the later layers' own rounding (H-term sums): every example's top-two
    # margin wider than twice that keeps its prediction; only the few near ties may flip.
    w1, w2 = (np.abs(np.asarray(params[n]["kernel"])) for n in ("hidden_1", "out"))
    h1 = np.maximum(h_plain + np.asarray(params["hidden_0"]["bias"]), 0)
    h2 = np.maximum(h1 @ np.asarray(params["hidden_1"]["kernel"]), 0)
    later = numerics.sum_atol((h1 @ w1) @ w2, 100) + numerics.sum_atol(h2 @ w2, 100)
    bound = np.max(np.abs(h_folded - h_plain)) * np.max(np.sum(w1 @ w2, axis=0)) + later
    logits = np.asarray(model.apply({"params": params}, x))
    top2 = np.sort(logits, axis=-1)[:, -2:]
    ties.append(int(np.sum(top2[:, 1] - top2[:, 0] <= 2 * bound)))
    assert ties[-1] <= 3, ties  # of 50: the comparison below stays sharp
    plain_acc.append(np.mean(np.argmax(logits, -1) == np.asarray(y)))
  for bs in (50, 7):  # one batch, and batches with padding
    acc = jax.jit(make_evaluate(Config(eval_batch_size=bs)))(params, stream)
    np.testing.assert_array_less(np.abs(np.asarray(acc) - plain_acc), (np.asarray(ties) + 0.5) / 50)


def test_batch_size_checks(stream):
  assert tasks.steps_per_task(stream, 8) == 5 and tasks.steps_per_task(stream, 7) == 5
  with pytest.raises(CljaxError, match="batch_size=41 exceeds the 40 training examples"):
    tasks.train_batch(stream, 0, 0, 41)
  with pytest.raises(CljaxError, match="batch_size must be >= 1"):
    tasks.steps_per_task(stream, 0)


# --- bad input ------------------------------------------------------------------------------------


def test_unknown_protocol(small_dataset):
  with pytest.raises(CljaxError, match="unknown protocol 'blur': choose one of permutations, rot"):
    tasks.make_stream(small_dataset, protocol="blur", n_tasks=2, samples_per_task=5)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(n_tasks=0), "n_tasks must be >= 1, got 0"),
    (dict(n_tasks=2.0), "n_tasks must be an integer"),
    (dict(n_tasks=True), "n_tasks must be an integer"),
    (dict(samples_per_task=0), "samples_per_task must be >= 1, got 0"),
    (dict(samples_per_task=-1), "samples_per_task must be >= 1, got -1"),
    (dict(test_samples=0), "test_samples must be >= 1"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(interpolation="cubic"), "unknown interpolation"),
  ],
)
def test_bad_counts(small_dataset, kwargs, match):
  args = {"protocol": "rotations", "n_tasks": 2, "samples_per_task": 5, **kwargs}
  with pytest.raises(CljaxError, match=match):
    tasks.make_stream(small_dataset, **args)


def test_samples_per_task_too_large_warns_and_clamps(small_dataset):
  with pytest.warns(UserWarning, match="samples_per_task=1000 exceeds the 300 examples"):
    stream = tasks.make_stream(
      small_dataset, protocol="permutations", n_tasks=2, samples_per_task=1000
    )
  assert stream.train_idx.shape == (2, 300)
  for row in np.asarray(stream.train_idx):
    np.testing.assert_array_equal(np.sort(row), np.arange(300))
  with pytest.warns(UserWarning, match="test_samples=99 exceeds the 50 examples"):
    stream = tasks.make_stream(
      small_dataset, protocol="permutations", n_tasks=2, samples_per_task=5, test_samples=99
    )
  assert stream.test_x.shape[0] == 50


def test_malformed_dataset():
  bad = data.Dataset(
    "mnist",
    data.Split(np.zeros((5, 28, 28), np.float32), np.zeros(5, np.int32)),
    data.Split(np.zeros((5, 28, 28), np.uint8), np.zeros(5, np.int32)),
  )
  with pytest.raises(CljaxError, match="must be \\(N, H, W\\) or \\(N, H, W, C\\) uint8"):
    tasks.make_stream(bad, protocol="permutations", n_tasks=1, samples_per_task=2)
