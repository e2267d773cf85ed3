"""GEM's task protocols over shared images: pixel maps and class splits.

Permuted / rotated images are per-task pixel maps; "split" divides the classes into tasks
(task-incremental, multi-head: each task trains on and is scored on its own classes).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cljax.data import Dataset
from cljax.errors import CljaxError

PROTOCOLS = ("permutations", "rotations", "split")
INTERPOLATIONS = ("bilinear", "nearest")
CLASS_ORDERS = ("label", "random")

# Independent RNG streams spawned from the seed, so that e.g. changing samples_per_task does not
# change the task transforms.
_RNG_TRANSFORMS, _RNG_TRAIN, _RNG_TEST = range(3)
# Pixel scale, applied as a multiplication (XLA would turn a division into one anyway).
PIXEL_SCALE = np.float32(1.0 / 255.0)


class TaskStream(NamedTuple):
  """All the data of a continual-learning run, as a pytree of arrays.

  Task t's examples are the shared base images seen through task t's linear pixel map: output
  pixel i of task t is sum_k pix_w[t, i, k] * x[pix_idx[t, i, k]] / 255 (or normalised by
  `norm`). Only the index and weight arrays grow with the number of tasks T; the images are
  stored once.

  Attributes:
    train_x: (N_train, D) uint8 base training images, flat: D = H * W (784) grey, H * W * C
      (3072: height, width, channel order) colour; shared by all tasks.
    train_y: (N_train,) int32 labels.
    test_x: (S_test, D) uint8 base test images: every task's test set is all of them, seen
      through that task's pixel map (the whole test split, or the test_samples subset).
    test_y: (S_test,) int32 labels.
    train_idx: (T, S) int32: task t's S = samples_per_task training examples, in training order.
    pix_idx: (T, D, K) int32: output pixel i of task t reads input pixels pix_idx[t, i, :].
    pix_w: (T, D, K) float32: with weights pix_w[t, i, :] (K = 1, w = 1 for permutations;
      K = 4 bilinear or K = 1 nearest for rotations).
    classes: (T, C) bool, task t's classes, for a task-incremental stream ("split"): task t
      trains on and is evaluated on its classes' examples only, its logits restricted to them
      (multi-head); its pixel maps are the identity. None (every task has every class, one head)
      for permutations and rotations.
    norm: (2, D) float32 (scale, shift): pixel i of a mapped image is its value times scale[i]
      plus shift[i], the dataset's per-channel (x / 255 - mean) / std; None: x / 255
      (`data.Spec`).
  """

  train_x: jax.Array
  train_y: jax.Array
  test_x: jax.Array
  test_y: jax.Array
  train_idx: jax.Array
  pix_idx: jax.Array
  pix_w: jax.Array
  classes: jax.Array | None = None
  norm: jax.Array | None = None


def _rng(seed: int, stream: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[stream])


def _check_int(value, name: str, *, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise CljaxError(f"{name} must be an integer, got {value!r}")
  if value < minimum:
    raise CljaxError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def permutation_transform(perm) -> tuple[np.ndarray, np.ndarray]:
  """The pixel map of a permutation: output pixel i reads input pixel perm[i].

  Args:
    perm: (D,) a permutation of range(D).

  Returns:
    pix_idx (D, 1) int32 = perm[:, None] and pix_w (D, 1) float32 ones.

  Raises:
    CljaxError: perm is not a permutation of range(D).
  """
  perm = np.asarray(perm)
  if (
    perm.ndim != 1
    or not np.issubdtype(perm.dtype, np.integer)
    or not np.array_equal(np.sort(perm), np.arange(perm.size))
  ):
    raise CljaxError(f"perm must be a 1-D permutation of range(D), got shape {perm.shape}")
  return perm.astype(np.int32)[:, None], np.ones((perm.size, 1), np.float32)


def _snap(v: np.ndarray) -> np.ndarray:
  """Rounds coordinates within 1e-9 of an integer, so multiples of 90 degrees map exactly."""
  r = np.round(v)
  return np.where(np.abs(v - r) < 1e-9, r, v)


def rotation_transform(
  angle_deg: float, *, interpolation: str = "bilinear", shape: tuple[int, int] = (28, 28)
) -> tuple[np.ndarray, np.ndarray]:
  """The pixel map of a rotation by angle_deg counter-clockwise about the image centre.

  Orientation: rows go down, columns right (as the image is displayed), and a positive angle
  turns the picture counter-clockwise, like PIL's Image.rotate (used by GEM) and np.rot90:
  rotation_transform(90) maps an image to np.rot90(image). With centre (cy, cx) =
  ((H - 1) / 2, (W - 1) / 2) and θ = angle_deg, output pixel (r, c) samples the input at

    r_src = cy + sin θ (c - cx) + cos θ (r - cy),
    c_src = cx + cos θ (c - cx) - sin θ (r - cy),

  by bilinear interpolation of its 4 neighbours (K = 4) or the nearest pixel (K = 1). Input
  pixels outside the image read 0 (their weight is 0 and their index points at pixel 0).
  Coordinates within 1e-9 of an integer are snapped to it, so 0 degrees is exactly the identity
  and multiples of 90 degrees are exact permutations.

  Args:
    angle_deg: the angle in degrees.
    interpolation: "bilinear" (K = 4) or "nearest" (K = 1).
    shape: the image shape (H, W); D = H * W.

  Returns:
    pix_idx (D, K) int32 and pix_w (D, K) float32, output pixels in row-major order.

  Raises:
    CljaxError: unknown interpolation or non-finite angle.
  """
  if interpolation not in INTERPOLATIONS:
    raise CljaxError(
      f"unknown interpolation {interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}"
    )
  if not math.isfinite(float(angle_deg)):
    raise CljaxError(f"rotation angle must be finite, got {angle_deg!r}")
  H, W = shape
  theta = math.radians(float(angle_deg))
  cos, sin = math.cos(theta), math.sin(theta)
  cy, cx = (H - 1) / 2.0, (W - 1) / 2.0
  r, c = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
  r_src = _snap(cy + sin * (c - cx) + cos * (r - cy)).reshape(-1)
  c_src = _snap(cx + cos * (c - cx) - sin * (r - cy)).reshape(-1)
  if interpolation == "nearest":
    rows = np.floor(r_src + 0.5)[:, None]
    cols = np.floor(c_src + 0.5)[:, None]
    weights = np.ones_like(rows)
  else:
    r0, c0 = np.floor(r_src), np.floor(c_src)
    fr, fc = r_src - r0, c_src - c0
    rows = np.stack([r0, r0, r0 + 1, r0 + 1], axis=-1)
    cols = np.stack([c0, c0 + 1, c0, c0 + 1], axis=-1)
    weights = np.stack([(1 - fr) * (1 - fc), (1 - fr) * fc, fr * (1 - fc), fr * fc], axis=-1)
  inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
  pix_idx = np.where(inside, rows * W + cols, 0).astype(np.int32)
  pix_w = np.where(inside, weights, 0.0).astype(np.float32)
  return pix_idx, pix_w


def task_permutations(n_tasks: int, n_pixels: int, *, seed: int = 0) -> np.ndarray:
  """GEM's mnist_permutations: one random pixel permutation per task.

  As in GEM, task 0 is a random permutation too, not the identity. Task t's permutation does
  not depend on n_tasks (the draws are sequential).

  Returns:
    (n_tasks, n_pixels) int32; row t is task t's permutation.
  """
  n_tasks = _check_int(n_tasks, "n_tasks", minimum=1)
  seed = _check_int(seed, "seed", minimum=0)
  rng = _rng(seed, _RNG_TRANSFORMS)
  return np.stack([rng.permutation(n_pixels) for _ in range(n_tasks)]).astype(np.int32)


def rotation_angles(
  n_tasks: int, *, seed: int = 0, min_rot: float = 0.0, max_rot: float = 180.0
) -> np.ndarray:
  """GEM's mnist_rotations: task t's angle is uniform within bin t of [min_rot, max_rot).

  angle_t = min_rot + (t + u_t) (max_rot - min_rot) / T with u_t ~ U[0, 1) i.i.d. The defaults
  (0, 180) are those of GEM's run_experiments.sh (GEM's script itself defaults to max_rot = 90).

  Returns:
    (n_tasks,) float64 angles in degrees, increasing.
  """
  n_tasks = _check_int(n_tasks, "n_tasks", minimum=1)
  seed = _check_int(seed, "seed", minimum=0)
  if not (math.isfinite(min_rot) and math.isfinite(max_rot)):
    raise CljaxError(f"min_rot and max_rot must be finite, got {min_rot!r} and {max_rot!r}")
  u = _rng(seed, _RNG_TRANSFORMS).random(n_tasks)
  return min_rot + (np.arange(n_tasks) + u) * (max_rot - min_rot) / n_tasks


def _clamp(requested: int, available: int, what: str) -> int:
  if requested > available:
    warnings.warn(
      f"{what}={requested} exceeds the {available} examples available; using {available}",
      UserWarning,
      stacklevel=3,
    )
    return available
  return requested


def _flat_images(images, labels, what: str) -> tuple[np.ndarray, np.ndarray]:
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim not in (3, 4) or images.dtype != np.uint8:
    raise CljaxError(
      f"dataset {what} images must be (N, H, W) or (N, H, W, C) uint8, got {images.shape} "
      f"{images.dtype}; load them with cljax.data.load_dataset"
    )
  if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise CljaxError(
      f"dataset {what} labels must be ({images.shape[0]},) integers, got {labels.shape} "
      f"{labels.dtype}"
    )
  if images.shape[0] == 0:
    raise CljaxError(f"dataset {what} split is empty")
  return images.reshape(images.shape[0], -1), labels.astype(np.int32)


def make_stream(
  dataset: Dataset,
  *,
  protocol: str,
  n_tasks: int | None,
  samples_per_task: int,
  test_samples: int | None = None,
  seed: int = 0,
  min_rot: float = 0.0,
  max_rot: float = 180.0,
  interpolation: str = "bilinear",
  classes_per_task: int | None = None,
  class_order: str = "label",
) -> TaskStream:
  """Builds GEM's task stream over a dataset, without copying images per task.

  Transforms ("permutations", GEM's mnist_permutations): task t applies `task_permutations`
  row t; ("rotations", GEM's mnist_rotations): task t rotates by `rotation_angles` entry t.

  ("split", task-incremental): task t holds classes [t c, (t + 1) c), c = classes_per_task, in
  label order (as GEM's split CIFAR-100), or of a seeded random order of the classes
  (class_order "random"), seen as they are (identity pixel maps); the stream's `classes` marks
  them. n_tasks None (or for split at most C / c) takes all C / c tasks. Colour images (CIFAR)
  run split only: a pixel map would mix their channels.

  Pixels are scaled as the dataset's `Spec` says (`norm`): x / 255, or per channel
  (x / 255 - mean) / std.

  Training examples (GEM's Continuum): per task, a random subset of `samples_per_task` training
  indices drawn without replacement, in random order (split: among the task's classes' examples).
  If samples_per_task exceeds what is available (N_train; split: the smallest task's examples) it
  is clamped to that with a warning (as GEM clamps, silently).

  Test examples: with test_samples None, the whole test split for every task (as GEM); else one
  random subset of test_samples test indices (sorted), the same for every task, so that tasks
  differ only by their transform (split: each task is scored on the subset's examples of its
  classes). test_samples > N_test is clamped with a warning.

  Randomness: `seed` spawns independent numpy streams for the transforms, the training subsets
  and the test subset. The same arguments give an identical stream.

  Args:
    dataset: a `cljax.data.Dataset` (images (N, H, W) or (N, H, W, C) uint8).
    protocol: one of `PROTOCOLS`.
    n_tasks: T >= 1 (None: split only, all of its C / classes_per_task tasks).
    samples_per_task: S >= 1 training examples per task.
    test_samples: test examples per task, or None for all.
    seed: a non-negative integer.
    min_rot: rotations only: the lower end of the angle range, in degrees.
    max_rot: rotations only: the upper end of the angle range, in degrees.
    interpolation: rotations only: "bilinear" (K = 4) or "nearest" (K = 1).
    classes_per_task: split only: c >= 1 classes per task (None: the dataset's usual, e.g. 2 for
      the MNISTs and CIFAR-10, 5 for CIFAR-100).
    class_order: split only: "label" (classes in label order) or "random" (a permutation of the
      classes drawn from the seed).

  Returns:
    The TaskStream, as jax arrays.

  Raises:
    CljaxError: unknown protocol or interpolation, bad counts or seed, or a malformed dataset.
  """
  if protocol not in PROTOCOLS:
    raise CljaxError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
  if interpolation not in INTERPOLATIONS:
    raise CljaxError(
      f"unknown interpolation {interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}"
    )
  if class_order not in CLASS_ORDERS:
    raise CljaxError(
      f"unknown class_order {class_order!r}: choose one of {', '.join(CLASS_ORDERS)}"
    )
  if n_tasks is None and protocol != "split":
    raise CljaxError(f"n_tasks is needed for protocol {protocol}.")
  if n_tasks is not None:
    n_tasks = _check_int(n_tasks, "n_tasks", minimum=1)
  samples_per_task = _check_int(samples_per_task, "samples_per_task", minimum=1)
  if test_samples is not None:
    test_samples = _check_int(test_samples, "test_samples", minimum=1)
  seed = _check_int(seed, "seed", minimum=0)
  train_x, train_y = _flat_images(dataset.train.images, dataset.train.labels, "train")
  test_x, test_y = _flat_images(dataset.test.images, dataset.test.labels, "test")
  image_shape = tuple(dataset.train.images.shape[1:])
  if tuple(dataset.test.images.shape[1:]) != image_shape:
    raise CljaxError(
      f"train images are {image_shape} but test images are {dataset.test.images.shape[1:]}"
    )
  if len(image_shape) == 3 and protocol != "split":
    raise CljaxError(
      f"{dataset.name} has colour images {image_shape}: it runs --protocol split, not "
      f"{protocol} (a pixel map would mix the channels)"
    )
  n_pixels = train_x.shape[1]
  spec = dataset.spec

  classes = None
  if protocol == "split":
    c = spec.classes_per_task if classes_per_task is None else classes_per_task
    n_classes = max(spec.n_classes, int(max(train_y.max(), test_y.max())) + 1)
    classes = split_classes(n_classes, c, n_tasks, class_order=class_order, seed=seed)
    n_tasks = classes.shape[0]
    maps = [permutation_transform(np.arange(n_pixels))] * n_tasks
  elif protocol == "permutations":
    maps = [permutation_transform(p) for p in task_permutations(n_tasks, n_pixels, seed=seed)]
  else:
    angles = rotation_angles(n_tasks, seed=seed, min_rot=min_rot, max_rot=max_rot)
    maps = [rotation_transform(a, interpolation=interpolation, shape=image_shape) for a in angles]
  pix_idx = np.stack([m[0] for m in maps])
  pix_w = np.stack([m[1] for m in maps])

  n_train, n_test = train_x.shape[0], test_x.shape[0]
  rng = _rng(seed, _RNG_TRAIN)
  if classes is None:
    s = _clamp(samples_per_task, n_train, "samples_per_task")
    train_idx = np.stack([rng.choice(n_train, size=s, replace=False) for _ in range(n_tasks)])
  else:
    pools = [np.flatnonzero(classes[t][train_y]) for t in range(n_tasks)]
    s = _clamp(samples_per_task, min(len(p) for p in pools), "samples_per_task")
    train_idx = np.stack([rng.choice(p, size=s, replace=False) for p in pools])
  if test_samples is None:
    test_rows = np.arange(n_test)
  else:
    s_test = _clamp(test_samples, n_test, "test_samples")
    test_rows = np.sort(_rng(seed, _RNG_TEST).choice(n_test, size=s_test, replace=False))
  test_x, test_y = test_x[test_rows], test_y[test_rows]

  return TaskStream(
    train_x=jnp.asarray(train_x),
    train_y=jnp.asarray(train_y),
    test_x=jnp.asarray(test_x),
    test_y=jnp.asarray(test_y),
    train_idx=jnp.asarray(train_idx, dtype=jnp.int32),
    pix_idx=jnp.asarray(pix_idx, dtype=jnp.int32),
    pix_w=jnp.asarray(pix_w, dtype=jnp.float32),
    classes=None if classes is None else jnp.asarray(classes),
    norm=None if spec.mean is None else jnp.asarray(_normalisation(spec, image_shape)),
  )


def split_classes(
  n_classes: int, classes_per_task: int, n_tasks: int | None, *, class_order: str, seed: int
) -> np.ndarray:
  """(T, C) bool: task t holds the classes at positions [t c, (t + 1) c) of the class order.

  The order is the labels' ("label") or a permutation drawn from the seed ("random"); n_tasks
  None takes all C // c tasks.

  Raises:
    CljaxError: c < 1 or > C, or more tasks than C // c.
  """
  c = _check_int(classes_per_task, "classes_per_task", minimum=1)
  most = n_classes // c
  if most < 1:
    raise CljaxError(f"classes_per_task {c} exceeds the dataset's {n_classes} classes.")
  if n_tasks is not None and n_tasks > most:
    raise CljaxError(
      f"split with {c} classes per task has at most {most} tasks ({n_classes} classes), got "
      f"n_tasks {n_tasks}: lower n_tasks or classes_per_task."
    )
  n_tasks = most if n_tasks is None else n_tasks
  order = np.arange(n_classes)
  if class_order == "random":
    order = _rng(seed, _RNG_TRANSFORMS).permutation(n_classes)
  position = np.empty(n_classes, np.int64)
  position[order] = np.arange(n_classes)  # class k is the position[k]-th of the order
  return position[None, :] // c == np.arange(n_tasks)[:, None]


def _normalisation(spec, image_shape: tuple[int, ...]) -> np.ndarray:
  """(2, H W C) float32 (scale, shift) per flat pixel: x / 255 -> (x / 255 - mean_c) / std_c."""
  mean, std = np.asarray(spec.mean, np.float64), np.asarray(spec.std, np.float64)
  channel = np.arange(math.prod(image_shape)) % image_shape[-1]  # height, width, channel order
  return np.stack([1.0 / (255.0 * std[channel]), -mean[channel] / std[channel]]).astype(np.float32)


def apply_transform(
  x: jax.Array, pix_idx_t: jax.Array, pix_w_t: jax.Array, norm: jax.Array | None = None
) -> jax.Array:
  """Applies one task's pixel map to flat uint8 images.

  out[..., i] = (sum_k pix_w_t[i, k] * x[..., pix_idx_t[i, k]]) * PIXEL_SCALE, PIXEL_SCALE =
  float32(1 / 255); with norm (`TaskStream.norm`), (...) * norm[0, i] + norm[1, i] instead. Pure
  jnp: works under jit and vmap. A map with K = 1 and unit weights (a permutation) gives exactly
  float32(x[..., pix_idx_t[:, 0]]) * PIXEL_SCALE.

  Args:
    x: (..., D) uint8 images.
    pix_idx_t: (D', K) int32 input-pixel indices.
    pix_w_t: (D', K) float32 weights.
    norm: (2, D') float32 scale and shift, or None (1 / 255).

  Returns:
    (..., D') float32 images (in [0, 1] without norm).
  """
  if pix_idx_t.ndim != 2 or pix_w_t.shape != pix_idx_t.shape:
    raise CljaxError(
      f"pix_idx_t and pix_w_t must both be (D, K), got {pix_idx_t.shape} and {pix_w_t.shape}"
    )
  x = jnp.asarray(x)
  out = None
  for k in range(pix_idx_t.shape[1]):
    term = jnp.take(x, pix_idx_t[:, k], axis=-1, mode="clip").astype(jnp.float32) * pix_w_t[:, k]
    out = term if out is None else out + term
  return scale_pixels(out, norm)


def scale_pixels(x: jax.Array, norm: jax.Array | None = None) -> jax.Array:
  """(..., D) pixel values in [0, 255] -> float32 x / 255, or x * norm[0] + norm[1] (per pixel)."""
  x = x.astype(jnp.float32)
  return x * PIXEL_SCALE if norm is None else x * norm[0] + norm[1]


def fold_pixel_map(kernel: jax.Array, pix_idx_t: jax.Array, pix_w_t: jax.Array) -> jax.Array:
  """A first-layer kernel that reads base images instead of the task's transformed ones.

  A task's pixel map is linear, x_t = A x (`apply_transform`), so (A x) W = x (A' W):
  W'[j] = sum over (i, k) with pix_idx_t[i, k] = j of pix_w_t[i, k] W[i]. For a permutation this
  is W with its rows moved (exact); for a rotation each input pixel gathers the weights of the
  output pixels that read it. The same math as transforming the images, rounded differently.

  Args:
    kernel: (D, H) the first Dense layer's kernel.
    pix_idx_t: (D, K) int32, one task's input-pixel indices (`TaskStream.pix_idx[t]`).
    pix_w_t: (D, K) float32, their weights (`TaskStream.pix_w[t]`).

  Returns:
    (D, H) W', with x @ W' = apply_transform(x) @ kernel up to float rounding (x scaled by
    PIXEL_SCALE as apply_transform does).
  """
  contrib = pix_w_t[..., None] * kernel[:, None, :]  # (D, K, H)
  return jax.ops.segment_sum(
    contrib.reshape(-1, kernel.shape[1]), pix_idx_t.reshape(-1), num_segments=kernel.shape[0]
  )


def _check_batch_size(stream: TaskStream, batch_size: int) -> int:
  batch_size = _check_int(batch_size, "batch_size", minimum=1)
  s = stream.train_idx.shape[1]
  if batch_size > s:
    raise CljaxError(f"batch_size={batch_size} exceeds the {s} training examples per task")
  return batch_size


def steps_per_task(stream: TaskStream, batch_size: int) -> int:
  """The number of full batches per task, S // batch_size (a remainder is not visited)."""
  return stream.train_idx.shape[1] // _check_batch_size(stream, batch_size)


def batch_rows(
  stream: TaskStream,
  t: int | jax.Array,
  step: int | jax.Array,
  batch_size: int,
  *,
  shuffle_key: jax.Array | None = None,
) -> jax.Array:
  """(B,) the training-set rows of task t's batch `step`.

  Without shuffle_key: rows [step * B, (step + 1) * B) of the task's samples (one epoch). With
  it, step counts over epochs of steps_per_task(stream, B) batches each: epoch e = step //
  steps_per_task reads the samples in the stream's order (e = 0) or in the order of
  jax.random.permutation(fold_in(fold_in(shuffle_key, t), e), S) (e > 0: reshuffled per epoch,
  as GEM's --n_epochs). t and step may be traced; a window past the end is shifted back to the
  last full batch (`lax.dynamic_slice`).
  """
  batch_size = _check_batch_size(stream, batch_size)
  rows = lax.dynamic_index_in_dim(stream.train_idx, t, axis=0, keepdims=False)
  if shuffle_key is not None:
    per_epoch = rows.shape[0] // batch_size
    epoch, step = step // per_epoch, step % per_epoch
    order = jax.random.permutation(
      jax.random.fold_in(jax.random.fold_in(shuffle_key, t), epoch), rows.shape[0]
    )
    rows = jnp.where(epoch > 0, rows[order], rows)
  return lax.dynamic_slice_in_dim(rows, step * batch_size, batch_size)


def train_batch(
  stream: TaskStream,
  t: int | jax.Array,
  step: int | jax.Array,
  batch_size: int,
  *,
  shuffle_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Task t's training batch `step` (`batch_rows`), transformed.

  t and step may be traced (dynamic slicing); batch_size B is static. As with
  `lax.dynamic_slice`, a window past the end is shifted back to the last full batch, so keep
  step < steps_per_task(stream, B) (times the epochs with shuffle_key).

  Returns:
    x (B, D) float32 in [0, 1] (or normalised: `TaskStream.norm`) and y (B,) int32.
  """
  idx = batch_rows(stream, t, step, batch_size, shuffle_key=shuffle_key)
  pix_idx = lax.dynamic_index_in_dim(stream.pix_idx, t, axis=0, keepdims=False)
  pix_w = lax.dynamic_index_in_dim(stream.pix_w, t, axis=0, keepdims=False)
  x = apply_transform(jnp.take(stream.train_x, idx, axis=0), pix_idx, pix_w, stream.norm)
  return x, jnp.take(stream.train_y, idx, axis=0)


def eval_set(stream: TaskStream, t: int | jax.Array) -> tuple[jax.Array, jax.Array]:
  """Task t's test examples, transformed; t may be traced.

  Split: all of the test set's examples, of which task t is scored on those of its classes
  (`stream.classes[t][y]`).

  Returns:
    x (S_test, D) float32 in [0, 1] and y (S_test,) int32.
  """
  pix_idx = lax.dynamic_index_in_dim(stream.pix_idx, t, axis=0, keepdims=False)
  pix_w = lax.dynamic_index_in_dim(stream.pix_w, t, axis=0, keepdims=False)
  return apply_transform(stream.test_x, pix_idx, pix_w, stream.norm), stream.test_y


def stream_nbytes(stream: TaskStream) -> int:
  """Total bytes held by the stream's arrays."""
  return sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(stream))
