"""Tests for cljax.data: IDX parsing, validation, path/source resolution, the TFDS adapter."""

import gzip
import importlib.util
import os
import sys

import numpy as np
import pytest

from cljax import data
from cljax.errors import CljaxError

HAS_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None
needs_tfds = pytest.mark.skipif(
  not HAS_TFDS, reason="tensorflow_datasets not installed (pip install 'cljax[tfds]')"
)

TRAIN_IMAGES = data.IDX_FILES[("train", "images")]
TRAIN_LABELS = data.IDX_FILES[("train", "labels")]


# --- read_idx -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("shape", [(7,), (5, 28, 28), (2, 3, 4, 5)])
def test_read_idx_roundtrip(tmp_path, idx_tools, gz, shape):
  array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  path = idx_tools.write(tmp_path / ("f.gz" if gz else "f"), array)
  out = data.read_idx(path)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, array)


def test_read_idx_detects_gzip_by_content(tmp_path, idx_tools):
  array = np.arange(12, dtype=np.uint8).reshape(3, 4)
  path = idx_tools.write(tmp_path / "no_suffix", array, gz=True)
  np.testing.assert_array_equal(data.read_idx(path), array)


def _expect_error(path, *fragments):
  with pytest.raises(CljaxError) as info:
    data.read_idx(path)
  message = str(info.value)
  assert str(path) in message
  for fragment in fragments:
    assert fragment in message, message
  return message


def test_read_idx_bad_magic(tmp_path, idx_tools):
  path = idx_tools.write(tmp_path / "f", np.zeros((2, 2)), magic_zero=b"\x01\x00")
  _expect_error(path, "bad magic number", "0x01000802")


@pytest.mark.parametrize("code,name", [(0x0C, "int32"), (0x0D, "float32"), (0x42, "unknown")])
def test_read_idx_wrong_dtype_code(tmp_path, idx_tools, code, name):
  path = idx_tools.write(tmp_path / "f", np.zeros((2, 2)), dtype_code=code)
  _expect_error(path, f"0x{code:02x}", name, "uint8")


def test_read_idx_truncated_payload(tmp_path, idx_tools):
  raw = idx_tools.encode(np.zeros((3, 28, 28)))[:-10]
  path = idx_tools.write(tmp_path / "f.gz", raw=raw)
  _expect_error(path, "truncated", "needs 2352 bytes, got 2342")


def test_read_idx_trailing_bytes(tmp_path, idx_tools):
  raw = idx_tools.encode(np.zeros((4,))) + b"\x00\x00\x00"
  path = idx_tools.write(tmp_path / "f", raw=raw)
  _expect_error(path, "trailing bytes", "needs 4 bytes, got 7")


def test_read_idx_truncated_header(tmp_path, idx_tools):
  raw = idx_tools.encode(np.zeros((3, 28, 28)))[:9]
  path = idx_tools.write(tmp_path / "f", raw=raw)
  _expect_error(path, "header truncated", "3 dimensions")


def test_read_idx_too_short_and_zero_dims(tmp_path, idx_tools):
  _expect_error(idx_tools.write(tmp_path / "a", raw=b"\x00\x00"), "shorter than the header")
  _expect_error(idx_tools.write(tmp_path / "b", raw=b"\x00\x00\x08\x00"), "0 dimensions")


