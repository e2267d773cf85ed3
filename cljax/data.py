"""Image-classification datasets as uint8 numpy arrays: the MNISTs (IDX or TFDS), CIFAR (TFDS).

Each dataset's `Spec` says what its examples are: image shape, classes, the normalisation its
benchmarks use, its usual classes per task when split, and where TFDS downloads it from.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from cljax.errors import CljaxError


class Spec(NamedTuple):
  """What a dataset's examples are.

  image_shape: the arrays' (H, W) grey or (H, W, C) colour; n_classes; mean, std: per-channel
  normalisation of the [0, 1] pixels, x' = (x / 255 - mean) / std, or None: x / 255;
  classes_per_task: its tasks' classes under --protocol split, as its benchmarks split it;
  idx: whether IDX files exist for it; download: a URL TFDS downloads it from (probed);
  network: the network its benchmarks train ("mlp": GEM's MLP; "resnet18": GEM's reduced
  ResNet-18, `cljax.resnet`).
  """

  image_shape: tuple[int, ...]
  n_classes: int
  mean: tuple[float, ...] | None
  std: tuple[float, ...] | None
  classes_per_task: int
  idx: bool
  download: str
  network: str = "mlp"

  @property
  def channels_last(self) -> tuple[int, int, int]:
    """(H, W, C): the shape a network takes one example in ((28, 28, 1) for the MNISTs)."""
    return self.image_shape if len(self.image_shape) == 3 else (*self.image_shape, 1)


_TORONTO = "https://www.cs.toronto.edu/~kriz/"
SPECS = {
  "fashion_mnist": Spec(
    (28, 28), 10, None, None, 2, True, "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
  ),
  "mnist": Spec((28, 28), 10, None, None, 2, True, "https://storage.googleapis.com/cvdf-datasets/"),
  # Split CIFAR-10 as Mammoth / DER (5 tasks x 2 classes), normalised with their channel
  # statistics; split CIFAR-100 as GEM and A-GEM (20 tasks x 5 classes), pixels / 255 as GEM's.
  "cifar10": Spec(
    (32, 32, 3),
    10,
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2615),
    2,
    False,
    _TORONTO,
    "resnet18",
  ),
  "cifar100": Spec((32, 32, 3), 100, None, None, 5, False, _TORONTO, "resnet18"),
}
DATASETS = tuple(SPECS)
NUM_CLASSES = 10  # the labels of a stream without a split: the MNISTs' (colour sets are split only)
SOURCES = ("auto", "idx", "tfds")
DEFAULT_DATA_PATH = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
DATA_PATH_ENV = "CLJAX_DATA"
_PROBE_TIMEOUT_S = 3.0  # how long a missing TFDS dataset's download host may take to answer

# (split, kind) -> IDX file stem; each file may be gzipped (".gz") or plain.
IDX_FILES = {
  ("train", "images"): "train-images-idx3-ubyte",
  ("train", "labels"): "train-labels-idx1-ubyte",
  ("test", "images"): "t10k-images-idx3-ubyte",
  ("test", "labels"): "t10k-labels-idx1-ubyte",
}

_IDX_UINT8 = 0x08
_IDX_TYPE_NAMES = {
  0x08: "uint8",
  0x09: "int8",
  0x0B: "int16",
  0x0C: "int32",
  0x0D: "float32",
  0x0E: "float64",
}
_GZIP_MAGIC = b"\x1f\x8b"

_FIX_TFDS = "use --source tfds (pip install 'cljax[tfds]')"
_FIX_MAKE_DATA = (
  "run `make data` (installs Debian's dataset-fashion-mnist into "
  f"{DEFAULT_DATA_PATH}: apt-get install dataset-fashion-mnist)"
)


class Split(NamedTuple):
  """One split of an image-classification dataset.

  Attributes:
    images: (N, *image_shape) uint8 pixel intensities in [0, 255] ((N, 28, 28) for the MNISTs,
      (N, 32, 32, 3) for CIFAR).
    labels: (N,) int32 class labels in [0, n_classes).
  """

  images: np.ndarray
  labels: np.ndarray


class Dataset(NamedTuple):
  """A dataset with its standard train/test splits.

  Attributes:
    name: one of `DATASETS`; `spec` (`SPECS[name]`) says what its examples are.
    train: the training split (60000 examples for the MNISTs, 50000 for CIFAR).
    test: the test split (10000 examples).
  """

  name: str
  train: Split
  test: Split

  @property
  def spec(self) -> Spec:
    """The dataset's `Spec`: image shape, classes, normalisation."""
    return SPECS[self.name]


