"""Tests of evaluate.py's causal tools (paper.md section 6) on models with known answers.

In-context learners: M1 with A = I, B = eta I (one GD step, step eta) and
theory.raw_token_gd_construction (a two-layer raw-token M4: one GD step, step eta / r).
A first-k lookup: least squares fitted on the first k tokens only, applied to x_r, a plain
function of x (it reads W off the start, as a model trained from a fixed s_0 may).
Every tool must tell the two apart: the switch of W, the replaced tokens, the influence map.
Sizes are small (d = 3, T = 12): the whole file runs in seconds.
"""
import autograd.numpy as anp
import numpy as np
import pytest

import evaluate
import icar
import theory

D, T, N, K = 3, 12, 256, 4   # state size, input positions, sequences, tokens the lookup reads
ETA = 0.1                    # M1's step
BETA = 40.0                  # the construction's sharpness: leakage exp(-40), far below rounding


@pytest.fixture(scope="module")
def data():
    s, W = icar.sample_sequences(np.random.default_rng(0), N, T, D, "haar", s1="random")
    return s, W


def m1(eta=ETA):
    """M1 in block form, A = I, B = eta I: f_r = eta sum_{t<=r} s_t s_{t-1}^* s_r."""
    return evaluate.model_predictor({"A": np.eye(D), "B": eta * np.eye(D)})


def construction(eta=1.0):
    """The two-layer raw-token M4 of one GD step with step eta / r at position r >= 1."""
    params, cfg = theory.raw_token_gd_construction(D, T, eta, BETA)
    return evaluate.model_predictor(params, cfg), params, cfg


def lookup(x):
    """The first-K lookup: W_hat = C S^{-1} from the K - 1 transitions among x_0..x_{K-1},
    f_r = W_hat x_r from r = K - 1 on (0 before: it stays causal). [n, T, d] -> [n, T, d]."""
    first = x[:, :K]                                                       # [n, K, d]
    S = anp.swapaxes(first[:, :-1], 1, 2) @ first[:, :-1]                  # [n, d, d]
    C = anp.swapaxes(first[:, 1:], 1, 2) @ first[:, :-1]                   # [n, d, d]: sum x_{t+1} x_t^T
    W_hat_T = anp.linalg.solve(S, anp.swapaxes(C, 1, 2))                   # S^{-1} C^T = W_hat^T
    started = (np.arange(x.shape[1]) >= K - 1)[None, :, None]              # [1, T, 1]
    return (x @ W_hat_T) * started                                         # [n, T, d]


# ----------------------------------------------------------------------------- interventions

def test_interventions_at_no_position_change_nothing(data):
    s, W = data
    assert np.array_equal(evaluate.replace_tokens(s, np.roll(s, 1, axis=0), []), s)
    s2, _ = evaluate.switch_context(np.random.default_rng(1), s, W, T)
    assert np.array_equal(s2, s)


def test_switch_follows_w_then_another_sequences_w(data):
    s, W = data
    s2, W2 = evaluate.switch_context(np.random.default_rng(1), s, W, K)
    assert np.array_equal(s2[:, :K + 1], s[:, :K + 1])
    np.testing.assert_allclose(s2[:, K + 1:], np.einsum("nij,ntj->nti", W2, s2[:, K:-1]), atol=1e-12)
    # W2 is another sequence's W (a derangement of the batch): never the sequence's own
    match = np.all(np.isclose(W2[:, None], W[None]), axis=(2, 3))          # [n, n]
    assert np.all(match.sum(1) == 1) and not np.any(np.diag(match))
    s3, _ = evaluate.switch_context(W2, s, W, K)                            # W2 given directly
    np.testing.assert_array_equal(s3, s2)


def test_replace_tokens_takes_the_other_sequences_states(data):
    s, _ = data
    other = np.roll(s, 1, axis=0)
    out = evaluate.replace_tokens(s, other, [1, 3])
    np.testing.assert_array_equal(out[:, [1, 3]], other[:, [1, 3]])
    np.testing.assert_array_equal(out[:, [0, 2] + list(range(4, T + 1))], s[:, [0, 2] + list(range(4, T + 1))])


# ----------------------------------------------------------------------------- switch

