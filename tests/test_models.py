"""Tests for cljax.models: GEM's MLP, its param tree, and the PyTorch-style init."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cljax.errors import CljaxError
from cljax.models import MLP, make_mlp, param_count

# One compiled init per model config (MLP is a hashable frozen dataclass), reused across tests.
_jit_init = jax.jit(lambda model, key, x: model.init(key, x), static_argnums=0)


def _init(model, key=0, n_inputs=784):
  return _jit_init(model, jax.random.key(key), jnp.zeros((1, n_inputs)))


def _shapes(model, n_inputs=784):
  """Variables as ShapeDtypeStructs: no compute, so shape tests stay fast."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, n_inputs)))


def _expected_count(n_inputs, H, L, n_out):
  return n_inputs * H + H + (L - 1) * (H * H + H) + H * n_out + n_out


def test_param_count_gem_default():
  variables = _init(make_mlp(100, 2))
  assert param_count(variables) == 89_610
  assert param_count(variables["params"]) == 89_610
  assert param_count(_shapes(MLP())) == 89_610


@pytest.mark.parametrize(("H", "L", "n_out"), [(1, 1, 1), (7, 1, 10), (100, 3, 10), (32, 4, 5)])
def test_param_count_formula(H, L, n_out):
  assert param_count(_shapes(make_mlp(H, L, n_out))) == _expected_count(784, H, L, n_out)


@pytest.mark.parametrize("L", [1, 2, 3])
def test_tree_layout_and_shapes(L):
  H, n_out = 20, 10
  params = _shapes(make_mlp(H, L, n_out))["params"]
  expected = {f"hidden_{i}": {"kernel": (784 if i == 0 else H, H), "bias": (H,)} for i in range(L)}
  expected["out"] = {"kernel": (H, n_out), "bias": (n_out,)}
  assert jax.tree.map(lambda leaf: leaf.shape, params) == expected
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_forward_matches_numpy_reference():
  model = make_mlp(16, 2, 10, n_inputs=12)
  params = _init(model, n_inputs=12)["params"]
  x = jax.random.normal(jax.random.key(1), (5, 12))
  logits = model.apply({"params": params}, x)
  assert logits.shape == (5, 10)
  p = jax.tree.map(np.asarray, params)
  h = np.asarray(x, np.float64)
  for name in ("hidden_0", "hidden_1"):
    h = np.maximum(h @ p[name]["kernel"] + p[name]["bias"], 0.0)
  ref = h @ p["out"]["kernel"] + p["out"]["bias"]
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(model.apply)({"params": params}, x), logits, atol=1e-6)


def _pooled_init(init, n_keys):
  """n_keys independent inits of the GEM MLP, stacked per leaf (one cached compile)."""
  model = make_mlp(100, 2, 10, init=init)
  draws = [_init(model, 1000 + k)["params"] for k in range(n_keys)]
  return jax.tree.map(lambda *leaves: np.stack(leaves), *draws)


FAN_IN = {"hidden_0": 784, "hidden_1": 100, "out": 100}


def test_torch_init_uniform_in_bound():
  params = _pooled_init("torch", n_keys=100)  # 100 independent inits, pooled per leaf
  for layer, fan_in in FAN_IN.items():
    bound = float(np.float32(1.0 / math.sqrt(fan_in)))  # the bound as the float32 init sees it
    for leaf in ("kernel", "bias"):
      w = np.asarray(params[layer][leaf], np.float64).ravel()
      assert np.all(np.abs(w) <= bound), (layer, leaf)
      assert np.abs(w).max() > 0.9 * bound, (layer, leaf)
      np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.05, err_msg=f"{layer}")
      assert abs(w.mean()) < 0.05 * bound, (layer, leaf)
      # Kolmogorov-Smirnov against U[-bound, bound] (fixed key: deterministic).
      w = w[:100_000]  # KS on a subsample keeps the test fast; still sharp for U vs anything else
      assert stats.kstest(w, "uniform", args=(-bound, 2 * bound)).pvalue > 1e-3, (layer, leaf)


FAN_OUT = {"hidden_0": 100, "hidden_1": 100, "out": 10}


def test_gem_init_is_the_gem_codes_xavier():
  # GEM's model/common.py: a = sqrt(3) * sqrt(2 / (fan_in + fan_out)), weight ~ U[-a, a], bias 0.
  params = _pooled_init("gem", n_keys=20)
  for layer, fan_in in FAN_IN.items():
    bound = float(np.float32(math.sqrt(3.0) * math.sqrt(2.0 / (fan_in + FAN_OUT[layer]))))
    w = np.asarray(params[layer]["kernel"], np.float64).ravel()
    assert np.all(np.abs(w) <= bound) and np.abs(w).max() > 0.9 * bound, layer
    np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.05, err_msg=layer)
    assert stats.kstest(w[:100_000], "uniform", args=(-bound, 2 * bound)).pvalue > 1e-3, layer
    assert np.all(np.asarray(params[layer]["bias"]) == 0.0), layer
  assert make_mlp().init_scheme == "gem"


