"""Tests of gpu.py, the CuPy adapter: losses, gradients and Adam steps on device arrays equal
NumPy's, on a strict CuPy stand-in (gpu.Strict) that refuses what CuPy refuses; NumPy's own
results are bit-identical with and without the adapter. The GPU check that runs these
comparisons on a device (`python bench.py --device cupy [--dry]`) is tested in test_bench.py.
Which test proves which claim: docs/claims.md."""


import email
import os
import subprocess
import sys

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from autograd.core import vspace
from autograd.tracer import getval

import icar
import theory
import train
from conftest import HERE
from gpu import STRICT, Strict, cupy_backend, enable_autograd_for


# ---- the stand-in ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xp():
    enable_autograd_for(Strict, STRICT)
    return STRICT


def test_stand_in_refuses_what_cupy_refuses():
    x = Strict(np.arange(6.0).reshape(2, 3))
    z = Strict(np.zeros(3, dtype=complex))
    for refused in (
            lambda: np.asarray(x),                                  # __array__
            lambda: x + np.ones(3),                                 # host array mixed in
            lambda: x * np.array(2.0),                              # even a 0-d one
            lambda: np.concatenate([x, np.ones((1, 3))]),
            lambda: STRICT.where(x > 1, x, np.zeros((2, 3))),
            lambda: STRICT.exp(np.zeros(3)),
            lambda: x.reshape((3, 2), order=None),                     # order=None
            lambda: np.reshape(x, (3, 2), order=None),
            lambda: np.ravel(x, order=None),
            lambda: STRICT.add.at(z, Strict(np.array([0, 0])), Strict(np.ones(2) * 1j)),
            lambda: STRICT.add.at(z, [0, 0], Strict(np.ones(2) * 1j)),
            lambda: np.add.at(x, (0,), 1.0),                        # numpy's add.at on it
            lambda: x.view(np.ndarray)):
        with pytest.raises(TypeError):
            refused()
    # ... and still computes what numpy computes, on Strict arrays, for what CuPy allows
    y = np.concatenate([x, x * np.float64(2.0)]) @ Strict(np.ones((3, 1))) + 1.0
    assert isinstance(y, Strict) and np.array_equal(y.get(), [[4.0], [13.0], [7.0], [25.0]])
    STRICT.add.at(z, (slice(0, 2),), Strict(np.ones(2) * 1j))       # complex with a slice
    x2 = Strict(np.zeros(3))
    STRICT.add.at(x2, Strict(np.array([0, 0, 2])), Strict(np.ones(3)))  # real, index array
    assert np.array_equal(z.get(), [1j, 1j, 0]) and np.array_equal(x2.get(), [2.0, 0, 1.0])
    assert isinstance(np.sum(x), Strict) and np.sum(x).shape == ()
    assert isinstance(icar.causal_mask(icar.array_module(x), 3), Strict)


# ---- the models on the device against NumPy ----------------------------------------------

def to_device(tree):
    return train.tree_map(STRICT.asarray, tree)


def on_device(x):
    assert isinstance(x, Strict), f"{type(x).__name__} left the device"
    return x.get()


def to_host(tree):
    return train.tree_map(on_device, tree)


def leaves(tree):
    return [np.asarray(x) for x in train.tree_leaves(tree)]


def assert_close(device, host, tol=1e-12):
    for a, b in zip(leaves(to_host(device)), leaves(host), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = 1.0 + np.max(np.abs(b), initial=0.0)
        assert np.max(np.abs(a - b), initial=0.0) <= tol * scale


def data(family, n=3, T=6, d=2, seed=0):
    s, _ = icar.sample_sequences(np.random.default_rng(seed), n, T, d, family)
    return s


def next_state_loss(model):
    """loss(params, s): model(params, s_1..s_T) against s_2..s_{T+1}, every position."""
    return lambda params, s: icar.mse(model(params, s[:, :-1]), s[:, 1:])


def _M1(form):
    def case(family):
        rng = np.random.default_rng(1)
        params = icar.init_params("augmented_linear", rng, d=2, form=form, scale=0.5)
        model = lambda p, s: icar.augmented_linear(p, icar.augment(s))
        return params, data(family), next_state_loss(model)
    return case


def _M2(family):
    rng = np.random.default_rng(1)
    params = icar.init_params("diagonal_heads", rng, d=2, T=6, H=2, scale=0.5)
    return params, data(family), next_state_loss(icar.diagonal_heads)


def _M3(family):
    params = {"P": 0.3 * np.random.default_rng(1).standard_normal((6, 6))}
    return params, data(family), next_state_loss(icar.pe_only)


def _M4(augmented, **options):
    def case(family):
        cfg = icar.transformer_config(d_in=6 if augmented else 2, d_out=2, T=6, **options)
        params = icar.init_params("transformer", np.random.default_rng(1), cfg=cfg)
        tokens = icar.augment if augmented else (lambda s: s)
        return params, data(family), next_state_loss(lambda p, s: icar.transformer(p, tokens(s), cfg))
    return case


def _population(family):
    """theory.population_loss at C = B^T A; the population has no data."""
    params = icar.init_params("diagonal_heads", np.random.default_rng(1), d=4, T=5, H=2, scale=0.5)
    return params, {}, lambda p, _: theory.population_loss(p["B"].T @ p["A"], p["P"], family)


CASES = {
    "M1_full": _M1("full"),
    "M1_block": _M1("block"),
    "M2": _M2,
    "M3": _M3,
    "M4_augmented_linear": _M4(True),
    "M4_softmax_positional": _M4(False, attention="softmax", positional=True, layers=2, heads=2,
                                 repeat=2),
    "M4_linear_no_layernorm": _M4(False, layernorm=False, residual=False, layers=2),
    "population": _population,
}


CASE_IDS = [(name, family) for name in CASES  # real and complex data; the theory's own families
            for family in (theory.FAMILIES if name == "population" else ("haar", "unitary"))]


def numpy_reference():
    """Loss and gradient of every case on NumPy, flattened for np.savez."""
    out = {}
    for name, family in CASE_IDS:
        params, s, loss = CASES[name](family)
        out[f"{name}-{family}-loss"] = loss(params, s)
        for i, g in enumerate(leaves(grad(loss)(params, s))):
            out[f"{name}-{family}-grad{i}"] = g
    return out


@pytest.mark.parametrize("name, family", CASE_IDS)
def test_loss_and_gradients_on_the_device_equal_numpy(xp, name, family):
    params, s, loss = CASES[name](family)
    value, g = loss(params, s), grad(loss)(params, s)
    value_d, g_d = loss(to_device(params), to_device(s)), grad(loss)(to_device(params), to_device(s))
    assert isinstance(value_d, Strict)
    assert_close(value_d, value)
    assert_close(g_d, g)


@pytest.mark.parametrize("name, family", CASE_IDS)
def test_twenty_adam_steps_on_the_device_equal_numpy(xp, name, family):
    params, s, loss = CASES[name](family)
    start = loss(params, s)
    params_d, s_d = to_device(params), to_device(s)
    state, state_d = train.adam_init(params), train.adam_init(params_d)
    for _ in range(20):
        params, state = train.adam_update(params, grad(loss)(params, s), state, lr=0.02)
        params_d, state_d = train.adam_update(params_d, grad(loss)(params_d, s_d), state_d, lr=0.02)
    assert loss(params, s) < start
    for a, b in zip(leaves(to_host(params_d)), leaves(params), strict=True):
        assert np.array_equal(a, b)


def test_numpy_results_are_bit_identical_with_and_without_the_adapter(xp, tmp_path):
    path = tmp_path / "reference.npz"
    code = f"import numpy, test_gpu; numpy.savez({str(path)!r}, **test_gpu.numpy_reference())"
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=here)
    without, with_ = np.load(path), numpy_reference()
    assert sorted(without.files) == sorted(with_)
    for key in with_:
        assert np.asarray(with_[key]).tobytes() == without[key].tobytes(), key


