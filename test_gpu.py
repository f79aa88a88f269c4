"""GPU arrays through autograd, tested on the CPU against a strict stand-in for CuPy.

Strict wraps a numpy array and behaves as strictly as cupy.ndarray where autograd could
trip: no implicit conversion to NumPy, no NumPy arrays mixed in (host index arrays pass, as
CuPy copies them), no reshape(order=None), no complex add.at with index arrays and no
numpy.add.at at all (only the module's own), no .view(numpy.ndarray); reductions return 0-d
arrays.
Every model's loss, gradients and Adam steps on Strict must equal the NumPy ones.
"""
import email
import os
import subprocess
import sys

import numpy
import numpy.lib.mixins
import pytest
from autograd import grad
from autograd.core import vspace
from autograd.tracer import Box, getval

import autograd.numpy as anp
import icar
import theory
import train
from train import cupy_backend, enable_autograd_for


# ============================================================================ the stand-in

class Strict(numpy.lib.mixins.NDArrayOperatorsMixin):
    """A device-like array: wraps a numpy array, refuses every implicit host exchange."""

    def __init__(self, a):
        self._a = a

    # --- what CuPy refuses
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed; use .get()")

    def view(self, *args, **kwargs):
        if numpy.ndarray in args or kwargs.get("type") is numpy.ndarray:
            raise TypeError("a device array has no numpy.ndarray view")
        return Strict(self._a.view(*args, **kwargs))

    def reshape(self, *shape, order="C"):
        _check_order(order)
        return Strict(self._a.reshape(*shape, order=order))

    def ravel(self, order="C"):
        _check_order(order)
        return Strict(self._a.ravel(order=order))

    # --- the protocols autograd and icar reach it through
    def __array_function__(self, func, types, args, kwargs):
        if func in (numpy.reshape, numpy.ravel):
            _check_order(kwargs.get("order", "C"))
        return _call(func, args, kwargs)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if any(isinstance(x, Box) for x in inputs):
            return NotImplemented  # let autograd's box take the call
        if method == "at":
            return NotImplemented  # as CuPy 12 (cupy#7561): only the module's own add.at works
        out = kwargs.get("out")
        result = _call(getattr(ufunc, method), inputs, kwargs)
        return out[0] if out is not None and len(out) == 1 else result

    def __array_namespace__(self, api_version=None):
        return STRICT

    # --- array behaviour
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    T = property(lambda self: Strict(self._a.T))
    real = property(lambda self: Strict(self._a.real))  # views, as in CuPy
    imag = property(lambda self: Strict(self._a.imag))

    def __getitem__(self, idx):
        return _wrap(self._a[_unwrap_index(idx)])

    def __setitem__(self, idx, value):
        self._a[_unwrap_index(idx)] = _unwrap(value)

    def __len__(self):
        return len(self._a)

    def __float__(self):
        return float(self._a)

    def __bool__(self):
        return bool(self._a)

    def item(self):
        return self._a.item()

    def __repr__(self):
        return f"Strict({self._a!r})"

    def get(self):
        """The explicit copy to the host, as cupy.ndarray.get()."""
        return self._a.copy()

    def astype(self, dtype, copy=True):
        return Strict(self._a.astype(dtype, copy=copy))

    def conj(self):
        return Strict(self._a.conj())

    def copy(self):
        return Strict(self._a.copy())


def _check_order(order):
    if order not in ("C", "F", "A"):
        raise TypeError(f"order not understood: {order!r}")


def _is_index_array(i):
    return isinstance(i, (Strict, numpy.ndarray, list)) and _unwrap_index(i).dtype.kind in "iu"


def _unwrap_index(idx):
    """An index: CuPy copies host index arrays and lists to the device, so they pass here."""
    if isinstance(idx, tuple):
        return tuple(_unwrap_index(i) for i in idx)
    if isinstance(idx, (list, numpy.ndarray)):
        return numpy.asarray(_unwrap(list(idx)) if isinstance(idx, list) else idx)
    return _unwrap(idx)


