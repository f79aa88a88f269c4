"""Tests of the paper's claims, in the order of paper.md: the samplers and models M1-M4
(icar.py, fused.py), the theory R1-R4 (theory.py) and the experiments of Figs. 1, 3-7
(evaluate.py and the numbers of figures.py). Each test compares a computation with an
independent reference (an exact identity, a closed form of paper.md, Monte Carlo, a trained
model, or autograd's check_grads). Here `np` is NumPy and `anp` autograd's wrapper of it.
figures.py (and so matplotlib) is imported only inside the tests that use it (section 5).

Sections (headers `# ==== N.`): 1 data and models, 2 R1, 3 R2/R3, 4 R4, 5 Figs. 3-7,
6 fast == plain, 7 bad input of the library (one table for icar.py, theory.py, evaluate.py).
Which test proves which claim: docs/claims.md (the one index). The plumbing has its own
files: test_train.py, test_runs.py, test_sweep.py, test_gpu.py, test_bench.py,
test_figures.py; conftest.py holds the shared helpers.
"""


import argparse
import inspect
import os
import subprocess
import sys

import autograd.numpy as anp
import numpy
import numpy as np
import pytest
from autograd import grad, value_and_grad
from autograd.misc import flatten
from autograd.test_util import check_grads

import bench
import evaluate
import fused
import icar
import runs
import theory
import train
from conftest import rng


def query(experiment, cfg, params, s):
    """evaluate.query_predictor of a trained experiment's model (M4: with its config)."""
    mcfg = train.model_config(cfg, experiment) if train.EXPERIMENTS[experiment].transformer else None
    return evaluate.query_predictor(params, s, mcfg)


def complex_haar_data(n, T, d, seed):
    """Complex sequences with a non-diagonal W, to exercise conj() in every model."""
    s, _ = icar.sample_sequences(rng(seed), n, T, d, "haar")
    phase = np.exp(1j * rng(seed + 1).uniform(0, 2 * np.pi, (n, 1, d)))
    return s * phase


# ==== 1. data and models ==================================================================
# Proves that the samplers draw what paper.md describes and that M1-M4 are the paper's
# models, against exact identities, check_grads, gradients (causality) and dtypes.

# ---- samplers ----------------------------------------------------------------------------

@pytest.mark.parametrize("family, d", [("unitary", 3), ("orthogonal", 4), ("haar", 5), ("angle", 1)])
def test_sampler_W_is_orthogonal_or_unitary_and_s_follows_W(family, d):
    s, W = icar.sample_sequences(rng(1), 50, 7, d, family, mu=3.0 if family == "angle" else None)
    assert s.shape == (50, 8, d) and W.shape == (50, d, d)
    assert np.iscomplexobj(s) == (family in ("unitary", "angle"))
    WWh = W @ np.conj(np.swapaxes(W, 1, 2))
    assert np.max(np.abs(WWh - np.eye(d))) < 1e-12
    pred = (W[:, None] @ s[:, :-1, :, None])[..., 0]                  # W s_t at every t
    assert np.max(np.abs(s[:, 1:] - pred)) < 1e-12


@pytest.mark.parametrize("family, d", [("unitary", 4), ("orthogonal", 4)])
def test_commuting_families_commute_and_haar_does_not(family, d):
    _, W = icar.sample_sequences(rng(2), 20, 3, d, family)
    comm = W[:10] @ W[10:] - W[10:] @ W[:10]
    assert np.max(np.abs(comm)) < 1e-12
    _, Wh = icar.sample_sequences(rng(2), 20, 3, d, "haar")
    comm_h = Wh[:10] @ Wh[10:] - Wh[10:] @ Wh[:10]
    assert np.min(np.max(np.abs(comm_h), axis=(1, 2))) > 1e-3


@pytest.mark.parametrize("d", [2, 3, 5])
def test_haar_statistics(d):
    """For Haar O(d), d >= 2: E[tr W] = 0 and E[tr(W)^2] = 1; checked within 4 standard errors."""
    n = 40000
    _, W = icar.sample_sequences(rng(3), n, 2, d, "haar")
    tr = np.trace(W, axis1=1, axis2=2)
    for values, expected in ((tr, 0.0), (tr ** 2, 1.0)):
        se = values.std() / np.sqrt(n)
        assert abs(values.mean() - expected) < 4 * se


def test_sampler_initial_states():
    s, _ = icar.sample_sequences(rng(4), 100, 2, 3, "unitary")
    assert np.allclose(np.abs(s[:, 0]), 1) and np.std(np.angle(s[:, 0])) > 1
    s, _ = icar.sample_sequences(rng(4), 100, 2, 3, "unitary", s1="fixed")
    assert np.all(s[:, 0] == 1)
    s, _ = icar.sample_sequences(rng(4), 100, 2, 4, "orthogonal")
    blocks = s[:, 0].reshape(100, 2, 2)
    assert np.allclose(np.sum(blocks ** 2, -1), 2) and np.std(blocks[..., 0]) > 0.5
    s, _ = icar.sample_sequences(rng(4), 100, 2, 4, "orthogonal", s1="fixed")
    assert np.allclose(s[:, 0], 1)
    s, _ = icar.sample_sequences(rng(4), 100, 2, 5, "haar")
    assert np.allclose(np.linalg.norm(s[:, 0], axis=1), 1) and np.std(s[:, 0]) > 0.2
    s, _ = icar.sample_sequences(rng(4), 100, 2, 5, "haar", s1="fixed")
    assert np.allclose(s[:, 0], 1 / np.sqrt(5))


def test_angle_family_draws_narrow_angles():
    mu = 50.0
    s, W = icar.sample_sequences(rng(5), 2000, 2, 1, "angle", mu=mu, s1="fixed")
    theta = np.angle(W[:, 0, 0]) % (2 * np.pi)
    assert theta.max() <= 2 * np.pi / mu and theta.min() >= 0
    # uniform on [0, 2 pi / mu]: mean pi / mu within 4 standard errors
    assert abs(theta.mean() - np.pi / mu) < 4 * theta.std() / np.sqrt(theta.size)


@pytest.mark.parametrize("family, d", [("unitary", 2), ("haar", 3)])
def test_noise_enters_each_transition_with_variance_sigma_squared(family, d):
    sigma, n = 0.1, 20000
    s, W = icar.sample_sequences(rng(6), n, 4, d, family, sigma=sigma)
    resid = s[:, 1:] - (W[:, None] @ s[:, :-1, :, None])[..., 0]       # [n, T, d]
    power = np.sum(np.abs(resid) ** 2, -1).ravel()                      # E = sigma^2 d
    assert abs(power.mean() - sigma ** 2 * d) < 4 * power.std() / np.sqrt(power.size)


