"""train: one training run of a model of icar.py, scored by evaluate.py, saved by runs.py.

    python train.py EXPERIMENT [--key value ...] [--preset quick|paper] [--resume] [--quiet]
    python train.py EXPERIMENT --help        every option with its quick and paper value

Each experiment trains one model of paper.md (augmented, nonaug: M4; block: M1; diagonal:
M2; pe-only: M3; population: M2's population loss); EXPERIMENTS says how, and --help lists them.
The `quick` preset (default) runs in seconds to a couple of minutes on 2 cores; `paper` uses
the authors' sizes (paper.md, marked [code]). Every option overrides the preset. Many runs
over a grid: sweep.py. Options, files and exit statuses: docs/training.md.

`run` writes runs/NAME/config.json (every setting, the seed, package versions and the code's
fingerprint), checkpoint.npz, params.npz and metrics.npz (loss curves, test loss per
position next to evaluate.baselines, evaluate.probe, and weight_blocks or mechanism where
EXPERIMENTS asks). A resumed run ends bit-identical to an uninterrupted one.
"""
if __name__ == "__main__":  # a signal while the modules load: one line, nothing written (then run_command's handlers)
    import os as _os, signal as _signal
    for _s in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
        _signal.signal(_s, lambda n, _: (_os.write(2, f"train.py: interrupted by {_signal.Signals(n).name} while starting; nothing was written\n".encode()), _os._exit(128 + n)))
import contextlib
import math
import os
import re
import shutil
import sys
import typing

import numpy
from autograd import value_and_grad

import evaluate
import fused
import icar
import runs
import theory

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
MAX_GD_STEPS = 64  # the k-step GD baselines cost grows as gd_steps^2 (a golden-section search per k)
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
    icar.check_choice("experiment", experiment, COMMANDS)
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
    if cfg.get("gd_steps", 0) > MAX_GD_STEPS:
        raise ValueError(f"option gd_steps must be at most {MAX_GD_STEPS} (its baselines cost grows as "
                         f"gd_steps^2), got {cfg['gd_steps']}")
    if "mu" in cfg and cfg["family"] != "angle":  # mu is the angle law's: never stored unused
        if "mu" in overrides:
            raise ValueError(f"option mu is only used by family 'angle', got family "
                             f"{cfg['family']!r}")
        del cfg["mu"]
    families = families_of(experiment)
    if experiment == POPULATION:  # no sampled data: the families theory knows
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


def families_of(experiment):
    """The families of W an experiment accepts."""
    return POPULATION_FAMILIES if experiment == POPULATION else EXPERIMENTS[experiment].families


def _numbers_of(kind):
    """Accepted Python types for an int or float option (an int is a valid float)."""
    return (int, numpy.integer) if kind is int else (int, float, numpy.integer, numpy.floating)


# ----------------------------------------------------------------------------- optimisers

def tree_map(f, *trees):
    """Apply f leafwise to parameter trees (nested dicts and lists of arrays) of one structure
    (ValueError if they differ)."""
    first = trees[0]
    if isinstance(first, dict):
        try:
            return {k: tree_map(f, *(t[k] for t in trees)) for k in first}
        except (KeyError, TypeError):
            raise ValueError(f"parameter trees differ: keys {sorted(first)} against "
                             f"{[sorted(t) if isinstance(t, dict) else type(t).__name__ for t in trees[1:]]}") from None
    if isinstance(first, (list, tuple)):
        if any(len(t) != len(first) for t in trees[1:]):
            raise ValueError(f"parameter trees differ: lists of {[len(t) for t in trees]} entries")
        return [tree_map(f, *leaves) for leaves in zip(*trees)]
    return f(*trees)


def tree_leaves(tree):
    """The arrays of a parameter tree, in a fixed order (dict keys sorted)."""
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in tree_leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in tree_leaves(v)]
    return [tree]


def _same(p, g):
    """g, a gradient or moment of the parameter p: ValueError unless it has p's shape."""
    if p.shape != g.shape:
        raise ValueError(f"a gradient of shape {g.shape} does not match its parameter's {p.shape}")
    return g


def _check_lr(lr):
    if not 0 < lr < math.inf:  # also False for NaN
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")


def gd_update(params, grads, lr):
    """One step of plain gradient descent."""
    _check_lr(lr)
    return tree_map(lambda p, g: p - lr * _same(p, g), params, grads)


def adam_init(params):
    """Adam state: zero moments allocated by each parameter's own array module."""
    zeros = tree_map(lambda p: icar.array_module(p).zeros_like(p), params)
    return {"m": zeros, "v": tree_map(lambda z: z.copy(), zeros), "t": 0}


def adam_update(params, grads, state, lr, b1=0.9, b2=0.999, eps=1e-8):
    """One Adam step (Kingma & Ba); returns (params, state)."""
    _check_lr(lr)
    t = state["t"] + 1
    m = tree_map(lambda m, g: b1 * m + (1 - b1) * _same(m, g), state["m"], grads)
    v = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t  # bias corrections, Python floats
    params = tree_map(lambda p, m, v: p - lr * (m / c1) / ((v / c2) ** 0.5 + eps), params, m, v)
    return params, {"m": m, "v": v, "t": t}


