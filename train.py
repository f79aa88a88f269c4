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
    bench       the speed benchmark: the same as python bench.py
The `quick` preset (default) runs in seconds to a couple of minutes on 2 cores; `paper` uses
the authors' sizes (paper.md, marked [code]). Every option overrides the preset.

Sweeps: `--sweep KEY=V1,V2,...`, repeatable; one run per point of the product grid, in
runs/NAME/KEY=V,.../, then a summary table (and summary.json). The sweeps of paper.md:
    python train.py augmented --sweep layers=1,2,3,4 --sweep attention=linear,softmax --sweep sigma=0,0.1
    python train.py nonaug --sweep heads=1,2,4,8,16,32,64 --sweep attention=linear,softmax --sweep sigma=0,0.1
    python train.py pe-only --sweep mu=50,100,200,300                        (Fig. 6)
The augmented summary puts each depth L next to k = L steps of GD with the optimal step.
`--jobs N` runs the points in N processes; `--list` prints one command per point (for a
cluster) and runs nothing; `--summary` rebuilds the summary from the points' folders.

What a run computes and saves in runs/NAME/ (each file written atomically):
    config.json     every setting, the seed, package versions
    checkpoint.npz  every `checkpoint_every` steps: parameters, optimiser and RNG state
    params.npz      the trained parameters (nested names joined by "/")
    metrics.npz     loss curves; test loss per position next to `baselines` (oracle W, least
                    squares, k-step GD with the optimal step, last value, zero); the `probe`
                    of the in-context mapping; for M1 and M4 augmented, `weight_blocks`;
                    for M4 on raw tokens, the `mechanism`: `mech_prev_share` [H] (first
                    layer's positional weight on key r - 1) and `mech_readout_r2` [T] (R^2
                    of s_{r-1} read linearly from the first layer's output at position r)

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

Each experiment is described once, in EXPERIMENTS (its model, predictor, probe, loss
positions, families and extra metrics); everything else reads that description.

Library: run, sweep, sweep_commands, summary, load, config, EXPERIMENTS, baselines,
optimal_gd_step, probe, weight_blocks, previous_token_share, readout_r2, mechanism,
query_predictor, tree_map, tree_leaves, adam_init,
adam_update, gd_update, atomic_write, save_text, save_json, save_npz, load_npz, Parser, main.
"""
import argparse
import concurrent.futures
import hashlib
import importlib.metadata
import io
import itertools
import json
import math
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import sys
import time
import typing
import zipfile

import autograd.numpy as np
import numpy
from autograd import grad, value_and_grad

import fused
import icar

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
MAX_INT = 2 ** 31 - 1  # integer options beyond this are typing errors (and would not fit memory)
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
    icar.check_choice("experiment", experiment, EXPERIMENTS)
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
            if OPTIONS[key][0] is int and value > MAX_INT:
                raise ValueError(f"option {key} must be at most {MAX_INT}, got {value!r}")
    if "mu" in cfg and cfg["family"] != "angle":  # mu is the angle law's: never stored unused
        if "mu" in overrides:
            raise ValueError(f"option mu is only used by family 'angle', got family "
                             f"{cfg['family']!r}")
        del cfg["mu"]
    families = EXPERIMENTS[experiment].families
    if EXPERIMENTS[experiment].init is None:  # no sampled data: the families theory knows
        icar.check_choice("family", cfg["family"], families)
    if cfg.get("batch", 0) > cfg.get("n_train", 0):
        raise ValueError(f"batch {cfg['batch']} exceeds n_train {cfg['n_train']}; allowed: "
                         f"0 (full batch) to n_train")
    if cfg.get("n_probe", 0) > cfg.get("n_test", 0):
        raise ValueError(f"n_probe {cfg['n_probe']} exceeds n_test {cfg['n_test']}; allowed: "
                         f"0 (no probe) to n_test")
    if cfg.get("family", families[0]) not in families:  # only 'angle' reaches here
        raise ValueError(f"family 'angle' (d = 1) is only for pe-only; allowed here: "
                         f"{', '.join(families)}")
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


def tree_leaves(tree):
    """The arrays of a parameter tree, in a fixed order (dict keys sorted)."""
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in tree_leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in tree_leaves(v)]
    return [tree]


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
# One function per model and role; the EXPERIMENTS table below says which each experiment uses.

def _augmented_m4(cfg):
    """icar.transformer_config of M4 on augmented tokens (0, s_t, s_{t-1})."""
    return icar.transformer_config(d_in=3 * cfg["d"], d_out=cfg["d"], T=cfg["T"],
                                   layers=cfg["layers"], heads=cfg["heads"], repeat=1,
                                   attention=cfg["attention"], positional=False, residual=True)


def _raw_m4(cfg):
    """icar.transformer_config of M4 on raw tokens s_t, repeated twice, with positions."""
    return icar.transformer_config(d_in=cfg["d"], d_out=cfg["d"], T=cfg["T"], layers=cfg["layers"],
                                   heads=cfg["heads"], repeat=2, attention=cfg["attention"],
                                   positional=True, residual=False)


def _predict_augmented_m4(cfg):
    mcfg = _augmented_m4(cfg)
    return lambda params, s: fused.transformer(params, icar.augment(s), mcfg)


def _predict_raw_m4(cfg):
    mcfg = _raw_m4(cfg)
    return lambda params, s: fused.transformer(params, s, mcfg)


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


def _query_augmented_m4(cfg, params, s):
    """x_r replaces s_r in the middle slot of position r's own token (queries, residual)."""
    mcfg = _augmented_m4(cfg)
    e = icar.augment(s)                                                     # [n, T, 3d]
    zeros = icar.array_module(s).zeros_like(s)
    return lambda x: _transformer_two_streams(
        params, e, e + np.concatenate([zeros, x - s, zeros], axis=-1), mcfg)


def _query_raw_m4(cfg, params, s):
    """x_r feeds position r's queries and residual stream; keys and values keep s_r."""
    mcfg = _raw_m4(cfg)
    return lambda x: _transformer_two_streams(params, s, x, mcfg)


def _previous(s):
    """(xp, causal mask [T, T], s_{r-1} [n, T, d] with s_{-1} = 0) of states s [n, T, d]."""
    n, T, d = s.shape
    xp = icar.array_module(s)
    prev = np.concatenate([xp.zeros((n, 1, d), dtype=s.dtype), s[:, :-1]], axis=1)  # [n, T, d]
    return xp, icar.causal_mask(xp, T, s), prev


def _query_m1(cfg, params, s):
    """f_r = B (sum_{t<=r} s_t s_{t-1}^*) A x_r (full form: x_r in the query token only)."""
    xp, mask, prev = _previous(s)
    d = s.shape[-1]
    if "A" in params:
        def predict(x):
            scores = ((x @ _swap(params["A"])) @ _swap(np.conj(prev))) * mask  # [n, T, T]
            return (scores @ s) @ _swap(params["B"])                            # [n, T, d]
        return predict
    e = icar.augment(s)                                                          # [n, T, 3d]
    def predict(x):
        eq = np.concatenate([xp.zeros_like(s), x, prev], axis=-1)                # [n, T, 3d]
        scores = ((eq @ _swap(params["W_KQ"])) @ _swap(np.conj(e))) * mask       # [n, T, T]
        return (scores @ (e @ _swap(params["W_V"])))[..., :d]                    # [n, T, d]
    return predict


def _query_m2(cfg, params, s):
    """x_r replaces the value of the newest token t = r in every head."""
    xp, mask, prev = _previous(s)
    eye = xp.eye(s.shape[1])                                                     # [T, T]
    q = np.conj(prev)[:, None] * params["A"][None, :, None, :]                   # [n, H, T, d]
    scores = (q @ _swap(s)[:, None]) * (params["P"] * mask)                      # [n, H, T, T]
    newest = np.sum(scores * eye, axis=-1)[..., None]                            # [n, H, T, 1]
    def predict(x):
        heads = scores @ s[:, None] + newest * (x - s)[:, None]                  # [n, H, T, d]
        return np.sum(heads * params["B"][None, :, None, :], axis=1)             # [n, T, d]
    return predict


def _query_m3(cfg, params, s):
    """x_r replaces the value s_r^2 of the newest token t = r by s_r x_r."""
    xp, mask, prev = _previous(s)
    eye = xp.eye(s.shape[1])                                                     # [T, T]
    weights = params["P"] * mask                                                 # [T, T]
    def predict(x):
        newest = np.sum(weights * eye, axis=-1)[:, None] * s                      # [n, T, d]: P[r, r] s_r
        return np.conj(prev) * (weights @ (s * s) + newest * (x - s))            # [n, T, d]
    return predict


# ----------------------------------------------------------------------------- experiments

class Experiment(typing.NamedTuple):
    """What one experiment trains and how it is scored; training, evaluation, probe and
    command line read this instead of the experiment's name."""
    init: typing.Callable       # (cfg, rng) -> float64 parameters; None: theory's population loss
    predictor: typing.Callable  # cfg -> predict(params, s [n, T, d]) -> f [n, T, d]
    query: typing.Callable      # (cfg, params, s) -> predict(x), see query_predictor
    families: tuple             # the families of W it accepts
    first: int = 0              # first position of the "all" loss: 1 where position 0 has no query
    moments: typing.Callable = None  # (s, first) -> loss_and_grad(params) of a full-batch "all" loss
    transformer: typing.Callable = None  # M4: cfg -> icar.transformer_config
    blocks: bool = False        # metrics hold weight_blocks (key-query and value in M1's layout)
    depth_vs_gd: bool = False   # the summary puts each depth L next to k = L steps of GD
    mechanism: bool = False     # metrics hold `mechanism` (previous-token share, read-out R^2)


_MATRICES = ("unitary", "orthogonal", "haar")  # the families of d x d context matrices
EXPERIMENTS = {
    "augmented": Experiment(
        init=lambda cfg, rng: icar.init_params("transformer", rng, cfg=_augmented_m4(cfg)),
        predictor=_predict_augmented_m4, query=_query_augmented_m4, families=_MATRICES,
        transformer=_augmented_m4, blocks=True, depth_vs_gd=True),
    "nonaug": Experiment(
        init=lambda cfg, rng: icar.init_params("transformer", rng, cfg=_raw_m4(cfg)),
        predictor=_predict_raw_m4, query=_query_raw_m4, families=_MATRICES, transformer=_raw_m4,
        mechanism=True),
    "block": Experiment(
        init=lambda cfg, rng: icar.init_params("augmented_linear", rng, d=cfg["d"],
                                               form=cfg["form"], scale=cfg["init_scale"]),
        predictor=lambda cfg: lambda params, s: icar.augmented_linear(params, icar.augment(s)),
        query=_query_m1, families=_MATRICES, blocks=True),
    "diagonal": Experiment(
        init=lambda cfg, rng: icar.init_params("diagonal_heads", rng, d=cfg["d"], T=cfg["T"],
                                               H=cfg["heads"], scale=cfg["init_scale"]),
        predictor=lambda cfg: icar.diagonal_heads, query=_query_m2, families=_MATRICES, first=1),
    "pe-only": Experiment(
        init=lambda cfg, rng: icar.init_params("pe_only", rng, T=cfg["T"]),
        predictor=lambda cfg: icar.pe_only, query=_query_m3, families=icar.FAMILIES, first=1,
        moments=fused.pe_only_objective),
    # theory's population losses are derived for two families
    "population": Experiment(init=None, predictor=None, query=None, families=("unitary", "orthogonal")),
}
COMMANDS = (*EXPERIMENTS, "bench")


def model_config(cfg, experiment):
    """icar.transformer_config of the M4 experiments."""
    return EXPERIMENTS[experiment].transformer(cfg)


def init_model(experiment, cfg, rng):
    """Initial float64 parameters of the experiment's model."""
    return EXPERIMENTS[experiment].init(cfg, rng)


def predictor(experiment, cfg):
    """predict(params, s) -> f: s [n, T, d] inputs -> [n, T, d] predictions of s[:, 1:]."""
    return EXPERIMENTS[experiment].predictor(cfg)


def query_predictor(experiment, cfg, params, s):
    """predict(x) -> [n, T, d]: the model on context s [n, T, d] with the current state at each
    position r replaced by x_r only where it acts as the query of the in-context mapping.

    M1: f_r = B (sum_{t<=r} s_t s_{t-1}^*) A x_r (full form: x_r in the query token only).
    M4: x_r feeds position r's queries and residual stream; keys and values keep s_r.
    M2, M3 (query s_{r-1}): x_r replaces the value of the newest token t = r for query r.
    predict(s) is the model's ordinary prediction; predict is linear in x for M1, M2, M3.
    """
    return EXPERIMENTS[experiment].query(cfg, params, s)


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
    m1 = EXPERIMENTS[experiment].transformer is None
    if m1:
        icar.check_params("params", params, ("A", "B"), ("W_KQ", "W_V"))
    else:
        icar.check_params("params", params, ("layers", "W_out", "b_out"), ("layers", "W_out", "b_out", "pos"))
        for i, layer in enumerate(params["layers"]):
            icar.check_params(f"params['layers'][{i}]", layer, icar.LAYER_KEYS)
    params = tree_map(numpy.asarray, params)
    if m1:
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


# ----------------------------------------------------------------------------- mechanism
# paper.md section 5: a raw-token M4 needs a first layer that copies s_{r-1} into position r.
# Two measures of whether the first layer of a positional M4 does so.

def previous_token_share(params, T):
    """[H]: per head of the FIRST layer, the positional attention weight on the previous key
    t = r - 1, averaged over query positions r = 1..T-1 (1: a previous-token head)."""
    icar.check_params("params", params, ("layers", "W_out", "b_out", "pos"))
    T = icar.check_int("T", T, 2)
    w = icar.positional_attention(params["layers"][0], params["pos"][:T])  # [H, T, T]
    r = numpy.arange(1, T)
    return numpy.mean(numpy.asarray(w)[:, r, r - 1], axis=1)               # [H, T-1] -> [H]


def readout_r2(params, cfg, s_fit, s_eval):
    """[T]: R^2 of a least-squares linear read-out (with bias) of s_{r-1} from the FIRST
    layer's output stream at position r, fitted per position on the inputs s_fit [n, T, d]
    and scored on the held-out inputs s_eval [m, T, d] (inputs s_1..s_T, not T + 1 states).
    R^2 = 1 - SSE / SST, SST around the mean of s_eval's targets, summed over coordinates.
    NaN at position 0 (no previous token) and where the target is constant on s_eval (SST at
    most 1e-12 of its sum of squares: a fixed first state at r = 1). Complex data: real and
    imaginary parts are stacked as real features and targets."""
    icar.check_tokens(s_fit, cfg)
    icar.check_params("params", params, ("layers", "W_out", "b_out") + (("pos",) if cfg["positional"] else ()))
    if icar.check_tokens(s_eval, cfg)[1] != s_fit.shape[1]:
        raise ValueError(f"s_fit and s_eval must have the same T, got {s_fit.shape[1]} and {s_eval.shape[1]}")
    real = lambda z: numpy.concatenate([z.real, z.imag], -1) if numpy.iscomplexobj(z) else z  # noqa: E731

    def features_targets(x):
        h = numpy.concatenate([x] * cfg["repeat"], axis=-1)                  # [n, T, E]
        h1 = icar.transformer_layer(params["layers"][0], h, cfg, params.get("pos"))  # [n, T, E]
        Z = real(numpy.transpose(numpy.asarray(h1)[:, 1:], (1, 0, 2)))      # [T-1, n, E or 2E]
        Z = numpy.concatenate([Z, numpy.ones(Z.shape[:2] + (1,))], -1)      # with the bias
        return Z, real(numpy.transpose(x[:, :-1], (1, 0, 2)))                # [T-1, n, d or 2d]

    Z, Y = features_targets(_float64(s_fit))
    coef = numpy.linalg.pinv(Z) @ Y                                          # [T-1, E+1, d]: per position
    Z, Y = features_targets(_float64(s_eval))
    sse = numpy.sum((Z @ coef - Y) ** 2, axis=(1, 2))                        # [T-1]
    sst = numpy.sum((Y - numpy.mean(Y, axis=1, keepdims=True)) ** 2, axis=(1, 2))
    const = sst <= 1e-12 * numpy.sum(Y ** 2, axis=(1, 2))
    with numpy.errstate(invalid="ignore", divide="ignore"):
        r2 = numpy.where(const, numpy.nan, 1 - sse / sst)
    return numpy.concatenate([[numpy.nan], r2])                              # [T]


def mechanism(experiment, cfg, params, s_test):
    """mech_prev_share [H] and mech_readout_r2 [T] of a run: the read-out is fitted on n_test
    fresh sequences of the training distribution, drawn from a generator of its own (child 4
    of the run's seed, beside _generators' four, so no other result changes), and scored on
    the test inputs s_test [n, T, d]."""
    mcfg = model_config(cfg, experiment)
    rng = numpy.random.default_rng(numpy.random.SeedSequence(cfg["seed"], spawn_key=(4,)))
    s_fit = _sample(cfg, rng, cfg["n_test"])[0][:, :-1]                      # [n_test, T, d]
    return {"mech_prev_share": previous_token_share(params, cfg["T"]),
            "mech_readout_r2": readout_r2(params, mcfg, s_fit, s_test)}


# ----------------------------------------------------------------------------- files

class FileFault(Exception):
    """A file that cannot be written (a full disk, no permission) or read back (truncated,
    empty, foreign): a fault of the machine or of the file, not of the settings (exit status 1)."""


def atomic_write(path, write):
    """write(binary file) into path + '.tmp' (flushed to disk), then rename: a reader sees the
    old or the new file, never a partial one. Creates path's folder if needed; FileFault
    naming path if the disk refuses."""
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise FileFault(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_file(path, what, read):
    """read(path), with every way the file can be missing, damaged or foreign turned into one
    FileFault naming the file and what it should have been."""
    try:
        return read(path)
    except FileNotFoundError:
        raise FileFault(f"{path}: no such file (expected {what})") from None
    except json.JSONDecodeError as e:
        raise FileFault(f"{path}: not valid JSON ({e}); expected {what}") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else "truncated, empty or not this kind of file"
        raise FileFault(f"{path}: cannot be read as {what} ({why})") from None


def load_json(path, what="a JSON file"):
    def read(p):
        with open(p, "rb") as f:
            return json.loads(f.read())
    return read_file(path, what, read)


def save_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


def save_json(path, obj):
    save_text(path, json.dumps(obj, indent=1, sort_keys=True))


def save_npz(path, arrays):
    """numpy.savez, with every entry dated 1980-01-01 (zip's first date) instead of now: the
    bytes depend on the arrays only, so a run writes the same file whenever, and in whichever
    process, it ran."""
    def write(f):
        packed = io.BytesIO()
        numpy.savez(packed, **arrays)
        with zipfile.ZipFile(packed) as z, zipfile.ZipFile(f, "w", allowZip64=True) as out:
            for name in z.namelist():
                with z.open(name) as src, out.open(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)),
                                                   "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst)
    atomic_write(path, write)


def load_npz(path, what="a .npz file of arrays"):
    def read(p):
        with numpy.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    return read_file(path, what, read)


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
    cfg = load_json(os.path.join(run_dir, "config.json"), "a run's config.json")
    metrics = {k: (float(v) if v.ndim == 0 else v)
               for k, v in load_npz(os.path.join(run_dir, "metrics.npz"), "a run's metrics").items()}
    params = _unflatten(load_npz(os.path.join(run_dir, "params.npz"), "a run's parameters"))
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


def array_module(backend):
    """The array module of a backend: numpy, or cupy made traceable by autograd (gpu.py,
    imported only here: NumPy runs never load the adapter)."""
    if backend == "numpy":
        return numpy
    import gpu
    return gpu.cupy_backend()


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
    save_npz(path, arrays)


def _restore(path, xp):
    z = load_npz(path, "a checkpoint")
    def group(name, move=xp.asarray):
        return _unflatten({k[len(name) + 1:]: move(v) for k, v in z.items() if k.startswith(name + "/")})

    try:
        opt = dict(group("opt"), t=int(z["opt_t"])) if "opt_t" in z else None
        rng = numpy.random.default_rng()
        rng.bit_generator.state = json.loads(str(z["rng"]))
        history = {k: list(v) for k, v in group("history", move=numpy.asarray).items()}
        return int(z["step"]), group("params"), opt, rng, z["perm"], int(z["pos"]), history
    except (KeyError, ValueError, TypeError) as e:
        raise FileFault(f"{path}: an incomplete checkpoint ({type(e).__name__}: {e})") from None


def _check_belongs(path, state, experiment, cfg):
    """ValueError unless the restored checkpoint `state` can continue the run of cfg."""
    step, params, opt, _, perm, pos, history = state
    init = init_model(experiment, cfg, numpy.random.default_rng(0))
    want = {k: v.shape for k, v in _flatten(init).items()}
    have = {k: numpy.shape(v) for k, v in _flatten(tree_map(_host, params)).items()}
    bad = (f"its step {step} is past steps={cfg['steps']}" if not 0 <= step <= cfg["steps"] else
           f"its parameters {have} differ from the model's {want}" if have != want else
           "its optimiser state is not the one of --optimizer " + cfg["optimizer"]
           if (opt is None) != (cfg["optimizer"] == "gd") else
           f"its minibatch order covers {len(perm)} sequences, not n_train={cfg['n_train']}"
           if len(perm) != cfg["n_train"] or not 0 <= pos <= cfg["n_train"] else None)
    if bad is None and opt is not None:
        moments = {k: numpy.shape(v) for k, v in _flatten(tree_map(_host, opt["m"])).items()}
        bad = "its optimiser state does not match the parameters" if moments != want else None
    if bad:
        raise ValueError(f"--resume: {path} does not belong to this run: {bad}")


RUN_FILES = ("config.json", "checkpoint.npz", "params.npz", "metrics.npz")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,=+-]*")


