"""Tests of theory.py: each closed form against Monte Carlo with the models of icar.py on
sampled data, and against trained models."""
import autograd.numpy as np
import numpy
import pytest
from autograd import grad

import icar
import theory


def assert_monte_carlo(value, per_sequence, k=4.0):
    """value agrees with the mean of per_sequence [n, ...] within k standard errors (plus
    rounding, for losses that are the same on every sequence)."""
    n = per_sequence.shape[0]
    mean = per_sequence.mean(axis=0)
    se = per_sequence.std(axis=0, ddof=1) / numpy.sqrt(n)
    gap = numpy.abs(mean - value)
    assert numpy.all(gap < k * se + 1e-12 * (1 + numpy.abs(value))), \
        f"closed form {value} vs Monte Carlo {mean} +- {se} (z = {gap / se})"


def squared_errors(f, y):
    """||f - y||^2 per sequence and position: [n, T, d] -> [n, T]."""
    return numpy.sum(numpy.abs(f - y) ** 2, axis=-1)


def adam(objective, params, steps, lr):
    """Plain Adam (beta 0.9, 0.999) on a dict of arrays."""
    g = grad(objective)
    m = {k: numpy.zeros_like(v) for k, v in params.items()}
    v = {k: numpy.zeros_like(x) for k, x in params.items()}
    for i in range(1, steps + 1):
        gr = g(params)
        for k in params:
            m[k] = 0.9 * m[k] + 0.1 * gr[k]
            v[k] = 0.999 * v[k] + 0.001 * gr[k] ** 2
            params[k] = params[k] - lr * (m[k] / (1 - 0.9 ** i)) / (numpy.sqrt(v[k] / (1 - 0.999 ** i)) + 1e-12)
    return params


# ----------------------------------------------------------------------------- R1

def test_r1_step_sizes_minimise_the_loss():
    for T, d in [(5, 3), (20, 10), (2, 1)]:
        eta = theory.gd_step_size(T, d)
        assert eta == pytest.approx(1 / (T + d - 2), rel=1e-14)
        assert theory.gd_loss(T, d) == pytest.approx(d * (d - 1) / (T + d - 2), abs=1e-12)
        for loss in ("last", "all"):
            e = theory.gd_step_size(T, d, loss)
            grid = e * numpy.linspace(0.5, 1.5, 101)
            values = [theory.gd_loss(T, d, float(x), loss=loss) for x in grid]
            assert numpy.argmin(values) == 50


@pytest.mark.parametrize("family,d,T", [("unitary", 3, 5), ("unitary", 2, 8), ("orthogonal", 4, 4)])
def test_r1_gd_loss_matches_monte_carlo(family, d, T):
    """M1 with A = I, B = eta I: last-token loss and the sum over positions r = 1..T-1."""
    rng = numpy.random.default_rng(1)
    s, _ = icar.sample_sequences(rng, 20000, T, d, family)
    e = icar.augment(s[:, :T])                                                 # [n, T, 3d]
    for eta in (theory.gd_step_size(T, d), 2 * theory.gd_step_size(T, d, "all")):
        f = icar.augmented_linear({"A": numpy.eye(d), "B": eta * numpy.eye(d)}, e)  # [n, T, d]
        err = squared_errors(f, s[:, 1:])                                      # [n, T]
        assert_monte_carlo(theory.gd_loss(T, d, eta), err[:, -1])
        assert_monte_carlo(theory.gd_loss(T, d, eta, loss="all"), err[:, 1:].sum(axis=1))


def last_token_statistics(v, k, q, y):
    """The last-token loss of linear attention f_i = sum_j L_ij sum_{a,b} R_ab Phi_{j,a,b},
    Phi = sum_t v_t conj(k_t)^T q^T, is quadratic in c_i = vec(L_i. kron R): return its
    matrix, vector and constant, Re E[Phi Phi^*] [D, D], Re E[Phi conj(y_i)] [d, D], E||y||^2."""
    n = v.shape[0]
    G = numpy.swapaxes(v, 1, 2) @ numpy.conj(k)                                # [n, Dv, Dk]
    Phi = (G[..., None] * q[:, None, None, :]).reshape(n, -1)                  # [n, D]
    Q = numpy.real(numpy.conj(Phi).T @ Phi) / n                                # [D, D]
    V = numpy.real(y.T @ numpy.conj(Phi)) / n                                  # [d, D]
    return Q, V, numpy.mean(numpy.sum(numpy.abs(y) ** 2, axis=1))


