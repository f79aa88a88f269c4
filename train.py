"""train: train every model of icar.py, compare it with the baselines of paper.md, and probe
which in-context algorithm it learned.

    python train.py EXPERIMENT [--key value ...] [--preset quick|paper] [--resume] [--quiet]
    python train.py EXPERIMENT --help        every option with its quick and paper value

Experiments (names of paper.md):
    augmented   M4 on augmented tokens (0, s_t, s_{t-1}), linear attention, Haar W (Fig. 5)
    nonaug      M4 on raw tokens, linear token scores times softmax positional scores (Fig. 7)
    block       M1, augmented linear attention, block (A, B) or full (W_KQ, W_V) form (R1)
    diagonal    M2, diagonal heads with a positional matrix P, on sampled data (R2, R3)
    pe-only     M3, only P is trained, narrow angles, plain GD (R4, Fig. 6)
    population  GD on (A, B, P) through theory.population_loss, no sampling (Fig. 3)
    bench       the speed benchmark
The `quick` preset (default) runs in seconds to a couple of minutes on 2 cores; `paper` uses
the authors' sizes (paper.md, marked [code]). Every option overrides the preset.

Sweeps: `--sweep KEY=V1,V2,...`, repeatable; one run per point of the product grid, in
runs/NAME/KEY=V,.../, then a summary table (and summary.json). The sweeps of paper.md:
    python train.py augmented --sweep layers=1,2,3,4 --sweep attention=linear,softmax --sweep sigma=0,0.1
    python train.py nonaug --sweep heads=1,2,4,8,16,32,64 --sweep attention=linear,softmax --sweep sigma=0,0.1
    python train.py pe-only --sweep mu=50,100,200,300                        (Fig. 6)
The augmented summary puts each depth L next to k = L steps of GD with the optimal step.

What a run computes and saves in runs/NAME/ (each file written atomically):
    config.json     every setting, the seed, package versions
    checkpoint.npz  every `checkpoint_every` steps: parameters, optimiser and RNG state
    params.npz      the trained parameters (nested names joined by "/")
    metrics.npz     loss curves; test loss per position next to `baselines` (oracle W, least
                    squares, k-step GD with the optimal step, last value, zero); the `probe`
                    of the in-context mapping; for M1 and M4 augmented, `weight_blocks`

Positions are 0-based: the prediction at position r (of s_{r+2} in paper.md's 1-based
states) has seen r transitions (s_t, s_{t+1}).

The probe differentiates with respect to the current state in its role as the query of the
in-context mapping, f_r = Gamma(context) x_r, holding the context (which also contains s_r)
fixed; the total derivative d f_r / d s_r would add d Gamma / d s_r terms (for M1 with
A = I, B = eta I: eta (s_{r-1}^* s_r) I). `query_predictor` says where x_r enters each model.

Resume: the checkpoint holds parameters, optimiser state, the minibatch generator and the
current epoch's permutation; the data are sampled again from the seed. A resumed run ends
bit-identical to an uninterrupted one. Only checkpoint_every and log_every may change.
A non-finite training loss stops the run at once (Diverged; exit status 1) and keeps the
last checkpoint, whose loss was finite. Bad settings: ValueError; exit status 2.

Library: run, sweep, load, config, baselines, optimal_gd_step, probe, weight_blocks,
query_predictor, tree_map, adam_init, adam_update, gd_update, main.
"""
import argparse
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import sys
import time
import tracemalloc

import autograd.numpy as np
import autograd.numpy.numpy_vjps as _vjps
import autograd.numpy.numpy_wrapper as _wrapper
import numpy
from autograd import grad, value_and_grad
from autograd.core import primitive_vjps as _primitive_vjps
from autograd.extend import SparseObject, defvjp, primitive
from autograd.numpy.numpy_boxes import ArrayBox
from autograd.numpy.numpy_vspaces import ArrayVSpace, ComplexArrayVSpace

import fused
import icar

EXPERIMENTS = ("augmented", "nonaug", "block", "diagonal", "pe-only", "population", "bench")

# ----------------------------------------------------------------------------- configuration

# option: (type, help). Each experiment uses the options its preset names.
OPTIONS = {
    "seed": (int, "seed of every generator: data, initialisation, minibatch order"),
    "d": (int, "state dimension"),
    "T": (int, "input positions per sequence (T + 1 states)"),
    "family": (str, "context-matrix family of W"),
    "s1": (str, "first state: random, or fixed (all ones, 1/sqrt(d) for haar)"),
    "sigma": (float, "noise level of s_{t+1} = W s_t + sigma eps_t"),
    "mu": (float, "narrow-angle law theta ~ U[0, 2 pi / mu]"),
    "n_train": (int, "training sequences"),
    "n_test": (int, "test sequences (evaluation, baselines)"),
    "n_probe": (int, "test sequences for the Jacobian probe (0: no probe)"),
    "layers": (int, "Transformer layers L"),
    "heads": (int, "attention heads H"),
    "attention": (str, "token attention: linear (no normalisation) or softmax"),
    "form": (str, "M1 parameters: block (A, B) or full (W_KQ, W_V)"),
    "init_scale": (float, "standard deviation of the initial parameters"),
    "loss": (str, "all: every prefix; last: the last position only"),
    "optimizer": (str, "adam or gd (plain gradient descent)"),
    "lr": (float, "learning rate"),
    "steps": (int, "optimiser steps"),
    "batch": (int, "minibatch size, shuffled each epoch (0: full batch)"),
    "target_loss": (float, "stop once the training loss is below this (0: never)"),
    "gd_steps": (int, "baselines: GD with 1..gd_steps steps"),
    "dtype": (str, "float64 or float32 (complex128 / complex64 for complex data)"),
    "backend": (str, "array module of the parameters and data"),
    "checkpoint_every": (int, "steps between checkpoints"),
    "log_every": (int, "steps between test-loss evaluations and progress lines"),
}
CHOICES = {"family": icar.FAMILIES, "s1": ("random", "fixed"), "attention": ("linear", "softmax"),
           "form": ("block", "full"), "loss": ("all", "last"), "optimizer": ("adam", "gd"),
           "dtype": ("float64", "float32"), "backend": ("numpy", "cupy")}
AT_LEAST_ZERO = {"sigma", "batch", "target_loss", "n_probe", "seed"}  # others: > 0
NOT_RESULT = {"checkpoint_every", "log_every"}  # may change on --resume

_DATA = dict(seed=0, sigma=0.0, n_test=512, n_probe=128, dtype="float64", backend="numpy",
             target_loss=0.0, gd_steps=4)
# quick M4: many small Adam steps (batch 64) rather than few large ones: the deeper and the
# non-augmented models need thousands of updates, and a step of 64 sequences costs far less
# than a quarter of one of 256 on 2 cores
_M4 = dict(_DATA, d=5, T=20, family="haar", s1="fixed", n_train=2048, layers=1, loss="all",
           optimizer="adam", lr=1e-2, steps=4000, batch=64, checkpoint_every=500, log_every=100)
# the authors' M4 training [code]: 50 inputs, 2^14 / 2^10 sequences, Adam 1e-2, batch 1024,
# 200 epochs of 16 steps
_M4_PAPER = dict(T=50, n_train=2 ** 14, n_test=2 ** 10, steps=3200, batch=1024,
                 checkpoint_every=200, log_every=50)
PRESETS = {
    "augmented": {"quick": dict(_M4, heads=1, attention="linear"), "paper": _M4_PAPER},
    "nonaug": {"quick": dict(_M4, heads=8, attention="linear"),
               "paper": dict(_M4_PAPER, heads=64)},
    # R1: last-token loss at fixed T, random phases; no published size, the paper preset uses
    # Fig. 3's d and T
    "block": {"quick": dict(_DATA, d=4, T=10, family="unitary", s1="random", n_train=4096,
                            form="block", init_scale=0.1, loss="last", optimizer="adam",
                            lr=1e-2, steps=500, batch=0, checkpoint_every=100, log_every=50),
              "paper": dict(d=10, T=20, n_train=2 ** 14, n_test=2 ** 10, steps=3000)},
    "diagonal": {"quick": dict(_DATA, d=4, T=8, family="unitary", s1="random", n_train=2048,
                               heads=4, init_scale=0.1, loss="all", optimizer="adam", lr=1e-2,
                               steps=500, batch=0, checkpoint_every=100, log_every=50),
                 "paper": dict(d=10, T=20, heads=10, n_train=2 ** 14, n_test=2 ** 10,
                               steps=3000)},
    # Fig. 6 [code]: T = 30, 1000 sequences, P from 0, GD lr 0.5, stop at loss 1e-3
    "pe-only": {"quick": dict(_DATA, d=1, T=30, family="angle", mu=50.0, s1="random",
                              n_train=1000, loss="all", optimizer="gd", lr=0.5, steps=3000,
                              batch=0, target_loss=1e-3, checkpoint_every=500, log_every=100),
                "paper": dict(steps=200000, checkpoint_every=10000, log_every=1000)},
    # Fig. 3 [code]: left unitary H = 10 (lr 1e-2, 100 steps), right orthogonal H = 8
    # (lr 1e-3, 100,000 steps); d = 10, T = 20
    "population": {"quick": dict(seed=0, d=10, T=20, heads=10, family="unitary", lr=1e-2,
                                 steps=100),
                   "paper": dict(heads=8, family="orthogonal", lr=1e-3, steps=100000)},
}