def run_folder(runs_dir, name):
    """runs_dir/name, where name must be one plain folder name, so that a run writes (and
    replaces) files inside runs_dir only."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"run name {name!r} must be one plain folder name: letters, digits and "
                         f"_ . , = + -, not starting with '.' or '-'")
    return os.path.join(runs_dir, name)


def _prepare_folder(run_dir):
    """Create run_dir; ValueError if it cannot hold a run's files (a bad --runs_dir or name)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the run folder {run_dir} ({e.strerror or e}); "
                         f"expected a writable folder") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ValueError(f"the run folder {run_dir} is not writable; expected a writable folder")
    for f in RUN_FILES:
        if os.path.isdir(os.path.join(run_dir, f)):
            raise ValueError(f"{os.path.join(run_dir, f)} is a folder; a run writes a file there")
    if os.path.exists(os.path.join(run_dir, ".replaced")):
        raise ValueError(f"{os.path.join(run_dir, '.replaced')} holds an earlier run's files, set "
                         f"aside by an interrupted start; move them back or delete the folder")


def check_run(experiment, cfg):
    """Build what a run of cfg needs on 2 sequences, so that a setting that passes `config` but
    fails later (T or d wrong for the family, an init scale whose loss overflows, no CuPy)
    raises ValueError before any file is touched."""
    rng = numpy.random.default_rng(0)
    if EXPERIMENTS[experiment].init is None:
        import theory
        theory.train_population(cfg["heads"], cfg["d"], cfg["T"], cfg["family"], cfg["lr"], 0, rng)
        return
    array_module(cfg["backend"])  # without CuPy: ValueError
    s = _to_dtype(_sample(cfg, rng, 2)[0], cfg["dtype"])
    params = tree_map(lambda p: p.astype(cfg["dtype"]), init_model(experiment, cfg, rng))
    with numpy.errstate(all="ignore"):
        loss = float(icar.mse(predictor(experiment, cfg)(params, s[:, :-1]), s[:, 1:]))
    if not math.isfinite(loss):
        raise ValueError(f"the initial parameters give a non-finite loss ({loss}) on sampled "
                         f"data in {cfg['dtype']}: init_scale {cfg.get('init_scale')} is too large")