class FlatAdam:
    """adam_update on one vector that holds every parameter: the same operations on every
    entry (the same bits), a dozen array operations a step instead of a dozen per parameter
    array (at the quick scale Adam on ~25 small arrays costs a fifth of a step).

    step(params, grads, state, lr) -> (params, state) as adam_update, the returned trees views
    into the vectors it keeps; given back what it returned last, it goes on from its vectors,
    given any other trees (the first step, members retired) it packs them first."""

    def __init__(self, b1=0.9, b2=0.999, eps=1e-8):
        self.b1, self.b2, self.eps, self.last = b1, b2, eps, None

    @staticmethod
    def _pack(tree):
        leaves = tree_leaves(tree)
        xp = icar.array_module(leaves[0])
        return xp.concatenate([xp.reshape(x, (-1,)) for x in leaves])

    def _views(self, vector):
        """A tree of the template's structure (its key order) whose leaves view `vector`."""
        bounds = iter(zip(self.offsets[:-1], self.offsets[1:], self.shapes))
        def fill(t):
            if isinstance(t, dict):
                filled = {k: fill(t[k]) for k in sorted(t)}  # tree_leaves' order
                return {k: filled[k] for k in t}
            if isinstance(t, (list, tuple)):
                return [fill(v) for v in t]
            a, b, shape = next(bounds)
            return vector[a:b].reshape(shape)
        return fill(self.template)

    def _checked(self, tree):
        """tree packed, ValueError unless its leaves have the parameters' shapes."""
        leaves = tree_leaves(tree)
        if [x.shape for x in leaves] != self.shapes:
            for x, shape in zip(leaves, self.shapes):
                _same(numpy.empty(shape, dtype=bool), x)
            raise ValueError(f"a tree of {len(leaves)} arrays does not match the {len(self.shapes)} parameters")
        xp = icar.array_module(leaves[0])
        return xp.concatenate([xp.reshape(x, (-1,)) for x in leaves])

    def step(self, params, grads, state, lr):
        _check_lr(lr)
        if self.last is None or params is not self.last[0] or state is not self.last[1]:
            self.template = params
            self.shapes = [x.shape for x in tree_leaves(params)]
            self.offsets = numpy.cumsum([0] + [math.prod(shape) for shape in self.shapes]).tolist()
            self.P, self.M, self.V = self._pack(params), self._checked(state["m"]), self._checked(state["v"])
        G = self._checked(grads)
        b1, b2, t = self.b1, self.b2, state["t"] + 1
        # adam_update's operations in its order, in place where nothing else holds the result
        self.M *= b1
        self.M += (1 - b1) * G
        g2 = (1 - b2) * G
        g2 *= G
        self.V *= b2
        self.V += g2
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t  # bias corrections, Python floats
        den = self.V / c2
        icar.array_module(den).sqrt(den, out=den)  # what ** 0.5 computes
        den += self.eps
        step = self.M / c1
        step *= lr
        step /= den
        self.P = self.P - step  # a new vector: the parameters handed out before stay as they were
        params, state = self._views(self.P), {"m": self._views(self.M), "v": self._views(self.V), "t": t}
        self.last = (params, state)
        return params, state


# ----------------------------------------------------------------------------- experiments

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


class Experiment(typing.NamedTuple):
    """What one experiment trains and how it is scored; training, evaluation and the command
    lines read this instead of the experiment's name."""
    model: str                  # the model of paper.md it trains
    init: typing.Callable       # (cfg, rng) -> float64 parameters
    predictor: typing.Callable  # cfg -> predict(params, s [n, T, d]) -> f [n, T, d]
    families: tuple             # the families of W it accepts
    first: int = 0              # first position of the "all" loss: 1 where position 0 has no query
    moments: typing.Callable = None  # (s, first) -> loss_and_grad(params) of a full-batch "all" loss
    transformer: typing.Callable = None  # M4: cfg -> icar.transformer_config
    tokens: typing.Callable = None  # M4: s [n, T, d] -> its tokens [n, T, d_in]
    blocks: bool = False        # metrics hold evaluate.weight_blocks
    depth_vs_gd: bool = False   # the sweep summary puts each depth L next to k = L steps of GD
    mechanism: bool = False     # metrics hold evaluate.mechanism


def _m4(model, transformer, tokens, **scoring):
    """An M4 experiment: fused.transformer (== icar.transformer) on tokens(s)."""
    def predictor(cfg):
        mcfg = transformer(cfg)
        return lambda params, s: fused.transformer(params, tokens(s), mcfg)
    return Experiment(model, lambda cfg, rng: icar.init_params("transformer", rng, cfg=transformer(cfg)),
                      predictor, _MATRICES, transformer=transformer, tokens=tokens, **scoring)