def test_in_context_learners_recover_after_a_switch_as_one_gd_step(data):
    s, W = data
    s2, _ = evaluate.switch_context(np.random.default_rng(1), s, W, K)
    # M1 is one GD step with step ETA: its loss equals gd1's with that step, at every position
    sc = evaluate.score(m1(), s2, gd_steps=1, eta=np.full(T, ETA))
    np.testing.assert_allclose(sc["model"], sc["gd1"], rtol=1e-12)
    # the construction is one GD step with step eta / r (r >= 1), up to exp(-BETA) leakage
    predict, _, _ = construction()
    sc_c = evaluate.score(predict, s2, gd_steps=1, eta=1.0 / np.maximum(np.arange(T), 1))
    np.testing.assert_allclose(sc_c["model"][1:], sc_c["gd1"][1:], rtol=1e-9)
    # with the optimal step of the last position, both equal the optimal-step GD step there,
    # and recover after the switch as it does: within 0.06 of it from 3 positions after
    eta = evaluate.optimal_gd_step(s2)[-1]
    for predict in (m1(eta), construction(eta * (T - 1))[0]):
        found = evaluate.score(predict, s2)
        assert found["model"][-1] == pytest.approx(found["gd1"][-1], rel=1e-9)
        np.testing.assert_allclose(found["model"][K + 3:], found["gd1"][K + 3:], atol=0.06)
        assert found["model"][-1] < 0.5 * found["model"][K]                 # recovered
        assert found["model"][-1] < 0.5 * found["zero"][-1]


def test_first_k_lookup_fails_after_a_switch(data):
    s, W = data
    clean = evaluate.score(lookup, s)
    assert np.all(clean["model"][K - 1:] < 1e-20)                           # exact before any switch
    s2, _ = evaluate.switch_context(np.random.default_rng(1), s, W, K)
    sc = evaluate.score(lookup, s2)
    # never recovers: at or above the zero predictor (E|W s - W2 s|^2 = 2 for independent W, W2)
    assert np.all(sc["model"][K:] > 0.9 * sc["zero"][K:])
    assert sc["model"][-1] > 1.5 * sc["gd1"][-1]


# ----------------------------------------------------------------------------- other start

def test_a_start_of_the_other_law_breaks_a_start_lookup_not_the_learner():
    """A lookup that assumes the fixed start s_0 = 1/sqrt(d) (a Krylov sequence of W from a
    known vector) is exact on fixed-start data, wrong on random starts; M1 scores alike."""
    c = np.ones(D) / np.sqrt(D)
    krylov = lambda x: lookup(anp.concatenate([c * anp.ones_like(x[:, :1]), x[:, 1:]], axis=1))  # noqa: E731
    rng = np.random.default_rng(8)
    fixed, _ = icar.sample_sequences(rng, N, T, D, "haar", s1="fixed")
    rand, _ = icar.sample_sequences(rng, N, T, D, "haar", s1="random")
    assert np.all(evaluate.score(krylov, fixed)["model"][K - 1:] < 1e-20)
    assert np.all(evaluate.score(krylov, rand)["model"][K - 1:] > 1.0)       # above zero's 1
    on_fixed, on_rand = evaluate.score(m1(), fixed), evaluate.score(m1(), rand)
    assert abs(on_fixed["model"][-1] - on_rand["model"][-1]) < 0.1
    assert on_rand["model"][-1] < 0.5 * on_rand["zero"][-1]


# ----------------------------------------------------------------------------- replacement

def test_replaced_first_tokens_break_the_lookup_not_the_learners(data):
    s, _ = data
    s3 = evaluate.replace_tokens(s, np.roll(s, 1, axis=0), list(range(1, K)))
    late = slice(T - 4, T)
    sc_lookup = evaluate.score(lookup, s3)
    assert np.mean(sc_lookup["model"][late]) > 0.9 * np.mean(sc_lookup["zero"][late])
    predict, _, _ = construction()
    for p in (m1(), predict):  # 4 broken transitions of 11: the loss moves, stays below zero's
        before, after = evaluate.score(p, s)["model"][late], evaluate.score(p, s3)["model"][late]
        assert np.mean(after) < np.mean(before) + 0.3 and np.mean(after) < 0.7


# ----------------------------------------------------------------------------- influence