def config(experiment, preset="quick", **overrides):
    """The checked settings of `experiment`: its preset with overrides (ValueError if bad)."""
    icar.check_choice("experiment", experiment, [e for e in EXPERIMENTS if e != "bench"])
    icar.check_choice("preset", preset, ("quick", "paper"))
    cfg = dict(PRESETS[experiment]["quick"])
    if preset == "paper":
        cfg.update(PRESETS[experiment]["paper"])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for {experiment!r}; "
                         f"allowed: {', '.join(sorted(cfg))}")
    for key, value in overrides.items():
        kind = OPTIONS[key][0]
        ok = (isinstance(value, kind) if kind is str else
              isinstance(value, _numbers_of(kind)) and not isinstance(value, bool))
        if not ok:
            raise ValueError(f"option {key} must be {kind.__name__}, got {value!r}")
        cfg[key] = kind(value)
    for key, value in cfg.items():
        if key in CHOICES:
            icar.check_choice(key, value, CHOICES[key])
        elif OPTIONS[key][0] is not str:
            low_ok = value >= 0 if key in AT_LEAST_ZERO else value > 0
            if not (math.isfinite(value) and low_ok):
                raise ValueError(f"option {key} must be a finite number "
                                 f"{'>= 0' if key in AT_LEAST_ZERO else '> 0'}, got {value!r}")
    if experiment == "population":
        icar.check_choice("family", cfg["family"], ("unitary", "orthogonal"))
    if cfg.get("batch", 0) > cfg.get("n_train", 0):
        raise ValueError(f"batch {cfg['batch']} exceeds n_train {cfg['n_train']}; allowed: "
                         f"0 (full batch) to n_train")
    if cfg.get("n_probe", 0) > cfg.get("n_test", 0):
        raise ValueError(f"n_probe {cfg['n_probe']} exceeds n_test {cfg['n_test']}; allowed: "
                         f"0 (no probe) to n_test")
    if experiment != "pe-only" and cfg.get("family") == "angle":
        raise ValueError("family 'angle' (d = 1) is only for pe-only; allowed here: "
                         "unitary, orthogonal, haar")
    return cfg


def _numbers_of(kind):
    """Accepted Python types for an int or float option (an int is a valid float)."""
    return (int, numpy.integer) if kind is int else (int, float, numpy.integer, numpy.floating)


# ----------------------------------------------------------------------------- optimisers

def tree_map(f, *trees):
    """Apply f leafwise to parameter trees (nested dicts and lists of arrays)."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: tree_map(f, *(t[k] for t in trees)) for k in first}
    if isinstance(first, (list, tuple)):
        return [tree_map(f, *leaves) for leaves in zip(*trees)]
    return f(*trees)


def gd_update(params, grads, lr):
    """One step of plain gradient descent."""
    return tree_map(lambda p, g: p - lr * g, params, grads)


def adam_init(params):
    """Adam state: zero moments allocated by each parameter's own array module."""
    zeros = tree_map(lambda p: icar.array_module(p).zeros_like(p), params)
    return {"m": zeros, "v": tree_map(lambda z: z.copy(), zeros), "t": 0}


def adam_update(params, grads, state, lr, b1=0.9, b2=0.999, eps=1e-8):
    """One Adam step (Kingma & Ba); returns (params, state)."""
    t = state["t"] + 1
    m = tree_map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
    v = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t  # bias corrections, Python floats
    params = tree_map(lambda p, m, v: p - lr * (m / c1) / ((v / c2) ** 0.5 + eps), params, m, v)
    return params, {"m": m, "v": v, "t": t}


# ----------------------------------------------------------------------------- models

def model_config(cfg, experiment):
    """icar.transformer_config of the M4 experiments."""
    if experiment == "augmented":
        return icar.transformer_config(d_in=3 * cfg["d"], d_out=cfg["d"], T=cfg["T"],
                                       layers=cfg["layers"], heads=cfg["heads"], repeat=1,
                                       attention=cfg["attention"], positional=False, residual=True)
    return icar.transformer_config(d_in=cfg["d"], d_out=cfg["d"], T=cfg["T"], layers=cfg["layers"],
                                   heads=cfg["heads"], repeat=2, attention=cfg["attention"],
                                   positional=True, residual=False)


def init_model(experiment, cfg, rng):
    """Initial float64 parameters of the experiment's model."""
    if experiment in ("augmented", "nonaug"):
        return icar.init_params("transformer", rng, cfg=model_config(cfg, experiment))
    if experiment == "block":
        return icar.init_params("augmented_linear", rng, d=cfg["d"], form=cfg["form"],
                                scale=cfg["init_scale"])
    if experiment == "diagonal":
        return icar.init_params("diagonal_heads", rng, d=cfg["d"], T=cfg["T"], H=cfg["heads"],
                                scale=cfg["init_scale"])
    return icar.init_params("pe_only", rng, T=cfg["T"])


def predictor(experiment, cfg):
    """predict(params, s) -> f: s [n, T, d] inputs -> [n, T, d] predictions of s[:, 1:]."""
    if experiment == "augmented":
        mcfg = model_config(cfg, experiment)
        return lambda params, s: fused.transformer(params, icar.augment(s), mcfg)
    if experiment == "nonaug":
        mcfg = model_config(cfg, experiment)
        return lambda params, s: fused.transformer(params, s, mcfg)
    if experiment == "block":
        return lambda params, s: icar.augmented_linear(params, icar.augment(s))
    if experiment == "diagonal":
        return icar.diagonal_heads
    return icar.pe_only


_swap = icar.swap


def _transformer_two_streams(params, x, xq, cfg):
    """M4 where position r's own stream starts from xq_r: keys and values at every position
    come from the ordinary stream of x, queries and the residual stream from xq.
    At xq = x this is icar.transformer; output position r depends on xq only through xq_r."""
    h = np.concatenate([x] * cfg["repeat"], axis=-1)                        # [n, T, E]
    g = np.concatenate([xq] * cfg["repeat"], axis=-1)                       # [n, T, E]
    for layer in params["layers"]:  # the two streams share keys and values
        h, g = (icar.transformer_layer(layer, h, cfg, params.get("pos")),
                icar.transformer_layer(layer, h, cfg, params.get("pos"), g))  # [n, T, E] each
    return g @ params["W_out"] + params["b_out"]                            # [n, T, d_out]


def query_predictor(experiment, cfg, params, s):
    """predict(x) -> [n, T, d]: the model on context s [n, T, d] with the current state at each
    position r replaced by x_r only where it acts as the query of the in-context mapping.

    M1: f_r = B (sum_{t<=r} s_t s_{t-1}^*) A x_r (full form: x_r in the query token only).
    M4: x_r feeds position r's queries and residual stream; keys and values keep s_r.
    M2, M3 (query s_{r-1}): x_r replaces the value of the newest token t = r for query r.
    predict(s) is the model's ordinary prediction; predict is linear in x for M1, M2, M3.
    """
    if experiment in ("augmented", "nonaug"):
        mcfg = model_config(cfg, experiment)
        if experiment == "augmented":
            e = icar.augment(s)                                             # [n, T, 3d]
            zeros = icar.array_module(s).zeros_like(s)
            return lambda x: _transformer_two_streams(
                params, e, e + np.concatenate([zeros, x - s, zeros], axis=-1), mcfg)
        return lambda x: _transformer_two_streams(params, s, x, mcfg)
    n, T, d = s.shape
    xp = icar.array_module(s)
    mask = icar.causal_mask(xp, T, s)                                       # [T, T]
    prev = np.concatenate([xp.zeros((n, 1, d), dtype=s.dtype), s[:, :-1]], axis=1)  # [n, T, d]
    if experiment == "block" and "A" in params:
        def predict(x):
            scores = ((x @ _swap(params["A"])) @ _swap(np.conj(prev))) * mask  # [n, T, T]
            return (scores @ s) @ _swap(params["B"])                            # [n, T, d]
        return predict
    if experiment == "block":
        e = icar.augment(s)                                                      # [n, T, 3d]
        def predict(x):
            eq = np.concatenate([xp.zeros_like(s), x, prev], axis=-1)            # [n, T, 3d]
            scores = ((eq @ _swap(params["W_KQ"])) @ _swap(np.conj(e))) * mask   # [n, T, T]
            return (scores @ (e @ _swap(params["W_V"])))[..., :d]                # [n, T, d]
        return predict
    eye = xp.eye(T)                                                              # [T, T]
    if experiment == "diagonal":
        q = np.conj(prev)[:, None] * params["A"][None, :, None, :]               # [n, H, T, d]
        scores = (q @ _swap(s)[:, None]) * (params["P"] * mask)                  # [n, H, T, T]
        newest = np.sum(scores * eye, axis=-1)[..., None]                        # [n, H, T, 1]
        def predict(x):
            heads = scores @ s[:, None] + newest * (x - s)[:, None]              # [n, H, T, d]
            return np.sum(heads * params["B"][None, :, None, :], axis=1)         # [n, T, d]
        return predict
    weights = params["P"] * mask                                                 # [T, T]
    def predict(x):  # pe-only
        newest = np.sum(weights * eye, axis=-1)[:, None] * s                      # [n, T, d]: P[r, r] s_r
        return np.conj(prev) * (weights @ (s * s) + newest * (x - s))            # [n, T, d]
    return predict