def statistics_loss(L, R, stats):
    Q, V, y2 = stats
    c = (L[:, :, None, None] * R[None, None]).reshape(L.shape[0], -1)          # [d, D]
    return np.sum((c @ Q) * c) - 2 * np.sum(c * V) + y2


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
    numpy.testing.assert_allclose(objective(params), model_loss(params), rtol=1e-10)
    g1, g2 = grad(objective)(params), grad(model_loss)(params)
    for key in params:
        numpy.testing.assert_allclose(g1[key], g2[key], rtol=1e-8, atol=1e-12)
    params = adam(objective, params, steps, lr)
    numpy.testing.assert_allclose(objective(params), model_loss(params), rtol=1e-10)
    return params


def test_r1_trained_block_form_is_one_gd_step():
    d, T = 3, 5
    rng = numpy.random.default_rng(2)
    s, _ = icar.sample_sequences(rng, 20000, T, d, "unitary")
    params = train_last_token(s, T, "block", rng)
    eta = theory.gd_step_size(T, d)
    BA = params["B"] @ params["A"]
    assert numpy.linalg.norm(BA - eta * numpy.eye(d)) < 0.05 * numpy.linalg.norm(eta * numpy.eye(d))
    st, _ = icar.sample_sequences(rng, 50000, T, d, "unitary")
    test = squared_errors(icar.augmented_linear(params, icar.augment(st[:, :T]))[:, -1], st[:, T])
    assert abs(test.mean() / theory.gd_loss(T, d) - 1) < 0.02


def test_r1_trained_full_form_reaches_L_star():
    d, T = 2, 4
    rng = numpy.random.default_rng(3)
    s, _ = icar.sample_sequences(rng, 20000, T, d, "unitary")
    params = train_last_token(s, T, "full", rng)
    st, _ = icar.sample_sequences(rng, 50000, T, d, "unitary")
    test = squared_errors(icar.augmented_linear(params, icar.augment(st[:, :T]))[:, -1], st[:, T])
    assert test.mean() <= 1.02 * theory.gd_loss(T, d)


def test_r1_fixed_first_state_beats_one_gd_step():
    d, T = 3, 5
    rng = numpy.random.default_rng(4)
    s, _ = icar.sample_sequences(rng, 20000, T, d, "unitary", s1="fixed")
    params = train_last_token(s, T, "block", rng)
    st, _ = icar.sample_sequences(rng, 50000, T, d, "unitary", s1="fixed")
    test = squared_errors(icar.augmented_linear(params, icar.augment(st[:, :T]))[:, -1], st[:, T])
    assert test.mean() + 4 * test.std() / numpy.sqrt(test.size) < theory.gd_loss(T, d)


# ----------------------------------------------------------------------------- R2, R3

def model_data(rng, n, T, d, family):
    """Sampled sequences in the coordinates where R2/R3 hold (eigen-basis for "orthogonal")."""
    s, _ = icar.sample_sequences(rng, n, T, d, family)
    return theory.eigen_coordinates(s) if family == "orthogonal" else s


@pytest.mark.parametrize("family,d,T,H", [("unitary", 3, 5, 2), ("unitary", 5, 4, 6),
                                          ("orthogonal", 4, 5, 3), ("orthogonal", 6, 4, 2)])
def test_population_loss_matches_monte_carlo(family, d, T, H):
    """population_loss at random parameters equals the Monte Carlo loss of
    icar.diagonal_heads, per position r = 1..T-1 and summed."""
    rng = numpy.random.default_rng(5)
    params = {"A": 0.7 * rng.standard_normal((H, d)), "B": 0.7 * rng.standard_normal((H, d)),
              "P": 0.5 * rng.standard_normal((T, T))}
    s = model_data(rng, 20000, T, d, family)
    err = squared_errors(icar.diagonal_heads(params, s[:, :T]), s[:, 1:])      # [n, T]
    C = params["B"].T @ params["A"]
    assert_monte_carlo(theory.population_loss_per_prefix(C, params["P"], family), err[:, 1:])
    assert_monte_carlo(theory.population_loss(C, params["P"], family), err[:, 1:].sum(axis=1))
    assert numpy.allclose(err[:, 0], d)  # position 0 has a zero query