def m1_influence_closed_form(s, eta):
    """[T, T]: ||d f_r / d s_t||_F of f_r = eta sum_{t'=1}^{r} s_{t'} s_{t'-1}^* s_r, mean over
    sequences. Its Jacobian in s_t (holomorphic part J, antiholomorphic part K):
      t < r: J = a I (a = s_{t-1}^* s_r, 0 at t = 0), K = s_{t+1} s_r^T (the key of t + 1)
             -> |J|^2 + |K|^2 = d |a|^2 + |s_{t+1}|^2 |s_r|^2 (+ 2 a s_{t+1}.s_r if real);
      t = r: J = a I + C_r (a = s_{r-1}^* s_r), K = 0 -> d |a|^2 + 2 Re(conj(a) tr C_r) + |C_r|^2.
    For real data J and K add into one matrix (the cross term); complex data keep them apart."""
    x = s[:, :-1]
    n, T, d = x.shape
    real = not np.iscomplexobj(x)
    C, _ = evaluate.context_sums(x)
    out = np.zeros((n, T, T))
    for r in range(T):
        for t in range(r):
            a = np.sum(np.conj(x[:, t - 1]) * x[:, r], -1) if t > 0 else np.zeros(n)
            u, v = x[:, t + 1], x[:, r]
            sq = d * np.abs(a) ** 2 + np.sum(np.abs(u) ** 2, -1) * np.sum(np.abs(v) ** 2, -1)
            out[:, r, t] = sq + (2 * a * np.sum(u * v, -1) if real else 0)
        a = np.sum(np.conj(x[:, r - 1]) * x[:, r], -1) if r > 0 else np.zeros(n)
        tr = np.trace(C[:, r], axis1=-2, axis2=-1)
        out[:, r, r] = (d * np.abs(a) ** 2 + 2 * np.real(np.conj(a) * tr)
                        + np.sum(np.abs(C[:, r]) ** 2, axis=(-1, -2)))
    return np.mean(eta * np.sqrt(out), axis=0)


@pytest.mark.parametrize("family", ["haar", "unitary"])
def test_influence_map_of_m1_equals_its_closed_form(family):
    s, _ = icar.sample_sequences(np.random.default_rng(3), 16, 7, D, family, s1="random")
    found = evaluate.influence_map(m1(), s)
    np.testing.assert_allclose(found, m1_influence_closed_form(s, ETA), rtol=1e-10, atol=1e-14)
    assert np.all(found[np.triu_indices(7, 1)] == 0)                         # causal


def test_influence_of_learners_spreads_over_the_context_lookups_does_not(data):
    s, _ = data
    x = s[:64]
    predict, _, _ = construction()
    r = T - 1
    for p in (m1(), predict):
        I = evaluate.influence_map(p, x)
        assert np.sum(I[r, K:r - 1]) > 0.3 * np.sum(I[r])                  # past the first K tokens
        assert np.all(I[K + 1:, K:-1][np.tril_indices(T - K - 1, -1)] > 1e-3)
    I = evaluate.influence_map(lookup, x)
    beyond = np.tril(np.ones((T, T)), -1)[K:, K:] > 0                        # K <= t < r
    assert np.all(I[K:, K:][beyond] == 0)                                    # exactly: no path
    assert np.all(np.diag(I)[K - 1:] > 0)                                    # but the query t = r


def test_construction_first_layer_copies_the_previous_token(data):
    s, _ = data
    _, params, cfg = construction()
    I1 = evaluate.influence_map(lambda x: evaluate.m4_streams(params, x, cfg)[1], s[:16])
    r = np.arange(1, T)
    # layer 1 writes s_{r-1} into B3 (an identity block: norm sqrt(d)); nothing older
    np.testing.assert_allclose(I1[r, r - 1], np.sqrt(D), rtol=1e-9)
    assert np.all(np.tril(I1, -2) < 1e-9)