# ----------------------------------------------------------------------------- baselines

def _float64(x):
    """x as float64, or complex128 if complex, whatever its precision: every baseline and probe
    reference is computed so, as it must not depend on the training dtype (at float32 the
    pseudo-inverse of a rank-deficient S_r inverts rounding noise: least squares read losses
    in the hundreds at 2-4 transitions of d = 5 Haar data)."""
    return _to_dtype(numpy.asarray(x), "float64")


def _context_sums(x):
    """C_r = sum_{t<r} x_{t+1} x_t^*, S_r = sum_{t<r} x_t x_t^*: the r transitions seen at
    position r. x [n, T, d] -> C, S [n, T, d, d]."""
    n, T, d = x.shape
    zero = numpy.zeros((n, 1, d, d), dtype=x.dtype)
    C = numpy.cumsum(x[:, 1:, :, None] * numpy.conj(x[:, :-1, None, :]), axis=1)  # [n, T-1, d, d]
    S = numpy.cumsum(x[:, :-1, :, None] * numpy.conj(x[:, :-1, None, :]), axis=1)
    return numpy.concatenate([zero, C], axis=1), numpy.concatenate([zero, S], axis=1)


def _apply(M, x):
    return (M @ x[..., None])[..., 0]                          # [n, T, d, d] @ [n, T, d] -> [n, T, d]


def _position_loss(f, y):
    """[n, T, d] -> [T]: squared error summed over d, averaged over sequences."""
    return numpy.mean(numpy.sum(numpy.abs(f - y) ** 2, axis=-1), axis=0)


def _gd_prediction(C, S, x, eta, k):
    """W_k x_r after k GD steps from 0, step eta [T], on L(W) = 1/2 sum_t ||s_{t+1} - W s_t||^2:
    W_k = eta C sum_{j<k} (I - eta S)^j, applied to vectors (no matrix powers)."""
    eta = eta[None, :, None]                                         # [1, T, 1]
    v, total = x, x
    for _ in range(k - 1):  # the k steps of an iterative algorithm, not a loop over data
        v = v - eta * _apply(S, v)                                   # [n, T, d]
        total = total + v
    return eta * _apply(C, total)                                    # [n, T, d]


def _check_sequences(s, W=None):
    """(n, T, d) of finite float or complex sequences s [n, T+1, d] (T >= 1) and, if given,
    their context matrices W [n, d, d]: the data of every baseline and probe."""
    n, T1, d = icar.check_data(s, finite=True)
    if T1 < 2:
        raise ValueError(f"s must have shape [n, T+1, d] with T >= 1, got shape {numpy.shape(s)}")
    if W is not None and icar.check_data(W, "W", "n, d, d", finite=True) != (n, d, d):
        raise ValueError(f"W must have shape [n, d, d] = {(n, d, d)} to match s, got shape {numpy.shape(W)}")
    return n, T1 - 1, d


def optimal_gd_step(s, k=1):
    """Per position r, the step eta [T] minimising the test error of k GD steps on s [n, T+1, d].

    k = 1: the closed form eta = sum Re<C x_r, y_r> / sum ||C x_r||^2. k > 1: golden-section
    search on [0, 2 / median lambda_max(S_r)] (the step that keeps GD stable for a typical
    context), 40 iterations (interval 1e-8 of its start). Computed in float64 / complex128.
    """
    _check_sequences(s)
    k = icar.check_int("k", k, 1)
    s = _float64(s)
    x, y = s[:, :-1], s[:, 1:]
    C, S = _context_sums(x)
    if k == 1:
        g = _apply(C, x)                                             # [n, T, d]
        num = numpy.sum(numpy.real(numpy.conj(g) * y), axis=(0, 2))
        den = numpy.sum(numpy.abs(g) ** 2, axis=(0, 2))
        return numpy.divide(num, den, out=numpy.zeros_like(num), where=den > 0)
    lam = numpy.median(numpy.linalg.eigvalsh(S)[..., -1], axis=0)   # [T]
    lo, hi = numpy.zeros_like(lam), numpy.where(lam > 0, 2 / numpy.where(lam > 0, lam, 1), 0.0)

    def loss(eta):
        return _position_loss(_gd_prediction(C, S, x, eta, k), y)

    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(40):
        left = fa < fb  # the minimum lies in [lo, b]: b becomes the new hi, a the new b
        lo, hi = numpy.where(left, lo, a), numpy.where(left, b, hi)
        new = numpy.where(left, hi - ratio * (hi - lo), lo + ratio * (hi - lo))
        f_new = loss(new)
        a, fa, b, fb = (numpy.where(left, new, b), numpy.where(left, f_new, fb),
                        numpy.where(left, a, new), numpy.where(left, fa, f_new))
    return (lo + hi) / 2


def least_squares(s, rtol=1e-10):
    """W_hat_r = C_r S_r^+ at every position: s [n, T+1, d] -> [n, T, d, d]. rtol: relative
    cut-off of the pseudo-inverse (S_r has rank min(r, d) in exact arithmetic), for float64:
    s is cast to float64 / complex128 first."""
    _check_sequences(s)
    rtol = icar.check_real("rtol", rtol, 0)
    C, S = _context_sums(_float64(s)[:, :-1])
    return C @ numpy.linalg.pinv(S, rtol=rtol, hermitian=True)


def baselines(s, W, gd_steps=4):
    """Per-position test losses [T] on sequences s [n, T+1, d] with context matrices W [n, d, d]:
    "oracle" (W s_r), "least_squares", "gd1".."gd{gd_steps}" (k GD steps from 0 with the
    optimal step per position), "last_value" (s_r), "zero"; in float64 whatever s's dtype."""
    _check_sequences(s, W)
    gd_steps = icar.check_int("gd_steps", gd_steps, 0)
    s, W = _float64(s), _float64(W)
    x, y = s[:, :-1], s[:, 1:]
    out = {"oracle": _position_loss(_apply(W[:, None], x), y),
           "least_squares": _position_loss(_apply(least_squares(s), x), y)}
    C, S = _context_sums(x)
    for k in range(1, gd_steps + 1):
        out[f"gd{k}"] = _position_loss(_gd_prediction(C, S, x, optimal_gd_step(s, k), k), y)
    out["last_value"] = _position_loss(x, y)
    out["zero"] = _position_loss(numpy.zeros_like(y), y)
    return out


# ----------------------------------------------------------------------------- probes