_MATRICES = ("unitary", "orthogonal", "haar")  # the families of d x d context matrices
EXPERIMENTS = {
    "augmented": _m4("M4: augmented tokens (0, s_t, s_{t-1}), linear attention", _augmented_m4,
                     icar.augment, blocks=True, depth_vs_gd=True),
    "nonaug": _m4("M4: raw tokens s_t, with positional attention", _raw_m4, lambda s: s, mechanism=True),
    "block": Experiment(
        "M1: augmented linear attention, block (A, B) or full (W_KQ, W_V) form (--form)",
        lambda cfg, rng: icar.init_params("augmented_linear", rng, d=cfg["d"], form=cfg["form"],
                                          scale=cfg["init_scale"]),
        lambda cfg: lambda params, s: icar.augmented_linear(params, icar.augment(s)),
        _MATRICES, blocks=True),
    "diagonal": Experiment(
        "M2: diagonal multi-head attention with positions P, on sampled data",
        lambda cfg, rng: icar.init_params("diagonal_heads", rng, d=cfg["d"], T=cfg["T"],
                                          H=cfg["heads"], scale=cfg["init_scale"]),
        lambda cfg: icar.diagonal_heads, _MATRICES, first=1),
    "pe-only": Experiment(
        "M3: only the positional matrix P is trained",
        lambda cfg, rng: icar.init_params("pe_only", rng, T=cfg["T"]),
        lambda cfg: icar.pe_only, icar.FAMILIES, first=1, moments=fused.pe_only_objective),
}
# M2's population loss (theory.py): GD on (A, B, P) without sampled data, for the two
# families theory derives it for; its own branch in config, run and the summaries
POPULATION = "population"
POPULATION_FAMILIES = theory.FAMILIES
COMMANDS = (*EXPERIMENTS, POPULATION)
MODELS = {**{k: v.model for k, v in EXPERIMENTS.items()}, POPULATION: "M2's population loss (theory.py)"}
# the files whose code defines every result (in config.json; figures.py's cache key)
CODE = ("icar.py", "fused.py", "theory.py", "evaluate.py", "train.py")


def changed_settings(saved, want):
    """The sorted result settings (not NOT_RESULT, not versions) on which two runs' settings differ."""
    return sorted(k for k in (set(saved) | set(want)) - NOT_RESULT - {"versions"} if saved.get(k) != want.get(k))


def model_config(cfg, experiment):
    """icar.transformer_config of the M4 experiments."""
    return EXPERIMENTS[experiment].transformer(cfg)


def init_model(experiment, cfg, rng):
    """Initial float64 parameters of the experiment's model."""
    return EXPERIMENTS[experiment].init(cfg, rng)


def predictor(experiment, cfg):
    """predict(params, s) -> f: s [n, T, d] inputs -> [n, T, d] predictions of s[:, 1:]."""
    return EXPERIMENTS[experiment].predictor(cfg)


# ----------------------------------------------------------------------------- data

def _to_dtype(x, dtype):
    complex_dtype = {"float64": numpy.complex128, "float32": numpy.complex64}[dtype]
    return x.astype(complex_dtype if numpy.iscomplexobj(x) else dtype)


def sample(cfg, rng, n):
    """(s [n, T+1, d], W [n, d, d]): n sequences of the run's law (family, T, d, sigma, s1, mu)."""
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
    """Generators for training data, test data, initialisation, minibatch order (own streams)."""
    return [numpy.random.default_rng(s) for s in numpy.random.SeedSequence(seed).spawn(4)]


def datasets(cfg):
    """(s_train, s_test, W_test) of a run with settings cfg, on the host in cfg's dtype."""
    data_rng, test_rng, _, _ = _generators(cfg["seed"])
    s_train, _ = sample(cfg, data_rng, cfg["n_train"])
    s_test, W_test = sample(cfg, test_rng, cfg["n_test"])
    return _to_dtype(s_train, cfg["dtype"]), _to_dtype(s_test, cfg["dtype"]), W_test


# ----------------------------------------------------------------------------- one run

def check_run(experiment, cfg):
    """Build a run of cfg on 2 sequences: a setting that passes `config` but fails later (T or d
    wrong for the family, an overflowing loss, no CuPy) is a ValueError before any file."""
    rng = numpy.random.default_rng(0)
    if experiment == POPULATION:
        theory.train_population(cfg["heads"], cfg["d"], cfg["T"], cfg["family"], cfg["lr"], 0, rng)
        return
    array_module(cfg["backend"])  # without CuPy: ValueError
    s = _to_dtype(sample(cfg, rng, 2)[0], cfg["dtype"])
    params = tree_map(lambda p: p.astype(cfg["dtype"]), init_model(experiment, cfg, rng))
    with numpy.errstate(all="ignore"):
        if not math.isfinite(float(icar.mse(numpy.zeros_like(s[:, 1:]), s[:, 1:]))):
            raise ValueError(f"the sampled data overflow in {cfg['dtype']}: sigma {cfg['sigma']} is too large")
    with numpy.errstate(all="ignore"):
        loss = float(icar.mse(predictor(experiment, cfg)(params, s[:, :-1]), s[:, 1:]))
    if not math.isfinite(loss):
        raise ValueError(f"the initial parameters give a non-finite loss ({loss}) on sampled "
                         f"data in {cfg['dtype']}: init_scale {cfg.get('init_scale')} is too large")