def test_orthogonal_loss_holds_in_eigen_coordinates_only():
    """The diagonal model is not basis-free: on icar's real rotation coordinates R3 is off."""
    d, T, H = 4, 5, 3
    rng = numpy.random.default_rng(6)
    params = {"A": 0.7 * rng.standard_normal((H, d)), "B": 0.7 * rng.standard_normal((H, d)),
              "P": 0.5 * rng.standard_normal((T, T))}
    s, _ = icar.sample_sequences(rng, 20000, T, d, "orthogonal")
    err = squared_errors(icar.diagonal_heads(params, s[:, :T]), s[:, 1:])[:, 1:].sum(axis=1)
    closed = theory.population_loss(params["B"].T @ params["A"], params["P"], "orthogonal")
    assert abs(err.mean() - closed) > 10 * err.std() / numpy.sqrt(err.size)
    z = theory.eigen_coordinates(s)
    assert numpy.allclose(numpy.sum(numpy.abs(z) ** 2, -1), numpy.sum(s ** 2, -1))
    ratio = z[:, 1:] / z[:, :-1]                                               # [n, T, d] eigenvalues
    assert numpy.allclose(ratio[..., 0::2], numpy.conj(ratio[..., 1::2]))
    assert numpy.allclose(numpy.abs(ratio), 1)


@pytest.mark.parametrize("family", theory.FAMILIES)
def test_population_gradient_matches_autograd(family):
    rng = numpy.random.default_rng(7)
    d, T, H = 6, 7, 4
    params = {"A": rng.standard_normal((H, d)), "B": rng.standard_normal((H, d)),
              "P": rng.standard_normal((T, T))}

    def objective(p):
        return theory.population_loss(p["B"].T @ p["A"], p["P"], family)

    loss, g = theory.population_loss_and_grad(params, family)
    auto = grad(objective)(params)
    assert abs(loss - objective(params)) < 1e-10 * abs(loss)
    for key in params:
        assert numpy.max(numpy.abs(g[key] - auto[key])) < 1e-10 * numpy.max(numpy.abs(auto[key]))


@pytest.mark.parametrize("family,d", [("unitary", 3), ("unitary", 4), ("orthogonal", 4), ("orthogonal", 6)])
def test_minimiser_reaches_min_loss(family, d):
    T = 6
    rng = numpy.random.default_rng(8)
    s = model_data(rng, 2000, T, d, family)
    for H in range(1, d + 2):
        star = theory.minimiser(d, H, family, c=-1.3, T=T)
        per = theory.population_loss_per_prefix(star["B"].T @ star["A"], star["P"], family)
        assert numpy.allclose(per, theory.min_loss(d, H, family), atol=1e-12)
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
            assert numpy.allclose(C, 0.8 * (numpy.eye(d) + kappa * theory._pair_mask(d, family)))
            assert squared_errors(icar.diagonal_heads(star, s[:, :T]), s[:, 1:]).max(axis=0)[1:].max() < 1e-20


def test_fig3_left_unitary_reaches_c_identity():
    """Fig. 3 left as the authors ran it: d = 10, T = 20, H = 10, lr 1e-2, 100 steps."""
    d = H = 10
    params, losses = theory.train_population(H, d, 20, "unitary", 1e-2, 100, numpy.random.default_rng(0))
    A, B, P = params["A"], params["B"], params["P"]
    C = B.T @ A
    c = numpy.mean(numpy.diag(C))
    assert losses[-1] < 1e-6
    assert numpy.linalg.norm(C - numpy.diag(numpy.diag(C))) < 1e-3 * numpy.linalg.norm(numpy.diag(C))
    assert numpy.allclose(numpy.diag(C), c, rtol=1e-3)
    assert numpy.allclose(numpy.diag(P)[1:] * c, 1, atol=1e-6)
    AB = A @ B.T
    assert numpy.linalg.norm(AB - c * numpy.eye(H)) < 1e-3 * numpy.linalg.norm(AB)