def test_m4_streams_end_in_the_prediction(data):
    s, W = data
    _, params, cfg = construction()
    h = evaluate.m4_streams(params, s[:8, :-1], cfg)
    assert len(h) == 3 and h[0].shape == (8, T, 3 * D)
    np.testing.assert_allclose(h[-1] @ params["W_out"] + params["b_out"],
                               icar.transformer(params, s[:8, :-1], cfg), rtol=1e-13, atol=1e-15)
    # M4 on augmented tokens (0, s_t, s_{t-1}): the same tools, built from the states
    acfg = icar.transformer_config(d_in=3 * D, d_out=D, T=T, layers=2, heads=2)
    aparams = icar.init_params("transformer", np.random.default_rng(11), cfg=acfg)
    h = evaluate.m4_streams(aparams, s[:8, :-1], acfg)
    np.testing.assert_array_equal(h[0], icar.augment(s[:8, :-1]))
    predict = evaluate.model_predictor(aparams, acfg)
    np.testing.assert_allclose(h[-1] @ aparams["W_out"] + aparams["b_out"], predict(s[:8, :-1]), rtol=1e-13)
    I = evaluate.influence_map(predict, s[:8])
    assert np.all(np.triu(I, 1) == 0) and np.all(np.diag(I) > 0)
    assert evaluate.head_ablation(aparams, acfg, s[:8])["ablated"].shape == (2, 2)
    assert evaluate.stream_w_r2(aparams, acfg, s[:64], W[:64], s[64:96], W[64:96]).shape == (3, T)


# ----------------------------------------------------------------------------- head ablation

def test_head_ablation(data):
    s, _ = data
    rng = np.random.default_rng(4)
    cfg = icar.transformer_config(d_in=D, d_out=D, T=T, layers=2, heads=2, repeat=2, positional=True,
                                  residual=False)
    params = icar.init_params("transformer", rng, cfg=cfg)
    for layer in params["layers"]:
        layer["b_V"] = rng.standard_normal(layer["b_V"].shape)                # value biases count too
    # removing a head is the same as deleting its slices (transformer_layer reads H off the arrays)
    loss = lambda p: np.mean(evaluate.position_loss(icar.transformer(p, s[:32, :-1], cfg), s[:32, 1:]))  # noqa: E731
    found = evaluate.head_ablation(params, cfg, s[:32])
    assert found["ablated"].shape == (2, 2)
    assert found["full"] == pytest.approx(loss(params), rel=1e-14)
    per_head = ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V")
    for l in range(2):
        for h in range(2):
            layers = list(params["layers"])
            layers[l] = {k: v[[1 - h]] if k in per_head else v for k, v in layers[l].items()}
            assert found["ablated"][l, h] == pytest.approx(loss(dict(params, layers=layers)), rel=1e-12)
    params["layers"][0]["W_V"][1] = 0.0                                      # head 1 of layer 0: silent
    params["layers"][0]["b_V"][1] = 0.0
    found = evaluate.head_ablation(params, cfg, s[:32])
    assert found["ablated"][0, 1] == found["full"]                           # nothing to remove
    assert np.all(found["ablated"][[0, 1, 1], [0, 0, 1]] != found["full"])
    # the construction has one head per layer and needs both: without either it predicts 0
    _, cparams, ccfg = construction()
    found = evaluate.head_ablation(cparams, ccfg, s)
    zero = np.mean(evaluate.position_loss(0 * s[:, 1:], s[:, 1:]))
    np.testing.assert_allclose(found["ablated"], zero, rtol=1e-12)
    assert found["full"] < 0.6 * zero


# ----------------------------------------------------------------------------- reading W

def test_linear_probe_w_reads_w_where_it_is_and_nothing_from_noise():
    rng = np.random.default_rng(5)
    for family in ("haar", "unitary"):
        _, W_fit = icar.sample_sequences(rng, 400, 2, D, family)
        _, W_eval = icar.sample_sequences(rng, 200, 2, D, family)
        noise = lambda n: rng.standard_normal((n, 2, 6))                     # noqa: E731
        with_w = [np.concatenate([W.reshape(len(W), 1, -1).repeat(2, 1), noise(len(W))], -1)
                  for W in (W_fit, W_eval)]                                 # [n, 2, d^2 + 6]
        r2 = evaluate.linear_probe_w(with_w[0], W_fit, with_w[1], W_eval, ridge=0.0)
        np.testing.assert_allclose(r2, 1.0, atol=1e-10)
        r2 = evaluate.linear_probe_w(noise(400), W_fit, noise(200), W_eval, ridge=1e-6)
        assert r2.shape == (2,) and np.all(r2 < 0.02)
    # complex W: targets are the real and imaginary parts; cos and sin of a uniform phase are
    # uncorrelated with equal variance, so the real part alone explains half (in population)
    re = [np.real(W).reshape(len(W), -1) for W in (W_fit, W_eval)]
    r2 = evaluate.linear_probe_w(re[0], W_fit, re[1], W_eval, ridge=0.0)
    assert abs(r2 - 0.5) < 0.05                                               # finite samples