def _check_belongs(path, state, experiment, cfg, settings):
    """ValueError unless the restored checkpoint `state` can continue the run of cfg, whose
    result settings have the digest `settings`."""
    step, params, opt, _, perm, pos, _, made_by = state
    init = init_model(experiment, cfg, numpy.random.default_rng(0))
    want = {k: v.shape for k, v in runs.flatten(init).items()}
    have = {k: numpy.shape(v) for k, v in runs.flatten(tree_map(_host, params)).items()}
    dtypes = {str(numpy.asarray(_host(v)).dtype) for v in tree_leaves(params)}
    moments = [{k: numpy.shape(v) for k, v in runs.flatten(tree_map(_host, opt[m])).items()}
               for m in ("m", "v")] if opt is not None else [want, want]
    n = cfg["n_train"]
    bad = (f"its step {step} is past steps={cfg['steps']}" if not 0 <= step <= cfg["steps"] else
           f"its parameters {have} differ from the model's {want}" if have != want else
           f"its parameters are {sorted(dtypes)}, not --dtype {cfg['dtype']}" if dtypes != {cfg["dtype"]} else
           "its optimiser state is not the one of --optimizer " + cfg["optimizer"]
           if (opt is None) != (cfg["optimizer"] == "gd") else
           "its optimiser state does not match the parameters" if moments != [want, want] else
           f"its minibatch order is not a permutation of n_train={n} sequences"
           if len(perm) != n or not numpy.array_equal(numpy.sort(perm), numpy.arange(n)) or not 0 <= pos <= n else
           "it was made with other settings (another seed, data or model of the same shapes)"
           if made_by != settings else None)
    if bad:
        raise ValueError(f"--resume: {path} does not belong to this run: {bad}")


def run(experiment, preset="quick", runs_dir="runs", name=None, resume=False, quiet=False,
        **overrides):
    """Train `experiment` with its preset and overrides; evaluate, probe, save in runs_dir/name,
    holding the folder's lock. Returns {"config", "params", "metrics", "dir"} as runs.load_run
    reads them back. ValueError for bad settings (all checked, and the model built once, before
    any file is touched), Diverged (a ValueError) on a non-finite training loss, FileFault when
    a file cannot be written or read. A fresh run is written into run_dir/.fresh and replaces
    an earlier run's files once it has written its first checkpoint. Metrics: docs/training.md."""
    cfg = config(experiment, preset, **overrides)
    run_dir = runs.run_folder(runs_dir, experiment if name is None else name)
    return _run_members(experiment, preset, [(cfg, run_dir)], resume, quiet)[0]


def parse_seeds(text):
    """The sorted seeds of "0-7", "0,3,5" or "0-3,8" (ValueError naming the bad text)."""
    seeds = set()
    for part in str(text).split(","):
        lo, dash, hi = part.strip().partition("-")
        digits = re.compile("[0-9]+")
        if not (digits.fullmatch(lo) and (digits.fullmatch(hi) if dash else True)) or (dash and int(hi) < int(lo)):
            raise ValueError(f"--seeds must be seeds like 0-7, 0,3,5 or 0-3,8 (integers >= 0, ranges "
                             f"from low to high), got {text!r}")
        seeds.update(range(int(lo), int(hi if dash else lo) + 1))
    if len(seeds) > 1024:
        raise ValueError(f"--seeds names {len(seeds)} seeds; allowed: at most 1024 in one stack")
    return sorted(seeds)


def seed_folder(name, seed):
    """The run folder name of one member of a stack of seeds: NAME-seedK."""
    return f"{name}-seed{seed}"


def run_seeds(experiment, seeds, preset="quick", runs_dir="runs", name=None, resume=False,
              quiet=False, **overrides):
    """`run` at every seed of `seeds` (a list of ints, or text for parse_seeds) as one stack:
    the runs differ only in seed and train as one computation (for M4 at the quick scale,
    fused.stack_loss_and_grad; elsewhere each member's own step, one after another, in one
    loop), each member's data, initialisation and minibatch order those of the lone run with
    its seed. Member k is saved in runs_dir/NAME-seedK (seed_folder) like a lone run: it loads,
    resumes (alone or in its stack), locks and sums up as one. Returns the list of
    runs.load_run results, in the order of the seeds."""
    if isinstance(seeds, str):
        seeds = parse_seeds(seeds)
    if (not isinstance(seeds, (list, tuple)) or not seeds or len(set(seeds)) != len(seeds)
            or any(isinstance(s, bool) or not isinstance(s, (int, numpy.integer)) for s in seeds)):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds!r}")
    if "seed" in overrides:
        raise ValueError("give either seed (one run) or seeds (a stack), not both")
    base = experiment if name is None else name
    members = [(config(experiment, preset, **overrides, seed=int(s)),
                runs.run_folder(runs_dir, seed_folder(base, int(s)))) for s in seeds]
    return _run_members(experiment, preset, members, resume, quiet)