def _replace_run(stage, run_dir):
    """Move a fresh run's files from stage into run_dir, in place of an earlier run's. The
    earlier files are first renamed into run_dir/.replaced, then removed: an interruption in
    between leaves every file on disk (_prepare_folder then says where)."""
    aside = os.path.join(run_dir, ".replaced")
    try:
        os.makedirs(aside)
        for f in RUN_FILES:
            if os.path.exists(os.path.join(run_dir, f)):
                os.replace(os.path.join(run_dir, f), os.path.join(aside, f))
        for f in os.listdir(stage):
            os.replace(os.path.join(stage, f), os.path.join(run_dir, f))
        os.rmdir(stage)
        shutil.rmtree(aside)
    except OSError as e:
        raise FileFault(f"cannot move the new run into {run_dir}: {e.strerror or e}") from None


def run(experiment, preset="quick", runs_dir="runs", name=None, resume=False, quiet=False,
        **overrides):
    """Train `experiment` with its preset and overrides; evaluate, probe, save in runs_dir/name.

    Returns {"config", "params", "metrics", "dir"} as `load` reads them back. Raises ValueError
    for bad settings (all checked, and the model built once, before any file is touched),
    Diverged (a ValueError) on a non-finite training loss, FileFault when a file cannot be
    written or read. A fresh run is written into run_dir/.fresh and replaces an earlier run's
    files only once it has written its first checkpoint. Metrics:
        train_loss [steps + 1]; test_step, test_loss (every log_every steps); steps_done
        test_loss_position [T]; baseline_<name> [T] (see `baselines`)
        probe_Gamma [n_probe, T, d, d], probe_err_<ref>, probe_cos_<ref> [T] (see `probe`)
        weights_KQ, weights_V, weights_share_KQ, weights_share_V (block, augmented)
    population: train_loss [steps + 1], min_loss.
    """
    cfg = config(experiment, preset, **overrides)
    run_dir = run_folder(runs_dir, experiment if name is None else name)
    check_run(experiment, cfg)
    ckpt = os.path.join(run_dir, "checkpoint.npz")
    if resume and not os.path.exists(ckpt):
        raise ValueError(f"--resume: no checkpoint in {run_dir}; run without --resume first")
    _prepare_folder(run_dir)
    saved = dict(cfg, experiment=experiment, preset=preset, versions=_versions())
    if resume:
        old = load_json(os.path.join(run_dir, "config.json"), "the config.json of the run to resume")
        changed = sorted(k for k in set(old) | set(saved) if k not in NOT_RESULT | {"versions"}
                         and old.get(k) != saved.get(k))
        if changed:
            raise ValueError(f"--resume: settings {changed} differ from the checkpointed run in "
                             f"{run_dir}; allowed to change: {', '.join(sorted(NOT_RESULT))}")
        state = _restore(ckpt, array_module(cfg["backend"]))
        _check_belongs(ckpt, state, experiment, cfg)
        folder, replace = run_dir, None
    else:  # a fresh run: staged apart until it has a checkpoint, then it replaces the old files
        folder, state = os.path.join(run_dir, ".fresh"), None
        shutil.rmtree(folder, ignore_errors=True)  # an earlier start that made no checkpoint
        replace = lambda: _replace_run(folder, run_dir)  # noqa: E731
    try:
        save_json(os.path.join(folder, "config.json"), saved)
        if EXPERIMENTS[experiment].init is None:  # no checkpoints: every file staged, then moved
            metrics, params = _population(cfg)
            folder = folder if replace else run_dir
        else:
            metrics, params = _train(experiment, cfg, ckpt, state, quiet, replace, folder)
            folder, replace = run_dir, None
        save_npz(os.path.join(folder, "params.npz"), _flatten(params))
        save_npz(os.path.join(folder, "metrics.npz"), {k: numpy.asarray(v) for k, v in metrics.items()})
        if replace:
            replace()
    finally:  # a fresh start that stopped before its first checkpoint leaves nothing behind
        if not resume:
            shutil.rmtree(os.path.join(run_dir, ".fresh"), ignore_errors=True)
    return load(run_dir)  # what was saved, on the host