def test_torch_init_single_draw_spreads_over_range():
  params = _init(make_mlp(100, 2, init="torch"))["params"]
  for layer, fan_in in FAN_IN.items():
    bound = float(np.float32(1.0 / math.sqrt(fan_in)))
    w = np.asarray(params[layer]["kernel"])
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.05)
    assert np.any(params[layer]["bias"] != 0)


def test_flax_init():
  params = _pooled_init("flax", n_keys=8)
  for layer, fan_in in FAN_IN.items():
    assert np.all(np.asarray(params[layer]["bias"]) == 0.0), layer
    w = np.asarray(params[layer]["kernel"], np.float64)
    # lecun_normal: variance 1 / fan_in (a truncated normal rescaled to that variance).
    np.testing.assert_allclose(w.std(), 1.0 / math.sqrt(fan_in), rtol=0.05, err_msg=layer)


def test_determinism_and_key_dependence():
  model = make_mlp(100, 2)
  a, b, c = _init(model, 7), _init(model, 7), _init(model, 8)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  kernels = [(a["params"][n]["kernel"], c["params"][n]["kernel"]) for n in FAN_IN]
  assert all(not np.array_equal(x, y) for x, y in kernels)  # biases start at 0 with "gem"


def test_jit_and_vmap_over_keys():
  model = make_mlp(8, 2, n_inputs=12)  # small: the property does not depend on size
  x = jnp.ones((3, 12))
  keys = jax.random.split(jax.random.key(0), 4)
  batched = jax.jit(jax.vmap(lambda k: model.init(k, x)))(keys)
  assert jax.tree.map(jnp.shape, batched)["params"]["hidden_0"] == {
    "kernel": (4, 12, 8),
    "bias": (4, 8),
  }
  for i in (0, 3):
    single = _jit_init(model, keys[i], x)
    jax.tree.map(
      lambda u, v, i=i: np.testing.assert_allclose(u[i], v, rtol=1e-6, atol=1e-7), batched, single
    )
  logits = jax.jit(jax.vmap(model.apply, in_axes=(0, None)))(batched, x)
  assert logits.shape == (4, 3, 10)


@pytest.mark.parametrize(
  "kwargs",
  [
    {"n_hiddens": 0, "n_layers": 2},
    {"n_hiddens": 100, "n_layers": 0},
    {"n_hiddens": -3, "n_layers": 2},
    {"n_hiddens": 2.5, "n_layers": 2},
    {"n_hiddens": 100, "n_layers": True},
    {"n_hiddens": 100, "n_layers": 2, "n_outputs": 0},
    {"n_hiddens": 100, "n_layers": 2, "init": "kaiming"},
    {"n_hiddens": 100, "n_layers": 2, "n_inputs": 0},
  ],
)
def test_make_mlp_bad_arguments(kwargs):
  with pytest.raises(CljaxError):
    make_mlp(**kwargs)


def test_direct_construction_validated_at_init():
  with pytest.raises(CljaxError, match="n_layers"):
    _init(MLP(n_layers=0))
  with pytest.raises(CljaxError, match="init"):
    _init(MLP(init_scheme="torchy"))


@pytest.mark.parametrize("shape", [(784,), (2, 28, 28), (2, 783), (2, 1, 784)])
def test_bad_input_shapes(shape):
  with pytest.raises(CljaxError, match="784"):
    make_mlp(10, 1).init(jax.random.key(0), jnp.zeros(shape))


def test_integer_input_rejected():
  with pytest.raises(CljaxError, match="floating"):
    make_mlp(10, 1).init(jax.random.key(0), jnp.zeros((2, 784), jnp.uint8))


def test_torch_reference_if_available():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  ours = _init(make_mlp(100, 2))["params"]
  for layer, (n_in, n_out) in {"hidden_0": (784, 100), "hidden_1": (100, 100)}.items():
    ref = torch.nn.Linear(n_in, n_out)
    assert ours[layer]["kernel"].shape == tuple(ref.weight.T.shape)
    for leaf, t in (("kernel", ref.weight), ("bias", ref.bias)):
      w = np.asarray(ours[layer][leaf]).ravel()
      assert stats.ks_2samp(w, t.detach().numpy().ravel()).pvalue > 1e-3, (layer, leaf)