class _Member:
    """One run of a stack: its settings, folder, files and training state."""

    def __init__(self, experiment, preset, cfg, run_dir, resume):
        self.cfg, self.dir, self.resume = cfg, run_dir, resume
        self.ckpt = os.path.join(run_dir, "checkpoint.npz")
        self.saved = dict(cfg, experiment=experiment, preset=preset, versions=runs.versions(CODE))
        self.settings = runs.digest({k: v for k, v in self.saved.items() if k not in NOT_RESULT | {"versions"}})
        self.state, self.folder, self.took_over, self.failure = None, run_dir, False, None
        self.keeps = False  # a finished run is there: replaced only once this one has finished

    def prepare(self, experiment):
        """Check the folder (and on resume, the checkpoint) and stage a fresh run."""
        if self.resume and not os.path.exists(self.ckpt):
            raise ValueError(f"--resume: no checkpoint in {self.dir}; run without --resume first")
        runs.prepare_folder(self.dir)
        if self.resume:
            changed = changed_settings(runs.load_config(self.dir), self.saved)
            if changed:
                raise ValueError(f"--resume: settings {changed} differ from the checkpointed run in "
                                 f"{self.dir}; allowed to change: {', '.join(sorted(NOT_RESULT))}")
            self.state = runs.load_checkpoint(self.ckpt, array_module(self.cfg["backend"]).asarray)
            _check_belongs(self.ckpt, self.state, experiment, self.cfg, self.settings)
        else:  # a fresh run: staged apart until it has a checkpoint (over a finished run: until it
            # has finished), then it replaces the old files
            self.keeps = all(os.path.exists(os.path.join(self.dir, f)) for f in ("params.npz", "metrics.npz"))
            self.folder = runs.fresh_stage(self.dir)
        runs.save_json(os.path.join(self.folder, "config.json"), self.saved)

    def checkpoint_path(self):
        return os.path.join(self.folder, "checkpoint.npz")

    def take_over(self, finished=False):
        """A fresh run's first checkpoint is written (over a finished run: its last files are):
        its files replace the earlier run's, and the move and its record are one step for a
        signal (runs.signals_deferred)."""
        if self.folder != self.dir and (finished or not self.keeps):
            with runs.signals_deferred():
                runs.replace_run(self.folder, self.dir)
                self.folder, self.took_over = self.dir, True


def _run_members(experiment, preset, members, resume, quiet):
    """Train the runs `members` ([(cfg, run_dir)], settings equal but for the seed) as one
    stack, holding every folder's lock; returns their runs.load_run results."""
    check_run(experiment, members[0][0])
    if len({d for _, d in members}) != len(members):
        raise ValueError("two members of a stack share a run folder")
    for _, run_dir in members:
        if resume and not os.path.isdir(run_dir):
            raise ValueError(f"--resume: no run folder {run_dir}; run without --resume first")
    made = [d for _, d in members if not os.path.lexists(d)]  # removed again if nothing is saved
    try:
        return _run_held(experiment, preset, members, resume, quiet)
    finally:  # a start that failed before any file (out of memory, a bad file) leaves no folder
        for d in made:
            if os.path.isdir(d) and not os.path.islink(d) and set(os.listdir(d)) <= {".lock"}:
                shutil.rmtree(d, ignore_errors=True)


def _run_held(experiment, preset, members, resume, quiet):
    with contextlib.ExitStack() as held:
        for _, run_dir in members:  # one process per run folder, before anything in it is read
            held.enter_context(runs.locked(run_dir))
        group = [_Member(experiment, preset, cfg, run_dir, resume) for cfg, run_dir in members]
        try:
            for m in group:
                m.prepare(experiment)
            if experiment == POPULATION:  # no checkpoints: every file staged, then moved
                results = [_population(m.cfg) for m in group]
            else:  # members resumed from different steps train as stacks of their own
                results = {}
                steps = sorted({0 if m.state is None else m.state[0] for m in group})
                for step in steps:
                    part = [m for m in group if (0 if m.state is None else m.state[0]) == step]
                    results.update(zip(map(id, part), _train(experiment, part, quiet)))
                results = [results[id(m)] for m in group]
            for m, result in zip(group, results):
                if result is None:
                    continue
                metrics, params = result
                runs.save_npz(os.path.join(m.folder, "params.npz"), runs.flatten(params))
                runs.save_npz(os.path.join(m.folder, "metrics.npz"), {k: numpy.asarray(v) for k, v in metrics.items()})
                m.take_over(finished=True)
        except KeyboardInterrupt as e:  # say what is on disk now
            e.args = (_on_disk(group),)
            raise
        finally:  # a fresh start that stopped before its first checkpoint leaves nothing behind
            for m in group:
                if not m.resume:
                    shutil.rmtree(os.path.join(m.dir, ".fresh"), ignore_errors=True)
        failed = [m for m in group if m.failure is not None]
        if failed:
            raise icar.Diverged("; ".join((f"seed {m.cfg['seed']}: " if len(group) > 1 else "") + m.failure
                                          for m in failed))
        return [runs.load_run(m.dir) for m in group]  # what was saved, on the host


def _on_disk(group):
    """What an interruption leaves of the runs of a stack (a lone run: a stack of one)."""
    kept = [m.dir for m in group if m.resume or m.took_over]
    finished = [m.dir for m in group if m.keeps and not m.took_over]
    fresh = [m.dir for m in group if not (m.resume or m.took_over or m.keeps)]
    lines = []
    if len(kept) == 1 and len(group) == 1:
        lines.append(f"{kept[0]} holds this run's last checkpoint (python train.py ... --resume continues it)")
    elif kept:
        lines.append(f"{', '.join(kept)} hold their runs' last checkpoints (python train.py ... --resume "
                     f"continues them)")
    if fresh:
        lines.append(f"stopped before its first checkpoint: {', '.join(fresh)} "
                     f"{'is as it was' if len(fresh) == 1 else 'are as they were'}")
    if finished:
        lines.append(f"stopped before it finished: {', '.join(finished)} "
                     f"{'holds its earlier finished run, as it was' if len(finished) == 1 else 'hold their earlier finished runs, as they were'}")
    return "; ".join(lines)