def test_stream_w_r2_sees_what_a_fixed_start_gives_away():
    """s_1 = W s_0 with s_0 known is d linear functions of W's d^2 entries; Haar entries are
    uncorrelated with variance 1/d, so a linear read-out explains 1/d of vec(W) (population
    R^2 = 1/d). With a random s_0 the covariance of s_1 with W is 0: R^2 about 0."""
    _, params, cfg = construction()
    rng = np.random.default_rng(10)
    for s1, want in (("fixed", 1 / D), ("random", 0.0)):
        s_fit, W_fit = icar.sample_sequences(rng, 3000, T, D, "haar", s1=s1)
        s_eval, W_eval = icar.sample_sequences(rng, 1000, T, D, "haar", s1=s1)
        r2 = evaluate.stream_w_r2(params, cfg, s_fit, W_fit, s_eval, W_eval)  # [L+1, T]
        assert r2.shape == (3, T)
        assert abs(r2[0, 1] - want) < 0.04
        assert np.all(r2[:, 0] < 0.01)                                       # s_0 alone says nothing


def test_fresh_query_probe_reads_one_gd_step_and_its_step_size(data):
    """The probe for the figures: M1 (step eta), the construction (step eta / r), a lookup (W)."""
    s, W = data
    x = s[:32]
    C, _ = evaluate.context_sums(x[:, :-1])
    C_before = np.concatenate([np.zeros_like(C[:, :1]), C[:, :-1]], axis=1)  # C_{r-1}
    found = evaluate.fresh_query_probe(m1(), x, np.random.default_rng(6), W[:32])
    np.testing.assert_allclose(found["Gamma"], ETA * C_before, atol=1e-13)
    assert np.isnan(found["step"][1])                                       # no transition before s_1
    np.testing.assert_allclose(found["step"][2:], ETA, rtol=1e-12)
    predict, _, _ = construction(eta=0.5)
    found = evaluate.fresh_query_probe(predict, x, np.random.default_rng(6), W[:32])
    steps = 0.5 / np.arange(1, T)
    np.testing.assert_allclose(found["Gamma"][:, 1:], steps[None, :, None, None] * C_before[:, 1:], atol=1e-12)
    np.testing.assert_allclose(found["step"][2:], steps[1:], rtol=1e-10)
    assert np.all(found["cos_gd1"][2:] > 1 - 1e-10)
    # the lookup applies W_hat = W (noise-free, K - 1 >= d transitions) to its query from r = K on
    found = evaluate.fresh_query_probe(lookup, x, np.random.default_rng(6), W[:32])
    np.testing.assert_allclose(found["err_W"][K:], 0.0, atol=1e-10)


def test_fresh_query_probe_compares_with_the_optimal_step_for_the_transitions_before_s_r(data):
    """Its gd1 reference at r is eta_r C_{r-1}, eta_r the optimal one-step size for the r - 1
    transitions before s_r (optimal_gd_step shifted by one, 0 at r = 0): for M1 (Gamma = ETA
    C_{r-1}) err_gd1 is |ETA - eta_r| / eta_r; an explicit eta is used as given."""
    s, W = data
    x = s[:32]
    eta = np.concatenate([[0.0], evaluate.optimal_gd_step(x, 1)[:-1]])
    found = evaluate.fresh_query_probe(m1(), x, np.random.default_rng(6), W[:32])
    assert np.isnan(found["err_gd1"][0]) and np.isnan(found["err_gd1"][1])  # C_{r-1} = 0
    np.testing.assert_allclose(found["err_gd1"][2:], np.abs(ETA - eta[2:]) / eta[2:], rtol=1e-9)
    given = evaluate.fresh_query_probe(m1(), x, np.random.default_rng(6), W[:32], eta=np.full(T, ETA))
    np.testing.assert_allclose(given["err_gd1"][2:], 0.0, atol=1e-12)


