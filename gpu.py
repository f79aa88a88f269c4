"""gpu: run the models on a GPU (CuPy) through autograd.

1. The adapter (enable_autograd_for, cupy_backend): autograd traces only numpy.ndarray;
   `python train.py EXPERIMENT --backend cupy` calls cupy_backend(), which lets it trace
   cupy.ndarray (see the section's comment for the private parts of autograd it touches).
2. The stand-in (Strict, STRICT): a strict CPU array type and its module that refuse what
   CuPy refuses (implicit host conversion, NumPy arrays mixed in, CuPy's reshape, add.at and
   .view restrictions); the tests and `python bench.py --device cupy --dry` run the adapter on it.

The check that the models run on a real GPU and equal NumPy there is bench.py's
(`python bench.py --device cupy`).
"""
import autograd.numpy as np
import autograd.numpy.numpy_vjps as _vjps
import autograd.numpy.numpy_wrapper as _wrapper
import numpy
import numpy.lib.mixins
from autograd.core import primitive_vjps as _primitive_vjps
from autograd.extend import SparseObject, defvjp, primitive
from autograd.numpy.numpy_boxes import ArrayBox
from autograd.numpy.numpy_vspaces import ArrayVSpace, ComplexArrayVSpace
from autograd.tracer import Box

import icar

# ----------------------------------------------------------------------------- GPU arrays
# autograd traces only numpy.ndarray. enable_autograd_for(array_type, xp) lets it trace a
# device array type (CuPy: cupy.ndarray, cupy) whose module refuses host arrays mixed in and
# whose arrays refuse implicit conversion to NumPy. Written for autograd 1.9.1 (pinned in
# requirements.txt); it touches these private parts of autograd, each only for arrays that
# are not NumPy's, so NumPy results stay bit-identical:
#   ArrayBox / VSpace registry    trace the type; zeros and ones allocated on the device
#   numpy_vjps.repeat_to_match_shape   VJPs of sum, mean, max, ... add host onp.zeros
#   VJP of where                  builds host anp.zeros(g.shape)
#   numpy_wrapper.concatenate_args     (concatenate, stack) calls .view(numpy.ndarray)
#   numpy_wrapper.array           (stack) calls numpy.array on each argument
#   numpy_vjps.untake             VJP of every index or slice: onp.add.at, which CuPy 12
#                                 does not dispatch; CuPy's add.at has no complex atomics
#   VJP of transpose              passes the inverse axes as a host array (anp.argsort)
#   VJPs of reshape and ravel     pass order=None, which CuPy rejects
# Still unsupported on the device: gradients of dot, einsum and trace, anp.array([...]) of
# traced values, NumPy-scalar exponents (x ** numpy.float64(2)), autograd.misc.optimizers,
# check_grads and forward mode.

def _on_host(x):
    return icar.array_module(x) is numpy


class DeviceVSpace(ArrayVSpace):
    """Vector space of a device array: no numpy.asarray (a host copy); zeros on the device."""

    def __init__(self, value, xp):
        self.shape, self.dtype, self.xp = value.shape, value.dtype, xp

    def zeros(self):
        return self.xp.zeros(self.shape, dtype=self.dtype)

    def ones(self):
        return self.xp.ones(self.shape, dtype=self.dtype)


class DeviceComplexVSpace(ComplexArrayVSpace, DeviceVSpace):
    def ones(self):
        return DeviceVSpace.ones(self) + 1j * DeviceVSpace.ones(self)


def _device_vspace(xp):
    def make(value):
        return (DeviceComplexVSpace if value.dtype.kind == "c" else DeviceVSpace)(value, xp)
    return make


def _repeat_to_match_shape(g, shape, dtype, axis, keepdims, _host=_vjps.repeat_to_match_shape):
    """Broadcast g back to shape with zeros from the module that owns g."""
    if _on_host(g) or shape == ():
        return _host(g, shape, dtype, axis, keepdims)
    if axis is None:
        axis = range(len(shape))
    axes = {a % len(shape) for a in (axis if isinstance(axis, (tuple, list, range)) else (axis,))}
    kept = tuple(1 if i in axes else n for i, n in enumerate(shape))
    reps = int(numpy.prod([shape[a] for a in axes]))  # a Python int keeps float32 in float32
    return np.reshape(g, kept) + icar.array_module(g).zeros(shape, dtype=dtype), reps


