"""Tests of icar: each one compares a computation with an independent reference
(an exact identity, a closed form of paper.md, Monte Carlo, or autograd's check_grads)."""
import numpy as np
import pytest
from autograd import grad
from autograd.test_util import check_grads

import icar


def rng(seed=0):
    return np.random.default_rng(seed)


def complex_haar_data(n, T, d, seed):
    """Complex sequences with a non-diagonal W, to exercise conj() in every model."""
    s, _ = icar.sample_sequences(rng(seed), n, T, d, "haar")
    phase = np.exp(1j * rng(seed + 1).uniform(0, 2 * np.pi, (n, 1, d)))
    return s * phase


# ============================================================================ samplers

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


# ============================================================================ gradients

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


# ============================================================================ exact identities

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


# ============================================================================ bad input

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
    _bad(r"parameters must be", icar.augmented_linear, {"A": np.eye(3)}, icar.augment(s))
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
    _bad(r"family 'angle' needs a finite mu > 0, got mu=", icar.sample_sequences, rng(), 2, 3, 1,
         "angle", mu=mu)


def test_angle_family_needs_d_one_and_mu_only_for_angle():
    _bad(r"family 'angle' needs d=1, got d=2", icar.sample_sequences, rng(), 2, 3, 2, "angle", mu=5.0)
    _bad(r"mu is only used by family 'angle'", icar.sample_sequences, rng(), 2, 3, 2, "haar", mu=5.0)