def _unwrap(x):
    """Strict -> its numpy array, recursively; a numpy array here is a host array mixed in."""
    if isinstance(x, Strict):
        return x._a
    if isinstance(x, numpy.ndarray):
        raise TypeError(f"a numpy array (shape {x.shape}) was mixed into a device-array call")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, (numpy.ndarray, numpy.generic)):  # reductions give 0-d arrays, as in CuPy
        return Strict(numpy.asarray(x))
    if isinstance(x, (list, tuple)):
        return type(x)(_wrap(v) for v in x)
    return x


def _call(func, args, kwargs):
    return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))


class _StrictModule:
    """The module of Strict arrays (as cupy): numpy's functions, returning Strict arrays."""

    def __getattr__(self, name):
        attr = getattr(numpy, name)
        if isinstance(attr, numpy.ufunc):
            return _StrictUfunc(attr)
        if not callable(attr) or isinstance(attr, type):
            return attr  # constants and dtypes
        return lambda *args, **kwargs: _call(attr, args, kwargs)

    @staticmethod
    def asarray(a, dtype=None):
        """The explicit copy to the device (cupy.asarray): the one entry for host arrays."""
        return a.astype(dtype) if isinstance(a, Strict) else Strict(numpy.array(a, dtype=dtype))

    @staticmethod
    def asnumpy(a):
        return a.get()


class _StrictUfunc:
    """A ufunc of the Strict module: calls refuse host arrays; add.at refuses complex values
    at index arrays (no complex atomics); other methods (reduce, ...) are numpy's, which hand
    Strict arguments to Strict.__array_ufunc__."""

    def __init__(self, ufunc):
        self.ufunc = ufunc

    def __call__(self, *args, **kwargs):
        return _call(self.ufunc, args, kwargs)

    def at(self, target, idx, values):
        if (self.ufunc is numpy.add and numpy.iscomplexobj(_unwrap(values))
                and any(_is_index_array(i) for i in (idx if isinstance(idx, tuple) else (idx,)))):
            raise TypeError("add.at does not support complex values with index arrays")
        self.ufunc.at(target._a, _unwrap_index(idx), _unwrap(values))

    def __getattr__(self, name):
        return getattr(self.ufunc, name)


STRICT = _StrictModule()


@pytest.fixture(scope="module")
def xp():
    enable_autograd_for(Strict, STRICT)
    return STRICT


def test_stand_in_refuses_what_cupy_refuses():
    x = Strict(numpy.arange(6.0).reshape(2, 3))
    z = Strict(numpy.zeros(3, dtype=complex))
    for refused in (
            lambda: numpy.asarray(x),                                  # __array__
            lambda: x + numpy.ones(3),                                 # host array mixed in
            lambda: x * numpy.array(2.0),                              # even a 0-d one
            lambda: numpy.concatenate([x, numpy.ones((1, 3))]),
            lambda: STRICT.where(x > 1, x, numpy.zeros((2, 3))),
            lambda: STRICT.exp(numpy.zeros(3)),
            lambda: x.reshape((3, 2), order=None),                     # order=None
            lambda: numpy.reshape(x, (3, 2), order=None),
            lambda: numpy.ravel(x, order=None),
            lambda: STRICT.add.at(z, Strict(numpy.array([0, 0])), Strict(numpy.ones(2) * 1j)),
            lambda: STRICT.add.at(z, [0, 0], Strict(numpy.ones(2) * 1j)),
            lambda: numpy.add.at(x, (0,), 1.0),                        # numpy's add.at on it
            lambda: x.view(numpy.ndarray)):
        with pytest.raises(TypeError):
            refused()
    # ... and still computes what numpy computes, on Strict arrays, for what CuPy allows
    y = numpy.concatenate([x, x * numpy.float64(2.0)]) @ Strict(numpy.ones((3, 1))) + 1.0
    assert isinstance(y, Strict) and numpy.array_equal(y.get(), [[4.0], [13.0], [7.0], [25.0]])
    STRICT.add.at(z, (slice(0, 2),), Strict(numpy.ones(2) * 1j))       # complex with a slice
    x2 = Strict(numpy.zeros(3))
    STRICT.add.at(x2, Strict(numpy.array([0, 0, 2])), Strict(numpy.ones(3)))  # real, index array
    assert numpy.array_equal(z.get(), [1j, 1j, 0]) and numpy.array_equal(x2.get(), [2.0, 0, 1.0])
    assert isinstance(numpy.sum(x), Strict) and numpy.sum(x).shape == ()
    assert isinstance(icar.causal_mask(icar.array_module(x), 3), Strict)