def _check_name(name: str) -> None:
  if name not in DATASETS:
    raise CljaxError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Parses one IDX file (gzipped or plain) into a uint8 array.

  The IDX format (LeCun et al., MNIST) is a 4-byte magic number `00 00 TT DD` (TT: element type,
  DD: number of dimensions), then DD big-endian uint32 sizes, then prod(sizes) elements.
  Only TT = 0x08 (unsigned byte), the type used by MNIST and Fashion-MNIST, is supported.
  A file is decompressed when its name ends in ".gz" or its content starts with the gzip magic.

  Args:
    path: the file to read.

  Returns:
    A read-only uint8 array of shape `sizes`.

  Raises:
    CljaxError: the file is missing, unreadable, not valid gzip, has a bad header, an unsupported
      element type, or a payload whose length is not exactly prod(sizes).
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise CljaxError(f"cannot read IDX file {path}: {e.strerror or e}") from e
  if path.endswith(".gz") or raw.startswith(_GZIP_MAGIC):
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise CljaxError(
        f"{path} is not a valid gzip file ({e}); the download is corrupt or incomplete: "
        "fetch the file again"
      ) from e
  if len(raw) < 4:
    raise CljaxError(f"{path} is not an IDX file: only {len(raw)} bytes, shorter than the header")
  zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
  if zero != b"\x00\x00":
    raise CljaxError(
      f"{path} is not an IDX file: bad magic number 0x{raw[:4].hex()} (expected 0x0000 followed by "
      "a type code and a dimension count); pass the un-modified MNIST/Fashion-MNIST files"
    )
  if dtype_code != _IDX_UINT8:
    type_name = _IDX_TYPE_NAMES.get(dtype_code, "unknown")
    raise CljaxError(
      f"{path}: IDX element type 0x{dtype_code:02x} ({type_name}) is not supported; cljax reads "
      "uint8 IDX files (type 0x08) as shipped for MNIST and Fashion-MNIST"
    )
  if ndim == 0:
    raise CljaxError(f"{path}: IDX header declares 0 dimensions; the file is corrupt")
  header_len = 4 + 4 * ndim
  if len(raw) < header_len:
    raise CljaxError(
      f"{path}: IDX header truncated: {ndim} dimensions need {header_len} header bytes, file has "
      f"{len(raw)}; fetch the file again"
    )
  dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
  expected = int(np.prod(dims, dtype=np.int64))
  got = len(raw) - header_len
  if got != expected:
    problem = "truncated" if got < expected else "has trailing bytes"
    raise CljaxError(
      f"{path}: IDX payload {problem}: shape {dims} needs {expected} bytes, got {got}; "
      "fetch the file again"
    )
  return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _check_split(
  images: np.ndarray, labels: np.ndarray, *, where: str, what: str, name: str = "fashion_mnist"
) -> Split:
  """Validates one split's arrays against `SPECS[name]` and returns it as a Split (int32 labels)."""
  spec = SPECS[name]
  shape = ", ".join(map(str, spec.image_shape))
  if tuple(images.shape[1:]) != spec.image_shape:
    raise CljaxError(
      f"{where}: {what} images have shape {tuple(images.shape)}, expected (N, {shape}); "
      f"pass {name} image files"
    )
  if images.dtype != np.uint8:
    raise CljaxError(f"{where}: {what} images have dtype {images.dtype}, expected uint8")
  if labels.ndim != 1:
    raise CljaxError(
      f"{where}: {what} labels have shape {tuple(labels.shape)}, expected (N,); "
      f"pass {name} label files"
    )
  if images.shape[0] != labels.shape[0]:
    raise CljaxError(
      f"{where}: {what} split has {images.shape[0]} images but {labels.shape[0]} labels; "
      "the image and label files must come from the same release"
    )
  if labels.size and (labels.min() < 0 or labels.max() >= spec.n_classes):
    raise CljaxError(
      f"{where}: {what} labels range over [{labels.min()}, {labels.max()}], expected "
      f"[0, {spec.n_classes}); pass {name} label files"
    )
  return Split(images=images, labels=labels.astype(np.int32))