def _population(cfg):
    import theory  # the layer above icar; imported here so that the other experiments work alone
    rng = numpy.random.default_rng(cfg["seed"])
    params, losses = theory.train_population(cfg["heads"], cfg["d"], cfg["T"], cfg["family"],
                                             cfg["lr"], cfg["steps"], rng)
    return {"train_loss": numpy.asarray(losses),
            "min_loss": theory.min_loss(cfg["d"], cfg["heads"], cfg["family"])}, params


def _train(experiment, cfg, ckpt, state, quiet, replace=None, folder=None):
    """Training loop; state: a restored checkpoint (resume) or None. A fresh run checkpoints
    into folder until replace() has moved its files to ckpt's folder."""
    # data are sampled on the host and moved once; parameters and optimiser state live in xp
    xp = array_module(cfg["backend"])
    _, _, init_rng, order_rng = _generators(cfg["seed"])
    s_train, s_test, W_test = datasets(cfg)
    s_train, s_test = xp.asarray(s_train), xp.asarray(s_test)
    predict = predictor(experiment, cfg)
    ex = EXPERIMENTS[experiment]
    first = ex.first

    def objective(params, s):
        f = predict(params, s[:, :-1])                                      # [n, T, d]
        if cfg["loss"] == "last":
            return icar.mse(f[:, -1:], s[:, -1:])
        return icar.mse(f[:, first:], s[:, 1 + first:])

    step_fn = value_and_grad(objective)
    n, batch = cfg["n_train"], cfg["batch"] or cfg["n_train"]
    if ex.moments and cfg["loss"] == "all" and batch >= n:
        # M3 is linear in P: the same loss and gradient from moments of the data, computed once
        moments = ex.moments(s_train, first)
        step_fn = lambda params, s: moments(params)  # noqa: E731  (s is always s_train here)
    if state is not None:
        step, params, opt, order_rng, perm, pos, history = state
    else:
        params = tree_map(lambda p: xp.asarray(p.astype(cfg["dtype"])),
                          init_model(experiment, cfg, init_rng))
        opt = adam_init(params) if cfg["optimizer"] == "adam" else None
        step, perm, pos = 0, numpy.arange(n), n
        history = {"train_loss": [], "test_step": [], "test_loss": []}
    progress = _Progress(cfg["steps"], quiet)
    last_checkpoint = step if state is not None else None
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
            done = step >= cfg["steps"] or loss < cfg["target_loss"]
            if step % cfg["checkpoint_every"] == 0 or done:  # the state before step's records
                if replace is None:
                    _checkpoint(ckpt, step, params, opt, order_rng, perm, pos, history)
                else:  # the first checkpoint of a fresh run: now it replaces the earlier run
                    _checkpoint(os.path.join(folder, "checkpoint.npz"), step, params, opt,
                                order_rng, perm, pos, history)
                    replace()
                    replace = None
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
    """Test loss per position, baselines, probe, weight blocks and mechanism (host arrays)."""
    host = numpy.asarray(s_test)
    out = {"test_loss_position": _position_loss(numpy.asarray(predict(params, s_test[:, :-1])),
                                                host[:, 1:])}
    out.update({"baseline_" + k: v for k, v in baselines(host, W_test, cfg["gd_steps"]).items()})
    if cfg["n_probe"]:
        s = s_test[:cfg["n_probe"]]
        found = probe(query_predictor(experiment, cfg, params, s[:, :-1]), s, W_test[:cfg["n_probe"]],
                      eta=optimal_gd_step(host, 1))
        out.update({"probe_" + k: v for k, v in found.items()})
    if EXPERIMENTS[experiment].blocks:
        out.update({"weights_" + k: v for k, v in weight_blocks(experiment, params, cfg["d"]).items()})
    if EXPERIMENTS[experiment].mechanism:
        out.update(mechanism(experiment, cfg, params, host[:, :-1]))
    return out