# ----------------------------------------------------------------------------- bad input

_S, _W = icar.sample_sequences(np.random.default_rng(9), 4, 5, 2, "haar")


@pytest.mark.parametrize("call, message", [
    (lambda: evaluate.influence_map(None, _S), "predict must be a function"),
    (lambda: evaluate.influence_map(lambda x: x[:, 0], _S), r"predict must return \[n, T, K\]"),
    (lambda: evaluate.score(lambda x: x, _S, eta=np.ones(3)), r"eta must have shape \[T\]"),
    (lambda: evaluate.switch_context(np.random.default_rng(0), _S, _W, 6), "k must be at most T"),
    (lambda: evaluate.switch_context(np.random.default_rng(0), _S[:1], _W[:1], 2), "n >= 2"),
    (lambda: evaluate.switch_context(np.eye(2), _S, _W, 2), r"source must be .* W2 of shape"),
    (lambda: evaluate.replace_tokens(_S, _S[:2], [1]), "other must have the shape of s"),
    (lambda: evaluate.replace_tokens(_S, _S, [6]), "positions must be integers in 0..T"),
    (lambda: evaluate.head_ablation({"A": np.eye(2), "B": np.eye(2)}, None, _S), "must be those of an M4"),
    (lambda: evaluate.linear_probe_w(np.ones((4, 3)), _W, np.ones((4, 3)), _W, ridge=-1), "ridge must be"),
    (lambda: evaluate.linear_probe_w(np.ones((3, 3)), _W, np.ones((4, 3)), _W), "the same n"),
    (lambda: evaluate.fresh_query_probe(lambda x: x, _S, 0), "rng must be a numpy.random.Generator"),
    (lambda: evaluate.model_predictor({"Q": np.eye(2)}), "params must be those of M1"),
])
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_query_probe_of_figs_5_and_7_reads_one_gd_step_on_m1_and_the_construction(data):
    """evaluate.probe (the derivative along the query path, Figs. 5 and 7's panels) reads
    eta C_r on M1 and (eta / r) C_r on the construction, whose one GD step takes its query from
    x_r alone; what it reads on a trained model is the query path only (see fresh_query_probe)."""
    s, W = data[0][:16], data[1][:16]
    C, _ = evaluate.context_sums(s[:, :-1])                                 # [n, T, d, d]
    found = evaluate.probe(evaluate.query_predictor({"A": np.eye(D), "B": ETA * np.eye(D)}, s[:, :-1]), s, W)
    np.testing.assert_allclose(found["Gamma"], ETA * C, atol=1e-12)
    _, params, cfg = construction()
    found = evaluate.probe(evaluate.query_predictor(params, s[:, :-1], cfg), s, W)
    r = np.arange(1, T)
    np.testing.assert_allclose(found["Gamma"][:, r], C[:, r] / r[None, :, None, None], atol=1e-9)
    np.testing.assert_allclose(found["cos_gd1"][1:], 1.0, atol=1e-9)


# ----------------------------------------------------------------------------- score's references

def test_score_takes_the_optimal_step_of_each_k_and_equals_the_baselines_on_clean_data(data):
    """Without eta, score's k-step GD reference uses the optimal step for k steps (not the
    one-step size for every k): on clean data its references are evaluate.baselines'."""
    s, W = data
    sc = evaluate.score(m1(), s, gd_steps=3)
    base = evaluate.baselines(s, W, gd_steps=3)
    assert set(sc) == {"model", "least_squares", "gd1", "gd2", "gd3", "zero"}
    for key in ("least_squares", "gd1", "gd2", "gd3", "zero"):
        np.testing.assert_allclose(sc[key], base[key], rtol=1e-12, atol=1e-15, err_msg=key)
    x, y = s[:, :-1], s[:, 1:]
    C, S = evaluate.context_sums(x)
    one_step_size = evaluate.optimal_gd_step(s, 1)
    for k in (2, 3):  # the one-step size is a different reference: the test can tell
        other = evaluate.position_loss(evaluate.gd_prediction(C, S, x, one_step_size, k), y)
        assert np.max(np.abs(other - sc[f"gd{k}"])) > 1e-3, k