def _population(cfg):
    rng = numpy.random.default_rng(cfg["seed"])
    params, losses = theory.train_population(cfg["heads"], cfg["d"], cfg["T"], cfg["family"],
                                             cfg["lr"], cfg["steps"], rng)
    return {"train_loss": numpy.asarray(losses),
            "min_loss": theory.min_loss(cfg["d"], cfg["heads"], cfg["family"])}, params


def stacked_batch(experiment, batches):
    """(tokens [S, b, T, d_in], targets [S, b, T, d]) of an M4 experiment from each member's
    minibatch of sequences [b, T+1, d]: what fused.stack_loss_and_grad takes."""
    sb = numpy.stack(batches)                                           # [S, b, T+1, d]
    S, b, T1, d = sb.shape
    tokens = EXPERIMENTS[experiment].tokens(numpy.reshape(sb[:, :, :-1], (S * b, T1 - 1, d)))
    return numpy.reshape(tokens, (S, b, T1 - 1, -1)), sb[:, :, 1:]


def _stack(trees, xp):
    """Parameter trees of one structure -> one tree with a leading member axis."""
    return tree_map(lambda *leaves: xp.stack(leaves), *trees)


def _member(tree, k):
    """Member k of a stacked tree."""
    return tree_map(lambda p: p[k], tree)