def _device_vjps(fun, *makers):
    """Give fun the VJP makers `makers` for device results, keeping autograd's own for NumPy."""
    host = _primitive_vjps[fun]
    defvjp(fun, *makers)
    device = _primitive_vjps[fun]
    _primitive_vjps[fun] = lambda argnums, ans, args, kwargs: (
        (host if _on_host(ans) else device)(argnums, ans, args, kwargs))


def _where_vjps():
    where = np._original_where  # the primitive behind autograd.numpy.where
    _device_vjps(where, None,
                 lambda ans, c, x=None, y=None: lambda g: np.where(c, g, np.zeros_like(g)),
                 lambda ans, c, x=None, y=None: lambda g: np.where(c, np.zeros_like(g), g))


def _transpose_vjps():
    def maker(ans, x, axes=None):
        inverse = None if axes is None else tuple(int(a) for a in numpy.argsort(axes))
        return lambda g: np.transpose(g, inverse)
    _device_vjps(np.transpose, maker)


def _reshape_vjps():
    _device_vjps(np.reshape, lambda ans, x, shape, order=None: lambda g: np.reshape(g, np.shape(x)))
    _device_vjps(np.ravel, lambda ans, x, order=None: lambda g: np.reshape(g, np.shape(x)))


def _concatenate_args():
    host = _wrapper.concatenate_args

    @primitive
    def concatenate_args(axis, *args):
        devices = [a for a in args if not _on_host(a)]
        if not devices:
            return host(axis, *args)
        return icar.array_module(devices[0]).concatenate(args, axis)

    _primitive_vjps[concatenate_args] = _primitive_vjps[host]
    _wrapper.concatenate_args = concatenate_args


def _array():
    host = _wrapper.array

    def array(A, *args, **kwargs):
        if type(A) in (list, tuple) or args or kwargs or _on_host(A):
            return host(A, *args, **kwargs)
        return A  # traced values are never written to, so stack needs no copy

    _wrapper.array = array


@primitive
def _untake(x, idx, vs, _host=_vjps.untake):
    """Scatter-add x into zeros of vs at idx, on x's device."""
    if _on_host(x):
        return _host(x, idx, vs)
    xp = icar.array_module(x)

    def mut_add(A):
        if x.dtype.kind != "c":
            xp.add.at(A, idx, x)
            return A
        parts = []
        for part in (x.real, x.imag):  # add.at has no complex atomics on the device
            total = xp.zeros(A.shape, dtype=part.dtype)
            xp.add.at(total, idx, part)
            parts.append(total)
        A += parts[0] + 1j * parts[1]
        return A

    return SparseObject(vs, mut_add)


defvjp(_untake, lambda ans, x, idx, _: lambda g: g[idx])


def enable_autograd_for(array_type, xp):
    """Let autograd trace arrays of array_type, owned by module xp (e.g. cupy.ndarray, cupy).

    Idempotent: a second call changes nothing.
    """
    if array_type in ArrayBox.type_mappings:
        return
    ArrayBox.register(array_type)
    DeviceVSpace.register(array_type, _device_vspace(xp))
    if _vjps.repeat_to_match_shape is not _repeat_to_match_shape:
        _vjps.repeat_to_match_shape = _repeat_to_match_shape
        _vjps.untake = _untake
        _where_vjps()
        _transpose_vjps()
        _reshape_vjps()
        _concatenate_args()
        _array()


def cupy_backend():
    """Import CuPy and let autograd trace its arrays; returns the cupy module."""
    try:
        import cupy
    except ImportError as error:
        raise ValueError(f"--backend cupy needs CuPy: install the wheel matching your CUDA, "
                         f"e.g. pip install cupy-cuda12x ({error})") from None
    enable_autograd_for(cupy.ndarray, cupy)
    return cupy


# ----------------------------------------------------------------------------- the stand-in

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