def test_sampler_is_seeded():
    a = icar.sample_sequences(rng(7), 5, 4, 3, "haar", sigma=0.1)
    b = icar.sample_sequences(rng(7), 5, 4, 3, "haar", sigma=0.1)
    c = icar.sample_sequences(rng(8), 5, 4, 3, "haar", sigma=0.1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.allclose(a[0], c[0])


def test_augment_tokens():
    s, _ = icar.sample_sequences(rng(9), 3, 4, 2, "unitary")
    e = icar.augment(s)
    assert e.shape == (3, 5, 6)
    assert np.all(e[..., :2] == 0) and np.array_equal(e[..., 2:4], s)
    assert np.all(e[:, 0, 4:] == 0) and np.array_equal(e[:, 1:, 4:], s[:, :-1])


# ---- gradients (check_grads) and dtypes --------------------------------------------------

def _models(d, T, complex_data):
    """(name, function of params, params) for every model on real or complex data."""
    if complex_data:
        s = complex_haar_data(3, T, d, seed=10)[:, :-1]
    else:
        s = icar.sample_sequences(rng(10), 3, T, d, "haar")[0][:, :-1]
    e = icar.augment(s)
    r = rng(11)
    cases = [
        ("M1 block", lambda p: icar.augmented_linear(p, e),
         icar.init_params("augmented_linear", r, d=d, form="block", scale=0.5)),
        ("M1 full", lambda p: icar.augmented_linear(p, e),
         icar.init_params("augmented_linear", r, d=d, form="full", scale=0.5)),
        ("M2", lambda p: icar.diagonal_heads(p, s),
         icar.init_params("diagonal_heads", r, d=d, T=T, H=2, scale=0.5)),
        ("M3", lambda p: icar.pe_only(p, s),
         {"P": r.standard_normal((T, T))}),
    ]
    for variant in (dict(d_in=3 * d, layers=2, heads=1),
                    dict(d_in=d, repeat=2, heads=3, positional=True, residual=False),
                    dict(d_in=d, heads=2, attention="softmax", positional=True)):
        cfg = icar.transformer_config(d_out=d, T=T, **variant)
        x = e if cfg["d_in"] == 3 * d else s
        params = icar.init_params("transformer", r, cfg=cfg)
        # non-zero biases and LayerNorm parameters, so their gradients are exercised too
        for layer in params["layers"]:
            for key in ("b_Q", "b_K", "b_V", "b_O", "ln_b"):
                layer[key] = 0.3 * r.standard_normal(layer[key].shape)
        cases.append((f"M4 {variant}", lambda p, x=x, cfg=cfg: icar.transformer(p, x, cfg), params))
    return cases


@pytest.mark.parametrize("complex_data", [False, True], ids=["real", "complex"])
def test_check_grads_every_model(complex_data):
    for name, f, params in _models(d=2, T=4, complex_data=complex_data):
        check_grads(f, modes=["rev"], order=1)(params)
        # and through the loss, the function that training differentiates
        target = f(params) + 0.1
        check_grads(lambda p: icar.mse(f(p), target), modes=["rev"], order=2)(params)


@pytest.mark.parametrize("family", ["haar", "unitary"])
def test_M1_M2_M3_keep_float32_in_value_and_gradients(family):
    """float32 (complex64) data and parameters stay in single precision: no float64 constant
    (such as a mask) upcasts them."""
    s = icar.sample_sequences(rng(30), 4, 6, 2, family)[0]
    s = s.astype(np.complex64 if np.iscomplexobj(s) else np.float32)
    r = rng(31)
    cases = [(icar.init_params("augmented_linear", r, d=2, form=form),
              lambda p: icar.mse(icar.augmented_linear(p, icar.augment(s[:, :-1])), s[:, 1:]))
             for form in ("block", "full")]
    cases += [(icar.init_params("diagonal_heads", r, d=2, T=6, H=2),
               lambda p: icar.mse(icar.diagonal_heads(p, s[:, :-1]), s[:, 1:])),
              ({"P": r.standard_normal((6, 6))}, lambda p: icar.mse(icar.pe_only(p, s[:, :-1]), s[:, 1:]))]
    for params, objective in cases:
        params = {k: v.astype(np.float32) for k, v in params.items()}
        loss, g = value_and_grad(objective)(params)
        assert np.asarray(loss).dtype == np.float32
        assert all(v.dtype == np.float32 for v in g.values())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_ignores_large_masked_scores(dtype):
    """A future (masked) score far above the visible ones must not turn a row into NaN."""
    z = np.array([[0.0, 800.0, -5.0], [0.0, 1.0, 900.0], [2.0, 0.0, 1.0]], dtype=dtype)
    mask = np.tril(np.ones((3, 3), dtype=dtype))
    w = icar.softmax(z, mask)
    e = np.exp([2.0, 0.0, 1.0])
    assert np.allclose(w[0], [1, 0, 0]) and np.allclose(w[1], [1 / (1 + np.e), np.e / (1 + np.e), 0])
    assert np.allclose(w[2], e / e.sum())
    check_grads(lambda z: icar.softmax(z, mask), modes=["rev"], order=1)(z.astype(np.float64))


# ---- exact identities: M1 is one GD step, M3 is M2 with C = I, causality -----------------

def test_block_M1_is_one_gradient_step_on_the_inner_objective():
    """A = I, B = eta I: f_T = W_1 s_T with W_1 = W_0 - eta grad L(W_0), W_0 = 0."""
    d, T, eta = 3, 6, 0.37
    s = icar.sample_sequences(rng(12), 4, T, d, "haar")[0][:, :-1]          # [n, T, d]
    params = {"A": np.eye(d), "B": eta * np.eye(d)}
    f = icar.augmented_linear(params, icar.augment(s))
    for i in range(s.shape[0]):
        for T_ in range(1, T + 1):  # prefix s_1..s_T_
            prefix = s[i, :T_]

            def inner(Wm):  # L(W) = 1/2 sum_{t=2}^{T} ||s_t - W s_{t-1}||^2
                r = prefix[1:] - prefix[:-1] @ Wm.T
                return 0.5 * np.sum(r ** 2)
            W1 = np.zeros((d, d)) - eta * grad(inner)(np.zeros((d, d)))
            assert np.max(np.abs(f[i, T_ - 1] - W1 @ prefix[-1])) < 1e-12


def test_block_M1_complex_is_eta_sum_s_t_conj_s_prev():
    d, T, eta = 2, 5, 0.2
    s = complex_haar_data(3, T, d, seed=13)[:, :-1]
    A = rng(14).standard_normal((d, d))
    B = rng(15).standard_normal((d, d))
    f = icar.augmented_linear({"A": A, "B": B}, icar.augment(s))
    for i in range(3):
        G = sum(np.outer(s[i, t], np.conj(s[i, t - 1])) for t in range(1, T))
        assert np.max(np.abs(f[i, -1] - B @ G @ A @ s[i, -1])) < 1e-12


def test_block_M1_equals_full_M1_with_the_blocks_embedded():
    d, T = 3, 5
    s = complex_haar_data(2, T, d, seed=16)[:, :-1]
    e = icar.augment(s)
    A, B = rng(17).standard_normal((2, d, d))
    W_KQ, W_V = np.zeros((3 * d, 3 * d)), np.zeros((3 * d, 3 * d))
    W_KQ[2 * d:, d:2 * d] = A     # e_t^* W_KQ e_T = s_{t-1}^* A s_T
    W_V[:d, d:2 * d] = B          # block_1(W_V e_t) = B s_t
    full = icar.augmented_linear({"W_KQ": W_KQ, "W_V": W_V}, e)
    block = icar.augmented_linear({"A": A, "B": B}, e)
    assert np.max(np.abs(full - block)) < 1e-12


def test_M3_with_p_T_one_predicts_full_circle_sequences():
    s = icar.sample_sequences(rng(20), 10, 6, 1, "unitary")[0]
    f = icar.pe_only({"P": np.eye(6)}, s[:, :-1])
    assert np.max(np.abs(f[:, 1:] - s[:, 2:])) < 1e-12


def test_M3_is_M2_with_C_identity():
    d, T = 3, 5
    s = complex_haar_data(2, T, d, seed=21)[:, :-1]
    P = rng(22).standard_normal((T, T))
    assert np.max(np.abs(icar.pe_only({"P": P}, s)
                         - icar.diagonal_heads({"A": np.eye(d), "B": np.eye(d), "P": P}, s))) < 1e-12


def test_models_are_causal():
    """Changing the last token changes no prediction before it."""
    d, T = 2, 5
    s = icar.sample_sequences(rng(23), 2, T, d, "haar")[0][:, :-1]
    s2 = s.copy()
    s2[:, -1] += 1.0
    cfg = icar.transformer_config(d_in=d, d_out=d, T=T, heads=2, positional=True, attention="softmax")
    p4 = icar.init_params("transformer", rng(24), cfg=cfg)
    pairs = [
        (lambda x: icar.augmented_linear(icar.init_params("augmented_linear", rng(25), d=d, form="full"),
                                         icar.augment(x))),
        (lambda x: icar.diagonal_heads(icar.init_params("diagonal_heads", rng(26), d=d, T=T, H=2), x)),
        (lambda x: icar.pe_only({"P": rng(27).standard_normal((T, T))}, x)),
        (lambda x: icar.transformer(p4, x, cfg)),
    ]
    for model in pairs:
        a, b = model(s), model(s2)
        assert np.max(np.abs(a[:, :-1] - b[:, :-1])) < 1e-12
        assert np.max(np.abs(a[:, -1] - b[:, -1])) > 1e-6


def test_positional_attention_is_a_causal_softmax():
    cfg = icar.transformer_config(d_in=3, d_out=3, T=6, heads=2, repeat=2, positional=True, residual=False)
    params = icar.init_params("transformer", rng(8), cfg=cfg)
    a = icar.positional_attention(params["layers"][0], params["pos"][:5])      # [2, 5, 5]
    assert a.shape == (2, 5, 5)
    assert np.allclose(a.sum(-1), 1) and np.all(np.triu(a, 1) == 0)
    lay, p = params["layers"][0], params["pos"][:5]
    h, r = 1, 3  # one entry by hand
    z = [(p[r] @ lay["W_Q"][h] + lay["b_Q"][h]) @ (p[t] @ lay["W_K"][h] + lay["b_K"][h]) / np.sqrt(6)
         for t in range(r + 1)]
    assert np.allclose(a[h, r, :r + 1], np.exp(z) / np.sum(np.exp(z)))


# ---- bad input of icar.py ----------------------------------------------------------------

def _bad(match, f, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        f(*args, **kwargs)


def test_bad_sizes_are_rejected():
    _bad(r"d must be an integer >= 1, got 0", icar.sample_sequences, rng(), 2, 3, 0, "haar")
    _bad(r"T must be an integer >= 2, got 1", icar.sample_sequences, rng(), 2, 1, 3, "haar")
    _bad(r"n must be an integer >= 1, got 0", icar.sample_sequences, rng(), 0, 3, 3, "haar")
    _bad(r"d must be an integer >= 1, got -1", icar.init_params, "augmented_linear", rng(), d=-1)
    _bad(r"T must be an integer >= 1, got 0", icar.init_params, "pe_only", rng(), T=0)
    _bad(r"T must be an integer >= 1, got 0", icar.transformer_config, T=0)


def test_bad_heads_are_rejected():
    _bad(r"H must be an integer >= 1, got 0", icar.init_params, "diagonal_heads", rng(), d=2, T=3, H=0)
    _bad(r"heads must be an integer >= 1, got -2", icar.transformer_config, heads=-2)
    s = np.ones((1, 3, 2))
    _bad(r"H \(rows of A\) must be an integer >= 1, got 0", icar.diagonal_heads,
         {"A": np.ones((0, 2)), "B": np.ones((0, 2)), "P": np.ones((3, 3))}, s)


def test_odd_d_for_orthogonal_is_rejected():
    _bad(r"'orthogonal' needs an even d, got d=3", icar.sample_sequences, rng(), 2, 3, 3, "orthogonal")


def test_unknown_names_are_rejected():
    _bad(r"unknown family 'gaussian'; allowed: unitary, orthogonal, haar, angle",
         icar.sample_sequences, rng(), 2, 3, 2, "gaussian")
    _bad(r"unknown model 'mlp'; allowed: augmented_linear", icar.init_params, "mlp", rng())
    _bad(r"unknown s1 'zeros'", icar.sample_sequences, rng(), 2, 3, 2, "haar", s1="zeros")
    _bad(r"unknown form 'diag'", icar.init_params, "augmented_linear", rng(), d=2, form="diag")
    _bad(r"unknown attention 'relu'", icar.transformer_config, attention="relu")
    _bad(r"unknown transformer option\(s\) \['width'\]", icar.transformer_config, width=3)
    _bad(r"rng must be a numpy.random.Generator", icar.sample_sequences, 0, 2, 3, 2, "haar")


def test_parameter_shapes_must_match_the_data():
    s = np.ones((2, 4, 3))
    _bad(r"A has shape \(2, 2\), expected \(3, 3\)", icar.augmented_linear,
         {"A": np.eye(2), "B": np.eye(3)}, icar.augment(s))
    _bad(r"W_KQ has shape \(3, 3\), expected \(9, 9\)", icar.augmented_linear,
         {"W_KQ": np.eye(3), "W_V": np.eye(9)}, icar.augment(s))
    _bad(r"params must be a dict with keys", icar.augmented_linear, {"A": np.eye(3)}, icar.augment(s))
    _bad(r"augmented tokens must have size 3d, got 4", icar.augmented_linear,
         {"A": np.eye(3), "B": np.eye(3)}, np.ones((2, 4, 4)))
    _bad(r"P has shape \(5, 5\), expected \(4, 4\)", icar.diagonal_heads,
         {"A": np.ones((2, 3)), "B": np.ones((2, 3)), "P": np.eye(5)}, s)
    _bad(r"B has shape \(2, 2\), expected \(2, 3\)", icar.diagonal_heads,
         {"A": np.ones((2, 3)), "B": np.ones((2, 2)), "P": np.eye(4)}, s)
    _bad(r"P has shape \(3, 3\), expected \(4, 4\)", icar.pe_only, {"P": np.eye(3)}, s)
    _bad(r"s must have shape \[n, T, d\]", icar.pe_only, {"P": np.eye(3)}, np.ones((4, 3)))
    cfg = icar.transformer_config(d_in=3, d_out=3, T=3)
    p = icar.init_params("transformer", rng(), cfg=cfg)
    _bad(r"x has T=4, d=3; the configuration allows T <= 3", icar.transformer, p, s, cfg)


@pytest.mark.parametrize("sigma", [-0.1, np.nan, np.inf, "0.1"])
def test_bad_sigma_is_rejected(sigma):
    _bad(r"sigma must be a finite number >= 0, got", icar.sample_sequences, rng(), 2, 3, 2, "haar",
         sigma=sigma)


@pytest.mark.parametrize("mu", [0, -2.0, None, np.inf])
def test_bad_mu_is_rejected(mu):
    _bad(r"mu \(family 'angle'\) must be a finite number > 0, got", icar.sample_sequences, rng(), 2, 3, 1,
         "angle", mu=mu)


def test_angle_family_needs_d_one_and_mu_only_for_angle():
    _bad(r"family 'angle' needs d=1, got d=2", icar.sample_sequences, rng(), 2, 3, 2, "angle", mu=5.0)
    _bad(r"mu is only used by family 'angle'", icar.sample_sequences, rng(), 2, 3, 2, "haar", mu=5.0)


# ---- icar.py standing alone --------------------------------------------------------------

ALONE = """
import numpy as np
from autograd import grad
from autograd.misc.optimizers import adam
import icar
rng = np.random.default_rng(0)
s, _ = icar.sample_sequences(rng, 64, 6, 2, "unitary")          # [n, T+1, d], complex
cfg = icar.transformer_config(d_in=2, d_out=2, T=6, heads=2, repeat=2, positional=True)
models = {"augmented_linear": (lambda p, x: icar.augmented_linear(p, icar.augment(x)), dict(d=2)),
          "diagonal_heads": (icar.diagonal_heads, dict(d=2, T=6, H=2)), "pe_only": (icar.pe_only, dict(T=6)),
          "transformer": (lambda p, x: icar.transformer(p, x, cfg), dict(cfg=cfg))}
for name, (model, sizes) in models.items():
    loss = lambda p: icar.mse(model(p, s[:, :-1]), s[:, 1:])
    params = icar.init_params(name, rng, **sizes)
    trained = adam(lambda p, i: grad(loss)(p), params, step_size=0.01, num_iters=30)
    assert loss(trained) < loss(params), name
"""


def test_icar_alone_trains_every_model(tmp_path):
    """icar.py copied into an empty folder samples data and trains M1-M4 with autograd's Adam:
    it needs no other file of the project."""
    (tmp_path / "icar.py").write_bytes(open(icar.__file__, "rb").read())
    (tmp_path / "alone.py").write_text(ALONE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "alone.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    imported = {line.split()[1].split(".")[0] for line in open(icar.__file__) if line.startswith(("import ", "from "))}
    assert imported == {"importlib", "numbers", "numpy", "autograd"}  # no threads, no os


# ==== 2. R1: one GD step, augmented (M1) ==================================================
# Proves theory.py's eta*, GD loss and L* of R1 against Monte Carlo and against M1 trained
# by Adam (block and full form). The helpers serve sections 2-4.

def assert_monte_carlo(value, per_sequence, k=4.0):
    """value agrees with the mean of per_sequence [n, ...] within k standard errors (plus
    rounding, for losses that are the same on every sequence)."""
    n = per_sequence.shape[0]
    mean = per_sequence.mean(axis=0)
    se = per_sequence.std(axis=0, ddof=1) / np.sqrt(n)
    gap = np.abs(mean - value)
    assert np.all(gap < k * se + 1e-12 * (1 + np.abs(value))), \
        f"closed form {value} vs Monte Carlo {mean} +- {se} (z = {gap / se})"


def squared_errors(f, y):
    """||f - y||^2 per sequence and position: [n, T, d] -> [n, T]."""
    return np.sum(np.abs(f - y) ** 2, axis=-1)


def adam(objective, params, steps, lr):
    """`steps` of train.py's Adam on objective(params)."""
    g, state = grad(objective), train.adam_init(params)
    for _ in range(steps):
        params, state = train.adam_update(params, g(params), state, lr)
    return params


def test_r1_step_sizes_minimise_the_loss():
    for T, d in [(5, 3), (20, 10), (2, 1)]:
        eta = theory.gd_step_size(T, d)
        assert eta == pytest.approx(1 / (T + d - 2), rel=1e-14)
        assert theory.gd_loss(T, d) == pytest.approx(d * (d - 1) / (T + d - 2), abs=1e-12)
        for loss in ("last", "all"):
            e = theory.gd_step_size(T, d, loss)
            grid = e * np.linspace(0.5, 1.5, 101)
            values = [theory.gd_loss(T, d, float(x), loss=loss) for x in grid]
            assert np.argmin(values) == 50


@pytest.mark.parametrize("family,d,T", [("unitary", 3, 5), ("unitary", 2, 8), ("orthogonal", 4, 4)])
def test_r1_gd_loss_matches_monte_carlo(family, d, T):
    """M1 with A = I, B = eta I: last-token loss and the sum over positions r = 1..T-1."""
    rng = np.random.default_rng(1)
    s, _ = icar.sample_sequences(rng, 20000, T, d, family)
    e = icar.augment(s[:, :T])                                                 # [n, T, 3d]
    for eta in (theory.gd_step_size(T, d), 2 * theory.gd_step_size(T, d, "all")):
        f = icar.augmented_linear({"A": np.eye(d), "B": eta * np.eye(d)}, e)  # [n, T, d]
        err = squared_errors(f, s[:, 1:])                                      # [n, T]
        assert_monte_carlo(theory.gd_loss(T, d, eta), err[:, -1])
        assert_monte_carlo(theory.gd_loss(T, d, eta, loss="all"), err[:, 1:].sum(axis=1))


def last_token_statistics(v, k, q, y):
    """The last-token loss of linear attention f_i = sum_j L_ij sum_{a,b} R_ab Phi_{j,a,b},
    Phi = sum_t v_t conj(k_t)^T q^T, is quadratic in c_i = vec(L_i. kron R): return its
    matrix, vector and constant, Re E[Phi Phi^*] [D, D], Re E[Phi conj(y_i)] [d, D], E||y||^2."""
    n = v.shape[0]
    G = np.swapaxes(v, 1, 2) @ np.conj(k)                                # [n, Dv, Dk]
    Phi = (G[..., None] * q[:, None, None, :]).reshape(n, -1)                  # [n, D]
    Q = np.real(np.conj(Phi).T @ Phi) / n                                # [D, D]
    V = np.real(y.T @ np.conj(Phi)) / n                                  # [d, D]
    return Q, V, np.mean(np.sum(np.abs(y) ** 2, axis=1))


def statistics_loss(L, R, stats):
    Q, V, y2 = stats
    c = (L[:, :, None, None] * R[None, None]).reshape(L.shape[0], -1)          # [d, D]
    return anp.sum((c @ Q) * c) - 2 * anp.sum(c * V) + y2


def train_last_token(s, T, form, rng, steps=3000, lr=1e-2):
    """Adam on the sample last-token loss of icar.augmented_linear (block or full form),
    through its sufficient statistics; checked equal to the model's own loss and gradient."""
    d = s.shape[2]
    e, y = icar.augment(s[:, :T]), s[:, T]                                     # [n, T, 3d], [n, d]
    if form == "block":
        names = ("B", "A")
        stats = last_token_statistics(e[..., d:2 * d], e[..., 2 * d:], e[:, -1, d:2 * d], y)
    else:
        names = ("W_V", "W_KQ")
        stats = last_token_statistics(e, e, e[:, -1], y)

    def objective(p):
        return statistics_loss(p[names[0]][:d], p[names[1]], stats)

    def model_loss(p):
        return icar.mse(icar.augmented_linear(p, e)[:, -1], y)

    params = icar.init_params("augmented_linear", rng, d=d, form=form)
    np.testing.assert_allclose(objective(params), model_loss(params), rtol=1e-10)
    g1, g2 = grad(objective)(params), grad(model_loss)(params)
    for key in params:
        np.testing.assert_allclose(g1[key], g2[key], rtol=1e-8, atol=1e-12)
    params = adam(objective, params, steps, lr)
    np.testing.assert_allclose(objective(params), model_loss(params), rtol=1e-10)
    return params


def test_r1_trained_block_form_is_one_gd_step():
    d, T = 3, 5
    rng = np.random.default_rng(2)
    s, _ = icar.sample_sequences(rng, 20000, T, d, "unitary")
    params = train_last_token(s, T, "block", rng)
    eta = theory.gd_step_size(T, d)
    BA = params["B"] @ params["A"]
    assert np.linalg.norm(BA - eta * np.eye(d)) < 0.05 * np.linalg.norm(eta * np.eye(d))
    st, _ = icar.sample_sequences(rng, 50000, T, d, "unitary")
    test = squared_errors(icar.augmented_linear(params, icar.augment(st[:, :T]))[:, -1], st[:, T])
    assert abs(test.mean() / theory.gd_loss(T, d) - 1) < 0.02


def test_r1_trained_full_form_reaches_L_star():
    d, T = 2, 4
    rng = np.random.default_rng(3)
    s, _ = icar.sample_sequences(rng, 20000, T, d, "unitary")
    params = train_last_token(s, T, "full", rng)
    st, _ = icar.sample_sequences(rng, 50000, T, d, "unitary")
    test = squared_errors(icar.augmented_linear(params, icar.augment(st[:, :T]))[:, -1], st[:, T])
    assert test.mean() <= 1.02 * theory.gd_loss(T, d)


def test_r1_fixed_first_state_beats_one_gd_step():
    d, T = 3, 5
    rng = np.random.default_rng(4)
    s, _ = icar.sample_sequences(rng, 20000, T, d, "unitary", s1="fixed")
    params = train_last_token(s, T, "block", rng)
    st, _ = icar.sample_sequences(rng, 50000, T, d, "unitary", s1="fixed")
    test = squared_errors(icar.augmented_linear(params, icar.augment(st[:, :T]))[:, -1], st[:, T])
    assert test.mean() + 4 * test.std() / np.sqrt(test.size) < theory.gd_loss(T, d)


# ==== 3. R2 / R3: diagonal heads (M2), population losses, minimisers, local minima ========
# Proves the population losses of R2/R3 against Monte Carlo and autograd, the minimum values
# (d-H)_+ and (d-2H)_+ at the minimisers, and the local minima, against the Hessian and GD.

# ---- the minimisers by hand predict their family exactly ---------------------------------

def r2_minimiser(d, T, c):
    """C = c I with H = d heads, p_T = 1/c (R2)."""
    return {"A": np.eye(d), "B": c * np.eye(d), "P": np.eye(T) / c}


def r3_minimiser(d, T, c):
    """C = c (I_{d/2} kron 1 1^T) with H = d/2 heads, p_T = 1/c, p_{T-1} = -1/(2c) (R3)."""
    heads = np.kron(np.eye(d // 2), np.ones((1, 2)))                     # [d/2, d]
    return {"A": heads, "B": c * heads, "P": (np.eye(T) - 0.5 * np.eye(T, k=-1)) / c}


def _error_after_first(params, s):
    f = icar.diagonal_heads(params, s[:, :-1])
    return np.max(np.abs(f[:, 1:] - s[:, 2:]))   # position 0 has no query


def test_M2_minimisers_predict_their_family_exactly_and_not_the_other():
    d, T, c = 4, 8, -1.3
    su = icar.sample_sequences(rng(18), 20, T, d, "unitary")[0]
    so = icar.sample_sequences(rng(19), 20, T, d, "orthogonal")[0]
    assert _error_after_first(r2_minimiser(d, T, c), su) < 1e-10
    assert _error_after_first(r3_minimiser(d, T, c), so) < 1e-10
    assert _error_after_first(r3_minimiser(d, T, c), su) > 0.1
    assert _error_after_first(r2_minimiser(d, T, c), so) > 0.1


# ---- population losses and minimisers ----------------------------------------------------

def model_data(rng, n, T, d, family):
    """Sampled sequences in the coordinates where R2/R3 hold (eigen-basis for "orthogonal")."""
    s, _ = icar.sample_sequences(rng, n, T, d, family)
    return theory.eigen_coordinates(s) if family == "orthogonal" else s


@pytest.mark.parametrize("family,d,T,H", [("unitary", 3, 5, 2), ("unitary", 5, 4, 6),
                                          ("orthogonal", 4, 5, 3), ("orthogonal", 6, 4, 2)])
def test_population_loss_matches_monte_carlo(family, d, T, H):
    """population_loss at random parameters equals the Monte Carlo loss of
    icar.diagonal_heads, per position r = 1..T-1 and summed."""
    rng = np.random.default_rng(5)
    params = {"A": 0.7 * rng.standard_normal((H, d)), "B": 0.7 * rng.standard_normal((H, d)),
              "P": 0.5 * rng.standard_normal((T, T))}
    s = model_data(rng, 20000, T, d, family)
    err = squared_errors(icar.diagonal_heads(params, s[:, :T]), s[:, 1:])      # [n, T]
    C = params["B"].T @ params["A"]
    assert_monte_carlo(theory.population_loss_per_prefix(C, params["P"], family), err[:, 1:])
    assert_monte_carlo(theory.population_loss(C, params["P"], family), err[:, 1:].sum(axis=1))
    assert np.allclose(err[:, 0], d)  # position 0 has a zero query


def test_orthogonal_loss_holds_in_eigen_coordinates_only():
    """The diagonal model is not basis-free: on icar's real rotation coordinates R3 is off."""
    d, T, H = 4, 5, 3
    rng = np.random.default_rng(6)
    params = {"A": 0.7 * rng.standard_normal((H, d)), "B": 0.7 * rng.standard_normal((H, d)),
              "P": 0.5 * rng.standard_normal((T, T))}
    s, _ = icar.sample_sequences(rng, 20000, T, d, "orthogonal")
    err = squared_errors(icar.diagonal_heads(params, s[:, :T]), s[:, 1:])[:, 1:].sum(axis=1)
    closed = theory.population_loss(params["B"].T @ params["A"], params["P"], "orthogonal")
    assert abs(err.mean() - closed) > 10 * err.std() / np.sqrt(err.size)
    z = theory.eigen_coordinates(s)
    assert np.allclose(np.sum(np.abs(z) ** 2, -1), np.sum(s ** 2, -1))
    ratio = z[:, 1:] / z[:, :-1]                                               # [n, T, d] eigenvalues
    assert np.allclose(ratio[..., 0::2], np.conj(ratio[..., 1::2]))
    assert np.allclose(np.abs(ratio), 1)


@pytest.mark.parametrize("family", theory.FAMILIES)
def test_population_gradient_matches_autograd(family):
    rng = np.random.default_rng(7)
    d, T, H = 6, 7, 4
    params = {"A": rng.standard_normal((H, d)), "B": rng.standard_normal((H, d)),
              "P": rng.standard_normal((T, T))}

    def objective(p):
        return theory.population_loss(p["B"].T @ p["A"], p["P"], family)

    loss, g = theory.population_loss_and_grad(params, family)
    auto = grad(objective)(params)
    assert abs(loss - objective(params)) < 1e-10 * abs(loss)
    for key in params:
        assert np.max(np.abs(g[key] - auto[key])) < 1e-10 * np.max(np.abs(auto[key]))


@pytest.mark.parametrize("family,d", [("unitary", 3), ("unitary", 4), ("orthogonal", 4), ("orthogonal", 6)])
def test_minimiser_reaches_min_loss(family, d):
    T = 6
    rng = np.random.default_rng(8)
    s = model_data(rng, 2000, T, d, family)
    for H in range(1, d + 2):
        star = theory.minimiser(d, H, family, c=-1.3, T=T)
        per = theory.population_loss_per_prefix(star["B"].T @ star["A"], star["P"], family)
        assert np.allclose(per, theory.min_loss(d, H, family), atol=1e-12)
        err = squared_errors(icar.diagonal_heads(star, s[:, :T]), s[:, 1:])[:, 1:]
        if theory.min_loss(d, H, family) == 0:  # zero loss: exact on every sampled sequence
            assert err.max() < 1e-20
        else:
            assert_monte_carlo(per, err)
    if family == "orthogonal":  # kappa = 1 reads block inner products: exact in real coordinates too
        real, _ = icar.sample_sequences(rng, 2000, T, d, family)
        star = theory.minimiser(d, d // 2, family, c=-1.3, T=T)
        assert squared_errors(icar.diagonal_heads(star, real[:, :T]), real[:, 1:])[:, 1:].max() < 1e-20
        # the kappa family, both signs, at H = d
        for kappa in (0.4, -0.6, 3.0):
            star = theory.minimiser(d, d, family, c=0.8, kappa=kappa, T=T)
            C = star["B"].T @ star["A"]
            assert np.allclose(C, 0.8 * (np.eye(d) + kappa * theory.pair_mask(d, family)))
            assert squared_errors(icar.diagonal_heads(star, s[:, :T]), s[:, 1:]).max(axis=0)[1:].max() < 1e-20


def test_fig3_left_unitary_reaches_c_identity():
    """Fig. 3 left as the authors ran it: d = 10, T = 20, H = 10, lr 1e-2, 100 steps."""
    d = H = 10
    params, losses = theory.train_population(H, d, 20, "unitary", 1e-2, 100, np.random.default_rng(0))
    A, B, P = params["A"], params["B"], params["P"]
    C = B.T @ A
    c = np.mean(np.diag(C))
    assert losses[-1] < 1e-6
    assert np.linalg.norm(C - np.diag(np.diag(C))) < 1e-3 * np.linalg.norm(np.diag(C))
    assert np.allclose(np.diag(C), c, rtol=1e-3)
    assert np.allclose(np.diag(P)[1:] * c, 1, atol=1e-6)
    AB = A @ B.T
    assert np.linalg.norm(AB - c * np.eye(H)) < 1e-3 * np.linalg.norm(AB)


# ---- local minima ------------------------------------------------------------------------

def population_hessian(params, family, h=1e-5):
    """Eigenvalues of the Hessian of population_loss in (A, B, P), by central differences of
    the hand-derived gradient (checked against autograd above)."""
    x0, unflatten = flatten(params)

    def gradient(x):
        return flatten(theory.population_loss_and_grad(unflatten(x), family)[1])[0]

    steps = h * np.eye(x0.size)                                            # [n, n]
    Hm = np.stack([(gradient(x0 + e) - gradient(x0 - e)) / (2 * h) for e in steps])  # [n, n]
    return np.linalg.eigvalsh((Hm + Hm.T) / 2)


def where_gd_stopped(params, family):
    """"bound": every prefix within 1e-3 of min_loss; "local minimum": gradient below 1e-6,
    Hessian positive semi-definite and every prefix at least 0.1 above the bound; "moving":
    gradient above 1e-2 and the loss above the bound; anything else is "undecided"."""
    H, d = params["A"].shape
    per = theory.population_loss_per_prefix(params["B"].T @ params["A"], params["P"], family)
    bound = theory.min_loss(d, H, family)
    assert np.all(per > bound - 1e-9)
    if np.allclose(per, bound, atol=1e-3):
        return "bound"
    _, g = theory.population_loss_and_grad(params, family)
    g = max(np.max(np.abs(v)) for v in g.values())
    if g < 1e-6 and per.min() > bound + 0.1:
        ev = population_hessian(params, family)
        return "local minimum" if ev.min() > -1e-6 * ev.max() else "undecided"
    return "moving" if g > 1e-2 else "undecided"


def pair_signs(C):
    """Per conjugate pair k: +1 when C_{2k,2k+1} has the sign of C_{2k,2k} (the pair's heads
    read the sum of the pair, as in R3's minimiser), -1 when they read the difference."""
    return np.sign(C[0::2, 1::2].diagonal() * C.diagonal()[0::2])


def test_orthogonal_half_heads_reach_rank_d_over_2_minimiser_or_spurious_minima():
    """H = d/2 (d = 4, T = 5, lr 1e-2, 4000 steps from N(0, 0.1^2)), seeds 0..4: 2 runs reach
    zero loss with C = c (I kron 1 1^T), p_T = 1/c, p_{T-1} / p_T = -1/2 and A B^T = 2c I_H;
    2 stop at spurious local minima where a head reads the difference of a conjugate pair
    (with every head so, the loss of position r is (d - 2H) + 2H / (r + 1)); 1 is still moving
    with growing weights. (Seeds 0..19, 20000 steps: 7 / 12 / 1; init scales 1e-3..1 and
    lr 1e-3 give the same picture.)"""
    d, H, T = 4, 2, 5
    kinds = {}
    for seed in range(5):
        params, _ = theory.train_population(H, d, T, "orthogonal", 1e-2, 4000, rng(seed))
        kind = where_gd_stopped(params, "orthogonal")
        kinds.setdefault(kind, []).append(seed)
        A, B, P = params["A"], params["B"], params["P"]
        C = B.T @ A
        if kind == "bound":
            assert np.all(pair_signs(C) > 0)
            c = np.mean(C[theory.pair_mask(d, "orthogonal") + np.eye(d) > 0])
            target = c * np.kron(np.eye(d // 2), np.ones((2, 2)))
            assert np.linalg.norm(C - target) < 1e-3 * np.linalg.norm(target)
            assert np.allclose(np.diag(P)[1:] * c, 1, atol=1e-3)
            assert np.allclose(np.diag(P, -1) / np.diag(P)[1:], -0.5, atol=1e-3)
            assert np.linalg.norm(A @ B.T - 2 * c * np.eye(H)) < 1e-3 * np.linalg.norm(A @ B.T)
        elif kind == "local minimum":
            assert np.any(pair_signs(C) < 0)
            if np.all(pair_signs(C) < 0):
                r = np.arange(1, T)
                per = theory.population_loss_per_prefix(C, P, "orthogonal")
                assert np.allclose(per, d - 2 * H + 2 * H / (r + 1), atol=1e-9)
        elif kind == "moving":  # the weights keep growing
            half, _ = theory.train_population(H, d, T, "orthogonal", 1e-2, 2000, rng(seed))
            assert np.linalg.norm(C) > 1.05 * np.linalg.norm(half["B"].T @ half["A"])
    assert kinds == {"bound": [0, 2], "local minimum": [1, 3], "moving": [4]}


@pytest.mark.parametrize("family,d,H,kinds", [
    ("unitary", 4, 2, {"bound": [0, 1, 2, 3]}),
    ("unitary", 5, 3, {"bound": [0, 1, 2, 3]}),
    ("orthogonal", 6, 2, {"bound": [0, 1], "local minimum": [2], "moving": [3]}),
    ("orthogonal", 4, 1, {"bound": [0, 2], "local minimum": [1, 3]})])
def test_below_threshold_loss_settles_at_min_loss_or_spurious_minima(family, d, H, kinds):
    """T = 5, lr 1e-2, 3000 steps, seeds 0..3: every prefix's loss is at least min_loss;
    "unitary" runs reach it from every start (20 of 20 seeds); "orthogonal" ones reach
    (d - 2H)_+ from some starts and otherwise stop at spurious local minima or keep moving
    (seeds 0..19, 20000 steps: 10 / 9 / 1 at d = 6, H = 2; 13 / 7 / 0 at d = 4, H = 1,
    where the single head of seeds 1 and 3 reads a difference: loss (d - 2) + 2 / (r + 1))."""
    T = 5
    assert theory.min_loss(d, H, family) > 0
    found = {}
    for seed in range(4):
        params, _ = theory.train_population(H, d, T, family, 1e-2, 3000, rng(seed))
        found.setdefault(where_gd_stopped(params, family), []).append(seed)
        if family == "orthogonal" and H == 1 and seed in kinds.get("local minimum", []):
            C = params["B"].T @ params["A"]
            per = theory.population_loss_per_prefix(C, params["P"], family)
            assert np.allclose(per, d - 2 + 2 / np.arange(2, T + 1), atol=1e-9)
    assert found == kinds


@pytest.mark.parametrize("d,H,T,alpha", [(4, 2, 5, 1.0), (6, 2, 5, -1.3), (4, 1, 6, 0.8)])
def test_heads_reading_differences_are_spurious_local_minima(d, H, T, alpha):
    """[derived] Head h on pair h with a_h = e_{2h} - e_{2h+1}, b_h = alpha a_h reads
    i sin(angle between s_{r-1} and s_t) on its block and writes a quarter turn of s_t: it
    builds the sin(theta) J s part of R(theta) s, never the cos(theta) s part. C has zero row
    sums, so tau1 = tau3 = 0 and each such pair loses 2 alpha^2 [sum_S p^2 + (sum_S p)^2]
    - 4 alpha p_r + 2, least 2 / (|S| + 1) = 2 / (r + 1) at p_r = r / ((r + 1) alpha) and
    p_t = -1 / ((r + 1) alpha) on the rest of S; p_{r-1} does not enter. The loss of position
    r is then (d - 2H) + 2H / (r + 1) > min_loss, the gradient is zero, the Hessian is
    positive semi-definite and singular only along the flat directions (entries of P that
    never enter, the GL(H) gauge of (A, B), the scale C -> kC, P -> P/k, each p_{r-1}), and
    gradient descent from small perturbations comes back to the same loss."""
    A = np.zeros((H, d))
    A[:, :2 * H] = np.kron(np.eye(H), [1.0, -1.0])
    r = np.arange(1, T)
    P = np.tril(np.ones((T, T))) * (-1 / ((np.arange(T) + 1) * alpha))[:, None]
    P[r, r] = r / ((r + 1) * alpha)
    P[r, r - 1] = 0.0
    P[0] = 0.0
    star = {"A": A, "B": alpha * A, "P": P}
    per = theory.population_loss_per_prefix(alpha * A.T @ A, P, "orthogonal")
    assert np.allclose(per, d - 2 * H + 2 * H / (r + 1), atol=1e-12)
    assert np.all(per > theory.min_loss(d, H, "orthogonal") + 0.1)
    loss, g = theory.population_loss_and_grad(star, "orthogonal")
    assert max(np.max(np.abs(v)) for v in g.values()) < 1e-12
    ev = population_hessian(star, "orthogonal")
    null = np.abs(ev) < 1e-6 * ev.max()
    assert ev.min() > -1e-6 * ev.max()
    unused = T * T - (T - 1) * (T + 2) // 2  # entries of P that never enter the loss
    assert null.sum() == unused + H * H + 1 + (T - 1)
    assert ev[~null].min() > 0.1
    masks, E = theory.position_masks(T), theory.pair_mask(d, "orthogonal")
    gen = rng(11)
    for _ in range(3):
        A2, B2, P2 = (star[k] + 1e-2 * gen.standard_normal(star[k].shape) for k in "ABP")
        for _ in range(2000):
            after, g = theory.loss_and_grad_with_masks(A2, B2, P2, E, *masks)
            A2, B2, P2 = A2 - 1e-2 * g["A"], B2 - 1e-2 * g["B"], P2 - 1e-2 * g["P"]
        assert abs(after - loss) < 1e-6


# ==== 4. R4: positional encoding only (M3) ================================================
# Proves R4's closed-form loss against Monte Carlo and its GD path of P against plain
# gradient descent on samples and on the population loss; then theory.py's bad input.

def uniform_phi(mu):
    """E[exp(i k theta)] for theta ~ U[0, 2 pi / mu], written independently of theory.py."""
    def phi(k):
        a = 2 * np.pi / mu
        k = np.asarray(k, dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(k == 0, 1.0, (np.exp(1j * a * k) - 1) / (1j * a * k))
    return phi


@pytest.mark.parametrize("mu,T", [(3.0, 5), (20.0, 8)])
def test_pe_only_loss_matches_monte_carlo(mu, T):
    rng = np.random.default_rng(10)
    P = 0.5 * rng.standard_normal((T, T))
    s, _ = icar.sample_sequences(rng, 20000, T, 1, "angle", mu=mu)
    err = squared_errors(icar.pe_only({"P": P}, s[:, :T]), s[:, 1:])          # [n, T]
    assert_monte_carlo(theory.pe_only_loss(P, mu=mu), err[:, 1:])
    assert np.allclose(theory.pe_only_loss(P, phi=uniform_phi(mu)), theory.pe_only_loss(P, mu=mu))
    M, b = theory.pe_only_system(T, mu=mu)
    lam = np.exp(1j * rng.uniform(0, 2 * np.pi / mu, 20000))              # [n]
    t = np.arange(T)
    assert_monte_carlo(M, np.real(lam[:, None, None] ** (2 * (t[:, None] - t[None, :]))))
    assert_monte_carlo(b[:-1], np.real(lam[:, None] ** (2 * (t[:-1] - (T - 1)))))


def pe_only_statistics(s, T):
    """Per row r, the sample loss of icar.pe_only (d = 1) is p^T Q_r p - 2 V_r^T p + y2_r."""
    n = s.shape[0]
    z = np.conj(np.concatenate([np.zeros((n, 1)), s[:, :T - 1, 0]], 1))[:, :, None] \
        * (s[:, None, :T, 0] ** 2) * np.tril(np.ones((T, T)))            # [n, T(r), T(t)]
    y = s[:, 1:T + 1, 0]                                                       # [n, T]
    Q = np.real(np.einsum("nrt,nru->rtu", np.conj(z), z)) / n         # [T, T, T]
    V = np.real(np.einsum("nrt,nr->rt", np.conj(z), y)) / n           # [T, T]
    return Q, V, np.mean(np.abs(y) ** 2, axis=0)


def gd_pe_only(s, T, lr, steps):
    """GD from P = 0 on the mean of icar.mse(icar.pe_only) over all T positions, through its
    statistics (checked against the model for the first steps); returns P_k for k in steps."""
    Q, V, y2 = pe_only_statistics(s, T)

    def objective(P):
        return (np.sum((Q @ P[:, :, None])[..., 0] * P) - 2 * np.sum(P * V) + np.sum(y2)) / T

    def gradient(P):
        return 2 * ((Q @ P[:, :, None])[..., 0] - V) / T                      # [T, T]

    def model_loss(P):
        return icar.mse(icar.pe_only({"P": P}, s[:, :T]), s[:, 1:])

    P, out = np.zeros((T, T)), []
    for k in range(max(steps) + 1):
        if k in steps:
            out.append(P)
        if k < 3:  # the statistics are the model's loss and gradient
            np.testing.assert_allclose(objective(P), model_loss(P), rtol=1e-10)
            np.testing.assert_allclose(gradient(P), grad(model_loss)(P), atol=1e-12)
        P = P - lr * gradient(P)
    return np.array(out)


def test_pe_only_gd_follows_exact_path_at_narrow_angles():
    """mu = 20, T = 8, 100,000 sequences: entries of the sample M, b are within 0.002 of the
    population ones, and the sampled GD path stays within 0.002 of pe_only_trajectory."""
    T, mu, lr = 8, 20.0, 1.5
    rng = np.random.default_rng(11)
    s, _ = icar.sample_sequences(rng, 100000, T, 1, "angle", mu=mu)
    Q, V, _ = pe_only_statistics(s, T)
    M, b = theory.pe_only_system(T, mu=mu)
    assert np.max(np.abs(Q[-1] - M)) < 0.002 and np.max(np.abs(V[-1] - b)) < 0.002
    steps = [0, 1, 10, 100, 1000]
    path = gd_pe_only(s, T, lr, steps)
    exact = theory.pe_only_trajectory(T, mu=mu, eta=lr / T, steps=np.array(steps))
    assert np.max(np.abs(path - exact)) < 0.002
    assert np.max(np.abs(exact[-1] - theory.pe_only_solution(T, mu=mu))) > 0.1  # far from the end


def test_pe_only_trajectory_is_gradient_descent_on_the_population_loss():
    T, mu, eta = 6, 7.0, 0.3
    P, g = np.zeros((T, T)), grad(lambda P: anp.sum(theory.pe_only_loss(P, mu=mu)))
    exact = theory.pe_only_trajectory(T, mu=mu, eta=eta, steps=np.arange(40))
    for k in range(40):
        assert np.max(np.abs(exact[k] - P)) < 1e-10
        P = P - eta * g(P)


def test_gd_path_is_explicit_gradient_descent_on_singular_rows_too():
    """theory.gd_path against the GD loop p <- p - eta (2 M p - 2 b) from p = 0, row by row,
    on rows whose M is singular (a sample with fewer sequences than positions) with b off its
    range: along a zero eigenvalue GD moves by 2 eta b each step."""
    rng = np.random.default_rng(31)
    rows = [None]
    for r in range(1, 4):
        X = rng.standard_normal((1, r + 1))                                   # rank 1
        rows.append((X.T @ X, rng.standard_normal(r + 1)))
    rows.append((np.zeros((5, 5)), rng.standard_normal(5)))                   # M = 0
    eta, K = 0.05, 12
    path = theory.gd_path(rows, eta=eta, steps=np.arange(K + 1))               # [K+1, T, T]
    for r in range(1, len(rows)):
        M, b = rows[r]
        p = np.zeros(r + 1)
        for k in range(K + 1):
            np.testing.assert_allclose(path[k, r, :r + 1], p, rtol=1e-9, atol=1e-12, err_msg=f"row {r}, step {k}")
            p = p - eta * (2 * M @ p - 2 * b)
    np.testing.assert_allclose(path[K, 4, :5], 2 * eta * K * rows[4][1], rtol=1e-12)


@pytest.mark.parametrize("mu", [6.0, 1.0])
def test_pe_only_gd_converges_to_solution(mu):
    """Sampled GD reaches pe_only_solution; full-circle angles (mu = 1) give p_T = 1."""
    T, lr = 6, 1.8
    rng = np.random.default_rng(12)
    s, _ = icar.sample_sequences(rng, 20000, T, 1, "angle", mu=mu)
    P = gd_pe_only(s, T, lr, [3000])[0]
    star = theory.pe_only_solution(T, mu=mu)
    assert np.max(np.abs(P - star)) < 1e-3
    assert np.allclose(theory.pe_only_trajectory(T, mu=mu, eta=lr / T, steps=3000), star, atol=1e-6)
    if mu == 1.0:
        assert np.allclose(star, np.diag((np.arange(T) > 0).astype(float)), atol=1e-12)


# ---- bad input of theory.py --------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: theory.gd_step_size(1, 3), r"T must be an integer >= 2, got 1"),
    (lambda: theory.gd_loss(5, 3, loss="first"), r"unknown loss 'first'; allowed: last, all"),
    (lambda: theory.population_loss(np.eye(3), np.eye(4), "orthogonal"),
     r"family 'orthogonal' needs an even d, got d=3"),
    (lambda: theory.population_loss(np.eye(3), np.eye(4), "haar"),
     r"unknown family 'haar'; allowed: unitary, orthogonal"),
    (lambda: theory.minimiser(4, 3, "orthogonal", kappa=0.5), r"kappa != 1 needs H >= d .* got H=3"),
    (lambda: theory.minimiser(4, 4, "unitary", kappa=0.5),
     r"kappa only parametrises 'orthogonal' minimisers.* got 0.5"),
    (lambda: theory.minimiser(4, 4, "unitary", c=0.0), r"c must be nonzero \(p_T = 1/c\), got c=0.0"),
    (lambda: theory.pe_only_system(5), r"give exactly one of mu .* got mu=None, phi=None"),
    (lambda: theory.pe_only_system(5, mu=2.0, phi=np.cos), r"give exactly one of mu .* got mu=2.0"),
    (lambda: theory.pe_only_trajectory(5, mu=2.0, eta=0.1, steps=-1),
     r"steps must be an integer >= 0 or a 1-D array of them, got -1"),
    (lambda: theory.train_population(2, 4, 5, "unitary", 10.0, 200, np.random.default_rng(0)),
     r"population loss became nan at step \d+: lr=10.0 is too large"),
])
def test_user_errors_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ==== 5. Figs. 3-7: the experiments =======================================================
# Proves the experiments' numbers: baselines and probe references against independent
# estimators (lstsq, autograd, sums by hand) and paper.md's numbers; the probe and weight
# blocks of trained-model predictors; each figure's summary rows; the Fig. 4 logic.

# ---- baselines (Figs. 5, 7) against paper.md and independent estimators ------------------

def test_baselines_match_paper_numbers():
    """paper.md: d = 5, Haar, s_1 = 1/sqrt(5): one-step GD 0.80, 0.67, 0.42, 0.31, 0.25, 0.22
    after 1, 2, 5, 10, 20, 49 transitions (two decimals, so 0.005 of rounding plus 4
    standard errors); zero predictor 1; least squares exact from 5 transitions."""
    s, W = icar.sample_sequences(np.random.default_rng(1), 4096, 50, 5, "haar", s1="fixed")
    b = evaluate.baselines(s, W, gd_steps=1)
    x, y = s[:, :-1], s[:, 1:]
    C, _ = evaluate.context_sums(x)
    per = np.sum((evaluate.optimal_gd_step(s)[None, :, None] * (C @ x[..., None])[..., 0] - y) ** 2, -1)
    se = per.std(axis=0) / np.sqrt(len(per))
    for r, ref in zip((1, 2, 5, 10, 20, 49), (0.80, 0.67, 0.42, 0.31, 0.25, 0.22)):
        assert abs(b["gd1"][r] - ref) <= 0.005 + 4 * se[r], (r, b["gd1"][r])
    assert np.allclose(b["zero"], 1.0, atol=1e-12)
    assert np.all(b["least_squares"][5:] < 1e-16) and b["least_squares"][4] > 0.1
    assert np.all(b["oracle"] < 1e-25)
    assert np.allclose(b["last_value"], np.mean(np.sum((x - y) ** 2, -1), 0))


# baselines and probe references, each against an independent computation
# Data: real (Haar, without and with noise), complex with diagonal W ("unitary", noisy) and
# complex with W = Q diag(lambda) Q^* for a random unitary Q (noisy), so that a missing or
# misplaced conjugate shows. Positions r = 0..T-1 have seen the transitions (s_t, s_{t+1}),
# t < r, and predict s_{r+1}. Tolerances are float64 rounding (eps = 2.2e-16) times the
# size of the sums (at most T = 8 terms of norm <= 3 here) and, for least squares, the
# condition number of the stacked states (at most 73 for these seeds): the errors measured
# are at most 2e-13 relative, so 1e-10 leaves a margin of 500; the bugs these tests catch
# err by 1e-3 or more.
BASELINE_CASES = [("haar", 0.0), ("haar", 0.1), ("unitary", 0.1), ("nondiagonal", 0.1)]


def baseline_data(case, n=6, T=8, d=3, seed=20):
    """(s [n, T+1, d], W [n, d, d]) of a case of BASELINE_CASES."""
    family, sigma = case
    g = rng(seed)
    if family != "nondiagonal":
        return icar.sample_sequences(g, n, T, d, family, sigma=sigma)
    Q, _ = np.linalg.qr(g.standard_normal((n, d, d)) + 1j * g.standard_normal((n, d, d)))
    lam = np.exp(1j * g.uniform(0, 2 * np.pi, (n, d)))                            # [n, d]
    W = Q @ (lam[:, :, None] * np.conj(np.swapaxes(Q, 1, 2)))                     # Q diag(lam) Q^*
    s = np.empty((n, T + 1, d), complex)
    s[:, 0] = g.standard_normal((n, d)) + 1j * g.standard_normal((n, d))
    s[:, 0] /= np.linalg.norm(s[:, 0], axis=1, keepdims=True)
    for t in range(T):
        eps = (g.standard_normal((n, d)) + 1j * g.standard_normal((n, d))) / np.sqrt(2)
        s[:, t + 1] = np.einsum("nij,nj->ni", W, s[:, t]) + sigma * eps
    return s, W


def moments_by_hand(s):
    """C_r = sum_{t<r} s_{t+1} s_t^*, S_r = sum_{t<r} s_t s_t^*, the sums written out: [n, T, d, d]."""
    n, T1, d = s.shape
    C, S = np.zeros((n, T1 - 1, d, d), complex), np.zeros((n, T1 - 1, d, d), complex)
    for r in range(T1 - 1):
        for t in range(r):
            C[:, r] += np.einsum("ni,nj->nij", s[:, t + 1], np.conj(s[:, t]))
            S[:, r] += np.einsum("ni,nj->nij", s[:, t], np.conj(s[:, t]))
    return C, S


def least_squares_by_lstsq(s):
    """W_hat [n, T, d, d]: per sequence and position, numpy.linalg.lstsq on the r transitions
    seen (minimum-norm solution of X W^T = Y, rows x_t^T and x_{t+1}^T); zero before any."""
    n, T1, d = s.shape
    W_hat = np.zeros((n, T1 - 1, d, d), complex)
    for i in range(n):
        for r in range(1, T1 - 1):
            X, Y = s[i, :r], s[i, 1:r + 1]                                        # [r, d]
            W_hat[i, r] = np.linalg.lstsq(X, Y, rcond=None)[0].T
    return W_hat


def gd_by_autograd(s, eta, steps):
    """Predictions W_k s_r [steps, n, T, d] after k = 1..steps steps W <- W - eta_r grad L(W)
    from W = 0, on L(W) = 1/2 sum_{t<r} ||s_{t+1} - W s_t||^2 per sequence, with W = U + i V
    and grad = dL/dU + i dL/dV by autograd on the real pair P = (U, V)."""
    n, T1, d = s.shape
    out = np.zeros((steps, n, T1 - 1, d), complex)
    for r in range(1, T1 - 1):  # at r = 0 there is no transition: W stays 0
        X, Y = s[:, :r], s[:, 1:r + 1]                                            # [n, r, d]

        def L(P):
            res = Y - X @ anp.swapaxes(P[0] + 1j * P[1], 1, 2)   # rows (s_{t+1} - W s_t)^T
            return 0.5 * anp.sum(anp.real(res * anp.conj(res)))

        P = np.zeros((2, n, d, d))
        for k in range(steps):
            P = P - eta[r] * grad(L)(P)
            out[k, :, r] = np.einsum("nij,nj->ni", P[0] + 1j * P[1], s[:, r])
    return out


def one_step_loss_by_hand(s, eta):
    """Per-position test loss [len(eta), T] of the one-step GD predictor eta C_r s_r for each
    step in eta (same step at every position)."""
    C, _ = moments_by_hand(s)
    g = np.einsum("ntij,ntj->nti", C, s[:, :-1])                                  # C_r s_r
    f = np.asarray(eta)[:, None, None, None] * g[None]                            # [G, n, T, d]
    return np.mean(np.sum(np.abs(f - s[None, :, 1:]) ** 2, -1), 1)


def one_step_vertex(s):
    """The minimiser [T] of the one-step loss, a quadratic q(eta) in eta: from its values at 0,
    1, 2, vertex = -q'(0) / q'' with q'' = q(2) - 2 q(1) + q(0), q'(0) = q(1) - q(0) - q''/2;
    0 where q'' = 0 (no transition seen)."""
    q0, q1, q2 = one_step_loss_by_hand(s, [0.0, 1.0, 2.0])
    curv = q2 - 2 * q1 + q0
    slope = q1 - q0 - curv / 2
    return np.where(curv > 0, -slope / np.where(curv > 0, curv, 1), 0.0)


@pytest.mark.parametrize("case", BASELINE_CASES)
def test_least_squares_equals_per_position_lstsq(case):
    s, _ = baseline_data(case)
    ref = least_squares_by_lstsq(s)
    got = evaluate.least_squares(s)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-10 * np.abs(ref).max(), np.abs(got - ref).max()


@pytest.mark.parametrize("case", BASELINE_CASES)
def test_k_step_gd_prediction_equals_explicit_gradient_descent(case):
    """_gd_prediction(C, S, x, eta, k), k = 1..4, is W_k s_r of k explicit GD steps with the
    same step eta_r (drawn, so that no particular value hides an error), at every position."""
    s, _ = baseline_data(case)
    T = s.shape[1] - 1
    eta = rng(21).uniform(0.5, 1.5, T) / (1 + np.arange(T))                     # [T]
    ref = gd_by_autograd(s, eta, 4)                                               # [4, n, T, d]
    x = s[:, :-1]
    C, S = evaluate.context_sums(x)
    for k in range(1, 5):
        got = evaluate.gd_prediction(C, S, x, eta, k)
        assert np.abs(got - ref[k - 1]).max() <= 1e-10 * np.abs(ref[k - 1]).max(), k


@pytest.mark.parametrize("case", BASELINE_CASES)
def test_optimal_one_step_is_the_vertex_of_the_quadratic_loss(case):
    """k = 1: optimal_gd_step equals the vertex of the loss measured at three steps, and no
    step of a fine grid around it does better."""
    s, _ = baseline_data(case, n=32)
    eta = evaluate.optimal_gd_step(s, 1)                                             # [T]
    vertex = one_step_vertex(s)
    assert eta[0] == 0 and np.abs(eta - vertex).max() <= 1e-10 * np.abs(vertex).max()
    grid = np.linspace(0, 2 * eta.max(), 4001)
    at_grid, at_eta = one_step_loss_by_hand(s, grid), one_step_loss_by_hand(s, eta)
    assert np.all(np.diagonal(at_eta) <= at_grid.min(0) * (1 + 1e-12))


@pytest.mark.parametrize("case", BASELINE_CASES)
def test_optimal_k_step_is_the_grid_minimum_of_the_explicit_loss(case):
    """k = 2..4: the golden-section step is at least as good as the best step of a grid (up to
    rounding) and next to it; the loss is that of k explicit GD steps
    W <- W - eta (W S_r - C_r), the gradient of L written by hand, from moments summed by hand."""
    s, _ = baseline_data(case, n=32)
    C, S = moments_by_hand(s)
    x, y = s[:, :-1], s[:, 1:]
    T = x.shape[1]

    def loss(eta, k):                                 # eta [G, T] -> [G, T]
        e = eta[:, None, :, None, None]
        Wk = np.zeros((len(eta),) + C.shape, complex)                             # [G, n, T, d, d]
        for _ in range(k):
            Wk = Wk - e * (Wk @ S - C)
        f = np.einsum("gntij,ntj->gnti", Wk, x)
        return np.mean(np.sum(np.abs(f - y) ** 2, -1), 1)

    for k in (2, 3, 4):
        eta = evaluate.optimal_gd_step(s, k)                                         # [T]
        grid = np.linspace(0, 2 * eta.max(), 401)
        at_grid = loss(np.repeat(grid[:, None], T, 1), k)                         # [G, T]
        at_eta = loss(eta[None], k)[0]
        assert np.all(at_eta[1:] <= at_grid[:, 1:].min(0) * (1 + 1e-10)), k
        # near the best grid point: within one spacing, or in the same flat valley (every grid
        # step in between within rounding of the minimum; at r = 1 the loss of k steps is
        # flat to order 2k around eta = 1 / ||s_1||^2)
        best = grid[np.argmin(at_grid, 0)]
        for r in range(1, T):
            lo, hi = min(eta[r], best[r]), max(eta[r], best[r])
            between = at_grid[(grid >= lo) & (grid <= hi), r]  # best only, if within a spacing
            assert between.max() <= at_grid[:, r].min() * (1 + 1e-10), (k, r, eta[r], best[r])


@pytest.mark.parametrize("case", BASELINE_CASES)
def test_baselines_recomputed_from_independent_estimators(case):
    """Every per-position loss of baselines(): oracle W s_r, least squares by lstsq, k explicit
    GD steps (autograd) with the step optimal_gd_step(s, k), last value s_r, zero."""
    s, W = baseline_data(case)
    x, y = s[:, :-1], s[:, 1:]
    loss = lambda f: np.mean(np.sum(np.abs(f - y) ** 2, -1), 0)                  # noqa: E731
    want = {"oracle": loss(np.einsum("nij,ntj->nti", W, x)),
            "least_squares": loss(np.einsum("ntij,ntj->nti", least_squares_by_lstsq(s), x)),
            "last_value": loss(x), "zero": loss(0 * y)}
    for k in range(1, 5):
        want[f"gd{k}"] = loss(gd_by_autograd(s, evaluate.optimal_gd_step(s, k), k)[k - 1])
    got = evaluate.baselines(s, W, gd_steps=4)
    assert sorted(got) == sorted(want)
    for name in want:
        assert np.abs(got[name] - want[name]).max() <= 1e-10 * max(1, want[name].max()), name


@pytest.mark.parametrize("case", BASELINE_CASES)
def test_probe_references_match_their_definitions(case):
    """predict(x) = G x with a chosen G [n, T, d, d]: Gamma = G, and err_* / cos_* are the mean
    over sequences of ||G - R||_F / ||R||_F and Re tr(R^* G) / (||R||_F ||G||_F) for R = W,
    least squares (lstsq) and eta C_r (given eta != 1; default: the vertex of the one-step
    loss); NaN at r = 0, where the last two are 0."""
    s, W = baseline_data(case)
    n, T1, d = s.shape
    g = rng(22)
    G = W[:, None] + 0.5 * g.standard_normal((n, T1 - 1, d, d))
    if np.iscomplexobj(s):
        G = G + 0.5j * g.standard_normal(G.shape)
    predict = lambda x: (G @ x[..., None])[..., 0]                                # noqa: E731
    C, _ = moments_by_hand(s)
    ls = least_squares_by_lstsq(s)
    fro = lambda M: np.sqrt(np.sum(np.abs(M) ** 2, (-1, -2)))                     # noqa: E731
    for eta in (g.uniform(0.2, 0.9, T1 - 1), None):
        found = evaluate.probe(predict, s, W, eta=eta)
        assert np.abs(found["Gamma"] - G).max() < 1e-14
        step = one_step_vertex(s) if eta is None else eta
        refs = {"W": np.broadcast_to(W[:, None], G.shape), "ls": ls, "gd1": step[:, None, None] * C}
        for name, R in refs.items():
            inner = np.real(np.trace(np.conj(np.swapaxes(R, -1, -2)) @ G, axis1=-2, axis2=-1))
            with np.errstate(invalid="ignore", divide="ignore"):
                err = np.mean(fro(G - R) / fro(R), 0)                                 # [T]
                cos = np.mean(inner / (fro(R) * fro(G)), 0)
            for stat, want in (("err_", err), ("cos_", cos)):
                got = found[stat + name]
                if name != "W":
                    assert np.isnan(got[0]) and np.all(fro(R[:, 0]) == 0), (stat, name)
                assert np.allclose(got[1:], want[1:], rtol=1e-10, atol=0), (stat, name, eta is None)


def test_baselines_and_probe_do_not_depend_on_the_data_dtype():
    """float32 / complex64 data: every baseline, optimal step and probe reference equals that of
    the same (rounded) data in float64, and stays within float32 rounding of the unrounded
    data's; d = 5 Haar, noiseless: least squares is finite, no worse than the zero predictor
    (W_hat s_r = W P s_r, P a projection) and below 1e-3 from 5 transitions on."""
    for family in ("haar", "unitary"):
        s, W = icar.sample_sequences(rng(23), 256, 10, 5, family)
        low = s.astype(np.complex64 if family == "unitary" else np.float32)
        b32, b64 = evaluate.baselines(low, W), evaluate.baselines(low.astype(s.dtype), W)
        b_exact = evaluate.baselines(s, W)
        for name in b64:
            assert b32[name].dtype == np.float64 and np.array_equal(b32[name], b64[name]), name
            # 1e-4: float32 rounding of the data (6e-8) times the condition of the sums
            assert np.allclose(b32[name], b_exact[name], rtol=1e-4, atol=1e-6), (family, name)
        for k in (1, 2):
            assert np.array_equal(evaluate.optimal_gd_step(low, k), evaluate.optimal_gd_step(low.astype(s.dtype), k))
        assert np.array_equal(evaluate.least_squares(low), evaluate.least_squares(low.astype(s.dtype)))
        G = (W[:, None] + 0.1 * rng(24).standard_normal((256, 10, 5, 5))).astype(low.dtype)
        p32 = evaluate.probe(lambda x: (G @ x[..., None])[..., 0], low, W)
        p64 = evaluate.probe(lambda x: (G.astype(s.dtype) @ x[..., None])[..., 0], low.astype(s.dtype), W)
        assert p32["Gamma"].dtype == low.dtype
        for name in p64:
            if name != "Gamma":
                assert np.allclose(p32[name], p64[name], rtol=1e-12, atol=0, equal_nan=True), name
        if family == "haar":
            ls = b32["least_squares"]
            assert np.all(np.isfinite(ls)) and np.all(ls <= b32["zero"] + 1e-6), ls
            assert np.all(ls[5:] < 1e-3), ls


def test_k_step_gd_step_is_the_grid_minimum():
    s, W = icar.sample_sequences(np.random.default_rng(2), 256, 12, 3, "haar")
    x, y = s[:, :-1], s[:, 1:]
    C, S = evaluate.context_sums(x)
    eta = evaluate.optimal_gd_step(s, 3)
    best = evaluate.position_loss(evaluate.gd_prediction(C, S, x, eta, 3), y)
    grid = np.linspace(0, 2 * eta.max(), 2001)
    losses = np.stack([evaluate.position_loss(
        evaluate.gd_prediction(C, S, x, np.full(12, g), 3), y) for g in grid])  # [grid, T]
    assert np.all(best <= losses.min(axis=0) + 1e-12)
    # and one step through the same code equals the closed form of optimal_gd_step(s, 1)
    eta1 = evaluate.optimal_gd_step(s, 1)
    one = evaluate.position_loss(evaluate.gd_prediction(C, S, x, eta1, 1), y)
    assert np.all(one <= np.stack([evaluate.position_loss(
        evaluate.gd_prediction(C, S, x, np.full(12, g), 1), y) for g in grid]).min(0) + 1e-12)


# ---- probe (Figs. 5, 7) and weight blocks ------------------------------------------------

def test_probe_m1_one_gd_step_and_oracle():
    """A = I, B = eta I: Gamma = eta sum_{t<=r} s_t s_{t-1}^* exactly (complex data); the
    oracle predictor gives W."""
    rng = np.random.default_rng(3)
    d, T, eta = 3, 6, 0.3
    s, W = icar.sample_sequences(rng, 8, T, d, "unitary")
    params = {"A": np.eye(d), "B": eta * np.eye(d)}
    cfg = train.config("block", d=d, T=T)
    predict = query("block", cfg, params, s[:, :-1])
    assert np.allclose(predict(s[:, :-1]), icar.augmented_linear(params, icar.augment(s[:, :-1])),
                          atol=1e-13)
    G = evaluate.probe(predict, s, W)["Gamma"]
    want = np.zeros((8, d, d), complex)
    for r in range(T):  # reference: the sum written out
        if r:
            want = want + eta * s[:, r, :, None] * s[:, r - 1, None, :].conj()
        assert np.abs(G[:, r] - want).max() < 1e-12, r
    oracle = evaluate.probe(lambda x: (W[:, None] @ x[..., None])[..., 0], s, W)
    assert np.abs(oracle["Gamma"] - W[:, None]).max() < 1e-14
    assert np.allclose(oracle["err_W"], 0, atol=1e-14) and np.allclose(oracle["cos_W"], 1)


def test_probe_full_form_equals_block_form():
    rng = np.random.default_rng(4)
    d, T = 2, 5
    s, W = icar.sample_sequences(rng, 4, T, d, "haar")
    A, B = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    full = {"W_KQ": np.zeros((3 * d, 3 * d)), "W_V": np.zeros((3 * d, 3 * d))}
    full["W_KQ"][2 * d:, d:2 * d], full["W_V"][:d, d:2 * d] = A, B
    cfg = train.config("block", d=d, T=T)
    pf = query("block", cfg, full, s[:, :-1])
    assert np.allclose(pf(s[:, :-1]), icar.augmented_linear(full, icar.augment(s[:, :-1])), atol=1e-13)
    Gf = evaluate.probe(pf, s, W)["Gamma"]
    Gb = evaluate.probe(query("block", cfg, {"A": A, "B": B}, s[:, :-1]), s, W)["Gamma"]
    assert np.abs(Gf - Gb).max() < 1e-12
    shares = evaluate.weight_blocks(full, d)
    assert np.allclose(shares["share_KQ"], 1) and np.allclose(shares["share_V"], 1)


@pytest.mark.parametrize("experiment,attention", [("augmented", "linear"), ("nonaug", "softmax")])
def test_two_stream_transformer_is_icar_and_local(experiment, attention):
    rng = np.random.default_rng(5)
    d, T = 2, 5
    cfg = train.config(experiment, d=d, T=T, layers=2, heads=2, attention=attention)
    params = train.init_model(experiment, cfg, rng)
    s, W = icar.sample_sequences(rng, 3, T, d, "haar")
    predict = query(experiment, cfg, params, s[:, :-1])
    assert np.abs(predict(s[:, :-1]) - train.predictor(experiment, cfg)(params, s[:, :-1])).max() < 1e-12
    # output position r depends on the query states only through x_r
    g = grad(lambda x: anp.sum(predict(x)[:, 2]))(s[:, :-1])
    assert np.all(g[:, [0, 1, 3, 4]] == 0) and np.abs(g[:, 2]).max() > 1e-6
    # probe rows against central finite differences
    G = evaluate.probe(predict, s, W)["Gamma"]
    h, j = 1e-6, 1
    e = np.zeros_like(s[:, :-1])
    e[..., j] = h
    fd = (predict(s[:, :-1] + e) - predict(s[:, :-1] - e)) / (2 * h)   # [n, T, d]: column j
    assert np.abs(G[..., j] - fd).max() < 1e-7


def test_probe_of_the_r2_minimiser_is_w():
    """M2 at R2's global minimiser (C = c I, p_T = 1/c): Gamma = diag(s_r conj(s_{r-1}))
    = diag(lambda) = W at every position r >= 1."""
    d, T = 3, 6
    params = theory.minimiser(d, d, "unitary", c=-1.2, T=T)
    s, W = icar.sample_sequences(np.random.default_rng(7), 5, T, d, "unitary")
    cfg = train.config("diagonal", d=d, T=T, heads=d)
    predict = query("diagonal", cfg, params, s[:, :-1])
    assert np.abs(predict(s[:, :-1]) - icar.diagonal_heads(params, s[:, :-1])).max() < 1e-13
    found = evaluate.probe(predict, s, W)
    assert np.abs(found["Gamma"][:, 1:] - W[:, None]).max() < 1e-12
    assert np.all(found["err_W"][1:] < 1e-12)


@pytest.mark.parametrize("experiment", ["diagonal", "pe-only"])
def test_value_slot_predictors_are_the_models(experiment):
    rng = np.random.default_rng(8)
    d, T = 2, 5
    cfg = train.config(experiment, d=d, T=T)
    params = {"P": rng.standard_normal((T, T))}
    if experiment == "diagonal":
        params.update(A=rng.standard_normal((4, d)), B=rng.standard_normal((4, d)))
    s, W = icar.sample_sequences(rng, 3, T, d, "unitary")
    predict = query(experiment, cfg, params, s[:, :-1])
    assert np.abs(predict(s[:, :-1]) - train.predictor(experiment, cfg)(params, s[:, :-1])).max() < 1e-12
    x = s[:, :-1] + rng.standard_normal(s[:, :-1].shape)
    for r in range(T):  # position r reads x only at r, linearly, as the value of the newest token
        y = s[:, :-1].copy()
        y[:, r] = x[:, r]
        assert np.abs(predict(y)[:, r] - predict(x)[:, r]).max() < 1e-12
    assert np.allclose(predict(2 * x - s[:, :-1]) - predict(x), predict(x) - predict(s[:, :-1]))


def test_weight_blocks_m4_reproduce_the_scores():
    """e_t^T KQ e_r equals the first layer's attention score q_r . k_t (zero biases)."""
    rng = np.random.default_rng(6)
    d = 2
    cfg = train.config("augmented", d=d, T=4, heads=2)
    params = train.init_model("augmented", cfg, rng)
    e = rng.standard_normal((3, 3 * d))
    layer = params["layers"][0]
    want = np.einsum("hri,hti->htr", e @ layer["W_Q"], e @ layer["W_K"])       # [H, t, r]
    KQ = evaluate.weight_blocks(params, d)["KQ"][0]                       # [H, 3d, 3d]
    assert np.allclose(e @ KQ @ e.T, want, atol=1e-12)
    blocks = evaluate.weight_blocks(params, d)
    by_hand = np.sum(KQ[:, 2 * d:, d:2 * d] ** 2, (1, 2)) / np.sum(KQ ** 2, (1, 2))
    assert np.allclose(blocks["share_KQ"][0], by_hand)


# ---- summary numbers per figure (Figs. 1, 3, 6) ------------------------------------------

@pytest.mark.parametrize("family, H", [("unitary", 4), ("orthogonal", 2)])
def test_fig3_rows_are_computed_from_the_parameters(family, H):
    """At an exact minimiser of R2/R3 the rows match their expected values; a perturbed P
    moves them (the numbers are computed, not typed)."""
    import figures
    d, T = 4, 6
    star = theory.minimiser(d, H, family, c=-1.3, T=T)
    C = star["B"].T @ star["A"]
    losses = np.array([theory.population_loss(C, star["P"], family)])
    rows = {r["quantity"].split(": ", 1)[1]: r for r in
            figures.fig3_rows("x", family, star["A"], star["B"], star["P"], losses)}
    assert np.isclose(rows["c = mean diag of C"]["value"], -1.3)
    assert np.isclose(rows["c * p_T"]["value"], 1.0) and np.isclose(rows["c * p_T"]["expected"], 1.0)
    ratio = rows["p_(T-1) / p_T"]
    assert np.isclose(ratio["value"], ratio["expected"])
    assert np.isclose(ratio["expected"], 0.0 if family == "unitary" else -0.5)
    assert np.allclose(rows["singular values of C"]["value"], rows["singular values of C"]["expected"])
    assert rows["||A B^T - (tr/H) I|| / ||A B^T||"]["value"] < 1e-12
    assert abs(rows["final population loss (sum over T-1 prefixes)"]["value"]) < 1e-12
    P = star["P"].copy()
    P[-1, -2] += 0.1
    moved = {r["quantity"].split(": ", 1)[1]: r for r in figures.fig3_rows("x", family, star["A"], star["B"], P, losses)}
    assert not np.isclose(moved["p_(T-1) / p_T"]["value"], ratio["expected"])


@pytest.mark.parametrize("family, H", [("unitary", 2), ("orthogonal", 1)])
def test_fig3_expected_final_loss_is_the_minimum_summed_over_the_t_minus_1_prefixes(family, H):
    """Below the threshold (min_loss > 0) the expected final loss is (T - 1) min_loss, the loss
    that theory.population_loss (a sum over the prefixes r = 1..T-1) gives at a minimiser."""
    import figures
    d, T = 4, 6
    star = theory.minimiser(d, H, family, c=-1.3, T=T)
    loss = theory.population_loss(star["B"].T @ star["A"], star["P"], family)
    rows = {r["quantity"].split(": ", 1)[1]: r for r in
            figures.fig3_rows("x", family, star["A"], star["B"], star["P"], np.array([loss]))}
    final = rows["final population loss (sum over T-1 prefixes)"]
    assert final["value"] == pytest.approx(final["expected"], rel=1e-9)
    assert final["expected"] == (T - 1) * theory.min_loss(d, H, family) == 10.0


def test_fig3_rows_read_the_last_row_of_p():
    """p_T and p_(T-1) are P[T-1, T-1] and P[T-1, T-2] (the longest prefix), whatever the
    other rows hold."""
    import figures
    d, H, T = 4, 4, 6
    star = theory.minimiser(d, H, "unitary", c=-1.3, T=T)
    P = np.tril(rng(5).standard_normal((T, T)))
    P[-1, -1], P[-1, -2] = 0.5, 0.25
    loss = theory.population_loss(star["B"].T @ star["A"], P, "unitary")
    rows = {r["quantity"].split(": ", 1)[1]: r["value"] for r in
            figures.fig3_rows("x", "unitary", star["A"], star["B"], P, np.array([loss]))}
    assert rows["p_T"] == 0.5 and rows["p_(T-1) / p_T"] == 0.5
    assert rows["c * p_T"] == pytest.approx(-1.3 * 0.5, rel=1e-12)


def test_fig6_population_path_takes_the_step_of_the_mean_over_t_minus_1_positions():
    """train.py averages M3's loss over the T - 1 positions r >= 1: each row's population
    quadratic sees the step lr / (T - 1). On 20000 sequences the sample path (the training
    set's moments, step lr) lies within sampling error (7e-5) of that population path; with
    lr / T it would be 7e-3 away."""
    import figures
    cfg = dict(train.config("pe-only", T=6, mu=50.0, n_train=20000, n_test=8, n_probe=0, steps=60,
                            target_loss=0.0), experiment="pe-only")
    res = {"config": cfg, "params": {"P": np.zeros((6, 6))}, "metrics": {"train_loss": np.zeros(61)}}
    panel, _ = figures.fig6_panel(res, 50.0)
    assert np.max(np.abs(panel["closed_row"] - panel["sample_row"])) < 1e-3 < np.max(np.abs(panel["closed_row"]))


def test_r2r3_reports_the_final_population_loss_per_prefix():
    """compute_r2r3's loss is the mean over the T - 1 prefixes of population_loss_per_prefix at
    the parameters train_population ends with (the same generator per family, H and start)."""
    import figures
    d, T, lr, steps = 2, 4, 1e-2, 5
    data = figures.compute_r2r3(d, T, 2, (lr, steps), (lr, steps), seed=3)
    for f, family in enumerate(("unitary", "orthogonal")):
        for H in (1, 2):
            for k in range(2):
                p, _ = theory.train_population(H, d, T, family, lr, steps, np.random.default_rng([3, f, H, k]))
                per_prefix = theory.population_loss_per_prefix(p["B"].T @ p["A"], p["P"], family)
                assert len(per_prefix) == T - 1
                assert data["loss"][f, H - 1, k] == pytest.approx(float(np.mean(per_prefix)), rel=1e-12)


def test_fig1_orbits_stay_on_circles():
    import figures
    s, W = figures.trajectories_3d(rng(7), 4, 25)
    assert np.allclose(np.linalg.det(W), 1)
    rows = figures.fig1_rows(s, W)
    assert all(r["value"] < 1e-12 for r in rows)
    s[0, 5] += 1e-3  # a state off its circle must show
    assert max(r["value"] for r in figures.fig1_rows(s, W)) > 1e-4


def test_fig6_trained_p_is_the_exact_gd_path_of_its_sample_loss(tmp_path):
    """The closed form with the training set's moments gives the trained P up to rounding;
    the population path differs by sampling error only; a changed step moves the path."""
    import figures
    ctx = argparse.Namespace(runs=str(tmp_path), preset="quick", retrain=False, quiet=True)
    res = figures.train_cached(ctx, "pe-only", "pe", T=6, mu=50.0, n_train=40, n_test=8, n_probe=0, steps=60,
                               target_loss=0.0, gd_steps=1)
    panel, rows = figures.fig6_panel(res, 50.0)
    values = {r["quantity"].split(": ", 1)[1]: r["value"] for r in rows}
    sample_gap = values["max |P - exact GD path of the sample loss| (rows r >= 1)"]
    population_gap = values["sampling error: max |P - exact GD path of the population loss| (rows r >= 1)"]
    assert sample_gap < 1e-12 < 1e-4 < population_gap
    assert panel["steps"] == 60 and np.allclose(panel["sample_row"], res["params"]["P"][-1], atol=1e-12)
    s = train.datasets(res["config"])[0]
    lr = res["config"]["lr"]
    assert np.max(np.abs(figures.sample_pe_only_trajectory(s, 1.1 * lr, 60)[-1] - panel["sample_row"])) > 1e-4


# ---- Fig. 4 logic ------------------------------------------------------------------------

def test_ar_refit_is_exact_on_ar_data_and_not_on_shuffled_tokens():
    """Windows of 5 states of s_{t+1} = W s_t in d = 3 (4 transitions > d): the least-squares
    W is the true one and the roll-out is exact; shuffled tokens break the recursion."""
    import figures
    s, _ = icar.sample_sequences(rng(1), 200, 4, 3, "haar")                    # [200, 5, 3]
    _, err = figures.ar_refit(s)
    assert np.max(err) < 1e-20
    _, err_shuffled = figures.ar_refit(figures.shuffle_tokens(s, rng(2)))
    assert np.mean(err_shuffled > 1e-6) > 0.9 and np.mean(err_shuffled) > 1e-3


def test_ar_refit_matches_per_window_lstsq():
    """The Gram-matrix route equals numpy.linalg.lstsq window by window (minimum norm),
    including windows with a repeated token (rank-deficient inputs)."""
    import figures
    s = rng(3).standard_normal((6, 5, 8))
    s[0, 3] = s[0, 1]                                                          # repeated token
    s /= np.linalg.norm(s, axis=-1, keepdims=True)
    rollout, err = figures.ar_refit(s)
    for i in range(len(s)):
        Wt = np.linalg.lstsq(s[i, :-1], s[i, 1:], rcond=None)[0]                 # [d, d] = W^T
        ref = [s[i, 0]]
        for _ in range(4):
            ref.append(ref[-1] @ Wt)
        ref = np.stack(ref)
        assert np.allclose(rollout[i], ref, atol=1e-10)
        assert np.isclose(err[i], np.mean(np.sum((ref[1:] - s[i, 1:]) ** 2, -1)), atol=1e-12)
    assert err[0] > 1e-3 and np.max(err[1:]) < 1e-20  # only the repeated token breaks the fit


def test_shuffle_tokens_permutes_tokens_across_windows():
    import figures
    s = rng(4).standard_normal((30, 5, 4))
    sh = figures.shuffle_tokens(s, rng(5))
    key = lambda x: np.sort(x.reshape(-1, 4).view([("", float)] * 4), axis=0)  # noqa: E731
    assert np.array_equal(key(s), key(sh)) and not np.array_equal(s, sh)


def test_token_windows_are_consecutive_unit_norm_and_check_ids():
    import figures
    E = rng(6).standard_normal((10, 3)) * 5
    ids = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2])
    s = figures.token_windows(ids, E, length=5)
    assert s.shape == (2, 5, 3)
    assert np.allclose(np.linalg.norm(s, axis=-1), 1)
    assert np.allclose(s[1, 0], E[6] / np.linalg.norm(E[6]))
    assert figures.token_windows(ids, E, length=5, n=1).shape == (1, 5, 3)
    with pytest.raises(ValueError, match="embedding table has 10 rows"):
        figures.token_windows(np.array([0, 1, 2, 3, 10]), E)


def test_fig4_on_the_shipped_text_with_the_real_table(tmp_path):
    """With the optional extras: a slice of the shipped book gives windows of the 384-wide
    table, and real order is fitted exactly more often than shuffled tokens."""
    import figures
    if figures.fig4_missing():
        pytest.skip("optional extras of requirements-fig4.txt not installed")
    with open(figures.DEFAULT_TEXT) as f:
        text = f.read()
    part = tmp_path / "part.txt"
    part.write_text(text[:40000])
    data = figures.compute_fig4(str(part), n=1500)
    assert data["dim"] == 384 and len(data["err_real"]) == 1500
    assert np.mean(data["err_real"] > figures.EXACT) < np.mean(data["err_shuffled"] > figures.EXACT)


# ---- paper.md section 5: raw tokens need depth (mechanism measures, a 2-layer construction) --

def _haar_inputs(n, T, d, seed):
    """Haar inputs s_1..s_T [n, T, d] with a random first state (no constant target)."""
    return icar.sample_sequences(np.random.default_rng(seed), n, T, d, "haar")[0][:, :-1]


def _with_first_layer(params, **changes):
    return dict(params, layers=[dict(params["layers"][0], **changes)] + params["layers"][1:])


def test_mechanism_measures_on_a_hand_built_previous_token_head():
    """The construction's first layer copies s_{r-1} into position r (positional logits peak at
    t = r - 1 by a gap beta; token scores constant): the share misses 1 by at most the softmax
    leakage T exp(-beta), and s_{r-1} is read out exactly (R^2 = 1 to 1e-6) at every r >= 1."""
    d, T, beta = 5, 12, 20.0
    x = _haar_inputs(1000, T, d, 1)
    params, cfg = theory.raw_token_gd_construction(d, T, eta=0.5, beta=beta)
    share = evaluate.previous_token_share(params, T)
    assert share.shape == (1,) and 1 - T * np.exp(-beta) <= share[0] <= 1
    r2 = evaluate.readout_r2(params, cfg, x[:500], x[500:])
    assert r2.shape == (T,) and np.isnan(r2[0])
    np.testing.assert_allclose(r2[1:], 1, atol=1e-6)


def test_mechanism_measures_on_heads_that_do_not_copy_the_previous_token():
    """Controls on the same layer. R^2 is scale-free: any weight left on t = r - 1 is read out
    (at beta = 20 a self-attending head's 2e-9 leak gives R^2 = 1), so beta = 1000 makes
    exp(-beta) exactly 0. Self (query not rotated, peak t = r): share 0, the stream holds s_r
    only and R^2 of s_{r-1} is ~0 (measured |R^2| < 0.03 over three seeds; asserted < 0.1).
    Uniform (W_Q = 0): share mean_r 1/(r+1) exactly; R^2 = 1 at r = 1 (s_0 = 2 mean - s_1),
    then ~1/r (measured <= 0.52 at r >= 2, <= 0.29 at r >= 5; asserted < 0.65, < 0.4)."""
    d, T = 5, 12
    x = _haar_inputs(1000, T, d, 1)
    params, cfg = theory.raw_token_gd_construction(d, T, eta=0.5, beta=1000.0)
    first = params["layers"][0]
    own = _with_first_layer(params, W_Q=first["W_K"])
    assert evaluate.previous_token_share(own, T)[0] == 0
    assert np.all(np.abs(evaluate.readout_r2(own, cfg, x[:500], x[500:])[1:]) < 0.1)
    uniform = _with_first_layer(params, W_Q=np.zeros_like(first["W_Q"]))
    np.testing.assert_allclose(evaluate.previous_token_share(uniform, T), np.mean(1 / np.arange(2, T + 1)),
                               rtol=1e-12)
    r2 = evaluate.readout_r2(uniform, cfg, x[:500], x[500:])
    np.testing.assert_allclose(r2[1], 1, atol=1e-6)
    assert np.all(r2[2:] < 0.65) and np.all(r2[5:] < 0.4)


def test_readout_r2_is_nan_for_a_constant_target_and_handles_complex_data():
    """A fixed first state makes s_0 constant: NaN at r = 1, not 1 - SSE / (rounding).
    Complex data: real and imaginary parts stacked; the copy is still exact."""
    d, T = 4, 6
    params, cfg = theory.raw_token_gd_construction(d, T, eta=1.0, beta=1000.0)
    rng = np.random.default_rng(2)
    x = icar.sample_sequences(rng, 200, T, d, "haar", s1="fixed")[0][:, :-1]
    r2 = evaluate.readout_r2(params, cfg, x[:100], x[100:])
    assert np.isnan(r2[:2]).all() and np.allclose(r2[2:], 1, atol=1e-6)
    z = icar.sample_sequences(rng, 200, T, d, "unitary")[0][:, :-1]
    np.testing.assert_allclose(evaluate.readout_r2(params, cfg, z[:100], z[100:])[1:], 1, atol=1e-6)


@pytest.mark.parametrize("layernorm", [False, True])
def test_readout_r2_is_a_least_squares_fit_with_bias_scored_on_held_out_inputs(layernorm):
    """readout_r2 against lstsq per position on [first-layer output, 1], on inputs with a
    nonzero mean (s + 1) through a random first layer with random biases; without LayerNorm
    the fit without the bias column is worse (the test can tell)."""
    d, T, n = 3, 6, 200
    cfg = icar.transformer_config(d_in=d, d_out=d, T=T, heads=2, repeat=2, positional=True, residual=False,
                                  attention="softmax", layernorm=layernorm)
    g = rng(21)
    params = icar.init_params("transformer", g, cfg=cfg)
    layer = params["layers"][0]
    for key in ("b_Q", "b_K", "b_V", "b_O", "ln_b"):
        layer[key] = g.standard_normal(np.shape(layer[key]))
    x = _haar_inputs(2 * n, T, d, 3) + 1.0                                   # targets of mean 1
    r2 = evaluate.readout_r2(params, cfg, x[:n], x[n:])
    h = np.asarray(icar.transformer_layer(layer, np.concatenate([x, x], -1), cfg, params["pos"]))  # [2n, T, 2d]
    want, without = [np.nan], [np.nan]
    for r in range(1, T):
        for bias, out in ((True, want), (False, without)):
            Z = np.concatenate([h[:, r], np.ones((2 * n, 1))], -1) if bias else h[:, r]
            coef = np.linalg.lstsq(Z[:n], x[:n, r - 1], rcond=None)[0]
            sse = np.sum((Z[n:] @ coef - x[n:, r - 1]) ** 2)
            out.append(1 - sse / np.sum((x[n:, r - 1] - x[n:, r - 1].mean(0)) ** 2))
    np.testing.assert_allclose(r2, want, rtol=1e-8, atol=1e-10)
    if not layernorm:  # (LayerNorm's outputs hold a constant: sum_e (h_e - ln_b_e) / ln_g_e = 0)
        assert np.max(np.asarray(want[1:]) - without[1:]) > 0.05


def test_nonaug_run_adds_mechanism_metrics_and_leaves_the_others_bit_identical(tmp_path, monkeypatch):
    """metrics.npz of a raw-token run gains mech_prev_share [H] and mech_readout_r2 [T] (equal to
    the functions on the saved parameters); without them every other metric is bit-identical."""
    kw = dict(T=5, n_train=32, n_test=16, n_probe=2, steps=3, batch=16, heads=2, quiet=True,
              runs_dir=str(tmp_path))
    with_mech = runs.load_run(train.run("nonaug", name="with", **kw)["dir"])
    monkeypatch.setitem(train.EXPERIMENTS, "nonaug", train.EXPERIMENTS["nonaug"]._replace(mechanism=False))
    without = runs.load_run(train.run("nonaug", name="without", **kw)["dir"])["metrics"]
    m = with_mech["metrics"]
    assert set(m) - set(without) == {"mech_prev_share", "mech_readout_r2"}
    for k in without:
        assert np.array_equal(m[k], without[k], equal_nan=True), k
    assert m["mech_prev_share"].shape == (2,) and m["mech_readout_r2"].shape == (5,)
    cfg = with_mech["config"]
    s_test = train.datasets(cfg)[1]
    rng = np.random.default_rng(np.random.SeedSequence(cfg["seed"], spawn_key=(4,)))
    s_fit = train.sample(cfg, rng, cfg["n_test"])[0][:, :-1]
    expected = evaluate.mechanism(with_mech["params"], train.model_config(cfg, "nonaug"), s_fit, s_test[:, :-1])
    for k, v in expected.items():
        np.testing.assert_array_equal(m[k], v)


def test_raw_token_construction_is_one_gd_step_averaged_over_transitions():
    """Two layers of raw-token M4 (theory.raw_token_gd_construction) equal M1 with A = I,
    B = eta I divided by the r transitions seen, at r >= 1, up to the positional softmax
    leakage, bounded by eta (2T + 2) exp(-beta) for unit-norm states: the error shrinks from
    beta = 5 to 10 and stays below the bound, and at beta = 40 (bound 5e-17) it is rounding
    (< 1e-12). Position 0 gives eta |s_0|^2 s_0 as the docstring says; fused equals icar."""
    d, T, eta = 5, 20, 0.3
    x = _haar_inputs(64, T, d, 0)
    r = np.arange(1, T)[None, :, None]
    ref = icar.augmented_linear({"A": np.eye(d), "B": eta * np.eye(d)}, icar.augment(x))[:, 1:] / r
    errors = {}
    for beta in (5.0, 10.0, 40.0):
        params, cfg = theory.raw_token_gd_construction(d, T, eta, beta)
        f = icar.transformer(params, x, cfg)
        errors[beta] = np.abs(f[:, 1:] - ref).max()
        assert errors[beta] <= eta * (2 * T + 2) * np.exp(-beta) + 1e-12, beta
        np.testing.assert_allclose(f[:, 0], eta * np.sum(x[:, 0] ** 2, -1)[:, None] * x[:, 0], atol=1e-12)
        np.testing.assert_allclose(fused.transformer(params, x, cfg), f, atol=1e-12)
    assert errors[10.0] < errors[5.0] / 50 and errors[40.0] < 1e-12


def test_raw_token_construction_needs_d_at_least_2():
    with pytest.raises(ValueError, match="d must be an integer >= 2"):
        theory.raw_token_gd_construction(1, 10, 0.1, 10.0)


# ==== 6. fast == plain ====================================================================
# Proves every fast path equal to the plain definition it replaces (fused.py vs icar.py,
# PE-only moments vs autograd, microbatching, the thread count). The benchmark's own
# tests (FLOP counts, its command line) are in test_bench.py.

# ---- fused.py and the PE-only objective against icar.py and autograd ---------------------

def ref_pe_only(P, s):
    """M3 position by position: f_r = conj(s_{r-1}) sum_{t<=r} P[r, t] s_t^2, f_0 = 0."""
    rows = [0 * s[:, 0]]
    for r in range(1, s.shape[1]):
        rows.append(anp.conj(s[:, r - 1]) * sum(P[r, t] * s[:, t] ** 2 for t in range(r + 1)))
    return anp.stack(rows, axis=1)


def _perturbed(params, rng, scale=0.3):
    """Parameters with nonzero biases and LayerNorm terms, so that every path is exercised."""
    return train.tree_map(lambda p: p + scale * rng.standard_normal(p.shape), params)


M4_CASES = {  # name: (family, augmented input, config overrides)
    "nonaug": ("haar", False, dict(repeat=2, heads=3, layers=2, positional=True, residual=False)),
    "augmented": ("haar", True, dict(repeat=1, heads=2, layers=3, positional=False, residual=True)),
    "softmax_positional": ("haar", False, dict(repeat=2, heads=2, layers=2, attention="softmax",
                                                positional=True, residual=True)),
    "complex_linear": ("unitary", False, dict(repeat=3, heads=2, layers=2, positional=True,
                                              residual=True, layernorm=False)),
    "complex_softmax": ("unitary", True, dict(repeat=1, heads=2, layers=2, attention="softmax",
                                              residual=False)),
}


@pytest.mark.parametrize("chunk", [1, 2, None])
@pytest.mark.parametrize("case", sorted(M4_CASES))
def test_fused_transformer_equals_icar_transformer(case, chunk, monkeypatch):
    family, augmented, overrides = M4_CASES[case]
    rng = np.random.default_rng(len(case))
    d, T, n = 2, 6, 5
    per_row = T * overrides["heads"] * T                           # entries of [T, H, T]
    if chunk is not None:  # slices of `chunk` sequences, the last one shorter, in 3 threads
        monkeypatch.setitem(fused.CHUNK_ENTRIES, "cpu", chunk * per_row)
        monkeypatch.setattr(fused, "THREADS", 3)
    s, _ = icar.sample_sequences(rng, n, T, d, family)
    x = icar.augment(s[:, :-1]) if augmented else s[:, :-1]
    cfg = icar.transformer_config(d_in=x.shape[-1], d_out=d, T=T + 2, **overrides)
    params = _perturbed(icar.init_params("transformer", rng, cfg=cfg), rng)
    assert len(fused.batch_chunks(n, per_row, numpy)) == (1 if chunk is None else -(-n // chunk))
    np.testing.assert_allclose(fused.transformer(params, x, cfg), icar.transformer(params, x, cfg),
                               rtol=0, atol=1e-10)

    def loss(model):
        return lambda p: icar.mse(model(p, x, cfg), s[:, 1:])
    fast = flatten(grad(loss(fused.transformer))(params))[0]
    plain = flatten(grad(loss(icar.transformer))(params))[0]
    np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-10 * max(1.0, np.abs(plain).max()))


def test_fused_transformer_second_derivatives():
    """The hand-written VJP is made of autograd operations, so it differentiates again."""
    rng = np.random.default_rng(6)
    cfg = icar.transformer_config(d_in=2, d_out=2, T=4, heads=2, repeat=2, positional=True)
    params = _perturbed(icar.init_params("transformer", rng, cfg=cfg), rng)
    s, _ = icar.sample_sequences(rng, 3, 4, 2, "unitary")
    check_grads(lambda p: icar.mse(fused.transformer(p, s[:, :-1], cfg), s[:, 1:]),
                modes=["rev"], order=2)(params)


@pytest.mark.parametrize("model", [icar.transformer, fused.transformer], ids=["icar", "fused"])
def test_transformer_float32_stays_float32(model):
    rng = np.random.default_rng(1)
    cfg = icar.transformer_config(d_in=3, d_out=3, T=5, heads=2, repeat=2, positional=True,
                                  residual=False)
    params = train.tree_map(lambda p: p.astype(np.float32),
                                 icar.init_params("transformer", rng, cfg=cfg))
    s, _ = icar.sample_sequences(rng, 4, 5, 3, "haar")
    x, y = s[:, :-1].astype(np.float32), s[:, 1:].astype(np.float32)
    loss, g = value_and_grad(lambda p: icar.mse(model(p, x, cfg), y))(params)
    assert loss.dtype == np.float32
    leaves = [g["W_out"], g["pos"]] + list(g["layers"][0].values())
    assert {leaf.dtype for leaf in leaves} == {np.dtype("float32")}
    # gradients of the parameters are cast back to their dtype; the input's shows the whole chain
    assert grad(lambda x: icar.mse(model(params, x, cfg), y))(x).dtype == np.float32


@pytest.mark.parametrize("complex_data", [False, True])
@pytest.mark.parametrize("heads_of_w", [3, 1])
def test_linear_attention_equals_plain_products(complex_data, heads_of_w, monkeypatch):
    monkeypatch.setitem(fused.CHUNK_ENTRIES, "cpu", 1)            # one sequence per slice
    rng = np.random.default_rng(2)
    n, T, H, D = 3, 4, 3, 2

    def draw(*shape):
        x = rng.standard_normal(shape)
        return x + 1j * rng.standard_normal(shape) if complex_data else x
    zG, z = draw(n, T * H, D), draw(n, T, D)
    w = rng.standard_normal((T, heads_of_w, T)) * np.tril(np.ones((T, T)))[:, None]
    plain = ((zG @ np.conj(np.swapaxes(z, 1, 2))).reshape(n, T, H, T) * w).reshape(n, T * H, T) @ z
    np.testing.assert_allclose(fused.linear_attention(zG, z, w), plain, rtol=0, atol=1e-12)
    # check_grads differentiates the first argument only: one check per argument
    check_grads(lambda zG: fused.linear_attention(zG, z, w), modes=["rev"], order=2)(zG)
    check_grads(lambda z: fused.linear_attention(zG, z, w), modes=["rev"], order=2)(z)
    check_grads(lambda w: fused.linear_attention(zG, z, w), modes=["rev"], order=2)(w)


def test_pe_only_matches_reference():
    rng = np.random.default_rng(3)
    s, _ = icar.sample_sequences(rng, 6, 7, 2, "unitary")
    P = rng.standard_normal((7, 7))
    x, y = s[:, :-1], s[:, 1:]
    np.testing.assert_allclose(icar.pe_only({"P": P}, x), ref_pe_only(P, x), rtol=0, atol=1e-12)
    g_fast = grad(lambda P: icar.mse(icar.pe_only({"P": P}, x), y))(P)
    g_ref = grad(lambda P: icar.mse(ref_pe_only(P * np.tril(np.ones((7, 7))), x), y))(P)
    np.testing.assert_allclose(g_fast, g_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family, d, first", [("angle", 1, 1), ("unitary", 2, 0), ("haar", 3, 1)])
def test_pe_only_objective_matches_autograd(family, d, first):
    rng = np.random.default_rng(5)
    s, _ = icar.sample_sequences(rng, 9, 6, d, family, **({"mu": 50.0} if family == "angle" else {}))
    P = rng.standard_normal((6, 6))
    loss, g = fused.pe_only_objective(s, first)({"P": P})
    def ref(P):
        f = ref_pe_only(P * np.tril(np.ones((6, 6))), s[:, :-1])
        return icar.mse(f[:, first:], s[:, 1 + first:])
    ref_loss, ref_g = value_and_grad(ref)(P)
    assert abs(loss - ref_loss) <= 1e-10
    np.testing.assert_allclose(g["P"], ref_g, rtol=0, atol=1e-10)


# ---- training step -----------------------------------------------------------------------

def test_microbatched_gradient_equals_full_batch():
    rng = np.random.default_rng(4)
    cfg = icar.transformer_config(d_in=3, d_out=3, T=6, heads=4, repeat=2, positional=True,
                                  residual=False)
    params = _perturbed(icar.init_params("transformer", rng, cfg=cfg), rng)
    s, _ = icar.sample_sequences(rng, 7, 6, 3, "haar")

    def loss(p, s):
        return icar.mse(icar.transformer(p, s[:, :-1], cfg), s[:, 1:])
    full_loss, full = value_and_grad(loss)(params, s)
    for micro in (1, 3, 7, 100):  # 3 leaves a shorter last slice
        part_loss, part = bench.loss_and_grad_microbatched(loss, params, s, micro)
        assert abs(part_loss - full_loss) <= 1e-12
        np.testing.assert_allclose(flatten(part)[0], flatten(full)[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="micro"):
        bench.loss_and_grad_microbatched(loss, params, s, 0)


def test_fused_gradient_bits_do_not_depend_on_the_thread_count(monkeypatch):
    """Sweep workers run with fewer threads than the command line: the same bits either way."""
    cfg = icar.transformer_config(d_in=3, d_out=3, T=7, heads=3, repeat=2, positional=True, residual=False)
    params = icar.init_params("transformer", rng(40), cfg=cfg)
    s, _ = icar.sample_sequences(rng(41), 40, 7, 3, "haar")
    loss = lambda p: icar.mse(fused.transformer(p, s[:, :-1], cfg), s[:, 1:])  # noqa: E731
    monkeypatch.setitem(fused.CHUNK_ENTRIES, "cpu", 3 * 7 * 7 * 3)  # 14 slices of 3 sequences
    found = []
    for threads in (1, 2, 3, 5):
        monkeypatch.setattr(fused, "THREADS", threads)
        found.append(flatten(grad(loss)(params))[0])
    assert all(np.array_equal(found[0], f) for f in found[1:])


# ---- the stacked M4 (fused.stack_loss_and_grad) against autograd on icar.transformer ------

STACK_CASES = {  # name: (augmented input, config overrides); real data only (fused.stackable)
    "nonaug": (False, dict(repeat=2, heads=3, layers=2, positional=True, residual=False)),
    "augmented": (True, dict(repeat=1, heads=2, layers=3, positional=False, residual=True)),
    "softmax_positional": (False, dict(repeat=2, heads=2, layers=2, attention="softmax",
                                       positional=True, residual=True)),
    "softmax_no_layernorm": (True, dict(repeat=1, heads=2, layers=2, attention="softmax",
                                        residual=False, layernorm=False)),
    "linear_repeat3_no_layernorm": (False, dict(repeat=3, heads=1, layers=1, positional=True,
                                                layernorm=False)),
}


@pytest.mark.parametrize("positions", [slice(None), slice(-1, None), slice(1, None)], ids=["all", "last", "from1"])
@pytest.mark.parametrize("case", sorted(STACK_CASES))
def test_stacked_loss_and_gradients_equal_autograd_on_icar_transformer_member_by_member(case, positions, monkeypatch):
    """Three members with their own parameters and data, in slices of 2 sequences (3 slices,
    the last shorter) and 3 threads: each member's loss and gradient is autograd's on the
    plain model, every parameter (the biases, LayerNorm and positions included)."""
    augmented, overrides = STACK_CASES[case]
    rng = np.random.default_rng(len(case))
    S, n, T, d = 3, 5, 6, 2
    monkeypatch.setattr(fused, "STACK_CHUNK", 2 * S * overrides["heads"] * T * T)
    monkeypatch.setattr(fused, "THREADS", 3)
    s = np.stack([icar.sample_sequences(rng, n, T, d, "haar")[0] for _ in range(S)])  # [S, n, T+1, d]
    x = np.stack([icar.augment(m[:, :-1]) if augmented else m[:, :-1] for m in s])
    cfg = icar.transformer_config(d_in=x.shape[-1], d_out=d, T=T + 2, **overrides)
    members = [_perturbed(icar.init_params("transformer", rng, cfg=cfg), rng) for _ in range(S)]
    loss, grads = fused.stack_loss_and_grad(train.tree_map(lambda *p: np.stack(p), *members), x,
                                            s[:, :, 1:], cfg, positions)
    assert loss.shape == (S,)
    for k, p in enumerate(members):
        value, g = value_and_grad(lambda p: icar.mse(icar.transformer(p, x[k], cfg)[:, positions],
                                                     s[k, :, 1:][:, positions]))(p)
        assert loss[k] == pytest.approx(value, rel=1e-12)
        plain = flatten(g)[0]
        mine = flatten(train.tree_map(lambda a: a[k], grads))[0]
        np.testing.assert_allclose(mine, plain, rtol=0, atol=1e-10 * np.abs(plain).max())


def test_stacked_gradient_bits_do_not_depend_on_the_thread_count(monkeypatch):
    cfg = icar.transformer_config(d_in=3, d_out=3, T=7, heads=3, repeat=2, positional=True, residual=False)
    params = train.tree_map(lambda *p: np.stack(p), *[icar.init_params("transformer", rng(40 + k), cfg=cfg)
                                                      for k in range(2)])
    s = np.stack([icar.sample_sequences(rng(43 + k), 40, 7, 3, "haar")[0] for k in range(2)])
    monkeypatch.setattr(fused, "STACK_CHUNK", 3 * 2 * 3 * 7 * 7)  # 14 slices of 3 sequences
    found = []
    for threads in (1, 2, 3, 5):
        monkeypatch.setattr(fused, "THREADS", threads)
        loss, grads = fused.stack_loss_and_grad(params, s[:, :, :-1], s[:, :, 1:], cfg)
        found.append(np.concatenate([loss, flatten(grads)[0]]))
    assert all(np.array_equal(found[0], f) for f in found[1:])


def test_stackable_takes_real_data_at_small_sizes_only():
    cfg = icar.transformer_config(d_in=5, d_out=5, T=20, heads=8)
    assert fused.stackable(cfg, 64, np.float64) and fused.stackable(cfg, 64, np.float32)
    assert not fused.stackable(cfg, 64, np.complex128)
    assert not fused.stackable(cfg, fused.STACK_ENTRIES // (8 * 400) + 1, np.float64)


# ==== 7. bad input of the library =========================================================
# The one bad-input table of the library modules icar.py, theory.py and evaluate.py: a wrong
# type, shape, dtype, key set or non-finite value is a ValueError naming the argument.
# (train.py's and runs.py's bad input: test_train.py, test_runs.py.)

_S = icar.sample_sequences(rng(90), 3, 4, 2, "haar")[0]                            # [3, 5, 2]
_W = icar.sample_sequences(rng(90), 3, 4, 2, "haar")[1]                            # [3, 2, 2]
_NAN = np.where(np.arange(2) == 1, np.nan, _S)                                     # NaN in coordinate 1
_M2 = icar.init_params("diagonal_heads", rng(91), d=2, T=5, H=2)
_CFG = icar.transformer_config(d_in=2, d_out=2, T=5)
_M4 = icar.init_params("transformer", rng(92), cfg=_CFG)
_LAYER = {k: v for k, v in _M4["layers"][0].items() if k != "W_Q"}
_KEYS = r"params must be a dict with keys"


@pytest.mark.parametrize("call, match", [
    # missing, extra or wrong-type parameter keys
    (lambda: icar.diagonal_heads({"A": _M2["A"], "B": _M2["B"]}, _S), _KEYS),
    (lambda: icar.diagonal_heads(dict(_M2, C=_M2["A"]), _S), _KEYS),
    (lambda: icar.pe_only({}, _S), _KEYS + r" \('P',\), got \[\]"),
    (lambda: icar.augmented_linear([np.eye(2), np.eye(2)], icar.augment(_S)), _KEYS + r".*got list"),
    (lambda: icar.transformer({"W_out": _M4["W_out"], "b_out": _M4["b_out"]}, _S, _CFG), _KEYS),
    (lambda: icar.transformer(dict(_M4, layers=[_LAYER]), _S, _CFG),
     r"params\['layers'\]\[0\] must be a dict with keys"),
    (lambda: icar.transformer_layer(_LAYER, _S, _CFG), r"layer must be a dict with keys"),
    (lambda: icar.positional_attention(_LAYER, np.ones((5, 2))), r"layer must be a dict with keys"),
    (lambda: icar.transformer(_M4, _S, {"heads": 2}), r"cfg must be a dict with keys"),
    (lambda: theory.population_loss_and_grad({"A": _M2["A"], "B": _M2["B"]}, "unitary"), _KEYS),
    (lambda: evaluate.weight_blocks({"A": np.eye(2)}, 2), _KEYS),
    (lambda: evaluate.weight_blocks({"W_out": 1, "b_out": 1}, 2), _KEYS),
    (lambda: evaluate.weight_blocks(dict(_M4, layers=[_LAYER]), 2),
     r"params\['layers'\]\[0\] must be a dict with keys"),
    (lambda: evaluate.weight_blocks(dict(_M4, pos=np.zeros((5, 2))), 2), _KEYS),
    (lambda: evaluate.previous_token_share(_M4, 5), _KEYS + r".*'pos'"),
    (lambda: evaluate.readout_r2(_M4, dict(_CFG, positional=True), _S[:, :-1], _S[:, :-1]), _KEYS),
    (lambda: evaluate.readout_r2(_M4, _CFG, _S[:, :-1], _S[:, :-2]), r"s_fit and s_eval must have the same T"),
    # lists and integer arrays where float or complex arrays are expected
    (lambda: icar.mse([1.0, 2.0], [1.0, 2.0]), r"f must be a float or complex array, got list"),
    (lambda: icar.diagonal_heads(_M2, _S.tolist()), r"s must be a float or complex array, got list"),
    (lambda: icar.augment(np.ones((2, 3, 2), dtype=int)), r"s must be a float or complex array, got int"),
    (lambda: icar.pe_only({"P": np.eye(5)}, np.ones((2, 5, 2), dtype=int)), r"s must be a float or complex"),
    (lambda: icar.transformer(_M4, np.ones((2, 5, 2), dtype=int), _CFG), r"x must be a float or complex"),
    (lambda: icar.augmented_linear({"A": np.eye(2), "B": np.eye(2)}, icar.augment(_S).tolist()),
     r"e must be a float or complex array, got list"),
    (lambda: theory.population_loss([[1.0, 0.0], [0.0, 1.0]], np.eye(4), "unitary"),
     r"C must be a float or complex array, got list"),
    (lambda: theory.population_loss(np.eye(2), np.eye(4, dtype=int), "unitary"), r"P must be a float or complex"),
    (lambda: theory.pe_only_loss([[0.0, 0.0], [0.0, 1.0]], mu=2.0), r"P must be a float or complex array"),
    (lambda: evaluate.least_squares(_S.tolist()), r"s must be a float or complex array, got list"),
    (lambda: evaluate.baselines(np.ones((3, 5, 2), dtype=int), _W), r"s must be a float or complex array, got int"),
    # 2-D data or mismatched shapes
    (lambda: icar.mse(np.ones((2, 3)), np.ones(3)), r"f and y must have the same shape.*\(2, 3\), y \(3,\)"),
    (lambda: theory.eigen_coordinates(np.ones((5, 2))), r"s must have shape \[n, T, d\]"),
    (lambda: theory.population_loss_and_grad({"A": np.ones((2, 3)), "B": np.ones((2, 4)), "P": np.eye(4)},
                                             "unitary"), r"A and B must have the same shape \[H, d\]"),
    (lambda: evaluate.optimal_gd_step(_S[0]), r"s must have shape \[n, T, d\]"),
    (lambda: evaluate.optimal_gd_step(_S[:, :1]), r"s must have shape \[n, T\+1, d\] with T >= 1"),
    (lambda: evaluate.least_squares(_S[0]), r"s must have shape \[n, T, d\]"),
    (lambda: evaluate.baselines(_S[0], _W), r"s must have shape \[n, T, d\]"),
    (lambda: evaluate.baselines(_S, _W[:, :1]), r"W must have shape \[n, d, d\]"),
    (lambda: evaluate.probe(lambda x: x, _S[0]), r"s must have shape \[n, T, d\]"),
    (lambda: evaluate.probe(lambda x: x, _S, eta=np.ones(3)), r"eta must have shape \[T\]"),
    (lambda: evaluate.probe(None, _S), r"predict must be a function"),
    # NaN or inf data in entry points that are not differentiated
    (lambda: evaluate.optimal_gd_step(_NAN), r"s must be finite"),
    (lambda: evaluate.least_squares(_NAN), r"s must be finite"),
    (lambda: evaluate.baselines(_NAN, _W), r"s must be finite"),
    (lambda: evaluate.baselines(_S, _W * np.inf), r"W must be finite"),
    (lambda: evaluate.probe(lambda x: x, _NAN), r"s must be finite"),
    (lambda: theory.eigen_coordinates(_NAN), r"s must be finite"),
    (lambda: theory.population_loss_and_grad(dict(_M2, P=np.full((5, 5), np.nan)), "unitary"), r"P must be finite"),
    (lambda: theory.pe_only_loss(np.full((4, 4), np.inf), mu=2.0), r"P must be finite"),
    # bools are not numbers
    (lambda: icar.sample_sequences(rng(), 2, 3, 2, "haar", sigma=True),
     r"sigma must be a finite number >= 0, got True"),
    (lambda: icar.sample_sequences(rng(), 2, 3, 1, "angle", mu=True), r"mu \(family 'angle'\) must be a finite number"),
    (lambda: icar.init_params("pe_only", rng(), T=3, scale=True), r"scale must be a finite number >= 0, got True"),
    (lambda: theory.gd_step_size(True, 5), r"T must be an integer >= 2, got True"),
    (lambda: theory.gd_loss(5, 3, eta=True), r"eta must be a finite number, got True"),
    (lambda: evaluate.optimal_gd_step(_S, k=True), r"k must be an integer >= 1, got True"),
    (lambda: evaluate.least_squares(_S, rtol=True), r"rtol must be a finite number >= 0, got True"),
    (lambda: evaluate.baselines(_S, _W, gd_steps=True), r"gd_steps must be an integer >= 0, got True"),
])
def test_library_functions_reject_bad_input_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- every public function against hostile values (a generated table) --------------------
# Each public function of icar, theory and evaluate, from one valid call (VALID), is called
# again with each hostile value in place of one argument, and, inside a dict, list or tuple
# argument, in place of one entry (to depth 3: an M4's params["layers"][0]["W_Q"]). Every
# call must succeed (some values are allowed: -1 where any number is) or raise a ValueError
# that names the argument (or a key on the way to the entry, or the name a check_* helper
# is given); TypeError, IndexError, KeyError, AttributeError, OverflowError or a hang (5 s)
# fail. A public function missing from VALID, or a parameter no valid call gives, fails.

def _public_functions():
    return {f"{m.__name__}.{name}": f for m in (icar, theory, evaluate)
            for name, f in inspect.getmembers(m, inspect.isfunction)
            if f.__module__ == m.__name__ and not name.startswith("_")}


def _phi(k):
    """The characteristic function of theta ~ U[0, 0.6]: E[exp(i k theta)]."""
    k = np.asarray(k, dtype=float)
    return np.exp(0.3j * k) * np.sinc(0.3 * k / np.pi)


_X = _S[:, :-1]                                                                    # [3, 4, 2]
_S2, _W2 = icar.sample_sequences(rng(95), 3, 4, 2, "haar")                         # held out
_ETA = np.full(4, 0.3)                                                             # [T]
_M1 = {"A": np.eye(2), "B": 0.5 * np.eye(2)}
_M1_FULL = icar.init_params("augmented_linear", rng(96), d=2, form="full")
_M2X = icar.init_params("diagonal_heads", rng(91), d=2, T=4, H=2)
_M3 = {"P": np.eye(4)}
_CFGP = icar.transformer_config(d_in=2, d_out=2, T=5, heads=2, attention="softmax", positional=True)
_M4P = icar.init_params("transformer", rng(93), cfg=_CFGP)
_CFGA = icar.transformer_config(d_in=6, d_out=2, T=5)                               # augmented tokens
_M4A = icar.init_params("transformer", rng(94), cfg=_CFGA)
_CS = evaluate.context_sums(_X)                                                    # C, S [3, 4, 2, 2]
_SYSTEM = theory.pe_only_system(4, mu=2.0)                                         # M [4, 4], b [4]
_ROWS = [None] + [(_SYSTEM[0][:r + 1, :r + 1], _SYSTEM[1][3 - r:]) for r in range(1, 4)]
_A2, _B2 = rng(97).standard_normal((2, 2)), rng(98).standard_normal((2, 2))       # [H, d] each
_P4 = rng(99).standard_normal((4, 4))                                              # [T, T]


def _call(args, kwargs=None):
    return args, kwargs or {}


# one valid call per public function (a list: several, to reach each branch's arguments)
VALID = {
    "icar.array_module": _call((_X,)),
    "icar.augment": _call((_X,)),
    "icar.augmented_linear": [_call((_M1, icar.augment(_X))), _call((_M1_FULL, icar.augment(_X)))],
    "icar.causal_mask": _call((np, 4, _X)),
    "icar.check_choice": _call(("family", "haar", icar.FAMILIES)),
    "icar.check_config": _call((_CFGP,)),
    "icar.check_data": _call((_X, "s", "n, T, d", True)),
    "icar.check_int": _call(("n", 3, 1)),
    "icar.check_layer": _call(("layer", _M4P["layers"][0], 2)),
    "icar.check_params": _call(("params", _M1, ("A", "B"), ("W_KQ", "W_V"))),
    "icar.check_real": _call(("sigma", 0.5, 0.0, True)),
    "icar.check_shape": _call(("P", _P4, (4, 4))),
    "icar.check_tokens": _call((_X, _CFG, "x")),
    "icar.check_transformer": [_call((_M4P, _CFGP)), _call((_M4A, _CFGA))],
    "icar.diagonal_heads": _call((_M2X, _X)),
    "icar.init_params": [_call(("diagonal_heads", rng(), 2, 4, 2, "block", None, 0.1)),
                         _call(("augmented_linear", rng(), 2), dict(form="full")),
                         _call(("transformer", rng()), dict(cfg=_CFGP))],
    "icar.layernorm": _call((_X * 3, np.ones(2), np.zeros(2), 1e-5)),
    "icar.mse": _call((_X, _X * 0.5)),
    "icar.pe_only": _call((_M3, _X)),
    "icar.positional_attention": _call((_M4P["layers"][0], _M4P["pos"][:4])),
    "icar.sample_sequences": [_call((rng(), 3, 4, 2, "haar", 0.1, "random", None)),
                              _call((rng(), 3, 4, 1, "angle", 0.0, "fixed", 5.0))],
    "icar.softmax": _call((_CS[1][..., 0, 0][:, None] * np.ones((3, 4, 4)), icar.causal_mask(np, 4))),
    "icar.swap": _call((_X,)),
    "icar.transformer": [_call((_M4, _X, _CFG)), _call((_M4P, _X, _CFGP))],
    "icar.transformer_config": _call((), dict(_CFGP)),
    "icar.transformer_layer": _call((_M4P["layers"][0], _X, _CFGP, _M4P["pos"], _X * 0.5)),
    "icar.transformer_two_streams": _call((_M4P, _X, _X * 0.5, _CFGP)),
    "theory.eigen_coordinates": _call((_X,)),
    "theory.gd_loss": _call((4, 2, 0.1, "all")),
    "theory.gd_path": [_call((_ROWS,), dict(eta=0.1, steps=np.arange(3))), _call((_ROWS,), dict(eta=0.1, steps=3))],
    "theory.gd_step_size": _call((4, 2, "all")),
    "theory.loss_and_grad_with_masks": _call((_A2, _B2, _P4, theory.pair_mask(2, "orthogonal"),
                                              *theory.position_masks(4))),
    "theory.min_loss": _call((2, 1, "orthogonal")),
    "theory.minimiser": _call((4, 4, "orthogonal", 1.5, 0.5, 5)),
    "theory.pair_mask": _call((2, "orthogonal")),
    "theory.pe_only_loss": [_call((_P4, 2.0, None)), _call((_P4, None, _phi))],
    "theory.pe_only_solution": [_call((4, 2.0, None)), _call((4, None, _phi))],
    "theory.pe_only_system": [_call((4, 2.0, None)), _call((4, None, _phi))],
    "theory.pe_only_trajectory": _call((4, 2.0, None), dict(eta=0.1, steps=3)),
    "theory.population_loss": _call((_B2.T @ _A2, _P4, "unitary")),
    "theory.population_loss_and_grad": _call((_M2X, "orthogonal")),
    "theory.population_loss_per_prefix": _call((_B2.T @ _A2, _P4, "orthogonal")),
    "theory.position_masks": _call((4,)),
    "theory.raw_token_gd_construction": _call((2, 4, 0.5, 3.0)),
    "theory.train_population": _call((2, 2, 4, "unitary", 0.01, 3, rng())),
    "evaluate.baselines": _call((_S, _W, 2)),
    "evaluate.context_sums": _call((_X,)),
    "evaluate.fresh_query_probe": _call((evaluate.model_predictor(_M1), _S, rng(), _W, _ETA)),
    "evaluate.gd_prediction": _call((*_CS, _X, _ETA, 2)),
    "evaluate.head_ablation": [_call((_M4, _CFG, _S, None)),
                               _call((_M4, _CFG, _S, lambda p, x: icar.transformer(p, x, _CFG)))],
    "evaluate.influence_map": _call((evaluate.model_predictor(_M1), _S)),
    "evaluate.least_squares": _call((_S, 1e-10)),
    "evaluate.linear_probe_w": _call((_X[:, :, None], _W, _S2[:, :-1, None], _W2, 1e-6)),
    "evaluate.m4_streams": _call((_M4A, _X, _CFGA)),
    "evaluate.mechanism": _call((_M4P, _CFGP, _X, _S2[:, :-1])),
    "evaluate.model_kind": [_call((_M4A, _CFGA)), _call((_M2X, None))],
    "evaluate.model_predictor": [_call((_M4A, _CFGA)), _call((_M3, None))],
    "evaluate.optimal_gd_step": [_call((_S, 1)), _call((_S, 2))],
    "evaluate.position_loss": _call((_X, _X * 0.5)),
    "evaluate.previous_token_share": _call((_M4P, 4)),
    "evaluate.probe": _call((evaluate.query_predictor(_M1, _X), _S, _W, _ETA)),
    "evaluate.query_predictor": [_call((_M1_FULL, _X, None)), _call((_M4A, _X, _CFGA))],
    "evaluate.readout_r2": _call((_M4P, _CFGP, _X, _S2[:, :-1])),
    "evaluate.replace_tokens": _call((_S, _S2, [1, 3])),
    "evaluate.score": _call((evaluate.model_predictor(_M1), _S, 2, _ETA)),
    "evaluate.stream_w_r2": _call((_M4, _CFG, _S, _W, _S2, _W2, 1e-6)),
    "evaluate.switch_context": [_call((rng(), _S, _W, 2)), _call((_W2, _S, _W, 2))],
    "evaluate.weight_blocks": [_call((_M1, 2)), _call((_M4A, 2))],
}

HOSTILE = {"None": None, "'x'": "x", "2**70": 2 ** 70, "-1": -1, "0": 0, "1.5": 1.5, "nan": np.nan,
           "inf": np.inf, "True": True, "[]": [], "[1.0, 2.0]": [1.0, 2.0], "{}": {}, "{'x': 1.0}": {"x": 1.0},
           "0-d array": np.array(1.0), "5-d array": np.ones((1, 1, 2, 1, 1)),
           "a function returning None": lambda *args, **kwargs: None}
HOSTILE_INSIDE = ("None", "'x'", "2**70", "-1", "nan", "[]", "{}", "5-d array")  # entries of dicts, lists


def _variants(value, depth=3):
    """(label, hostile value, dict keys on the way to it) for one argument: the table's values,
    the array with another dtype, rank or NaNs, and (depth > 1) each entry of a container
    removed (dicts) or replaced."""
    out = [(k, HOSTILE[k], ()) for k in (HOSTILE if depth == 3 else HOSTILE_INSIDE)]
    if isinstance(value, np.ndarray) and value.ndim:
        out += [(label, v, ()) for label, v in (
            ("complex array", value * (1 + 1j)), ("int array", np.ones(value.shape, dtype=int)),
            ("NaN array", np.full(value.shape, np.nan)), ("a list", value.tolist()), ("one axis more", value[None]),
            ("one axis less", value[0]), ("empty last axis", value[..., :0]))]
    if depth > 1 and isinstance(value, dict):
        for key in value:
            out.append((f"without [{key!r}]", {k: v for k, v in value.items() if k != key}, (key,)))
            out += [(f"[{key!r}] = {label}", dict(value, **{key: v}), (key,) + keys)
                    for label, v, keys in _variants(value[key], depth - 1)]
    if depth > 1 and isinstance(value, (list, tuple)):
        for i, entry in enumerate(value):
            out += [(f"[{i}] = {label}", type(value)(value[:i]) + type(value)([v]) + type(value)(value[i + 1:]), keys)
                    for label, v, keys in _variants(entry, depth - 1)]
    return out


def _cases(name):
    """(label, names, args, kwargs) of every hostile call of the public function `name`; its
    ValueError must say one of `names`: the argument, a dict key on the way to the hostile
    entry, or the `name` a check_* helper was given for what it checks."""
    f = _public_functions()[name]
    calls = VALID[name] if isinstance(VALID[name], list) else [VALID[name]]
    positional = [p.name for p in inspect.signature(f).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    for args, kwargs in calls:
        slots = [(positional[i] if i < len(positional) else f"*allowed[{i - len(positional)}]", i)
                 for i in range(len(args))] + [(key, key) for key in kwargs]
        for arg, slot in slots:
            for label, v, keys in _variants(args[slot] if isinstance(slot, int) else kwargs[slot]):
                a, kw = (args[:slot] + (v,) + args[slot + 1:], kwargs) if isinstance(slot, int) else \
                        (args, dict(kwargs, **{slot: v}))
                given = inspect.signature(f).bind(*a, **kw).arguments.get("name")
                names = {arg.split("[")[0].lstrip("*"), *map(str, keys)} | ({given} if isinstance(given, str) else set())
                yield f"{arg} = {label}", names, a, kw


def _run_hostile(name):
    """The table for the public function `name`: (number of calls, [(label, what went wrong)])."""
    import signal
    import warnings

    def hang(*_):
        raise TimeoutError("no answer within 5 s")

    f, calls, wrong = _public_functions()[name], 0, []
    old = signal.signal(signal.SIGALRM, hang)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            for label, names, args, kwargs in _cases(name):
                calls += 1
                signal.setitimer(signal.ITIMER_REAL, 5.0)
                try:
                    f(*args, **kwargs)
                except Exception as e:  # noqa: BLE001  what the table is for
                    # numpy's AxisError is also an IndexError: a user catching ValueError only misses none
                    if not isinstance(e, ValueError) or isinstance(e, (TypeError, LookupError, AttributeError,
                                                                       ArithmeticError)):
                        wrong.append((label, f"{type(e).__name__}: {str(e)[:100]}"))
                    elif not any(n in str(e) for n in names):
                        wrong.append((label, f"ValueError naming none of {sorted(names)}: {str(e)[:100]}"))
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old)
    return calls, wrong


def test_valid_calls_cover_every_public_function_and_parameter():
    """VALID names exactly the public functions, each parameter is given by some valid call,
    and every valid call succeeds (else its hostile variants would test nothing)."""
    functions = _public_functions()
    assert set(VALID) == set(functions), f"add to VALID: {sorted(set(functions) - set(VALID))}; " \
                                         f"remove: {sorted(set(VALID) - set(functions))}"
    for name, f in functions.items():
        calls = VALID[name] if isinstance(VALID[name], list) else [VALID[name]]
        given = set()
        for args, kwargs in calls:
            given |= set(inspect.signature(f).bind(*args, **kwargs).arguments)
            f(*args, **kwargs)
        assert given == set(inspect.signature(f).parameters), f"{name}: no valid call gives " \
            f"{sorted(set(inspect.signature(f).parameters) - given)}"


@pytest.mark.parametrize("name", sorted(_public_functions()))
def test_hostile_arguments_raise_value_error_naming_the_argument(name):
    assert name in VALID, f"{name} is public: add a valid call of it to VALID"
    calls, wrong = _run_hostile(name)
    assert calls and not wrong, f"{len(wrong)} of {calls} hostile calls of {name} went wrong:\n" + "\n".join(
        f"  {label}: {why}" for label, why in wrong[:20])