# ----------------------------------------------------------------------------- sweeps, report

class SweepIncomplete(Exception):
    """Points of a sweep that failed or have no finished run: `lines` (one per point) and
    `table`, the summary of the finished ones (None if none was summarised). Exit status 1."""

    def __init__(self, lines, table=None):
        super().__init__("; ".join(lines))
        self.lines, self.table = lines, table


def _plan(experiment, grid, preset, runs_dir, name, overrides):
    """Check every point of the product grid {option: [values]} (settings, and the model built
    once on two sequences) before anything runs; return (folder of the sweep, [(point name
    K=V,..., point settings)])."""
    if not grid:
        raise ValueError("sweep needs at least one option with values")
    clash = set(grid) & set(overrides)
    if clash:
        raise ValueError(f"option(s) {sorted(clash)} are both swept and fixed; give each once")
    keys = list(grid)
    for k in keys:
        values = [config(experiment, preset, **overrides, **{k: v})[k] for v in grid[k]]
        if not values or len(set(values)) < len(values):
            raise ValueError(f"--sweep {k} needs distinct values, got {list(grid[k])}")
    points = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    base = run_folder(runs_dir, experiment if name is None else name)
    plan = [(",".join(f"{k}={v}" for k, v in point.items()), point) for point in points]
    for sub, point in plan:
        run_folder(base, sub)
        check_run(experiment, config(experiment, preset, **overrides, **point))
    return base, plan