def _train(experiment, members, quiet):
    """The training loop of a stack of runs (a lone run: a stack of one), all at the same
    step: members' restored checkpoints (resume) or fresh starts. Returns [(metrics, params)
    or None for a member that diverged (its failure says why)]. A fresh member checkpoints
    into its stage until take_over() has moved its files to its run folder."""
    # data are sampled on the host and moved once; parameters and optimiser state live in xp
    cfg = members[0].cfg  # equal for every member but the seed
    xp = array_module(cfg["backend"])
    ex = EXPERIMENTS[experiment]
    predict, first = predictor(experiment, cfg), ex.first
    n, batch = cfg["n_train"], cfg["batch"] or cfg["n_train"]
    positions = slice(-1, None) if cfg["loss"] == "last" else slice(first, None)

    def objective(params, s):
        f = predict(params, s[:, :-1])                                      # [n, T, d]
        return icar.mse(f[:, positions], s[:, 1:][:, positions])

    S = len(members)
    data = [datasets(m.cfg) for m in members]                               # (s_train, s_test, W_test)
    s_train = [xp.asarray(s) for s, _, _ in data]
    s_test = [xp.asarray(s) for _, s, _ in data]
    lone = value_and_grad(objective)
    step_fns = [lone] * S
    if ex.moments and cfg["loss"] == "all" and batch >= n:
        # M3 is linear in P: the same loss and gradient from moments of the data, computed once
        step_fns = [(lambda mom: lambda params, s: mom(params))(ex.moments(s, first)) for s in s_train]
    mcfg = ex.transformer(cfg) if ex.transformer else None
    fast = (mcfg is not None and xp is numpy and not numpy.iscomplexobj(s_train[0])
            and fused.stackable(mcfg, batch, s_train[0].dtype))

    def stack_step(params, batches, active):
        """(losses [S], stacked gradients) of the active members on their batches."""
        if fast:  # M4 at the quick scale: one computation for the stack (fused.stack_loss_and_grad)
            return fused.stack_loss_and_grad(params, *stacked_batch(experiment, batches), mcfg, positions)
        out = [step_fns[j](_member(params, i), s) for i, (j, s) in enumerate(zip(active, batches))]
        return [float(loss) for loss, _ in out], _stack([g for _, g in out], xp)

    states = []
    for m in members:
        if m.state is not None:
            step, params, opt, order_rng, perm, pos, history, _ = m.state
        else:
            _, _, init_rng, order_rng = _generators(m.cfg["seed"])
            params = tree_map(lambda p: xp.asarray(p.astype(cfg["dtype"])), init_model(experiment, m.cfg, init_rng))
            opt = adam_init(params) if cfg["optimizer"] == "adam" else None
            step, perm, pos = 0, numpy.arange(n), n
            history = {"train_loss": [], "test_step": [], "test_loss": []}
        states.append(dict(params=params, opt=opt, rng=order_rng, perm=perm, pos=pos, history=history,
                           last=step if m.state is not None else None))
    step = 0 if members[0].state is None else members[0].state[0]
    params = _stack([st["params"] for st in states], xp)
    opt = (None if cfg["optimizer"] == "gd" else
           {"m": _stack([st["opt"]["m"] for st in states], xp), "v": _stack([st["opt"]["v"] for st in states], xp),
            "t": states[0]["opt"]["t"]})
    active, results, adam = list(range(S)), [None] * S, FlatAdam()
    progress = runs.Progress(cfg["steps"], quiet)
    with numpy.errstate(over="ignore", invalid="ignore"):
        while active:
            batches = []
            for j in active:
                st = states[j]
                if batch < n and st["pos"] + batch > n:  # a new epoch: reshuffle
                    st["perm"], st["pos"] = st["rng"].permutation(n), 0
                batches.append(s_train[j][st["perm"][st["pos"]:st["pos"] + batch]] if batch < n else s_train[j])
            losses, grads = stack_step(params, batches, active)
            retire = []
            for i, j in enumerate(active):
                m, st, loss = members[j], states[j], float(losses[i])
                if not math.isfinite(loss) and m.keeps:
                    m.failure = (f"training loss is {loss} at step {step}: the learning rate {cfg['lr']} or the "
                                 f"initial parameters (init_scale) are likely too large; {m.dir} holds its earlier "
                                 f"finished run, as it was")
                    retire.append(i)
                    continue
                if not math.isfinite(loss):
                    m.failure = (f"training loss is {loss} at step {step}, before any update: the initial "
                                 f"parameters (init_scale) or the data make it non-finite; nothing was saved"
                                 if st["last"] is None else
                                 f"training loss is {loss} at step {step}: the learning rate {cfg['lr']} is "
                                 f"likely too large; the last finite checkpoint (step {st['last']}) is kept "
                                 f"in {m.ckpt}")
                    retire.append(i)
                    continue
                done = step >= cfg["steps"] or loss < cfg["target_loss"]
                mine = _member(params, i)
                if step % cfg["checkpoint_every"] == 0 or done:  # the state before step's records
                    host_opt = None if opt is None else dict(t=opt["t"], m=tree_map(_host, _member(opt["m"], i)),
                                                             v=tree_map(_host, _member(opt["v"], i)))
                    runs.save_checkpoint(m.checkpoint_path(), step, tree_map(_host, mine), host_opt, st["rng"],
                                         st["perm"], st["pos"], st["history"], m.settings)
                    m.take_over()  # the first checkpoint of a fresh run: it replaces the earlier run
                    st["last"] = step
                st["history"]["train_loss"].append(loss)
                if step % cfg["log_every"] == 0 or done:
                    st["history"]["test_step"].append(step)
                    st["history"]["test_loss"].append(float(objective(mine, s_test[j])))
                if done:
                    results[j] = (st["history"], step, tree_map(_host, mine))
                    retire.append(i)
            shown = [j for j in active if members[j].failure is None and states[j]["history"]["test_step"]
                     and states[j]["history"]["test_step"][-1] == step]
            if shown:  # the mean over the members that logged this step (a lone run: its own)
                progress.show(step, float(numpy.mean([states[j]["history"]["train_loss"][-1] for j in shown])),
                              float(numpy.mean([states[j]["history"]["test_loss"][-1] for j in shown])),
                              final=len(retire) == len(active))
            if retire:
                keep = [i for i in range(len(active)) if i not in retire]
                active = [active[i] for i in keep]
                if not active:
                    break
                index = numpy.asarray(keep)
                params, grads = tree_map(lambda p: p[index], params), tree_map(lambda g: g[index], grads)
                if opt is not None:
                    opt = dict(opt, m=tree_map(lambda p: p[index], opt["m"]), v=tree_map(lambda p: p[index], opt["v"]))
            for j in active:
                if batch < n:
                    states[j]["pos"] += batch
            if opt is None:
                params = gd_update(params, grads, cfg["lr"])
            else:
                params, opt = adam.step(params, grads, opt, cfg["lr"])
            step += 1
    out = []
    for m, st, result, (_, _, W_test), s in zip(members, states, results, data, s_test):
        if result is None:
            out.append(None)
            continue
        history, done_at, host_params = result  # evaluation and files are on the host
        metrics = {k: numpy.asarray(v) for k, v in history.items()}
        metrics["steps_done"] = done_at
        metrics.update(_evaluate(experiment, m.cfg, host_params, predict, _host(s), W_test))
        out.append((metrics, host_params))
    return out


def _evaluate(experiment, cfg, params, predict, s_test, W_test):
    """Test loss per position, baselines, probe, weight blocks and mechanism (host arrays)."""
    ex, host = EXPERIMENTS[experiment], numpy.asarray(s_test)
    mcfg = ex.transformer(cfg) if ex.transformer else None
    out = {"test_loss_position": evaluate.position_loss(
        numpy.asarray(predict(params, s_test[:, :-1])), host[:, 1:])}
    out.update({"baseline_" + k: v for k, v in evaluate.baselines(host, W_test, cfg["gd_steps"]).items()})
    if cfg["n_probe"]:
        s = s_test[:cfg["n_probe"]]
        found = evaluate.probe(evaluate.query_predictor(params, s[:, :-1], mcfg), s,
                               W_test[:cfg["n_probe"]], eta=evaluate.optimal_gd_step(host, 1))
        out.update({"probe_" + k: v for k, v in found.items()})
    if ex.blocks:
        out.update({"weights_" + k: v for k, v in evaluate.weight_blocks(params, cfg["d"]).items()})
    if ex.mechanism:  # the read-out is fitted on fresh sequences from a generator of its own
        # (child 4 of the run's seed, beside _generators' four, so no other result changes)
        rng = numpy.random.default_rng(numpy.random.SeedSequence(cfg["seed"], spawn_key=(4,)))
        s_fit = sample(cfg, rng, cfg["n_test"])[0][:, :-1]                      # [n_test, T, d]
        out.update(evaluate.mechanism(params, mcfg, s_fit, host[:, :-1]))
    return out