def probe(predict, s, W=None, eta=None):
    """The in-context mapping Gamma_hat = d f_r / d x_r, by autograd, at x = s[:, :T].

    predict(x) -> [n, T, d] must depend on x only through x_r at position r (as the
    `query_predictor`s do). Derivatives are taken along real directions of x, one reverse
    pass per output coordinate and per real/imaginary part; for a model holomorphic in x
    (M1, M2, M3 in the query slot) this is the complex Jacobian. Returns "Gamma" [n, T, d, d]
    and, per position [T], the relative Frobenius error "err_*" and the cosine "cos_*" (real
    part of the Frobenius inner product) to the true W (if given, [n, d, d]), least squares
    (ls) and one-step GD (gd1) with step eta [T] (default: the optimal step on s); NaN where
    the reference is 0. References and statistics are computed in float64 / complex128;
    Gamma keeps the model's dtype.
    """
    if not callable(predict):
        raise ValueError(f"predict must be a function x [n, T, d] -> [n, T, d], got {type(predict).__name__}")
    _, T, _ = _check_sequences(s, W)
    if eta is not None and icar.check_data(eta, "eta", "T", finite=True) != (T,):
        raise ValueError(f"eta must have shape [T] = {(T,)} to match s, got shape {numpy.shape(eta)}")
    x0 = s[:, :-1]
    n, T, d = x0.shape
    real = not numpy.iscomplexobj(x0)
    u0 = icar.array_module(x0).zeros(x0.shape, dtype=numpy.real(x0[:1, :1, :1]).dtype)
    rows = []
    for i in range(d):
        parts = [grad(lambda u: np.sum(np.real(predict(x0 + u)[..., i])))(u0)]
        if not real:
            parts.append(grad(lambda u: np.sum(np.imag(predict(x0 + u)[..., i])))(u0))
        rows.append(parts[0] if real else parts[0] + 1j * parts[1])     # [n, T, d]: d f_i / d x
    Gamma = numpy.stack([numpy.asarray(r) for r in rows], axis=2)       # [n, T, d, d]
    host, G = _float64(s), _float64(Gamma)
    C, _ = _context_sums(host[:, :-1])
    eta = optimal_gd_step(host, 1) if eta is None else _float64(eta)
    refs = {"ls": least_squares(host), "gd1": eta[None, :, None, None] * C}
    if W is not None:
        refs = dict(W=numpy.broadcast_to(_float64(W)[:, None], G.shape), **refs)
    out = {"Gamma": Gamma}
    norm_G = numpy.linalg.norm(G, axis=(2, 3))                           # [n, T]
    for name, R in refs.items():
        norm_R = numpy.linalg.norm(R, axis=(2, 3))                       # [n, T]
        with numpy.errstate(invalid="ignore", divide="ignore"):
            err = numpy.linalg.norm(G - R, axis=(2, 3)) / norm_R
            cos = numpy.real(numpy.sum(numpy.conj(R) * G, axis=(2, 3))) / (norm_R * norm_G)
        zero = numpy.all(norm_R == 0, axis=0)
        out["err_" + name] = numpy.where(zero, numpy.nan, numpy.mean(err, axis=0))
        out["cos_" + name] = numpy.where(zero, numpy.nan, numpy.mean(cos, axis=0))
    return out


def weight_blocks(experiment, params, d):
    """Key-query and value matrices in M1's layout, with the share of their squared Frobenius
    mass in the blocks one GD step uses (key-query: key s_{t-1} x query s_r; value: s_t).

    M1: W_KQ, W_V [3d, 3d] (block form embedded at W_KQ's (3, 2), W_V's (1, 2) blocks).
    M4 augmented, per layer and head: W_KQ = W_K W_Q^T (rows: key coordinates, columns:
    query coordinates), value map V = (W_V W_O W_out)^T [d, 3d] read through the final
    read-out, ignoring LayerNorm and later layers. Returns KQ [L, H, 3d, 3d], V [L, H, *, 3d],
    share_KQ and share_V [L, H].
    """
    icar.check_choice("experiment", experiment, ("block", "augmented"))
    d = icar.check_int("d", d, 1)
    if experiment == "block":
        icar.check_params("params", params, ("A", "B"), ("W_KQ", "W_V"))
    else:
        icar.check_params("params", params, ("layers", "W_out", "b_out"), ("layers", "W_out", "b_out", "pos"))
        for i, layer in enumerate(params["layers"]):
            icar.check_params(f"params['layers'][{i}]", layer, icar.LAYER_KEYS)
    params = tree_map(numpy.asarray, params)
    if experiment == "block":
        if "A" in params:
            KQ, V = numpy.zeros((3 * d, 3 * d)), numpy.zeros((3 * d, 3 * d))
            KQ[2 * d:, d:2 * d], V[:d, d:2 * d] = params["A"], params["B"]
        else:
            KQ, V = params["W_KQ"], params["W_V"]
        KQ, V = KQ[None, None], V[None, None]
    else:
        layers = params["layers"]
        KQ = numpy.stack([lay["W_K"] @ numpy.swapaxes(lay["W_Q"], -1, -2) for lay in layers])
        V = numpy.stack([numpy.swapaxes(lay["W_V"] @ lay["W_O"] @ params["W_out"], -1, -2)
                         for lay in layers])
    mass = lambda M: numpy.sum(M ** 2, axis=(-1, -2))                   # noqa: E731
    return {"KQ": KQ, "V": V,
            "share_KQ": mass(KQ[..., 2 * d:, d:2 * d]) / mass(KQ),
            "share_V": mass(V[..., :d, d:2 * d]) / mass(V)}


# ----------------------------------------------------------------------------- files