def test_read_idx_corrupt_gzip(tmp_path, idx_tools):
  good = gzip.compress(idx_tools.encode(np.zeros((100, 28, 28))))
  path = tmp_path / "f.gz"
  path.write_bytes(good[: len(good) // 2])  # cut mid-stream
  _expect_error(path, "not a valid gzip file")
  path.write_bytes(b"definitely not gzip")  # .gz name, garbage content
  _expect_error(path, "not a valid gzip file")


def test_read_idx_missing_file(tmp_path):
  _expect_error(tmp_path / "nope.gz", "cannot read IDX file")


# --- load_idx_dir ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_dir(tmp_path, idx_tools, gz):
  arrays = idx_tools.write_dir(tmp_path, n_train=30, n_test=10, gz=gz)
  ds = data.load_idx_dir(tmp_path, "mnist")
  assert ds.name == "mnist"
  for split in ("train", "test"):
    s = getattr(ds, split)
    assert s.images.dtype == np.uint8 and s.labels.dtype == np.int32
    np.testing.assert_array_equal(s.images, arrays[(split, "images")])
    np.testing.assert_array_equal(s.labels, arrays[(split, "labels")])
  assert ds.train.images.shape == (30, 28, 28) and ds.test.labels.shape == (10,)


def test_load_idx_dir_missing_dir(tmp_path):
  with pytest.raises(CljaxError) as info:
    data.load_idx_dir(tmp_path / "absent")
  message = str(info.value)
  for fragment in ["does not exist", TRAIN_IMAGES, "make data", "apt-get install dataset-fashion"]:
    assert fragment in message
  for fragment in ["--data_path", "CLJAX_DATA", "--source tfds", "pip install 'cljax[tfds]'"]:
    assert fragment in message


def test_load_idx_dir_missing_file(idx_dir):
  path, _ = idx_dir
  os.remove(os.path.join(path, TRAIN_LABELS + ".gz"))
  with pytest.raises(CljaxError, match=f"missing in {path}: {TRAIN_LABELS}") as info:
    data.load_idx_dir(path)
  assert "make data" in str(info.value) and "--source tfds" in str(info.value)


def test_load_idx_dir_mnist_message_has_no_make_data(tmp_path):
  with pytest.raises(CljaxError) as info:
    data.load_idx_dir(tmp_path / "absent", "mnist")
  assert "make data" not in str(info.value) and "--data_path" in str(info.value)


def test_load_idx_dir_count_mismatch(idx_dir, idx_tools):
  path, arrays = idx_dir
  idx_tools.write(os.path.join(path, TRAIN_LABELS + ".gz"), arrays[("train", "labels")][:-1])
  with pytest.raises(CljaxError, match="train split has 60 images but 59 labels"):
    data.load_idx_dir(path)


def test_load_idx_dir_labels_out_of_range(idx_dir, idx_tools):
  path, arrays = idx_dir
  labels = arrays[("train", "labels")].copy()
  labels[3] = 10
  idx_tools.write(os.path.join(path, TRAIN_LABELS + ".gz"), labels)
  with pytest.raises(CljaxError, match=r"labels range over \[0, 10\], expected \[0, 10\)"):
    data.load_idx_dir(path)


def test_load_idx_dir_bad_image_shape(idx_dir, idx_tools):
  path, _ = idx_dir
  idx_tools.write(os.path.join(path, TRAIN_IMAGES + ".gz"), np.zeros((60, 27, 28)))
  with pytest.raises(CljaxError, match=r"shape \(60, 27, 28\), expected \(N, 28, 28\)"):
    data.load_idx_dir(path)
  idx_tools.write(os.path.join(path, TRAIN_IMAGES + ".gz"), np.zeros((60 * 784,)))
  with pytest.raises(CljaxError, match="expected \\(N, 28, 28\\)"):
    data.load_idx_dir(path)


def test_load_idx_dir_labels_not_1d(idx_dir, idx_tools):
  path, _ = idx_dir
  idx_tools.write(os.path.join(path, TRAIN_LABELS + ".gz"), np.zeros((60, 1)))
  with pytest.raises(CljaxError, match=r"labels have shape \(60, 1\), expected \(N,\)"):
    data.load_idx_dir(path)


def test_load_idx_dir_corrupt_member(idx_dir):
  path, _ = idx_dir
  with open(os.path.join(path, TRAIN_IMAGES + ".gz"), "r+b") as f:
    f.truncate(100)
  with pytest.raises(CljaxError, match="not a valid gzip file"):
    data.load_idx_dir(path)


# --- resolution and load_dataset -----------------------------------------------------------------


def test_unknown_dataset_and_source(idx_dir):
  path, _ = idx_dir
  for call in (
    lambda: data.load_dataset("svhn", data_path=path),
    lambda: data.load_idx_dir(path, "svhn"),
    lambda: data.load_tfds("svhn"),
  ):
    with pytest.raises(CljaxError, match="unknown dataset 'svhn': choose one of fashion_mnist"):
      call()
  with pytest.raises(CljaxError, match="cifar10 has no IDX files: load it with load_tfds"):
    data.load_idx_dir(path, "cifar10")
  with pytest.raises(CljaxError, match="unknown data source 'web': choose one of auto, idx, tfds"):
    data.load_dataset(data_path=path, source="web")


def test_resolve_data_path(monkeypatch, no_data_env):
  assert data.resolve_data_path("fashion_mnist") == data.DEFAULT_DATA_PATH
  assert data.resolve_data_path("mnist") is None
  monkeypatch.setenv("CLJAX_DATA", "/env/dir")
  assert data.resolve_data_path("mnist") == "/env/dir"
  assert data.resolve_data_path("fashion_mnist", "/arg/dir") == "/arg/dir"


def test_load_dataset_idx_from_arg_and_env(idx_dir, monkeypatch, no_data_env):
  path, arrays = idx_dir
  ds = data.load_dataset("mnist", data_path=path, source="idx")
  np.testing.assert_array_equal(ds.test.images, arrays[("test", "images")])
  monkeypatch.setenv("CLJAX_DATA", path)
  ds = data.load_dataset("mnist", source="auto")
  assert ds.name == "mnist" and ds.train.images.shape == (60, 28, 28)


def test_load_dataset_mnist_without_path(no_data_env):
  with pytest.raises(CljaxError) as info:
    data.load_dataset("mnist", source="idx")
  message = str(info.value)
  assert "no default IDX directory for mnist" in message
  assert "--data_path" in message and "CLJAX_DATA" in message and "--source tfds" in message


def test_resolve_source_auto(idx_dir, tmp_path, monkeypatch, no_data_env):
  path, _ = idx_dir
  absent = str(tmp_path / "absent")
  assert data.resolve_source("mnist", data_path=path) == "idx"
  assert data.resolve_source("mnist", data_path=path, source="tfds") == "tfds"
  monkeypatch.setattr(data, "_tfds_importable", lambda: True)
  # A named directory means IDX, even when it is wrong: its error is the useful one.
  assert data.resolve_source("mnist", data_path=absent) == "idx"
  with pytest.raises(CljaxError, match="does not exist"):
    data.load_dataset("mnist", data_path=absent)
  # No directory named and no default (MNIST), or an empty default: TFDS when importable.
  assert data.resolve_source("mnist") == "tfds"
  monkeypatch.setattr(data, "DEFAULT_DATA_PATH", absent)
  assert data.resolve_source("fashion_mnist") == "tfds"
  monkeypatch.setattr(data, "_tfds_importable", lambda: False)
  assert data.resolve_source("mnist") == "idx"
  with pytest.raises(CljaxError, match="no default IDX directory for mnist"):
    data.load_dataset("mnist")
  with pytest.raises(CljaxError, match=f"directory {absent} does not exist"):
    data.load_dataset("fashion_mnist")


@pytest.mark.realdata
def test_real_fashion_mnist(real_fashion_dir, no_data_env):
  ds = data.load_dataset("fashion_mnist", data_path=real_fashion_dir, source="idx")
  assert ds.train.images.shape == (60000, 28, 28) and ds.test.images.shape == (10000, 28, 28)
  assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ds.train.labels, minlength=10), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test.labels, minlength=10), [1000] * 10)
  assert ds.train.images.max() == 255 and ds.train.images.min() == 0
  assert 60 < ds.train.images.mean() < 90  # Fashion-MNIST mean intensity is about 72.9