# ---- the adapter's parts -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_vector_space_of_device_arrays_matches_numpy(xp, dtype):
    host = np.zeros((2, 3), dtype=dtype)
    vs, vs_d = vspace(host), vspace(xp.asarray(host))
    for attribute in ("iscomplex", "size", "shape", "dtype"):
        assert getattr(vs_d, attribute) == getattr(vs, attribute)
    for made, expected in ((vs_d.zeros(), vs.zeros()), (vs_d.ones(), vs.ones())):
        assert isinstance(made, Strict) and made.dtype == expected.dtype
        assert np.array_equal(made.get(), expected)


def _x(dtype=float):
    x = np.random.default_rng(5).standard_normal((3, 4))
    return x * np.exp(1j * np.arange(4)) if dtype is complex else x


# Small functions that reach every autograd internal the adapter touches.
INTERNALS = {
    "sum_mean_var_std": (float, lambda x: anp.sum(anp.mean(x, axis=0)) + anp.var(x)
                         + anp.std(x, axis=1)[0]),
    "max_min_prod": (float, lambda x: anp.max(x, axis=1)[1] * anp.min(x) + anp.prod(x[0])),
    "where": (float, lambda x: anp.sum(anp.where(getval(x) > 0, x, -2.0 * x))),
    "stack": (float, lambda x: anp.sum(anp.stack([x, 2.0 * x], axis=1)[:, 1] * x)),
    "concatenate": (complex, lambda x: anp.sum(anp.abs(anp.concatenate([x, x[:1]], axis=0)))),
    "reshape_ravel": (float, lambda x: anp.sum(anp.reshape(x, (4, 3))[0] * anp.ravel(x)[:3])),
    "transpose": (float, lambda x: anp.sum(anp.transpose(x[None], (2, 0, 1))[1:] * x.T[:-1, None])),
    "index_array": (float, lambda x: anp.sum(x[_index(x)] * x[:3])),
    "complex_index_array": (complex, lambda x: anp.sum(anp.abs(x[_index(x)] * x[:3]))),
    "complex_index_list": (complex, lambda x: anp.sum(anp.abs(x[:, [1, 1, 3]] * x[:, :3]))),
    "complex_slice": (complex, lambda x: anp.sum(anp.real(x[:, 1:] * anp.conj(x[:, :-1])))),
}


def _index(x):
    return icar.array_module(x).asarray([0, 2, 0])


@pytest.mark.parametrize("name", INTERNALS)
def test_gradients_through_each_patched_internal_equal_numpy(xp, name):
    dtype, f = INTERNALS[name]
    x = _x(dtype)
    value, g = f(x), grad(f)(x)
    value_d, g_d = f(xp.asarray(x)), grad(f)(xp.asarray(x))
    assert_close(value_d, value)
    assert_close(g_d, g)


def test_cupy_backend_without_cupy_is_one_clear_value_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy now raises ImportError
    with pytest.raises(ValueError, match=r"^--backend cupy needs CuPy: .*pip install cupy"):
        cupy_backend()


def test_array_module_of_a_type_without_array_namespace_is_its_package():
    fake = type("ndarray", (), {"__module__": "email.message"})()  # as CuPy < 14's cupy._core.core
    assert icar.array_module(fake) is email


def test_importing_train_loads_neither_the_adapter_nor_the_benchmark():
    code = "import sys, train; print(sorted({'gpu', 'bench'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