# ============================================================================ helpers

def to_device(tree):
    if isinstance(tree, dict):
        return {k: to_device(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_device(v) for v in tree]
    return STRICT.asarray(tree)


def to_host(tree):
    if isinstance(tree, dict):
        return {k: to_host(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_host(v) for v in tree]
    assert isinstance(tree, Strict), f"{type(tree).__name__} left the device"
    return tree.get()


def leaves(tree):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in leaves(tree[k])]
    if isinstance(tree, list):
        return [x for v in tree for x in leaves(v)]
    return [numpy.asarray(tree)]


def assert_close(device, host, tol=1e-12):
    for a, b in zip(leaves(to_host(device)), leaves(host), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = 1.0 + numpy.max(numpy.abs(b), initial=0.0)
        assert numpy.max(numpy.abs(a - b), initial=0.0) <= tol * scale


# ============================================================================ the models

def data(family, n=3, T=6, d=2, seed=0):
    s, _ = icar.sample_sequences(numpy.random.default_rng(seed), n, T, d, family)
    return s


def next_state_loss(model):
    """loss(params, s): model(params, s_1..s_T) against s_2..s_{T+1}, every position."""
    return lambda params, s: icar.mse(model(params, s[:, :-1]), s[:, 1:])


def _M1(form):
    def case(family):
        rng = numpy.random.default_rng(1)
        params = icar.init_params("augmented_linear", rng, d=2, form=form, scale=0.5)
        model = lambda p, s: icar.augmented_linear(p, icar.augment(s))
        return params, data(family), next_state_loss(model)
    return case


def _M2(family):
    rng = numpy.random.default_rng(1)
    params = icar.init_params("diagonal_heads", rng, d=2, T=6, H=2, scale=0.5)
    return params, data(family), next_state_loss(icar.diagonal_heads)


def _M3(family):
    params = {"P": 0.3 * numpy.random.default_rng(1).standard_normal((6, 6))}
    return params, data(family), next_state_loss(icar.pe_only)


def _M4(augmented, **options):
    def case(family):
        cfg = icar.transformer_config(d_in=6 if augmented else 2, d_out=2, T=6, **options)
        params = icar.init_params("transformer", numpy.random.default_rng(1), cfg=cfg)
        tokens = icar.augment if augmented else (lambda s: s)
        return params, data(family), next_state_loss(lambda p, s: icar.transformer(p, tokens(s), cfg))
    return case


def _population(family):
    """theory.population_loss at C = B^T A; the population has no data."""
    params = icar.init_params("diagonal_heads", numpy.random.default_rng(1), d=4, T=5, H=2, scale=0.5)
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
    """Loss and gradient of every case on NumPy, flattened for numpy.savez."""
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
        assert numpy.array_equal(a, b)


def test_numpy_results_are_bit_identical_with_and_without_the_adapter(xp, tmp_path):
    path = tmp_path / "reference.npz"
    code = f"import numpy, test_gpu; numpy.savez({str(path)!r}, **test_gpu.numpy_reference())"
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=here)
    without, with_ = numpy.load(path), numpy_reference()
    assert sorted(without.files) == sorted(with_)
    for key in with_:
        assert numpy.asarray(with_[key]).tobytes() == without[key].tobytes(), key


# ============================================================================ the adapter's parts

@pytest.mark.parametrize("dtype", [numpy.float64, numpy.complex128])
def test_vector_space_of_device_arrays_matches_numpy(xp, dtype):
    host = numpy.zeros((2, 3), dtype=dtype)
    vs, vs_d = vspace(host), vspace(xp.asarray(host))
    for attribute in ("iscomplex", "size", "shape", "dtype"):
        assert getattr(vs_d, attribute) == getattr(vs, attribute)
    for made, expected in ((vs_d.zeros(), vs.zeros()), (vs_d.ones(), vs.ones())):
        assert isinstance(made, Strict) and made.dtype == expected.dtype
        assert numpy.array_equal(made.get(), expected)


def _x(dtype=float):
    x = numpy.random.default_rng(5).standard_normal((3, 4))
    return x * numpy.exp(1j * numpy.arange(4)) if dtype is complex else x


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