# --- TFDS adapter ---------------------------------------------------------------------------------


@needs_tfds
@pytest.mark.parametrize("name", data.DATASETS)
def test_load_tfds_mock(name):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=7):
    ds = data.load_tfds(name)
  assert ds.name == name
  for split in (ds.train, ds.test):
    spec = data.SPECS[name]
    assert split.images.shape == (7, *spec.image_shape) and split.images.dtype == np.uint8
    assert split.labels.shape == (7,) and split.labels.dtype == np.int32
    assert split.labels.min() >= 0 and split.labels.max() < spec.n_classes
  assert ds.train.images.std() > 0  # real pixel content came through


@needs_tfds
def test_load_dataset_tfds_source_mock(tmp_path):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=3):
    ds = data.load_dataset("mnist", source="tfds", tfds_data_dir=str(tmp_path))
  assert ds.train.images.shape == (3, 28, 28)


def test_load_tfds_not_installed(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(CljaxError, match=r"pip install 'cljax\[tfds\]'"):
    data.load_tfds("fashion_mnist")


@needs_tfds
def test_load_tfds_failure_is_one_error(monkeypatch):
  import tensorflow_datasets as tfds

  def fail(*args, **kwargs):
    raise ConnectionError("network unreachable\nsecond line")

  monkeypatch.setattr(tfds, "data_source", fail)
  monkeypatch.setattr(data, "_check_obtainable", lambda *args: None)  # the reading fails here
  with pytest.raises(CljaxError, match=r"could not provide split 'train'.*network unreachable;"):
    data.load_tfds("mnist")


@needs_tfds
def test_load_tfds_tfrecord_fallback(monkeypatch):
  import tensorflow_datasets as tfds

  def tfrecord_only(*args, **kwargs):
    raise NotImplementedError("Random access data source for file format TFRECORD")

  monkeypatch.setattr(tfds, "data_source", tfrecord_only)
  monkeypatch.setattr(data, "_check_obtainable", lambda *args: None)  # prepared as TFRecord
  monkeypatch.setattr(data, "_tensorflow_importable", lambda: False)
  with pytest.raises(CljaxError, match="TFRecord format, which needs TensorFlow"):
    data.load_tfds("mnist")

  calls = []

  def fake_load(name, *, split, batch_size, data_dir, download):
    calls.append((name, split, batch_size))
    n = 4 if split == "train" else 2
    return {"image": np.full((n, 28, 28, 1), 9, np.uint8), "label": np.arange(n, dtype=np.int64)}

  monkeypatch.setattr(data, "_tensorflow_importable", lambda: True)
  monkeypatch.setattr(tfds, "load", fake_load)
  monkeypatch.setattr(tfds, "as_numpy", lambda x: x)
  ds = data.load_tfds("mnist")
  assert calls == [("mnist", "train", -1), ("mnist", "test", -1)]
  assert ds.train.images.shape == (4, 28, 28) and ds.test.labels.dtype == np.int32