def _summarize(experiment, grid, base, results):
    """Write base/summary.json of the finished points' results; return the printable table."""
    rows = [_summary_row(experiment, r, list(grid)) for r in results]
    save_json(os.path.join(base, "summary.json"), {"grid": grid, "rows": rows})
    columns = list(rows[0])
    return "\n".join(["  ".join(f"{c:>14}" for c in columns)] +
                     ["  ".join(f"{_fmt(row[c]):>14}" for c in columns) for row in rows])


def _run_point(experiment, preset, base, sub, resume, threads, overrides):
    """One sweep point in a worker process that shares the machine's cores with the others:
    `threads` threads of its own (fused.THREADS), one BLAS thread. Returns None, or the
    failure as one line (the other points go on)."""
    fused.THREADS = threads
    fused.set_up_process()
    try:
        run(experiment, preset, base, sub, resume, True, **overrides)
    except (ValueError, FileFault, OSError, MemoryError) as e:
        return fault_line(e)
    return None


def sweep(experiment, grid, preset="quick", runs_dir="runs", name=None, resume=False, quiet=False,
          jobs=1, **overrides):
    """One run per point of the product of grid {option: [values]}, in runs_dir/name/K=V,.../,
    in this process (jobs=1) or in `jobs` worker processes, each with cores // jobs threads.

    Returns (results, table): the list of run results, read back from disk whichever way they
    ran, and the summary text (also saved as summary.json next to the runs). Every point is
    checked before the first starts (ValueError). A point that fails (Diverged, a full disk)
    does not stop the others: once all ran, the finished ones are summarised and
    SweepIncomplete names the failed ones.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= MAX_INT:
        raise ValueError(f"jobs must be a whole number >= 1, got {jobs!r}")
    base, plan = _plan(experiment, grid, preset, runs_dir, name, overrides)
    for sub, _ in plan:
        _prepare_folder(run_folder(base, sub))
    failed = {}
    if jobs == 1:
        for sub, point in plan:
            if not quiet:
                print(f"-- {experiment} {sub}", file=sys.stderr)
            try:
                run(experiment, preset, base, sub, resume, quiet, **overrides, **point)
            except (ValueError, FileFault, OSError, MemoryError) as e:
                failed[sub] = fault_line(e)
    else:
        failed = _run_in_workers(experiment, preset, base, plan, resume, quiet, jobs, overrides)
    results = [load(run_folder(base, sub)) for sub, _ in plan if sub not in failed]
    table = _summarize(experiment, grid, base, results) if results else None
    if failed:
        raise SweepIncomplete([f"point {sub} failed: {why}" for sub, why in failed.items()], table)
    return results, table


def _run_in_workers(experiment, preset, base, plan, resume, quiet, jobs, overrides):
    """Run the points of plan in `jobs` spawned processes, at most `jobs` at a time, with one
    progress line per point started and finished; return {point: failure line}."""
    workers = min(jobs, len(plan))
    threads = max(1, fused.cores() // workers)
    say = (lambda line: None) if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    failed, running, todo = {}, {}, list(plan)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        try:
            while todo or running:
                while todo and len(running) < workers:
                    sub, point = todo.pop(0)
                    say(f"-- {experiment} {sub}: started (threads={threads})")
                    running[pool.submit(_run_point, experiment, preset, base, sub, resume,
                                        threads, {**overrides, **point})] = (sub, time.perf_counter())
                done, _ = concurrent.futures.wait(running, return_when="FIRST_COMPLETED")
                for future in done:
                    sub, t0 = running.pop(future)
                    try:
                        why = future.result()
                    except Exception as e:  # a worker that died (killed, out of memory)
                        why = f"its worker process stopped ({type(e).__name__}: {e})"
                    if why is not None:
                        failed[sub] = why
                    say(f"-- {experiment} {sub}: {'failed' if why else 'finished'} "
                        f"({time.perf_counter() - t0:.1f} s)")
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return failed


def summary(experiment, grid, preset="quick", runs_dir="runs", name=None, **overrides):
    """(results, table) of a sweep whose points ran elsewhere (sweep_commands), read from
    runs_dir/name/K=V,.../ without training; summary.json is written only when every point
    has a finished run of its settings, else SweepIncomplete names the others (no file touched)."""
    base, plan = _plan(experiment, grid, preset, runs_dir, name, overrides)
    results, missing = [], []
    for sub, point in plan:
        folder = run_folder(base, sub)
        try:
            result = load(folder)
        except FileFault as e:
            missing.append(f"point {sub} has no finished run: {e}")
            continue
        want = dict(config(experiment, preset, **overrides, **point), experiment=experiment,
                    preset=preset)
        have = result["config"]
        other = sorted(k for k in (set(want) | set(have)) - NOT_RESULT - {"versions"}
                       if want.get(k) != have.get(k))
        if other:
            missing.append(f"point {sub}: {folder} holds a run of other settings {other}")
            continue
        results.append(result)
    if missing:
        raise SweepIncomplete(missing)
    return results, _summarize(experiment, grid, base, results)


def sweep_commands(experiment, grid, preset="quick", runs_dir="runs", name=None, resume=False,
                   quiet=False, **overrides):
    """One shell command per point of the sweep (for a cluster's job array or GNU parallel),
    each a plain run writing runs_dir/name/K=V,.../ as `sweep` does, with absolute paths so
    that it runs from any folder. Checks every point as `sweep` does; writes nothing."""
    base, plan = _plan(experiment, grid, preset, runs_dir, name, overrides)
    here = os.path.dirname(os.path.abspath(__file__))
    head = [sys.executable, os.path.join(here, "train.py"), experiment, "--preset", preset,
            "--runs_dir", os.path.abspath(base)]
    flags = ["--resume"] * resume + ["--quiet"] * quiet
    return [" ".join(shlex.quote(a) for a in head + ["--name", sub] + flags + [
        a for k, v in {**overrides, **point}.items() for a in (f"--{k}", str(v))])
        for sub, point in plan]


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _loss_positions(cfg, experiment):
    """The positions the training loss averages over."""
    if cfg["loss"] == "last":
        return slice(-1, None)
    return slice(EXPERIMENTS[experiment].first, None)


def _summary_row(experiment, result, swept=()):
    cfg, m = result["config"], result["metrics"]
    row = {k: cfg[k] for k in (*swept, "layers", "heads", "attention", "sigma") if k in cfg}
    if EXPERIMENTS[experiment].init is None:
        row["loss"] = float(m["train_loss"][-1])
        return row
    at = _loss_positions(cfg, experiment)
    row["test_loss"] = float(numpy.mean(m["test_loss_position"][at]))
    if EXPERIMENTS[experiment].depth_vs_gd and f"baseline_gd{cfg['layers']}" in m:
        row["gd_k=L"] = float(numpy.mean(m[f"baseline_gd{cfg['layers']}"][at]))
    row["gd1"] = float(numpy.mean(m["baseline_gd1"][at]))
    row["least_squares"] = float(numpy.mean(m["baseline_least_squares"][at]))
    return row


def report(result):
    """A printable table of one run: test loss per position next to the baselines and probe."""
    cfg, m = result["config"], result["metrics"]
    if EXPERIMENTS[cfg["experiment"]].init is None:
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
              --sweep KEY=V1,V2,...  (repeatable)  --jobs N  --list  --summary
python train.py EXPERIMENT --help lists its options with their defaults."""


class Parser(argparse.ArgumentParser):
    """argparse for the other command lines (bench.py, figures.py): a bad argument raises
    ValueError, which they print as one line with exit status 2, as train.py does."""

    def error(self, message):
        raise ValueError(message)


def _help(experiment):
    quick = config(experiment, "quick")
    paper = config(experiment, "paper")
    lines = [f"usage: python train.py {experiment} [--key value ...]", "",
             f"{'option':<18}{'quick':>11}{'paper':>11}  meaning"]
    for key in (k for k in OPTIONS if k in quick):
        kind, text = OPTIONS[key]
        choices = EXPERIMENTS[experiment].families if key == "family" else CHOICES.get(key, ())
        allowed = f" ({', '.join(choices)})" if choices else f" [{kind.__name__}]"
        lines.append(f"--{key:<16}{_fmt(quick[key]):>11}{_fmt(paper[key]):>11}  {text}{allowed}")
    lines += ["", "--preset quick|paper (quick)  --name NAME (the experiment)  --runs_dir DIR (runs)",
              "--resume: continue from runs/NAME/checkpoint.npz  --quiet: no progress",
              "--sweep KEY=V1,V2,...: one run per point of the product grid",
              "  --jobs N: the points in N processes  --list: one command per point, runs nothing",
              "  --summary: the summary of points that ran elsewhere (from their folders)"]
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
    flags = {"preset": "quick", "name": None, "runs_dir": "runs", "resume": False, "quiet": False,
             "jobs": None, "list": False, "summary": False}
    raw, grid, seen = {}, {}, set()
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ValueError(f"expected --option, got {arg!r}")
        key = arg[2:].replace("-", "_")
        if key in seen and key != "sweep":
            raise ValueError(f"option --{key} is given twice; give each option once")
        seen.add(key)
        if key in ("resume", "quiet", "list", "summary"):
            flags[key] = True
            i += 1
            continue
        if i + 1 >= len(args):
            raise ValueError(f"option --{key} needs a value")
        value = args[i + 1]
        if key in ("preset", "name", "runs_dir"):
            flags[key] = value
        elif key == "jobs":
            if not (value.isdigit() and 1 <= int(value) <= MAX_INT):
                raise ValueError(f"option --jobs needs a whole number of processes >= 1, got {value!r}")
            flags[key] = int(value)
        elif key == "sweep":
            if "=" not in value:
                raise ValueError(f"--sweep needs KEY=V1,V2,..., got {value!r}")
            k, values = value.split("=", 1)
            k = k.replace("-", "_")
            if k in grid:
                raise ValueError(f"--sweep {k} is given twice; give all its values in one --sweep")
            grid[k] = values.split(",")
        else:
            raw[key] = value
        i += 2
    for key, needs in (("jobs", "runs the points of a sweep"), ("list", "lists the points of a sweep"),
                       ("summary", "summarises the points of a sweep")):
        if flags[key] not in (None, False) and not grid:
            raise ValueError(f"--{key} {needs}; give --sweep KEY=V1,V2,...")
    for a, b in (("list", "jobs"), ("list", "summary"), ("summary", "jobs"), ("summary", "resume")):
        if flags[a] and flags[b] not in (None, False):
            raise ValueError(f"--{a} runs no training, so --{b} has no use with it; give one of them")
    icar.check_choice("preset", flags["preset"], ("quick", "paper"))
    cfg = config(experiment, flags["preset"])
    clash = set(grid) & set(raw)
    if clash:
        raise ValueError(f"option(s) {sorted(clash)} are both swept and fixed; give each once")
    overrides = {k: _parse_value(k, v, cfg) for k, v in raw.items()}
    grid = {k: [_parse_value(k, v, cfg) for v in vs] for k, vs in grid.items()}
    return flags, overrides, grid


def main(argv=None):
    """Command line; returns the exit status (2: bad arguments, 1: diverged)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(f"train.py: name an experiment ({', '.join(COMMANDS)}); --help for more",
              file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    experiment, args = argv[0], argv[1:]
    if experiment == "bench":
        import bench  # bench imports train: the alias loads it only when asked
        return bench.main(args, prog="python train.py bench", name="train.py: bench")
    def command():
        icar.check_choice("experiment", experiment, COMMANDS)
        if "-h" in args or "--help" in args:
            print(_help(experiment))
            return 0
        flags, overrides, grid = _parse(experiment, args)
        jobs, listing, summarise = flags.pop("jobs") or 1, flags.pop("list"), flags.pop("summary")
        if listing:
            print("\n".join(sweep_commands(experiment, grid, **flags, **overrides)))
            return 0
        if summarise:
            del flags["resume"], flags["quiet"]
            print(summary(experiment, grid, **flags, **overrides)[1])
            return 0
        fused.set_up_process()
        if grid:
            print(sweep(experiment, grid, jobs=jobs, **flags, **overrides)[1])
        else:
            print(report(run(experiment, **flags, **overrides)))
        return 0
    return one_line_errors("train.py", command)


def one_line_errors(prefix, command):
    """command() -> exit status, with every error one line on stderr after prefix: 2 for a bad
    argument (ValueError), 1 for a diverged run, failed sweep points or a fault of the machine
    or of a file, 130 for an interruption. The command lines of train, bench and figures."""
    try:
        return command()
    except BrokenPipeError:  # the reader of stdout went away: run_command ends quietly
        raise
    except SweepIncomplete as e:
        if e.table is not None:
            print(e.table)
        for line in e.lines:
            print(f"{prefix}: {line}", file=sys.stderr)
        return 1
    except Diverged as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return 2
    except (FileFault, OSError, MemoryError) as e:
        print(f"{prefix}: {fault_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; every file already written is intact (train.py --resume "
              "and figures.py continue from the last checkpoint)", file=sys.stderr)
        return 130


def fault_line(e):
    """One line for a fault of the machine or of a file."""
    if isinstance(e, MemoryError):
        return "out of memory: try fewer sequences (n_train, n_test, batch) or a smaller model"
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


def run_command(main):
    """sys.exit(main()), quietly when the reader of standard output goes away first
    (`python train.py --help | head`)."""
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the flush at exit
        status = 0
    sys.exit(status)

if __name__ == "__main__":
    run_command(main)