def _idx_file(directory: str, stem: str) -> str | None:
  """Returns the path of `stem.gz` or `stem` in directory (gzipped first), or None."""
  for candidate in (stem + ".gz", stem):
    full = os.path.join(directory, candidate)
    if os.path.isfile(full):
      return full
  return None


def _missing_idx_files(directory: str) -> list[str]:
  return [stem + "[.gz]" for stem in IDX_FILES.values() if _idx_file(directory, stem) is None]


def _fixes(name: str) -> str:
  fixes = [f"point --data_path or {DATA_PATH_ENV} at a directory holding them", _FIX_TFDS]
  if name == "fashion_mnist":
    fixes.insert(0, _FIX_MAKE_DATA)
  return "fix: " + "; or ".join(fixes)


def load_idx_dir(path: str | os.PathLike, name: str = "fashion_mnist") -> Dataset:
  """Loads a dataset from a directory of the four standard IDX files.

  The files are train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
  t10k-labels-idx1-ubyte, each gzipped (".gz", preferred when both exist) or plain.

  Args:
    path: the directory.
    name: the dataset the files hold, one of `DATASETS`; only used as the returned name.

  Returns:
    The Dataset, images (N, 28, 28) uint8 and labels (N,) int32.

  Raises:
    CljaxError: unknown name, missing directory or files, or any file fails `read_idx` or the
      shape/count/label-range checks.
  """
  _check_name(name)
  if not SPECS[name].idx:
    raise CljaxError(f"{name} has no IDX files: load it with load_tfds (--source tfds)")
  directory = os.fspath(path)
  expected = ", ".join(stem + "[.gz]" for stem in IDX_FILES.values())
  if not os.path.isdir(directory):
    raise CljaxError(
      f"{name} data directory {directory} does not exist (expected the IDX files {expected}); "
      + _fixes(name)
    )
  missing = _missing_idx_files(directory)
  if missing:
    raise CljaxError(
      f"{name} IDX files missing in {directory}: {', '.join(missing)} (expected {expected}); "
      + _fixes(name)
    )
  splits = {}
  for split in ("train", "test"):
    images = read_idx(_idx_file(directory, IDX_FILES[(split, "images")]))
    labels = read_idx(_idx_file(directory, IDX_FILES[(split, "labels")]))
    splits[split] = _check_split(images, labels, where=directory, what=split, name=name)
  return Dataset(name=name, train=splits["train"], test=splits["test"])


def resolve_data_path(name: str = "fashion_mnist", data_path: str | None = None) -> str | None:
  """The IDX directory to read: `data_path`, else $CLJAX_DATA, else the Debian default.

  The default, DEFAULT_DATA_PATH, exists only for Fashion-MNIST (Debian ships no MNIST
  package), so for "mnist" without `data_path` or $CLJAX_DATA this returns None; so does every
  dataset without IDX files (CIFAR).
  """
  _check_name(name)
  if not SPECS[name].idx:
    return None
  if data_path:
    return os.fspath(data_path)
  env = os.environ.get(DATA_PATH_ENV)
  if env:
    return env
  return DEFAULT_DATA_PATH if name == "fashion_mnist" else None


def _tfds_importable() -> bool:
  return importlib.util.find_spec("tensorflow_datasets") is not None


def _tensorflow_importable() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def resolve_source(
  name: str = "fashion_mnist", *, data_path: str | None = None, source: str = "auto"
) -> str:
  """Resolves `source` to "idx" or "tfds".

  "idx" and "tfds" are returned as given. "auto" is "idx" when an IDX directory was named
  (`data_path` or $CLJAX_DATA; loading then reports any problem with it) or when the default
  directory holds the four files; otherwise "tfds" when tensorflow_datasets is importable, else
  "idx" (so that loading says which files are missing and how to get them). A dataset without
  IDX files (CIFAR) is always "tfds".
  """
  _check_name(name)
  if source not in SOURCES:
    raise CljaxError(f"unknown data source {source!r}: choose one of {', '.join(SOURCES)}")
  if not SPECS[name].idx:
    if source == "idx":
      raise CljaxError(f"{name} has no IDX files: it loads through TFDS (--source tfds or auto)")
    return "tfds"
  if source != "auto":
    return source
  if data_path or os.environ.get(DATA_PATH_ENV):
    return "idx"
  directory = resolve_data_path(name, data_path)
  if directory is not None and os.path.isdir(directory) and not _missing_idx_files(directory):
    return "idx"
  return "tfds" if _tfds_importable() else "idx"