def report(result):
    """A printable table of one run: test loss per position next to the baselines and probe."""
    cfg, m = result["config"], result["metrics"]
    if cfg["experiment"] == POPULATION:
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

def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _spellings(key):  # --n_train and --n-train
    return list(dict.fromkeys([f"--{key}", f"--{key.replace('_', '-')}"]))


def parser(experiment, prog="python train.py"):
    """The argparse parser of one run of `experiment`: its options (default None: the
    preset's value, shown in the help for both presets), --preset, --name, --runs_dir,
    --resume and --quiet. sweep.py adds its own flags to it."""
    quick, paper = config(experiment, "quick"), config(experiment, "paper")
    p = runs.Parser(prog=f"{prog} {experiment}", allow_abbrev=False, add_help=False,
                    description=f"{experiment}: {MODELS[experiment]}; each option's help ends with its "
                                f"quick and paper values")
    for key in (k for k in OPTIONS if k in quick):
        kind, text = OPTIONS[key]
        choices = families_of(experiment) if key == "family" else CHOICES.get(key, ())
        allowed = f" ({', '.join(choices)})" if choices else f" [{kind.__name__}]"
        p.add_argument(*_spellings(key), dest=key, action=runs.Once,
                       type=kind, metavar="V",
                       help=f"{text}{allowed}; quick {fmt(quick[key])}, paper {fmt(paper[key])}")
    for flag, text in (("preset", "quick (default) or paper"), ("name", "run folder name (default: the experiment)"),
                       ("runs_dir", "folder of the run folders (default: runs)")):
        p.add_argument(*_spellings(flag), dest=flag, action=runs.Once, help=text)
    if "seed" in quick:
        p.add_argument("--seeds", dest="seeds", action=runs.Once, metavar="LIST",
                       help="train a stack of runs that differ only in seed, as one computation, e.g. 0-7 "
                            "or 0,3,5; member K is saved in RUNS_DIR/NAME-seedK (not with --seed)")
    p.add_argument("--resume", action=runs.Once, flag=True, help="continue from RUNS_DIR/NAME/checkpoint.npz")
    p.add_argument("--quiet", action=runs.Once, flag=True, help="no progress lines")
    return p


def parse(args, p):
    """(run keywords, overrides, every parsed value) of argv `args` for parser p (see
    `parser`); None after printing the help for -h or --help."""
    if "-h" in args or "--help" in args:
        print(p.format_help())
        return None
    ns = vars(p.parse_args(args))
    flags = {k: default if ns[k] is None else ns[k] for k, default in (("preset", "quick"), ("runs_dir", "runs"))}
    flags.update(name=ns["name"], resume=bool(ns["resume"]), quiet=bool(ns["quiet"]))
    if ns.get("seeds") is not None:
        if ns.get("seed") is not None:
            raise ValueError("give either --seed (one run) or --seeds (a stack), not both")
        flags["seeds"] = parse_seeds(ns["seeds"])
    icar.check_choice("preset", flags["preset"], ("quick", "paper"))
    return flags, {k: v for k, v in ns.items() if v is not None and k in OPTIONS}, ns


def main(argv=None):
    """Command line of one run; returns the exit status (2: bad arguments, 1: diverged or a
    fault of a file or of the machine)."""
    argv = sys.argv[1:] if argv is None else list(argv)

    def command():
        if not argv:
            raise ValueError(f"name an experiment ({', '.join(COMMANDS)}); --help for more")
        if argv[0] in ("-h", "--help"):
            print("usage: python train.py EXPERIMENT [--key value ...]\nexperiments:\n"
                  + "".join(f"  {k:<11} {v}\n" for k, v in MODELS.items())
                  + "python train.py EXPERIMENT --help lists its options; many runs: python sweep.py")
            return 0
        experiment, args = argv[0], argv[1:]
        icar.check_choice("experiment", experiment, COMMANDS)
        moved = [a for a in args if a.split("=")[0] in ("--sweep", "--jobs", "--list", "--summary")]
        if moved:
            raise ValueError(f"{moved[0].split('=')[0]} belongs to sweeps: python sweep.py {experiment} "
                             f"--sweep KEY=V1,V2,... (train.py trains one run)")
        parsed = parse(args, parser(experiment))
        if parsed is None:
            return 0
        flags, overrides, _ = parsed
        runs.set_up_process()
        if "seeds" in flags:
            print("\n".join(report(r) for r in run_seeds(experiment, **flags, **overrides)))
        else:
            print(report(run(experiment, **flags, **overrides)))
        return 0
    return runs.one_line_errors("train.py", command, "every file already written is intact "
                                "(train.py --resume continues from the last checkpoint)")


if __name__ == "__main__":
    runs.run_command(main)