def _atomic_write(path, write):
    """write(file) into path + '.tmp', then rename: a reader sees the old or the new file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}/").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _flatten(sub, f"{prefix}{i}/").items()}
    return {prefix[:-1]: numpy.asarray(tree)}


def _unflatten(flat):
    tree = {}
    for key, value in flat.items():
        node, parts = tree, key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def lists(node):  # dicts keyed 0..k-1 were lists
        if not isinstance(node, dict):
            return node
        node = {k: lists(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[str(i)] for i in range(len(node))]
        return node
    return lists(tree)


def _save_npz(path, arrays):
    _atomic_write(path, lambda f: numpy.savez(f, **arrays))


def _load_npz(path):
    with numpy.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _save_json(path, obj):
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def code_fingerprint():
    """SHA-1 of the files that define every result (icar.py, fused.py, theory.py, train.py):
    a cached run made by other code is stale."""
    digest = hashlib.sha1()
    for name in ("icar.py", "fused.py", "theory.py", "train.py"):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _versions():
    out = {"python": platform.python_version(), "code": code_fingerprint()}
    for package in ("numpy", "autograd"):
        out[package] = importlib.metadata.version(package)
    return out


def load(run_dir):
    """The result of `run` read back from runs/NAME: config, params, metrics, dir."""
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    metrics = {k: (float(v) if v.ndim == 0 else v)
               for k, v in _load_npz(os.path.join(run_dir, "metrics.npz")).items()}
    params = _unflatten(_load_npz(os.path.join(run_dir, "params.npz")))
    return {"config": cfg, "params": params, "metrics": metrics, "dir": run_dir}


# ----------------------------------------------------------------------------- training

Diverged = icar.Diverged  # a non-finite training loss; the last finite checkpoint is kept


class _Progress:
    """One updating line on a terminal, plain periodic lines otherwise, nothing when quiet."""

    def __init__(self, total, quiet, stream=sys.stderr):
        self.total, self.quiet, self.stream = total, quiet, stream
        self.tty = stream.isatty()
        self.first = None  # (step, time) of the first report: rates exclude start-up

    def show(self, step, train, test, final=False):
        if self.quiet:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)
        done, elapsed = step - self.first[0], now - self.first[1]
        line = f"step {step}/{self.total}  train {train:.4g}  test {test:.4g}"
        if done > 0 and elapsed > 0:  # no rate before a second report
            rate = done / elapsed
            line += f"  {rate:.1f} steps/s  left {(self.total - step) / rate:.0f} s"
        if self.tty:
            self.stream.write("\r" + line.ljust(78) + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _to_dtype(x, dtype):
    complex_dtype = {"float64": numpy.complex128, "float32": numpy.complex64}[dtype]
    return x.astype(complex_dtype if numpy.iscomplexobj(x) else dtype)


def _sample(cfg, rng, n):
    mu = cfg.get("mu") if cfg["family"] == "angle" else None  # mu belongs to the angle law only
    return icar.sample_sequences(rng, n, cfg["T"], cfg["d"], cfg["family"], sigma=cfg["sigma"],
                                 s1=cfg["s1"], mu=mu)


def _host(x):
    """A NumPy copy of a device array (CuPy's .get()); NumPy arrays pass through."""
    return x if isinstance(x, numpy.ndarray) else x.get()


def _generators(seed):
    """One generator per purpose: training data, test data, initialisation, minibatch order
    (the test set stays the same when n_train changes)."""
    return [numpy.random.default_rng(s) for s in numpy.random.SeedSequence(seed).spawn(4)]


def datasets(cfg):
    """(s_train, s_test, W_test) of a run with settings cfg, on the host in cfg's dtype."""
    data_rng, test_rng, _, _ = _generators(cfg["seed"])
    s_train, _ = _sample(cfg, data_rng, cfg["n_train"])
    s_test, W_test = _sample(cfg, test_rng, cfg["n_test"])
    return _to_dtype(s_train, cfg["dtype"]), _to_dtype(s_test, cfg["dtype"]), W_test


def _checkpoint(path, step, params, opt, rng, perm, pos, history):
    params = tree_map(_host, params)
    if opt is not None:
        opt = dict(opt, m=tree_map(_host, opt["m"]), v=tree_map(_host, opt["v"]))
    arrays = {f"params/{k}": v for k, v in _flatten(params).items()}
    if opt is not None:
        arrays.update({f"opt/{k}": v for k, v in _flatten({"m": opt["m"], "v": opt["v"]}).items()})
        arrays["opt_t"] = numpy.asarray(opt["t"])
    arrays.update(step=numpy.asarray(step), rng=numpy.asarray(json.dumps(rng.bit_generator.state)),
                  perm=numpy.asarray(perm, dtype=numpy.int64), pos=numpy.asarray(pos),
                  **{f"history/{k}": numpy.asarray(v) for k, v in history.items()})
    _save_npz(path, arrays)


def _restore(path, xp):
    z = _load_npz(path)
    def group(name, move=xp.asarray):
        return _unflatten({k[len(name) + 1:]: move(v) for k, v in z.items() if k.startswith(name + "/")})

    opt = None
    if "opt_t" in z:
        opt = dict(group("opt"), t=int(z["opt_t"]))
    rng = numpy.random.default_rng()
    rng.bit_generator.state = json.loads(str(z["rng"]))
    history = {k: list(v) for k, v in group("history", move=numpy.asarray).items()}
    return int(z["step"]), group("params"), opt, rng, z["perm"], int(z["pos"]), history


def run(experiment, preset="quick", runs_dir="runs", name=None, resume=False, quiet=False,
        **overrides):
    """Train `experiment` with its preset and overrides; evaluate, probe, save in runs_dir/name.

    Returns {"config", "params", "metrics", "dir"} as `load` reads them back. Raises ValueError
    for bad settings, Diverged (a ValueError) on a non-finite training loss. Metrics:
        train_loss [steps + 1]; test_step, test_loss (every log_every steps); steps_done
        test_loss_position [T]; baseline_<name> [T] (see `baselines`)
        probe_Gamma [n_probe, T, d, d], probe_err_<ref>, probe_cos_<ref> [T] (see `probe`)
        weights_KQ, weights_V, weights_share_KQ, weights_share_V (block, augmented)
    population: train_loss [steps + 1], min_loss.
    """
    cfg = config(experiment, preset, **overrides)
    if cfg.get("backend") == "cupy":  # the population experiment has no backend option
        cupy_backend()  # without CuPy: fail before anything is written
    run_dir = os.path.join(runs_dir, name or experiment)
    os.makedirs(run_dir, exist_ok=True)
    saved = dict(cfg, experiment=experiment, preset=preset, versions=_versions())
    config_path = os.path.join(run_dir, "config.json")
    ckpt = os.path.join(run_dir, "checkpoint.npz")
    if resume:
        if not os.path.exists(ckpt):
            raise ValueError(f"--resume: no checkpoint in {run_dir}; run without --resume first")
        with open(config_path) as f:
            old = json.load(f)
        changed = sorted(k for k in set(old) | set(saved) if k not in NOT_RESULT | {"versions"}
                         and old.get(k) != saved.get(k))
        if changed:
            raise ValueError(f"--resume: settings {changed} differ from the checkpointed run in "
                             f"{run_dir}; allowed to change: {', '.join(sorted(NOT_RESULT))}")
    else:  # a fresh run: no file of an earlier run in this folder may outlive it
        for old_file in ("checkpoint.npz", "params.npz", "metrics.npz"):
            if os.path.exists(os.path.join(run_dir, old_file)):
                os.remove(os.path.join(run_dir, old_file))
    _save_json(config_path, saved)
    if experiment == "population":
        metrics, params = _population(cfg)
    else:
        metrics, params = _train(experiment, cfg, ckpt, resume, quiet)
    _save_npz(os.path.join(run_dir, "params.npz"), _flatten(params))
    _save_npz(os.path.join(run_dir, "metrics.npz"), {k: numpy.asarray(v) for k, v in metrics.items()})
    return load(run_dir)  # what was saved, on the host


def _population(cfg):
    import theory  # the layer above icar; imported here so that the other experiments work alone
    rng = numpy.random.default_rng(cfg["seed"])
    params, losses = theory.train_population(cfg["heads"], cfg["d"], cfg["T"], cfg["family"],
                                             cfg["lr"], cfg["steps"], rng)
    return {"train_loss": numpy.asarray(losses),
            "min_loss": theory.min_loss(cfg["d"], cfg["heads"], cfg["family"])}, params


def pe_only_objective(s, first=1):
    """loss_and_grad(params) -> (loss, {"P": gradient}) of the training loss of M3,
        mse(icar.pe_only(params, s[:, :-1])[:, first:], s[:, 1 + first:]),
    from moments of the data computed once. M3 is linear in P: with
    u[n, r, t] = conj(s_{r-1}) s_t^2 (per coordinate), f_r = sum_t P[r, t] u[n, r, t], so row
    r of the loss is p_r^T M_r p_r - 2 b_r . p_r + c_r with M_r = Re(U_r^* U_r) / N,
    b_r = Re(U_r^* y_r) / N over the N = n (T - first) d-vectors averaged. A step costs
    O(T^3) instead of passes over the data; the values are those of autograd on
    icar.pe_only up to rounding.
    """
    x, y = s[:, :-1], s[:, 1:]                                  # [n, T, d] each
    n, T, d = icar.check_data(x)
    if not (isinstance(first, int) and 0 <= first < T):
        raise ValueError(f"first must be an integer position in 0..{T - 1}, got {first!r}")
    xp = icar.array_module(s)
    query = xp.concatenate([xp.zeros((n, 1, d), dtype=s.dtype), xp.conj(x[:, :-1])], axis=1)
    u = query[:, :, None, :] * (x * x)[:, None, :, :]            # [n, T (r), T (t), d]
    u = xp.reshape(xp.transpose(u, (1, 0, 3, 2)), (T, n * d, T))  # [T (r), n*d, T (t)]: U_r
    yr = xp.reshape(xp.transpose(y, (1, 0, 2)), (T, n * d, 1))   # [T, n*d, 1]
    N = n * (T - first)
    keep = (xp.arange(T) >= first)[:, None]                      # [T, 1] rows in the loss
    uh = xp.conj(xp.swapaxes(u, -1, -2))                         # [T, T, n*d]: U_r^*
    M = xp.real(uh @ u) / N * keep[:, :, None]                   # [T, T, T]
    b = xp.real(uh @ yr)[..., 0] / N * keep                      # [T, T]
    c = float(xp.sum(xp.real(yr * xp.conj(yr))[first:])) / N
    mask = icar.causal_mask(xp, T, s)                            # [T, T]

    def loss_and_grad(params):
        P = params["P"] * mask                                  # [T, T]
        MP = (M @ P[:, :, None])[..., 0]                        # [T, T, T] @ [T, T, 1] -> [T, T]
        loss = xp.sum(P * (MP - 2 * b)) + c
        return loss, {"P": 2 * (MP - b) * mask}
    return loss_and_grad


def _train(experiment, cfg, ckpt, resume, quiet):
    # data are sampled on the host and moved once; parameters and optimiser state live in xp
    xp = cupy_backend() if cfg["backend"] == "cupy" else numpy
    _, _, init_rng, order_rng = _generators(cfg["seed"])
    s_train, s_test, W_test = datasets(cfg)
    s_train, s_test = xp.asarray(s_train), xp.asarray(s_test)
    predict = predictor(experiment, cfg)
    first = 1 if experiment in ("diagonal", "pe-only") else 0  # position 0 has no query there

    def objective(params, s):
        f = predict(params, s[:, :-1])                                      # [n, T, d]
        if cfg["loss"] == "last":
            return icar.mse(f[:, -1:], s[:, -1:])
        return icar.mse(f[:, first:], s[:, 1 + first:])

    step_fn = value_and_grad(objective)
    n, batch = cfg["n_train"], cfg["batch"] or cfg["n_train"]
    if experiment == "pe-only" and cfg["loss"] == "all" and batch >= n:
        # M3 is linear in P: the same loss and gradient from moments of the data, computed once
        moments = pe_only_objective(s_train, first)
        step_fn = lambda params, s: moments(params)  # noqa: E731  (s is always s_train here)
    if resume:
        step, params, opt, order_rng, perm, pos, history = _restore(ckpt, xp)
    else:
        params = tree_map(lambda p: xp.asarray(p.astype(cfg["dtype"])),
                          init_model(experiment, cfg, init_rng))
        opt = adam_init(params) if cfg["optimizer"] == "adam" else None
        step, perm, pos = 0, numpy.arange(n), n
        history = {"train_loss": [], "test_step": [], "test_loss": []}
    progress = _Progress(cfg["steps"], quiet)
    last_checkpoint = step if resume else None
    with numpy.errstate(over="ignore", invalid="ignore"):
        while True:
            if batch < n and pos + batch > n:  # a new epoch: reshuffle
                perm, pos = order_rng.permutation(n), 0
            idx = perm[pos:pos + batch] if batch < n else slice(None)
            loss, grads = step_fn(params, s_train[idx])
            loss = float(loss)
            if not math.isfinite(loss) and last_checkpoint is None:
                raise Diverged(f"training loss is {loss} at step {step}, before any update: the "
                               f"initial parameters (init_scale) or the data make it non-finite; "
                               f"nothing was saved")
            if not math.isfinite(loss):
                raise Diverged(f"training loss is {loss} at step {step}: the learning rate "
                               f"{cfg['lr']} is likely too large; the last finite checkpoint "
                               f"(step {last_checkpoint}) is kept in {ckpt}")
            done = step == cfg["steps"] or loss < cfg["target_loss"]
            if step % cfg["checkpoint_every"] == 0 or done:  # the state before step's records
                _checkpoint(ckpt, step, params, opt, order_rng, perm, pos, history)
                last_checkpoint = step
            history["train_loss"].append(loss)
            if step % cfg["log_every"] == 0 or done:
                history["test_step"].append(step)
                history["test_loss"].append(float(objective(params, s_test)))
                progress.show(step, loss, history["test_loss"][-1], final=done)
            if done:
                break
            if batch < n:
                pos += batch
            if opt is None:
                params = gd_update(params, grads, cfg["lr"])
            else:
                params, opt = adam_update(params, grads, opt, cfg["lr"])
            step += 1
    metrics = {k: numpy.asarray(v) for k, v in history.items()}
    metrics["steps_done"] = step
    params = tree_map(_host, params)  # evaluation and files are on the host
    metrics.update(_evaluate(experiment, cfg, params, predict, _host(s_test), W_test))
    return metrics, params


def _evaluate(experiment, cfg, params, predict, s_test, W_test):
    """Test loss per position, baselines, probe and weight blocks (host arrays)."""
    host = numpy.asarray(s_test)
    out = {"test_loss_position": _position_loss(numpy.asarray(predict(params, s_test[:, :-1])),
                                                host[:, 1:])}
    out.update({"baseline_" + k: v for k, v in baselines(host, W_test, cfg["gd_steps"]).items()})
    if cfg["n_probe"]:
        s = s_test[:cfg["n_probe"]]
        found = probe(query_predictor(experiment, cfg, params, s[:, :-1]), s, W_test[:cfg["n_probe"]],
                      eta=optimal_gd_step(host, 1))
        out.update({"probe_" + k: v for k, v in found.items()})
    if experiment in ("block", "augmented"):
        out.update({"weights_" + k: v for k, v in weight_blocks(experiment, params, cfg["d"]).items()})
    return out


# ----------------------------------------------------------------------------- sweeps, report

def sweep(experiment, grid, preset="quick", runs_dir="runs", name=None, resume=False, quiet=False,
          **overrides):
    """One run per point of the product of grid {option: [values]}, in runs_dir/name/K=V,.../.

    Returns (results, table): the list of run results and the summary text (also saved as
    summary.json next to the runs).
    """
    if not grid:
        raise ValueError("sweep needs at least one option with values")
    clash = set(grid) & set(overrides)
    if clash:
        raise ValueError(f"option(s) {sorted(clash)} are both swept and fixed; give each once")
    keys = list(grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    for point in points:  # check every setting before the first run starts
        config(experiment, preset, **overrides, **point)
    base = os.path.join(runs_dir, name or experiment)
    results = []
    for point in points:
        sub = ",".join(f"{k}={v}" for k, v in point.items())
        if not quiet:
            print(f"-- {experiment} {sub}", file=sys.stderr)
        results.append(run(experiment, preset, base, sub, resume, quiet, **overrides, **point))
    rows = [_summary_row(experiment, r) for r in results]
    _save_json(os.path.join(base, "summary.json"), {"grid": grid, "rows": rows})
    columns = list(rows[0])
    table = "\n".join(["  ".join(f"{c:>14}" for c in columns)] +
                      ["  ".join(f"{_fmt(row[c]):>14}" for c in columns) for row in rows])
    return results, table


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _loss_positions(cfg, experiment):
    """The positions the training loss averages over."""
    if cfg["loss"] == "last":
        return slice(-1, None)
    return slice(1 if experiment in ("diagonal", "pe-only") else 0, None)


def _summary_row(experiment, result):
    cfg, m = result["config"], result["metrics"]
    row = {k: cfg[k] for k in ("layers", "heads", "attention", "sigma") if k in cfg}
    if experiment == "population":
        row["loss"] = float(m["train_loss"][-1])
        return row
    at = _loss_positions(cfg, experiment)
    row["test_loss"] = float(numpy.mean(m["test_loss_position"][at]))
    if experiment == "augmented" and f"baseline_gd{cfg['layers']}" in m:
        row["gd_k=L"] = float(numpy.mean(m[f"baseline_gd{cfg['layers']}"][at]))
    row["gd1"] = float(numpy.mean(m["baseline_gd1"][at]))
    row["least_squares"] = float(numpy.mean(m["baseline_least_squares"][at]))
    return row


def report(result):
    """A printable table of one run: test loss per position next to the baselines and probe."""
    cfg, m = result["config"], result["metrics"]
    if cfg["experiment"] == "population":
        return (f"population {cfg['family']} d={cfg['d']} H={cfg['heads']} T={cfg['T']}: final "
                f"loss {m['train_loss'][-1]:.6g} (minimum {m['min_loss']:.6g})\nsaved in {result['dir']}")
    T = cfg["T"]
    cols = sorted({r for r in (1, 2, 5, 10, 20, 49, 99) if r < T} | {T - 1})
    names = ["test_loss_position"] + [k for k in m if k.startswith("baseline_")]
    names += [k for k in m if k.startswith(("probe_err", "probe_cos"))]
    lines = [f"{cfg['experiment']}: {int(m['steps_done'])} steps, final train loss "
             f"{m['train_loss'][-1]:.4g}, test loss {m['test_loss'][-1]:.4g}",
             "per position (transitions seen):",
             f"{'':>24}" + "".join(f"{r:>10}" for r in cols)]
    for k in names:
        label = "model" if k == "test_loss_position" else k.replace("baseline_", "")
        lines.append(f"{label:>24}" + "".join(f"{m[k][r]:>10.4g}" for r in cols))
    if "weights_share_KQ" in m:
        lines.append("share of squared mass in the one-GD-step blocks, per layer and head: "
                     f"key-query {numpy.round(m['weights_share_KQ'], 3).tolist()}, "
                     f"value {numpy.round(m['weights_share_V'], 3).tolist()}")
    lines.append(f"saved in {result['dir']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

USAGE = """usage: python train.py EXPERIMENT [--key value ...]
experiments: augmented, nonaug, block, diagonal, pe-only, population, bench
common flags: --preset quick|paper  --name NAME  --runs_dir DIR  --resume  --quiet
              --sweep KEY=V1,V2,...  (repeatable)
python train.py EXPERIMENT --help lists its options with their defaults."""


def _help(experiment):
    quick = config(experiment, "quick")
    paper = config(experiment, "paper")
    lines = [f"usage: python train.py {experiment} [--key value ...]", "",
             f"{'option':<18}{'quick':>11}{'paper':>11}  meaning"]
    for key in (k for k in OPTIONS if k in quick):
        kind, text = OPTIONS[key]
        choices = [c for c in CHOICES.get(key, ()) if not (key == "family" and c == "angle"
                                                            and experiment != "pe-only")]
        allowed = f" ({', '.join(choices)})" if choices else f" [{kind.__name__}]"
        lines.append(f"--{key:<16}{_fmt(quick[key]):>11}{_fmt(paper[key]):>11}  {text}{allowed}")
    lines += ["", "--preset quick|paper (quick)  --name NAME (the experiment)  --runs_dir DIR (runs)",
              "--resume: continue from runs/NAME/checkpoint.npz  --quiet: no progress",
              "--sweep KEY=V1,V2,...: one run per point of the product grid"]
    return "\n".join(lines)


def _parse_value(key, text, cfg):
    if key not in cfg:
        raise ValueError(f"unknown option --{key}; allowed: {', '.join('--' + k for k in cfg)}")
    kind = OPTIONS[key][0]
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"option --{key} needs {kind.__name__}, got {text!r}") from None


def _parse(experiment, args):
    """args -> (run keywords, overrides, sweep grid)."""
    flags = {"preset": "quick", "name": None, "runs_dir": "runs", "resume": False, "quiet": False}
    raw, grid = {}, {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ValueError(f"expected --option, got {arg!r}")
        key = arg[2:].replace("-", "_")
        if key in ("resume", "quiet"):
            flags[key] = True
            i += 1
            continue
        if i + 1 >= len(args):
            raise ValueError(f"option --{key} needs a value")
        value = args[i + 1]
        if key in ("preset", "name", "runs_dir"):
            flags[key] = value
        elif key == "sweep":
            if "=" not in value:
                raise ValueError(f"--sweep needs KEY=V1,V2,..., got {value!r}")
            k, values = value.split("=", 1)
            grid[k.replace("-", "_")] = values.split(",")
        else:
            raw[key] = value
        i += 2
    icar.check_choice("preset", flags["preset"], ("quick", "paper"))
    cfg = config(experiment, flags["preset"])
    overrides = {k: _parse_value(k, v, cfg) for k, v in raw.items()}
    grid = {k: [_parse_value(k, v, cfg) for v in vs] for k, vs in grid.items()}
    return flags, overrides, grid


def main(argv=None):
    """Command line; returns the exit status (2: bad arguments, 1: diverged)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(f"train.py: name an experiment ({', '.join(EXPERIMENTS)}); --help for more",
              file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    experiment, args = argv[0], argv[1:]
    if experiment == "bench":
        return bench(args)
    try:
        icar.check_choice("experiment", experiment, EXPERIMENTS)
        if "-h" in args or "--help" in args:
            print(_help(experiment))
            return 0
        flags, overrides, grid = _parse(experiment, args)
        fused.set_up_process()
        if grid:
            _, table = sweep(experiment, grid, **flags, **overrides)
            print(table)
        else:
            print(report(run(experiment, **flags, **overrides)))
    except Diverged as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    return 0


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


# ----------------------------------------------------------------------------- benchmark
# The speed benchmark: time one training step of each paper-size workload.
#
#     python train.py bench [--repeats 5] [--micro 0] [--workloads nonaug,augmented,...] [--json FILE]
#
# Workloads (the authors' sizes, paper.md [code]):
#     nonaug      M4 on raw tokens: batch 1024, 50 positions, d = 5 repeated twice (embed 10),
#                 64 heads, linear token scores times softmax positional scores, LayerNorm, no
#                 residual; Adam; float32 (--micro m: the gradient accumulated over slices of
#                 m sequences, as loss_and_grad_microbatched does)
#     augmented   M4 on augmented tokens (size 15 = 3d): batch 1024, 50 positions, 1 head,
#                 linear attention, LayerNorm, residual; Adam; float32
#     population  Fig. 3 right: GD on (A, B, P) through theory's population loss, d = 10,
#                 H = 8, T = 20, orthogonal family
#     pe-only     Fig. 6: M3, T = 30, 1000 complex "angle" sequences (mu = 50), GD, lr 0.5,
#                 autograd through icar.pe_only
#     pe-only-moments  the same GD steps through pe_only_objective (exact moments of the data)
#
# For each: the median (and the minimum) over `repeats` timed steps after a warm-up step, the
# peak of memory allocated during one step (tracemalloc, which NumPy reports its array buffers
# to; BLAS work buffers are not included), the FLOP count of one step (below), the GFLOP/s it
# implies, and that rate as a fraction of this machine's matrix-multiply rate in the same
# precision, measured in the same process: the fastest of 15 products C = A @ B of [1024, 1024]
# operands, with every BLAS thread and with one (the larger of the two is used: with other
# processes on the machine, a threaded product can be the slower).
#
# FLOP counts (transformer_flops, pe_only_flops, population_flops) count what the model
# computes as written in its docstring, not what the code executes: a matrix product
# [m, k] @ [k, p] costs 2mkp, an elementwise operation 1 per real entry (a complex product 6,
# a complex-by-real product 2), and one training step (forward and backward) costs 3 times
# the forward pass (each product's gradient takes two products of the same size). Masked
# entries count as computed. fused.transformer, which training runs, executes fewer: see
# transformer_flops(executed=True). pe-only-moments counts what it executes (2 T^3 + 10 T^2).
#
# The process is set up as training should be: fused.tune_allocator() (glibc keeps freed memory
# between steps) and fused.set_blas_threads(1) while the workloads run (fused.transformer runs
# batch slices in fused.THREADS threads of its own); the output says which took effect.

WORKLOADS = ("nonaug", "augmented", "population", "pe-only", "pe-only-moments")
TARGET_MS = {"nonaug": 1200.0, "augmented": 50.0, "population": 0.3, "pe-only": 0.5,
             "pe-only-moments": 0.5}


# ----------------------------------------------------------------------------- training step

def loss_and_grad_microbatched(loss_fn, params, batch, micro):
    """value_and_grad(loss_fn)(params, batch), computed over slices of at most `micro`
    sequences and combined with weights (slice size / batch size).

    loss_fn(params, s) must average over the first axis of s (as icar.mse does), so that
    the combination is the full-batch loss and gradient up to rounding; the memory the
    gradient takes is that of one slice.
    """
    micro = icar.check_int("micro", micro, 1)
    n = batch.shape[0]
    step = value_and_grad(loss_fn)
    if micro >= n:
        return step(params, batch)
    loss, grads = 0.0, None
    for start in range(0, n, micro):
        part = batch[start:start + micro]
        w = part.shape[0] / n                                   # Python float: keeps float32
        value, g = step(params, part)
        loss = loss + w * value
        grads = (tree_map(lambda g: w * g, g) if grads is None
                 else tree_map(lambda acc, g: acc + w * g, grads, g))
    return loss, grads


# ----------------------------------------------------------------------------- FLOP counts

def transformer_flops(cfg, n, T, executed=False):
    """FLOPs of one training step of M4 (icar.transformer) on n sequences of T tokens.

    Forward, per layer, as the docstring writes it (E = repeat * d_in, H heads):
        q, k, v          3 * 2 n T E (H E)
        q . k, a @ v     2 * 2 n H T^2 E
        a = scores*mask  n H T^2 (and n H T^2 more with positional weights)
        W_O              2 n T E^2 (after the sum over heads, n H T E)
        positional       2 * 2 T E (H E) + 2 H T^2 E (batch-independent)
    plus the read-out 2 n T E d_out; a step is 3 forward passes.
    executed=True counts fused.transformer's products instead: with z = (h, 1) of size D
    (d_in + 1 in the first layer, E + 1 after), z G [2 n T D H D], scores and a @ z
    [2 * 2 n H P D] over the P (query, key) pairs formed (T^2, or fewer with linear
    attention's causal blocks), and the output [2 n T (H D) E].
    """
    E, H = cfg["repeat"] * cfg["d_in"], cfg["heads"]
    pairs = (sum((r1 - r0) * r1 for r0, r1 in fused.causal_blocks(T)) if cfg["attention"] == "linear"
             else T * T)
    total = 0
    for layer in range(cfg["layers"]):
        if executed:
            D = (cfg["d_in"] if layer == 0 else E) + 1
            fwd = 2 * n * T * D * H * D + 4 * n * H * pairs * D + 2 * n * T * H * D * E
        else:
            fwd = 6 * n * T * E * H * E + 4 * n * H * T * T * E + 2 * n * T * E * E + n * H * T * E
        fwd += n * H * (pairs if executed else T * T) * (2 if cfg["positional"] else 1)
        if cfg["positional"]:
            fwd += 4 * T * E * H * E + 2 * H * T * T * E
        total += fwd
    total += 2 * n * T * E * cfg["d_out"]
    return 3 * total


def pe_only_flops(n, T, d, complex_data=True):
    """FLOPs of one GD step of icar.pe_only: the product (P * mask) s^2 [T, T] @ [T, n d]
    (2 T^2 n d real, twice that on complex data), the query product (n T d, 6 each on
    complex data) and the squared error (3 per real entry, 8 per complex one); 3 forward
    passes per step."""
    c = 2 if complex_data else 1
    fwd = c * 2 * T * T * n * d + ((6 if complex_data else 1) + (8 if complex_data else 3)) * n * T * d
    return 3 * fwd


def population_flops(d, H, T):
    """FLOPs of one GD step on theory's population loss with its hand-written gradient:
    C = B^T A and the gradients B G, A G^T (3 * 2 H d^2), about 17 operations per entry of
    [d, d] arrays (taus, G) and 22 per entry of [T, T] arrays (row sums, dL/dP, the update)."""
    return 6 * H * d * d + 17 * d * d + 22 * T * T


# ----------------------------------------------------------------------------- measurement

def matmul_rate(dtype, size=1024, repeats=15):
    """This machine's matrix-multiply rate (GFLOP/s): the fastest of `repeats` products
    [size, size] @ [size, size] in `dtype` after a warm-up one (the least disturbed by other
    processes: the rate the machine can reach)."""
    rng = numpy.random.default_rng(0)
    A, B = (rng.standard_normal((size, size)).astype(dtype) for _ in range(2))
    return 2 * size ** 3 / min(_times(lambda: A @ B, repeats)) / 1e9


def _times(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _peak_bytes(fn):
    """Peak bytes allocated (tracemalloc, NumPy buffers included) while fn runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _cast(params, dtype):
    return tree_map(lambda p: p.astype(dtype), params)


class _Trainer:
    """A training loop's state, advanced one step per call (parameters and optimiser move);
    loss_and_grad(params) -> (loss, grads)."""

    def __init__(self, loss_and_grad, params, opt, lr):
        self.loss_and_grad, self.params, self.lr = loss_and_grad, params, lr
        self.opt = adam_init(params) if opt == "adam" else None

    def __call__(self):
        loss, grads = self.loss_and_grad(self.params)
        if self.opt is None:
            self.params = gd_update(self.params, grads, self.lr)
        else:
            self.params, self.opt = adam_update(self.params, grads, self.opt, self.lr)
        return loss


def _on(s, loss, micro=None):
    """loss_and_grad(params) of loss(params, s), over micro-batches where micro is given."""
    if micro:
        return lambda params: loss_and_grad_microbatched(loss, params, s, micro)
    step = value_and_grad(loss)
    return lambda params: step(params, s)


def _transformer_workload(name, dtype, micro, rng):
    d, T, n = 5, 50, 1024
    if name == "nonaug":
        cfg = icar.transformer_config(d_in=d, d_out=d, T=T, heads=64, repeat=2, attention="linear",
                                      positional=True, residual=False)
    else:
        cfg = icar.transformer_config(d_in=3 * d, d_out=d, T=T, heads=1, repeat=1,
                                      attention="linear", positional=False, residual=True)
    s, _ = icar.sample_sequences(rng, n, T, d, "haar", s1="fixed")
    s = s.astype(dtype)                                         # [n, T+1, d]
    params = _cast(icar.init_params("transformer", rng, cfg=cfg), dtype)

    def loss(params, s):
        x = s[:, :-1] if name == "nonaug" else icar.augment(s[:, :-1])
        return icar.mse(fused.transformer(params, x, cfg), s[:, 1:])

    step = _Trainer(_on(s, loss, micro), params, "adam", 1e-2)
    flops = transformer_flops(cfg, n, T)
    notes = (f"batch {n}, T {T}, embed {cfg['repeat'] * cfg['d_in']}, {cfg['heads']} heads, "
             f"Adam, {numpy.dtype(dtype).name}, micro-batch {micro or n}; executed "
             f"{transformer_flops(cfg, n, T, executed=True) / 1e9:.2f} GFLOP/step")
    return step, flops, notes


def _population_workload(steps):
    import theory  # the layer above icar: imported only where it is needed
    d, H, T = 10, 8, 20

    def run():
        theory.train_population(H, d, T, "orthogonal", 1e-3, steps, numpy.random.default_rng(0))
    return run, steps, population_flops(d, H, T), f"d {d}, H {H}, T {T}, {steps} GD steps per call"


def _pe_only_workload(rng, moments):
    T, n = 30, 1000
    s, _ = icar.sample_sequences(rng, n, T, 1, "angle", mu=50.0)   # complex128 [n, T+1, 1]
    params = icar.init_params("pe_only", rng, T=T)
    if moments:  # executed FLOPs: M P (2 T^3) and about 10 operations per entry of P
        step = _Trainer(pe_only_objective(s), params, "gd", 0.5)
        return step, 2 * T ** 3 + 10 * T ** 2, (f"{n} sequences, T {T}, GD lr 0.5 on "
                                               f"pe_only_objective (moments computed once, untimed)")

    def loss(params, s):  # position 0 has no query
        return icar.mse(icar.pe_only(params, s[:, :-1])[:, 1:], s[:, 2:])

    step = _Trainer(_on(s, loss), params, "gd", 0.5)
    return step, pe_only_flops(n, T, 1), f"{n} sequences, T {T}, complex128, GD lr 0.5, autograd"


def run_benchmark(workloads=WORKLOADS, repeats=5, micro=0, dtype="float32", population_steps=2000,
                  tune=True, out=None):
    """Time each workload, printing a line each to `out` (default sys.stdout); return the
    results as a dict (see the module docstring)."""
    out = sys.stdout if out is None else out
    for w in workloads:
        icar.check_choice("workload", w, WORKLOADS)
    repeats, micro = icar.check_int("repeats", repeats, 1), icar.check_int("micro", micro, 0)
    load_before = os.getloadavg()
    tuned = fused.tune_allocator() if tune else False
    rates = {k: matmul_rate(k) for k in ("float32", "float64")}
    blas_threads = fused.set_blas_threads(1)                    # None: BLAS left as it is
    one_thread = ({k: matmul_rate(k) for k in ("float32", "float64")} if blas_threads is not None
                  else None)
    result = {"matmul_gflops": rates, "matmul_gflops_one_blas_thread": one_thread,
              "cpus": os.cpu_count(), "fused_threads": fused.THREADS, "numpy": numpy.__version__,
              "repeats": repeats, "allocator_tuned": tuned,
              "blas_threads": {"matmul": blas_threads, "workloads": 1 if blas_threads else None},
              "workloads": {}}
    print(f"matrix multiply: {rates['float32']:.1f} GFLOP/s float32, {rates['float64']:.1f} "
          f"float64 ({os.cpu_count()} CPUs"
          + (f"; one BLAS thread: {one_thread['float32']:.1f}, {one_thread['float64']:.1f}"
             if one_thread else "")
          + f"); load average {load_before[0]:.2f}; allocator {'tuned' if tuned else 'as is'}; "
          f"workloads with {fused.THREADS} threads of fused.transformer and "
          f"{'1 BLAS thread' if blas_threads else 'BLAS threads as they are'}", file=out)
    rng = numpy.random.default_rng(0)
    for name in workloads:
        if name in ("nonaug", "augmented"):
            fn, flops, notes = _transformer_workload(name, dtype, micro, rng)
            per_call, prec = 1, dtype
        elif name == "population":
            fn, per_call, flops, notes = _population_workload(population_steps)
            prec = "float64"
        else:
            fn, flops, notes = _pe_only_workload(rng, moments=name == "pe-only-moments")
            per_call, prec = 1, "float64"
        times = numpy.asarray(_times(fn, repeats)) / per_call
        peak = _peak_bytes(fn)
        med = float(numpy.median(times))
        gflops = flops / med / 1e9
        best = max(rates[prec], one_thread[prec]) if one_thread else rates[prec]
        row = {"ms_per_step": 1e3 * med, "ms_min": 1e3 * float(times.min()),
               "target_ms": TARGET_MS[name], "meets_target": 1e3 * med <= TARGET_MS[name],
               "peak_MB": peak / 1e6, "gflop_per_step": flops / 1e9, "gflops": gflops,
               "fraction_of_matmul": gflops / best, "precision": prec, "notes": notes}
        result["workloads"][name] = row
        print(f"{name:<15} {row['ms_per_step']:9.3f} ms/step (min {row['ms_min']:.3f}, target "
              f"{row['target_ms']:g})  peak {row['peak_MB']:8.1f} MB  {row['gflop_per_step']:9.4f} "
              f"GFLOP/step  {gflops:7.2f} GFLOP/s = {100 * row['fraction_of_matmul']:5.1f}% of "
              f"{prec} matmul  [{notes}]", file=out, flush=True)
    if blas_threads is not None:
        fused.set_blas_threads(blas_threads)
    result["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    print(f"load average after: {result['load_average']['after'][0]:.2f}", file=out)
    return result


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, through bench's handler
        raise ValueError(message)


def bench(argv):
    """Command line of the benchmark; returns the exit status."""
    parser = _Parser(prog="python train.py bench", description="time one training step of each "
                     "paper-size workload")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per workload (median)")
    parser.add_argument("--micro", type=int, default=0,
                        help="micro-batch of the M4 workloads (0: the whole batch)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="precision of the M4 workloads")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    parser.add_argument("--no-tune-allocator", action="store_true",
                        help="leave glibc's malloc as it is (see fused.tune_allocator)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    try:
        args = parser.parse_args(argv)
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise ValueError(f"--json {args.json!r}: no such folder")
        result = run_benchmark([w for w in args.workloads.split(",") if w], args.repeats,
                               args.micro, args.dtype, tune=not args.no_tune_allocator)
    except ValueError as e:
        print(f"train.py: bench: {e}", file=sys.stderr)
        return 2
    if args.json:
        _save_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