def _read_tfds_split(tfds, name: str, split: str, data_dir: str | None, download: bool) -> Split:
  """Reads one TFDS split into numpy through the random-access data source (no TensorFlow)."""
  where = f"tfds {name}"
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=download)
  except NotImplementedError as e:
    # The data was prepared as TFRecord, which only TensorFlow can read.
    if not _tensorflow_importable():
      raise CljaxError(
        f"{where}: the prepared data in {data_dir or '~/tensorflow_datasets'} is in TFRecord "
        "format, which needs TensorFlow; fix: pass --tfds_data_dir to an empty directory so "
        "that TFDS prepares ArrayRecord files, or install tensorflow, or use the IDX files "
        "(--source idx)"
      ) from e
    return _read_tfds_split_tf(tfds, name, split, data_dir, download)
  except Exception as e:  # any TFDS failure (network, missing data) becomes one message
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CljaxError(
      f"{where}: TensorFlow Datasets could not provide split {split!r} "
      f"(data_dir={data_dir or '~/tensorflow_datasets'}, download={download}): {first_line}; "
      "fix: check the network or --tfds_data_dir, or use the IDX files (--source idx, "
      f"{DATA_PATH_ENV})"
    ) from e
  shape = SPECS[name].image_shape
  n = len(source)
  images = np.empty((n, *shape), np.uint8)
  labels = np.empty((n,), np.int64)
  for i in range(n):
    example = source[i]
    image = np.asarray(example["image"])
    if image.shape != shape and image.shape != (*shape, 1):
      raise CljaxError(
        f"{where}: {split} example {i} has image shape {image.shape}, expected {shape}"
      )
    images[i] = image.reshape(shape)
    labels[i] = example["label"]
  return _check_split(images, labels, where=where, what=split, name=name)


def _read_tfds_split_tf(tfds, name: str, split: str, data_dir: str | None, download: bool) -> Split:
  """Reads one split with tfds.load (TensorFlow) for data prepared as TFRecord."""
  try:
    batch = tfds.as_numpy(
      tfds.load(name, split=split, batch_size=-1, data_dir=data_dir, download=download)
    )
  except Exception as e:  # any TFDS/TF failure becomes one message
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CljaxError(
      f"tfds {name}: tfds.load could not read split {split!r} "
      f"(data_dir={data_dir or '~/tensorflow_datasets'}): {first_line}; "
      "fix: check --tfds_data_dir, or use the IDX files (--source idx)"
    ) from e
  images = np.asarray(batch["image"], dtype=np.uint8)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  labels = np.asarray(batch["label"])
  return _check_split(images, labels, where=f"tfds {name}", what=split, name=name)


def _reachable(url: str, timeout: float = _PROBE_TIMEOUT_S) -> bool:
  """Whether url's server answers an HTTP HEAD request within timeout seconds (once, no retry).

  Any HTTP answer counts, an error status too; no answer (no DNS, refused, timed out, a proxy
  that accepts the connection but cannot reach the server) does not.
  """
  try:
    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
      return True
  except urllib.error.HTTPError:
    return True
  except (OSError, ValueError):
    return False


@contextlib.contextmanager
def quiet_absl(level: int = logging.ERROR) -> Iterator[None]:
  """Silences the absl logs (TFDS's, Orbax's) below level inside the block."""
  logger = logging.getLogger("absl")
  before = logger.level
  logger.setLevel(level)
  try:
    yield
  finally:
    logger.setLevel(before)