def test_orthogonal_half_heads_reach_rank_d_over_2_minimiser():
    """H = d/2: every run ends at a stationary point; those at zero loss have
    C = c (I kron 1 1^T), p_T = 1/c, p_{T-1} / p_T = -1/2 and A B^T = 2c I_H. (From other
    starts plain GD stalls at spurious minima of positive loss.)"""
    d, H, T = 4, 2, 5
    zero = 0
    for seed in range(4):
        params, losses = theory.train_population(H, d, T, "orthogonal", 1e-2, 4000,
                                                 numpy.random.default_rng(seed))
        _, g = theory.population_loss_and_grad(params, "orthogonal")
        assert max(numpy.max(numpy.abs(v)) for v in g.values()) < 1e-6
        if losses[-1] > 1e-6:
            continue
        zero += 1
        A, B, P = params["A"], params["B"], params["P"]
        C = B.T @ A
        c = numpy.mean(C[theory._pair_mask(d, "orthogonal") + numpy.eye(d) > 0])
        target = c * numpy.kron(numpy.eye(d // 2), numpy.ones((2, 2)))
        assert numpy.linalg.norm(C - target) < 1e-3 * numpy.linalg.norm(target)
        assert numpy.allclose(numpy.diag(P)[1:] * c, 1, atol=1e-3)
        assert numpy.allclose(numpy.diag(P, -1) / numpy.diag(P)[1:], -0.5, atol=1e-3)
        assert numpy.linalg.norm(A @ B.T - 2 * c * numpy.eye(H)) < 1e-3 * numpy.linalg.norm(A @ B.T)
    assert zero >= 1


@pytest.mark.parametrize("family,d,H", [("unitary", 4, 2), ("unitary", 5, 3), ("orthogonal", 6, 2)])
def test_below_threshold_loss_settles_at_min_loss(family, d, H):
    """Every prefix's loss is at least min_loss; "unitary" runs reach it from every start,
    "orthogonal" ones from some (others stall at spurious minima of higher loss)."""
    T, bound = 5, theory.min_loss(d, H, family)
    assert bound > 0
    reached = []
    for seed in range(3):
        params, _ = theory.train_population(H, d, T, family, 1e-2, 3000, numpy.random.default_rng(seed))
        per = theory.population_loss_per_prefix(params["B"].T @ params["A"], params["P"], family)
        assert numpy.all(per > bound - 1e-9)
        reached.append(numpy.allclose(per, bound, atol=1e-3))
    assert all(reached) if family == "unitary" else any(reached)


# ----------------------------------------------------------------------------- R4

def uniform_phi(mu):
    """E[exp(i k theta)] for theta ~ U[0, 2 pi / mu], written independently of theory.py."""
    def phi(k):
        a = 2 * numpy.pi / mu
        k = numpy.asarray(k, dtype=float)
        with numpy.errstate(invalid="ignore", divide="ignore"):
            return numpy.where(k == 0, 1.0, (numpy.exp(1j * a * k) - 1) / (1j * a * k))
    return phi


@pytest.mark.parametrize("mu,T", [(3.0, 5), (20.0, 8)])
def test_pe_only_loss_matches_monte_carlo(mu, T):
    rng = numpy.random.default_rng(10)
    P = 0.5 * rng.standard_normal((T, T))
    s, _ = icar.sample_sequences(rng, 20000, T, 1, "angle", mu=mu)
    err = squared_errors(icar.pe_only({"P": P}, s[:, :T]), s[:, 1:])          # [n, T]
    assert_monte_carlo(theory.pe_only_loss(P, mu=mu), err[:, 1:])
    assert numpy.allclose(theory.pe_only_loss(P, phi=uniform_phi(mu)), theory.pe_only_loss(P, mu=mu))
    M, b = theory.pe_only_system(T, mu=mu)
    lam = numpy.exp(1j * rng.uniform(0, 2 * numpy.pi / mu, 20000))              # [n]
    t = numpy.arange(T)
    assert_monte_carlo(M, numpy.real(lam[:, None, None] ** (2 * (t[:, None] - t[None, :]))))
    assert_monte_carlo(b[:-1], numpy.real(lam[:, None] ** (2 * (t[:-1] - (T - 1)))))


def pe_only_statistics(s, T):
    """Per row r, the sample loss of icar.pe_only (d = 1) is p^T Q_r p - 2 V_r^T p + y2_r."""
    n = s.shape[0]
    z = numpy.conj(numpy.concatenate([numpy.zeros((n, 1)), s[:, :T - 1, 0]], 1))[:, :, None] \
        * (s[:, None, :T, 0] ** 2) * numpy.tril(numpy.ones((T, T)))            # [n, T(r), T(t)]
    y = s[:, 1:T + 1, 0]                                                       # [n, T]
    Q = numpy.real(numpy.einsum("nrt,nru->rtu", numpy.conj(z), z)) / n         # [T, T, T]
    V = numpy.real(numpy.einsum("nrt,nr->rt", numpy.conj(z), y)) / n           # [T, T]
    return Q, V, numpy.mean(numpy.abs(y) ** 2, axis=0)


def gd_pe_only(s, T, lr, steps):
    """GD from P = 0 on the mean of icar.mse(icar.pe_only) over all T positions, through its
    statistics (checked against the model for the first steps); returns P_k for k in steps."""
    Q, V, y2 = pe_only_statistics(s, T)

    def objective(P):
        return (numpy.sum((Q @ P[:, :, None])[..., 0] * P) - 2 * numpy.sum(P * V) + numpy.sum(y2)) / T

    def gradient(P):
        return 2 * ((Q @ P[:, :, None])[..., 0] - V) / T                      # [T, T]

    def model_loss(P):
        return icar.mse(icar.pe_only({"P": P}, s[:, :T]), s[:, 1:])

    P, out = numpy.zeros((T, T)), []
    for k in range(max(steps) + 1):
        if k in steps:
            out.append(P)
        if k < 3:  # the statistics are the model's loss and gradient
            numpy.testing.assert_allclose(objective(P), model_loss(P), rtol=1e-10)
            numpy.testing.assert_allclose(gradient(P), grad(model_loss)(P), atol=1e-12)
        P = P - lr * gradient(P)
    return numpy.array(out)


def test_pe_only_gd_follows_exact_path_at_narrow_angles():
    """mu = 20, T = 8, 100,000 sequences: entries of the sample M, b are within 0.002 of the
    population ones, and the sampled GD path stays within 0.002 of pe_only_trajectory."""
    T, mu, lr = 8, 20.0, 1.5
    rng = numpy.random.default_rng(11)
    s, _ = icar.sample_sequences(rng, 100000, T, 1, "angle", mu=mu)
    Q, V, _ = pe_only_statistics(s, T)
    M, b = theory.pe_only_system(T, mu=mu)
    assert numpy.max(numpy.abs(Q[-1] - M)) < 0.002 and numpy.max(numpy.abs(V[-1] - b)) < 0.002
    steps = [0, 1, 10, 100, 1000]
    path = gd_pe_only(s, T, lr, steps)
    exact = theory.pe_only_trajectory(T, mu=mu, eta=lr / T, steps=numpy.array(steps))
    assert numpy.max(numpy.abs(path - exact)) < 0.002
    assert numpy.max(numpy.abs(exact[-1] - theory.pe_only_solution(T, mu=mu))) > 0.1  # far from the end


def test_pe_only_trajectory_is_gradient_descent_on_the_population_loss():
    T, mu, eta = 6, 7.0, 0.3
    P, g = numpy.zeros((T, T)), grad(lambda P: np.sum(theory.pe_only_loss(P, mu=mu)))
    exact = theory.pe_only_trajectory(T, mu=mu, eta=eta, steps=numpy.arange(40))
    for k in range(40):
        assert numpy.max(numpy.abs(exact[k] - P)) < 1e-10
        P = P - eta * g(P)


@pytest.mark.parametrize("mu", [6.0, 1.0])
def test_pe_only_gd_converges_to_solution(mu):
    """Sampled GD reaches pe_only_solution; full-circle angles (mu = 1) give p_T = 1."""
    T, lr = 6, 1.8
    rng = numpy.random.default_rng(12)
    s, _ = icar.sample_sequences(rng, 20000, T, 1, "angle", mu=mu)
    P = gd_pe_only(s, T, lr, [3000])[0]
    star = theory.pe_only_solution(T, mu=mu)
    assert numpy.max(numpy.abs(P - star)) < 1e-3
    assert numpy.allclose(theory.pe_only_trajectory(T, mu=mu, eta=lr / T, steps=3000), star, atol=1e-6)
    if mu == 1.0:
        assert numpy.allclose(star, numpy.diag((numpy.arange(T) > 0).astype(float)), atol=1e-12)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call", [
    lambda: theory.gd_step_size(1, 3),
    lambda: theory.gd_loss(5, 3, loss="first"),
    lambda: theory.population_loss(numpy.eye(3), numpy.eye(4), "orthogonal"),
    lambda: theory.population_loss(numpy.eye(3), numpy.eye(4), "haar"),
    lambda: theory.minimiser(4, 3, "orthogonal", kappa=0.5),
    lambda: theory.minimiser(4, 4, "unitary", kappa=0.5),
    lambda: theory.minimiser(4, 4, "unitary", c=0.0),
    lambda: theory.pe_only_system(5),
    lambda: theory.pe_only_system(5, mu=2.0, phi=numpy.cos),
    lambda: theory.pe_only_trajectory(5, mu=2.0, eta=0.1, steps=-1),
    lambda: theory.train_population(2, 4, 5, "unitary", 10.0, 200, numpy.random.default_rng(0)),
])
def test_user_errors_raise_value_error(call):
    with pytest.raises(ValueError):
        call()
