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
import numpy

import autograd.numpy as anp
import autograd.numpy.numpy_vjps as _vjps
import autograd.numpy.numpy_wrapper as _wrapper
from autograd.core import primitive_vjps as _primitive_vjps
from autograd.extend import SparseObject, defvjp, primitive
from autograd.numpy.numpy_boxes import ArrayBox
from autograd.numpy.numpy_vspaces import ArrayVSpace, ComplexArrayVSpace

import icar


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
    return anp.reshape(g, kept) + icar.array_module(g).zeros(shape, dtype=dtype), reps


def _device_vjps(fun, *makers):
    """Give fun the VJP makers `makers` for device results, keeping autograd's own for NumPy."""
    host = _primitive_vjps[fun]
    defvjp(fun, *makers)
    device = _primitive_vjps[fun]
    _primitive_vjps[fun] = lambda argnums, ans, args, kwargs: (
        (host if _on_host(ans) else device)(argnums, ans, args, kwargs))


def _where_vjps():
    where = anp._original_where  # the primitive behind autograd.numpy.where
    _device_vjps(where, None,
                 lambda ans, c, x=None, y=None: lambda g: anp.where(c, g, anp.zeros_like(g)),
                 lambda ans, c, x=None, y=None: lambda g: anp.where(c, anp.zeros_like(g), g))


def _transpose_vjps():
    def maker(ans, x, axes=None):
        inverse = None if axes is None else tuple(int(a) for a in numpy.argsort(axes))
        return lambda g: anp.transpose(g, inverse)
    _device_vjps(anp.transpose, maker)


def _reshape_vjps():
    _device_vjps(anp.reshape, lambda ans, x, shape, order=None: lambda g: anp.reshape(g, anp.shape(x)))
    _device_vjps(anp.ravel, lambda ans, x, order=None: lambda g: anp.reshape(g, anp.shape(x)))


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