def _check_obtainable(tfds, name: str, data_dir: str | None, download: bool) -> None:
  """Fails in one line, within seconds, when the data is neither prepared nor downloadable.

  Without it an offline machine spends minutes in TFDS's download retries (urllib3 warnings and
  progress bars) before failing. Prepared: readable as ArrayRecord, or the builder says so
  (TFRecord, read through TensorFlow). Downloadable: `download` and the dataset's download
  server answers one HTTP request within _PROBE_TIMEOUT_S.
  """
  with quiet_absl():
    try:
      tfds.data_source(name, split="test", data_dir=data_dir, download=False)
      return
    except Exception:  # not there as ArrayRecord: prepared otherwise, downloadable, or neither
      pass
    try:
      if tfds.builder(name, data_dir=data_dir).is_prepared():
        return
    except Exception:  # an unreadable folder: let the reading say what is wrong
      return
  url = SPECS[name].download
  if download and _reachable(url):
    return
  host = urllib.parse.urlsplit(url).hostname
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  why = f"{host} cannot be reached (offline?)" if download else "download is off"
  raise CljaxError(
    f"{name} is not prepared in {where} and {why}; fix: run once with internet (TFDS downloads "
    "it and prepares it there), or pass --tfds_data_dir a folder where TFDS prepared it"
    + (f", or use the IDX files (--source idx, {DATA_PATH_ENV})" if SPECS[name].idx else "")
  )


def load_tfds(name: str, *, data_dir: str | None = None, download: bool = True) -> Dataset:
  """Loads a dataset through TensorFlow Datasets, without needing TensorFlow.

  Uses `tfds.data_source` (random-access ArrayRecord files; TFDS downloads and prepares them in
  `data_dir` on first use when `download`). If the data in `data_dir` was prepared as TFRecord
  and TensorFlow is importable, falls back to `tfds.load(..., batch_size=-1)`.
  Images (28, 28, 1) uint8 are squeezed to (28, 28), CIFAR's stay (32, 32, 3) (CIFAR-100: its
  fine labels, 100 classes); labels int64 become int32. Data that is not prepared while its
  download host cannot be reached fails within seconds, in one line that says how to get it.

  Args:
    name: one of `DATASETS`.
    data_dir: the TFDS data directory; None means TFDS's default ($TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    download: whether TFDS may download and prepare the data when it is not in `data_dir`.

  Returns:
    The Dataset.

  Raises:
    CljaxError: unknown name, tensorflow_datasets not installed, or TFDS fails.
  """
  _check_name(name)
  try:
    import tensorflow_datasets as tfds  # optional dependency
  except ImportError as e:
    raise CljaxError(
      "the TFDS source needs tensorflow_datasets, which is not installed; fix: "
      "pip install 'cljax[tfds]', or use the IDX files (--source idx)"
    ) from e
  _check_obtainable(tfds, name, data_dir, download)
  train = _read_tfds_split(tfds, name, "train", data_dir, download)
  test = _read_tfds_split(tfds, name, "test", data_dir, download)
  return Dataset(name=name, train=train, test=test)


def load_dataset(
  name: str = "fashion_mnist",
  *,
  data_path: str | None = None,
  source: str = "auto",
  tfds_data_dir: str | None = None,
) -> Dataset:
  """Loads Fashion-MNIST, MNIST, CIFAR-10 or CIFAR-100 (TFDS only) as uint8 arrays.

  Sources:
    "idx": the four IDX files in `resolve_data_path(name, data_path)`: `data_path`, else
      $CLJAX_DATA, else DEFAULT_DATA_PATH (Debian's dataset-fashion-mnist; Fashion-MNIST only).
    "tfds": `load_tfds(name, data_dir=tfds_data_dir)`.
    "auto": "idx" when an IDX directory was named (`data_path` or $CLJAX_DATA) or the default
      one holds the files, else "tfds" when tensorflow_datasets is importable, else "idx" (whose
      error says which files are missing and how to get them). See `resolve_source`.

  Args:
    name: one of `DATASETS`.
    data_path: the IDX directory (overrides $CLJAX_DATA).
    source: one of "auto", "idx", "tfds".
    tfds_data_dir: the TFDS data directory.

  Returns:
    The Dataset: uint8 images (N, *SPECS[name].image_shape), int32 labels.

  Raises:
    CljaxError: bad name or source, or the chosen source cannot provide valid data.
  """
  resolved = resolve_source(name, data_path=data_path, source=source)
  if resolved == "tfds":
    return load_tfds(name, data_dir=tfds_data_dir)
  directory = resolve_data_path(name, data_path)
  if directory is None:
    raise CljaxError(
      f"no default IDX directory for {name} (Debian packages only Fashion-MNIST); fix: pass "
      f"--data_path or set {DATA_PATH_ENV} to a directory holding "
      + ", ".join(stem + "[.gz]" for stem in IDX_FILES.values())
      + f"; or {_FIX_TFDS}"
    )
  return load_idx_dir(directory, name)
