"""evaluate: what a trained model of icar.py is scored against, and how it is read.

Baselines (Figs. 5, 7): per-position test losses of the oracle W, least squares, k steps of
GD from 0 with the optimal step per position, the last value and zero (`baselines`), all in
float64 / complex128 whatever the model's dtype. Their pieces are public: `context_sums`
(C_r, S_r), `gd_prediction`, `optimal_gd_step`, `least_squares`, `position_loss`.

Reading a model: `probe`, the in-context mapping d f_r / d x_r by autograd, through
`query_predictor` (where x_r enters each model as the query; chosen by the parameters'
keys, and for M4 by its icar.transformer_config); `weight_blocks` (M1 and M4 on augmented
tokens in M1's layout); `previous_token_share` and `readout_r2` (paper.md section 5: does
the first layer of a raw-token M4 copy s_{r-1} into position r), together `mechanism`.

Positions are 0-based: the prediction at position r (of s_{r+2} in paper.md's 1-based
states) has seen r transitions (s_t, s_{t+1}).

The probe differentiates with respect to the current state in its role as the query of the
in-context mapping, f_r = Gamma(context) x_r, holding the context (which also contains s_r)
fixed; the total derivative d f_r / d s_r would add d Gamma / d s_r terms (for M1 with
A = I, B = eta I: eta (s_{r-1}^* s_r) I).

Causal tests (paper.md section 6: does a model learn in context, or read W off a known start?),
for any model as predict(x) (`model_predictor`, chosen by `model_kind`):
    influence_map        [T, T] mean ||d f_r / d x_t||_F, of the output or of an M4 stream (m4_streams)
    score                per-position losses next to least squares, k GD steps and zero, on the
                         same (possibly intervened) data: a start of the other law
                         (icar.sample_sequences with the other s1), switch_context (W -> W2 at
                         position k), replace_tokens (states from another sequence)
    head_ablation        [L, H] loss of an M4 with one head's value map removed
    linear_probe_w       R^2 of a ridge read-out of vec(W) from features; stream_w_r2 per M4
                         stream and position
    fresh_query_probe    the map applied to a fresh current state (in every role), context
                         fixed: reads one GD step and its step size where `probe`'s query-only
                         derivative points away from W (raw-token M4 without residual; see there)
"""
import math

import autograd.numpy as np
import numpy
from autograd import grad, make_vjp

import icar

_swap = icar.swap


# ----------------------------------------------------------------------------- baselines

def _float64(x):
    """x as float64, or complex128 if complex, whatever its precision: every baseline and probe
    reference is computed so, as it must not depend on the training dtype (at float32 the
    pseudo-inverse of a rank-deficient S_r inverts rounding noise: least squares read losses
    in the hundreds at 2-4 transitions of d = 5 Haar data)."""
    x = numpy.asarray(x)
    return x.astype(numpy.complex128 if numpy.iscomplexobj(x) else numpy.float64)


def context_sums(x):
    """C_r = sum_{t<r} x_{t+1} x_t^*, S_r = sum_{t<r} x_t x_t^*: the r transitions seen at
    position r. x [n, T, d] -> C, S [n, T, d, d]."""
    n, T, d = icar.check_data(x, "x")
    zero = numpy.zeros((n, 1, d, d), dtype=x.dtype)
    C = numpy.cumsum(x[:, 1:, :, None] * numpy.conj(x[:, :-1, None, :]), axis=1)  # [n, T-1, d, d]
    S = numpy.cumsum(x[:, :-1, :, None] * numpy.conj(x[:, :-1, None, :]), axis=1)
    return numpy.concatenate([zero, C], axis=1), numpy.concatenate([zero, S], axis=1)


def _apply(M, x):
    """M x per sequence and position."""
    return (M @ x[..., None])[..., 0]                          # [n, T, d, d] @ [n, T, d] -> [n, T, d]


def position_loss(f, y):
    """[n, T, d] -> [T]: the test loss per position, squared error summed over d, averaged over sequences."""
    if icar.check_data(f, "f") != icar.check_data(y, "y"):
        raise ValueError(f"f and y must have the same shape [n, T, d], got f {numpy.shape(f)}, y {numpy.shape(y)}")
    return numpy.mean(numpy.sum(numpy.abs(f - y) ** 2, axis=-1), axis=0)


def gd_prediction(C, S, x, eta, k):
    """W_k x_r after k GD steps from 0, step eta [T], on L(W) = 1/2 sum_t ||s_{t+1} - W s_t||^2:
    W_k = eta C sum_{j<k} (I - eta S)^j, applied to vectors (no matrix powers). C, S [n, T, d, d]
    (context_sums), x [n, T, d], eta [T], k >= 1."""
    n, T, d = icar.check_data(x, "x")
    for name, M in (("C", C), ("S", S)):
        if icar.check_data(M, name, "n, T, d, d") != (n, T, d, d):
            raise ValueError(f"{name} must have shape [n, T, d, d] = {(n, T, d, d)} to match x, got {numpy.shape(M)}")
    if icar.check_data(eta, "eta", "T") != (T,):
        raise ValueError(f"eta must have shape [T] = {(T,)} to match x, got shape {numpy.shape(eta)}")
    k = icar.check_int("k", k, 1)
    eta = eta[None, :, None]                                         # [1, T, 1]
    v, total = x, x
    for _ in range(k - 1):  # the k steps of an iterative algorithm, not a loop over data
        v = v - eta * _apply(S, v)                                   # [n, T, d]
        total = total + v
    return eta * _apply(C, total)                                    # [n, T, d]


def _check_sequences(s, W=None, names=("s", "W")):
    """(n, T, d) of finite float or complex sequences s [n, T+1, d] (T >= 1) and, if given,
    their context matrices W [n, d, d]: the data of every baseline and probe (names: of s, W)."""
    n, T1, d = icar.check_data(s, names[0], finite=True)
    if T1 < 2:
        raise ValueError(f"{names[0]} must have shape [n, T+1, d] with T >= 1, got shape {numpy.shape(s)}")
    if W is not None and icar.check_data(W, names[1], "n, d, d", finite=True) != (n, d, d):
        raise ValueError(f"{names[1]} must have shape [n, d, d] = {(n, d, d)} to match {names[0]}, "
                         f"got shape {numpy.shape(W)}")
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
    C, S = context_sums(x)
    if k == 1:
        g = _apply(C, x)                                             # [n, T, d]
        num = numpy.sum(numpy.real(numpy.conj(g) * y), axis=(0, 2))
        den = numpy.sum(numpy.abs(g) ** 2, axis=(0, 2))
        return numpy.divide(num, den, out=numpy.zeros_like(num), where=den > 0)
    lam = numpy.median(numpy.linalg.eigvalsh(S)[..., -1], axis=0)   # [T]
    lo, hi = numpy.zeros_like(lam), numpy.where(lam > 0, 2 / numpy.where(lam > 0, lam, 1), 0.0)

    def loss(eta):
        return position_loss(gd_prediction(C, S, x, eta, k), y)

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
    C, S = context_sums(_float64(s)[:, :-1])
    return C @ numpy.linalg.pinv(S, rtol=rtol, hermitian=True)


def baselines(s, W, gd_steps=4):
    """Per-position test losses [T] on sequences s [n, T+1, d] with context matrices W [n, d, d]:
    "oracle" (W s_r), "least_squares", "gd1".."gd{gd_steps}" (k GD steps from 0 with the
    optimal step per position), "last_value" (s_r), "zero"; in float64 whatever s's dtype."""
    if W is None:
        raise ValueError("W must be the context matrices [n, d, d] of s, got None")
    _check_sequences(s, W)
    gd_steps = icar.check_int("gd_steps", gd_steps, 0)
    s, W = _float64(s), _float64(W)
    x, y = s[:, :-1], s[:, 1:]
    out = {"oracle": position_loss(_apply(W[:, None], x), y),
           "least_squares": position_loss(_apply(least_squares(s), x), y)}
    C, S = context_sums(x)
    for k in range(1, gd_steps + 1):
        out[f"gd{k}"] = position_loss(gd_prediction(C, S, x, optimal_gd_step(s, k), k), y)
    out["last_value"] = position_loss(x, y)
    out["zero"] = position_loss(numpy.zeros_like(y), y)
    return out



# ----------------------------------------------------------------------------- probes

def query_predictor(params, s, cfg=None):
    """predict(x) -> [n, T, d]: the model with parameters `params` on context s [n, T, d],
    with the current state at each position r replaced by x_r only where it acts as the
    query of the in-context mapping. The model is read from params' keys: M1 (A, B or W_KQ,
    W_V), M2 (A, B, P), M3 (P), M4 (layers, ...; cfg is its icar.transformer_config, on
    augmented tokens (0, s_t, s_{t-1}) when d_in = 3 d_out, on raw tokens when d_in = d_out).

    M1: f_r = B (sum_{t<=r} s_t s_{t-1}^*) A x_r (full form: x_r in the query token only).
    M4: x_r feeds position r's queries and residual stream; keys and values keep s_r.
    M2, M3 (query s_{r-1}): x_r replaces the value of the newest token t = r for query r.
    predict(s) is the model's ordinary prediction; predict is linear in x for M1, M2, M3.
    """
    icar.check_data(s, "s")
    kind = model_kind(params, cfg)
    model_predictor(params, cfg)(s[:1])  # the model's own checks of params and s, on one sequence
    if kind.startswith("M4"):
        return (_query_augmented_m4 if kind == "M4 augmented" else _query_raw_m4)(params, s, cfg)
    return {"M1": _query_m1, "M2": _query_m2, "M3": _query_m3}[kind](params, s)


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

    This asks how f_r moves with x_r AS THE QUERY only. Where a model reads its current state
    elsewhere (a raw-token M4 without residual reads it through the value of key t = r, and
    LayerNorm makes its query path nearly scale-free), the answer is not the in-context map:
    cosine -0.48 to W for a quick random-start two-layer raw-token M4 that learns in context.
    `fresh_query_probe` asks the better-posed question (the map applied to a fresh state in
    every role, context fixed); its docstring gives the numbers.
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
    def f(u):
        out = predict(x0 + u)
        if numpy.shape(out) != (n, T, d):
            raise ValueError(f"predict must return [n, T, d] = {(n, T, d)}, got shape {numpy.shape(out)}")
        return out

    rows = []
    for i in range(d):
        parts = [grad(lambda u: np.sum(np.real(f(u)[..., i])))(u0)]
        if not real:
            parts.append(grad(lambda u: np.sum(np.imag(f(u)[..., i])))(u0))
        rows.append(parts[0] if real else parts[0] + 1j * parts[1])     # [n, T, d]: d f_i / d x
    Gamma = numpy.stack([numpy.asarray(r) for r in rows], axis=2)       # [n, T, d, d]
    host, G = _float64(s), _float64(Gamma)
    C, _ = context_sums(host[:, :-1])
    eta = optimal_gd_step(host, 1) if eta is None else _float64(eta)
    refs = {"ls": least_squares(host), "gd1": eta[None, :, None, None] * C}
    if W is not None:
        refs = dict(W=numpy.broadcast_to(_float64(W)[:, None], G.shape), **refs)
    return dict(Gamma=Gamma, **_compare(G, refs))


def _compare(G, refs):
    """err_<name>, cos_<name> [T] of maps G [n, T, d, d] to each reference R [n, T, d, d] of
    refs: the relative Frobenius error ||G - R|| / ||R|| and the cosine (real part of the
    Frobenius inner product), averaged over sequences; NaN where R is 0 for every sequence."""
    out = {}
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



def weight_blocks(params, d):
    """Key-query and value matrices in M1's layout, with the share of their squared Frobenius
    mass in the blocks one GD step uses (key-query: key s_{t-1} x query s_r; value: s_t).

    M1: W_KQ, W_V [3d, 3d] (block form embedded at W_KQ's (3, 2), W_V's (1, 2) blocks).
    M4 augmented, per layer and head: W_KQ = W_K W_Q^T (rows: key coordinates, columns:
    query coordinates), value map V = (W_V W_O W_out)^T [d, 3d] read through the final
    read-out, ignoring LayerNorm and later layers. Returns KQ [L, H, 3d, 3d], V [L, H, *, 3d],
    share_KQ and share_V [L, H].
    """
    d = icar.check_int("d", d, 1)
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict of arrays, got {type(params).__name__}")
    m1 = "layers" not in params
    if m1:
        size = 3 * d if icar.check_params("params", params, ("A", "B"), ("W_KQ", "W_V")) == ("W_KQ", "W_V") else d
        for key in params:
            icar.check_shape(key, params[key], (size, size))
    else:
        icar.check_params("params", params, ("layers", "W_out", "b_out"))  # no "pos": augmented tokens
        if not isinstance(params["layers"], (list, tuple)) or not params["layers"]:
            raise ValueError(f"params['layers'] must be a list of at least one layer, got {params['layers']!r:.80}")
        for i, layer in enumerate(params["layers"]):
            icar.check_params(f"params['layers'][{i}]", layer, icar.LAYER_KEYS)
            if getattr(layer["W_Q"], "ndim", None) == 3 and numpy.shape(layer["W_Q"])[-2] != 3 * d:
                raise ValueError(f"params['layers'][{i}]['W_Q'] must have 3d = {3 * d} rows (augmented "
                                 f"tokens of d = {d}), got shape {numpy.shape(layer['W_Q'])}")
            icar.check_layer(f"params['layers'][{i}]", layer, 3 * d)
        d_out = icar.check_data(params["W_out"], "W_out", "E, d_out")[1]
        icar.check_shape("W_out", params["W_out"], (3 * d, d_out))
    if m1:
        if "A" in params:
            KQ, V = numpy.zeros((3 * d, 3 * d)), numpy.zeros((3 * d, 3 * d))
            KQ[2 * d:, d:2 * d], V[:d, d:2 * d] = numpy.asarray(params["A"]), numpy.asarray(params["B"])
        else:
            KQ, V = numpy.asarray(params["W_KQ"]), numpy.asarray(params["W_V"])
        KQ, V = KQ[None, None], V[None, None]
    else:
        layers = [{k: numpy.asarray(v) for k, v in lay.items()} for lay in params["layers"]]
        W_out = numpy.asarray(params["W_out"])
        KQ = numpy.stack([lay["W_K"] @ numpy.swapaxes(lay["W_Q"], -1, -2) for lay in layers])
        V = numpy.stack([numpy.swapaxes(lay["W_V"] @ lay["W_O"] @ W_out, -1, -2)
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
    if not isinstance(params["layers"], (list, tuple)) or not params["layers"]:
        raise ValueError(f"params['layers'] must be a list of at least one layer, got {params['layers']!r:.80}")
    rows, E = icar.check_data(params["pos"], "pos", "T', E")
    if rows < T:
        raise ValueError(f"T must be at most the rows of pos {numpy.shape(params['pos'])}, got T={T}")
    icar.check_shape("pos", params["pos"], (rows, E))
    icar.check_layer("params['layers'][0]", params["layers"][0], E)
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
    icar.check_tokens(s_fit, cfg, "s_fit")
    icar.check_transformer(params, cfg)
    if not params["layers"]:
        raise ValueError("params['layers'] must hold at least one layer, got none")
    if icar.check_tokens(s_eval, cfg, "s_eval")[1] != s_fit.shape[1]:
        raise ValueError(f"s_fit and s_eval must have the same T, got {s_fit.shape[1]} and {s_eval.shape[1]}")
    if numpy.iscomplexobj(s_fit) != numpy.iscomplexobj(s_eval):
        raise ValueError("s_fit and s_eval must be both real or both complex")
    icar.check_data(s_fit, "s_fit", finite=True)
    icar.check_data(s_eval, "s_eval", finite=True)

    def features_targets(x):
        h = numpy.concatenate([x] * cfg["repeat"], axis=-1)                  # [n, T, E]
        h1 = icar.transformer_layer(params["layers"][0], h, cfg, params.get("pos"))  # [n, T, E]
        Z = _real_parts(numpy.transpose(numpy.asarray(h1)[:, 1:], (1, 0, 2)))      # [T-1, n, E or 2E]
        if not numpy.all(numpy.isfinite(Z)):
            raise ValueError("params must give finite first-layer outputs, got NaN or inf (non-finite params?)")
        Z = numpy.concatenate([Z, numpy.ones(Z.shape[:2] + (1,))], -1)      # with the bias
        return Z, _real_parts(numpy.transpose(x[:, :-1], (1, 0, 2)))                # [T-1, n, d or 2d]

    Z, Y = features_targets(_float64(s_fit))
    coef = numpy.linalg.pinv(Z) @ Y                                          # [T-1, E+1, d]: per position
    Z, Y = features_targets(_float64(s_eval))
    sse = numpy.sum((Z @ coef - Y) ** 2, axis=(1, 2))                        # [T-1]
    sst = numpy.sum((Y - numpy.mean(Y, axis=1, keepdims=True)) ** 2, axis=(1, 2))
    const = sst <= 1e-12 * numpy.sum(Y ** 2, axis=(1, 2))
    with numpy.errstate(invalid="ignore", divide="ignore"):
        r2 = numpy.where(const, numpy.nan, 1 - sse / sst)
    return numpy.concatenate([[numpy.nan], r2])                              # [T]


def mechanism(params, cfg, s_fit, s_eval):
    """mech_prev_share [H] and mech_readout_r2 [T] of a positional M4 (cfg: its
    icar.transformer_config): the read-out is fitted on inputs s_fit and scored on s_eval
    (each [n, T, d]; see readout_r2)."""
    icar.check_config(cfg)
    return {"mech_prev_share": previous_token_share(params, cfg["T"]),
            "mech_readout_r2": readout_r2(params, cfg, s_fit, s_eval)}


# ----------------------------------------------------------------------------- where the query enters
# One function per model: predict(x) -> [n, T, d], the model on context s with the current
# state at position r replaced by x_r only where it acts as the query.

def _previous(s):
    """(xp, causal mask [T, T], s_{r-1} [n, T, d] with s_{-1} = 0) of states s [n, T, d]."""
    n, T, d = s.shape
    xp = icar.array_module(s)
    prev = np.concatenate([xp.zeros((n, 1, d), dtype=s.dtype), s[:, :-1]], axis=1)  # [n, T, d]
    return xp, icar.causal_mask(xp, T, s), prev


def _query_m1(params, s):
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


def _query_m2(params, s):
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


def _query_m3(params, s):
    """x_r replaces the value s_r^2 of the newest token t = r by s_r x_r."""
    xp, mask, prev = _previous(s)
    eye = xp.eye(s.shape[1])                                                     # [T, T]
    weights = params["P"] * mask                                                 # [T, T]
    def predict(x):
        newest = np.sum(weights * eye, axis=-1)[:, None] * s                      # [n, T, d]: P[r, r] s_r
        return np.conj(prev) * (weights @ (s * s) + newest * (x - s))            # [n, T, d]
    return predict


def _query_augmented_m4(params, s, cfg):
    """x_r replaces s_r in the middle slot of position r's own token (queries, residual)."""
    e = icar.augment(s)                                                     # [n, T, 3d]
    zeros = icar.array_module(s).zeros_like(s)
    return lambda x: icar.transformer_two_streams(
        params, e, e + np.concatenate([zeros, x - s, zeros], axis=-1), cfg)


def _query_raw_m4(params, s, cfg):
    """x_r feeds position r's queries and residual stream; keys and values keep s_r."""
    return lambda x: icar.transformer_two_streams(params, s, x, cfg)


# ----------------------------------------------------------------------------- causal tests
# paper.md section 6: a low loss does not say whether a model learns in context (a model
# trained from a fixed s_0 can read W off the first tokens, a Krylov sequence of W). These
# tools ask causal questions instead, of any model given as predict(x) -> f: which inputs
# move each output (influence_map), how the loss reacts to data the model did not train on
# (score on a start of the other law, switch_context, replace_tokens), which heads matter
# (head_ablation), where W can be read linearly (linear_probe_w, stream_w_r2), and which
# linear map the model applies to a fresh current state (fresh_query_probe).

def model_kind(params, cfg=None):
    """"M1", "M2", "M3", "M4 augmented" or "M4 raw": the model of `params`, read from its
    keys (and for M4 from its icar.transformer_config cfg), as `query_predictor` reads it."""
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict of arrays, got {type(params).__name__}")
    if "layers" in params:
        if cfg is None or not isinstance(cfg, dict):
            raise ValueError("cfg must be the icar.transformer_config of an M4 (params has 'layers')")
        icar.check_config(cfg)
        if cfg.get("d_in") == 3 * cfg.get("d_out", 0):
            return "M4 augmented"
        if cfg.get("d_in") == cfg.get("d_out"):
            return "M4 raw"
        raise ValueError(f"cfg must have d_in = 3 d_out (augmented tokens) or d_in = d_out (raw "
                         f"tokens), got d_in={cfg.get('d_in')}, d_out={cfg.get('d_out')}")
    if "P" in params:
        return "M2" if "A" in params else "M3"
    if "A" in params or "W_KQ" in params:
        return "M1"
    raise ValueError(f"params must be those of M1 (A, B or W_KQ, W_V), M2 (A, B, P), M3 (P) or "
                     f"M4 (layers, W_out, b_out), got keys {sorted(params)}")


def model_predictor(params, cfg=None):
    """predict(x) -> [n, T, d]: the model's ordinary prediction on states x [n, T, d] (the
    inputs s_1..s_T), the model chosen by `model_kind`; augmented tokens are built from x."""
    kind = model_kind(params, cfg)
    if kind == "M1":
        return lambda x: icar.augmented_linear(params, icar.augment(x))
    if kind == "M2":
        return lambda x: icar.diagonal_heads(params, x)
    if kind == "M3":
        return lambda x: icar.pe_only(params, x)
    tokens = icar.augment if kind == "M4 augmented" else (lambda x: x)
    return lambda x: icar.transformer(params, tokens(x), cfg)


def m4_streams(params, x, cfg):
    """[h_0, h_1, .., h_L], each [n, T, E]: M4's stream at its input (the tokens repeated
    cfg["repeat"] times; (0, s_t, s_{t-1}) for augmented tokens) and after each layer, on
    states x [n, T, d]. The prediction is h_L W_out + b_out."""
    kind = model_kind(params, cfg)
    if not kind.startswith("M4"):
        raise ValueError(f"params must be those of an M4 (layers, W_out, b_out), got {kind}")
    icar.check_data(x, "x")
    tokens = icar.augment(x) if kind == "M4 augmented" else x              # [n, T, d_in]
    icar.check_tokens(tokens, cfg)
    icar.check_transformer(params, cfg)
    h = np.concatenate([tokens] * cfg["repeat"], axis=-1)                  # [n, T, E]
    out = [h]
    for layer in params["layers"]:  # layers differ in parameters, a short fixed loop
        h = icar.transformer_layer(layer, h, cfg, params.get("pos"))        # [n, T, E]
        out.append(h)
    return out


def _real_parts(z):
    """z, or its real and imaginary parts side by side on the last axis if complex."""
    return np.concatenate([np.real(z), np.imag(z)], axis=-1) if numpy.iscomplexobj(z) else z


def influence_map(predict, s):
    """[T, T]: I[r, t] = mean over sequences of ||d f_r / d x_t||_F, f = predict(x) at the
    inputs x = s[:, :T] of s [n, T+1, d].

    predict: x [n, T, d] -> f [n, T, K], any K (the model, model_predictor; or one of M4's
    streams, lambda x: m4_streams(params, x, cfg)[l]), treating sequences independently (every
    model here does: one reverse pass then serves all n sequences). Exact: autograd, one
    forward pass, one reverse pass per output position and coordinate (T K, 2 T K for
    complex f). For a causal model I[r, t] = 0 for t > r. Complex data: the derivative along
    real and imaginary directions, sqrt(||d f / d z||_F^2 + ||d f / d conj(z)||_F^2) (the real
    Jacobian's norm / sqrt 2), which is ||d f / d z||_F where f is holomorphic in z."""
    if not callable(predict):
        raise ValueError(f"predict must be a function x [n, T, d] -> [n, T, K], got {type(predict).__name__}")
    _check_sequences(s)
    x0 = s[:, :-1]                                                          # [n, T, d]
    n, T, d = x0.shape
    complex_x = numpy.iscomplexobj(x0)
    u0 = numpy.zeros((2 if complex_x else 1,) + x0.shape, dtype=numpy.real(x0[:1, :1, :1]).dtype)

    def real_f(u):  # real directions u[0] (and imaginary ones u[1]) of x -> real outputs
        x = x0 + u[0] + (1j * u[1] if complex_x else 0)                     # [n, T, d]
        return _real_parts(predict(x))                                      # [n, T, K or 2K]

    vjp, f = make_vjp(real_f)(u0)
    if numpy.ndim(f) != 3 or numpy.shape(f)[:2] != (n, T):
        raise ValueError(f"predict must return [n, T, K] = [{n}, {T}, K], got shape {numpy.shape(f)}")
    sq = numpy.zeros((n, T, T))                                             # [n, r, t]
    for r in range(T):  # rows of the Jacobian, outside the differentiated function
        for k in range(f.shape[-1]):
            g = numpy.zeros(f.shape, dtype=f.dtype)
            g[:, r, k] = 1.0
            J = numpy.asarray(vjp(g))                                       # [1 or 2, n, T, d]
            sq[:, r] += numpy.sum(J ** 2, axis=(0, 3))                      # [n, T]
    return numpy.mean(numpy.sqrt(sq / (2 if complex_x else 1)), axis=0)    # [T, T]


def score(predict, s, gd_steps=1, eta=None):
    """Per-position test losses [T] of predict(x) -> [n, T, d] on the inputs of s [n, T+1, d]
    against its own next states, next to references computed on the same (possibly
    intervened) data: "model", "least_squares", "gd1".."gd{gd_steps}" (k GD steps from 0; the
    step eta [T] if given, else the optimal step per position and k on s) and "zero". No
    oracle: after an intervention no single W explains the data. In float64."""
    if not callable(predict):
        raise ValueError(f"predict must be a function x [n, T, d] -> [n, T, d], got {type(predict).__name__}")
    _, T, _ = _check_sequences(s)
    gd_steps = icar.check_int("gd_steps", gd_steps, 0)
    if eta is not None and icar.check_data(eta, "eta", "T", finite=True) != (T,):
        raise ValueError(f"eta must have shape [T] = {(T,)} to match s, got shape {numpy.shape(eta)}")
    host = _float64(s)
    x, y = host[:, :-1], host[:, 1:]                                        # [n, T, d] each
    f = _float64(predict(s[:, :-1]))
    if f.shape != y.shape:
        raise ValueError(f"predict must return [n, T, d] = {y.shape}, got shape {f.shape}")
    out = {"model": position_loss(f, y),
           "least_squares": position_loss(_apply(least_squares(host), x), y)}
    C, S = context_sums(x)
    for k in range(1, gd_steps + 1):
        step = optimal_gd_step(host, k) if eta is None else _float64(eta)
        out[f"gd{k}"] = position_loss(gd_prediction(C, S, x, step, k), y)
    out["zero"] = position_loss(numpy.zeros_like(y), y)
    return out


def switch_context(source, s, W, k):
    """(s2 [n, T+1, d], W2 [n, d, d]): s [n, T+1, d] (context matrices W [n, d, d]) with W
    switched to W2 at position k: s2 keeps the states s_0..s_k (0-based) and continues
    s2_{t+1} = W2 s2_t for t >= k, noise-free. The prediction at position r >= k then has
    seen r - k transitions of W2. k = T leaves s as it is.

    source: a numpy.random.Generator (W2 is another sequence's W, a random cyclic derangement
    of the batch, so W2 follows the law of W; needs n >= 2), or W2 itself [n, d, d]."""
    if W is None:
        raise ValueError("W must be the context matrices [n, d, d] of s, got None")
    n, T, d = _check_sequences(s, W)
    k = icar.check_int("k", k, 0)
    if k > T:
        raise ValueError(f"k must be at most T = {T} (the last input position), got {k}")
    if isinstance(source, numpy.random.Generator):
        if n < 2:
            raise ValueError(f"source: a generator draws W2 from another sequence of the batch, "
                             f"which needs n >= 2 sequences, got n = {n}")
        perm = source.permutation(n)
        W2 = numpy.empty_like(numpy.asarray(W))
        W2[perm] = numpy.asarray(W)[numpy.roll(perm, 1)]                    # each gets another's W
    else:
        if numpy.shape(source) != (n, d, d):
            raise ValueError(f"source must be a numpy.random.Generator or W2 of shape [n, d, d] = "
                             f"{(n, d, d)}, got {type(source).__name__} of shape {numpy.shape(source)}")
        icar.check_data(source, "source (W2)", "n, d, d", finite=True)
        W2 = numpy.asarray(source)
    s2 = numpy.array(s, dtype=numpy.result_type(s, W2))                      # [n, T+1, d], a copy
    for t in range(k, T):  # the recursion is sequential; the batch is not
        s2[:, t + 1] = (W2 @ s2[:, t, :, None])[..., 0]                     # [n, d]
    return s2, W2


def replace_tokens(s, other, positions):
    """s [n, T+1, d] with the states at `positions` (0-based indices into the T + 1 states)
    taken from other [n, T+1, d] (e.g. another sequence's, numpy.roll(s, 1, axis=0)): a copy.
    The transitions into and out of a replaced state are broken; later targets are not."""
    n, T, d = _check_sequences(s)
    if numpy.shape(other) != numpy.shape(s):
        raise ValueError(f"other must have the shape of s {numpy.shape(s)}, got {numpy.shape(other)}")
    icar.check_data(other, "other", finite=True)
    if not isinstance(positions, (list, tuple, range, numpy.ndarray)) or getattr(positions, "ndim", 1) != 1:
        raise ValueError(f"positions must be a list of integers in 0..T = 0..{T}, got {positions!r}")
    positions = list(positions)
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, (int, numpy.integer)) or not 0 <= p <= T:
            raise ValueError(f"positions must be integers in 0..T = 0..{T}, got {p!r}")
    out = numpy.array(s, dtype=numpy.result_type(s, other))                 # [n, T+1, d], a copy
    out[:, positions] = numpy.asarray(other)[:, positions]
    return out


def head_ablation(params, cfg, s, predict=None):
    """{"ablated" [L, H], "full"}: an M4's test loss on s [n, T+1, d] (mean over every
    position of `position_loss`) with the value map of one head of one layer removed
    (W_V[h] and b_V[h] set to 0: the head adds nothing to its layer's output), for every
    layer and head, and without ablation. predict(params, x) -> [n, T, d] defaults to
    icar.transformer on x's tokens (`model_predictor`); any equal function may replace it."""
    kind = model_kind(params, cfg)
    if not kind.startswith("M4"):
        raise ValueError(f"params must be those of an M4 (layers, W_out, b_out), got {kind}")
    icar.check_transformer(params, cfg)
    for l, layer in enumerate(params["layers"]):
        if numpy.shape(layer["W_V"])[0] != cfg["heads"]:
            raise ValueError(f"params['layers'][{l}] must have cfg['heads'] = {cfg['heads']} heads, "
                             f"got {numpy.shape(layer['W_V'])[0]}")
    _check_sequences(s)
    if predict is None:
        predict = lambda p, x: model_predictor(p, cfg)(x)                  # noqa: E731
    elif not callable(predict):
        raise ValueError(f"predict must be a function (params, x) -> [n, T, d], got {type(predict).__name__}")
    x, y = s[:, :-1], _float64(s[:, 1:])

    def loss(p):
        f = _float64(predict(p, x))
        if f.shape != y.shape:
            raise ValueError(f"predict must return [n, T, d] = {y.shape}, got shape {f.shape}")
        return float(numpy.mean(position_loss(f, y)))

    L, H = len(params["layers"]), cfg["heads"]
    ablated = numpy.zeros((L, H))
    for l in range(L):  # one evaluation per head: outside any derivative
        for h in range(H):
            layer = dict(params["layers"][l])
            layer["W_V"], layer["b_V"] = numpy.array(layer["W_V"]), numpy.array(layer["b_V"])
            layer["W_V"][h], layer["b_V"][h] = 0.0, 0.0
            layers = list(params["layers"])
            layers[l] = layer
            ablated[l, h] = loss(dict(params, layers=layers))
    return {"ablated": ablated, "full": loss(params)}


def linear_probe_w(features_fit, W_fit, features_eval, W_eval, ridge=1e-6):
    """R^2 [...] of a ridge regression (with bias) from features [n, ..., F] to vec(W) (W [n,
    d, d]; real and imaginary parts stacked as real targets for complex W, and likewise for
    complex features), one regression per index of the middle axes (e.g. [n, L+1, T, F]: per
    layer and position), fitted on (features_fit, W_fit) and scored on held-out
    (features_eval, W_eval). ridge >= 0: the penalty relative to the mean feature variance
    (ridge * tr(Z^T Z) / F on centred fit features Z; 0: least squares, minimum norm).
    R^2 = 1 - SSE / SST around the mean of the held-out targets, summed over coordinates:
    1 for features that contain vec(W), about 0 or below for features unrelated to W."""
    ridge = icar.check_real("ridge", ridge, 0)
    Ff, Wf, Fe, We = (icar.check_data(a, name, None, finite=True) for a, name in
                      ((features_fit, "features_fit"), (W_fit, "W_fit"),
                       (features_eval, "features_eval"), (W_eval, "W_eval")))
    if len(Ff) < 2 or Ff[1:] != Fe[1:] or len(Wf) != 3 or Wf[1:] != We[1:] or Wf[1] != Wf[2]:
        raise ValueError(f"features_fit, features_eval must be [n, ..., F] with the same trailing axes "
                         f"and W_fit, W_eval [n, d, d], got {Ff}, {Fe}, {Wf}, {We}")
    if (numpy.iscomplexobj(features_fit) != numpy.iscomplexobj(features_eval)
            or numpy.iscomplexobj(W_fit) != numpy.iscomplexobj(W_eval)):
        raise ValueError("features_fit and features_eval, and W_fit and W_eval, must be both real or both complex")
    if Ff[0] != Wf[0] or Fe[0] != We[0]:
        raise ValueError(f"features and W must have the same n, got features_fit {Ff[0]}, W_fit "
                         f"{Wf[0]}, features_eval {Fe[0]}, W_eval {We[0]}")

    def arrange(Z, W):  # [n, ..., F], [n, d, d] -> [..., n, F or 2F], [n, d^2 or 2 d^2]
        Z = numpy.moveaxis(_real_parts(_float64(Z)), 0, -2)
        return Z, _real_parts(_float64(W).reshape(len(W), -1))

    Zf, Yf = arrange(features_fit, W_fit)
    Ze, Ye = arrange(features_eval, W_eval)
    mz, my = numpy.mean(Zf, axis=-2, keepdims=True), numpy.mean(Yf, axis=0)
    Z = Zf - mz                                                              # [..., n, F]
    G = numpy.swapaxes(Z, -1, -2) @ Z                                        # [..., F, F]
    F = G.shape[-1]
    lam = ridge * numpy.trace(G, axis1=-2, axis2=-1)[..., None, None] / F    # [..., 1, 1]
    coef = numpy.linalg.pinv(G + lam * numpy.eye(F), hermitian=True) @ (numpy.swapaxes(Z, -1, -2) @ (Yf - my))
    sse = numpy.sum(((Ze - mz) @ coef + my - Ye) ** 2, axis=(-1, -2))       # [...]
    sst = numpy.sum((Ye - numpy.mean(Ye, axis=0)) ** 2)
    if sst <= 1e-12 * numpy.sum(Ye ** 2):
        raise ValueError("W_eval must vary over its sequences (R^2 is undefined for one W)")
    return 1 - sse / sst


def stream_w_r2(params, cfg, s_fit, W_fit, s_eval, W_eval, ridge=1e-6):
    """[L+1, T]: `linear_probe_w` of an M4's streams (`m4_streams`: the input, then each
    layer's output) at each position r, fitted on sequences s_fit [n, T+1, d] with context
    matrices W_fit and scored on held-out s_eval, W_eval. Where W becomes linearly readable.

    An in-context learner need not hold vec(W) anywhere: M1 and theory's construction hold
    states and Gamma s_r, and the quick random-start raw-token M4 (L = 2, H = 8) reads
    R^2 <= 0 at every layer and position; a fixed start gives 1/d away at position 1
    (s_1 = W s_0 with s_0 known). So this locates what a start gives away; the in-context map
    itself is read by `fresh_query_probe`."""
    def features(s):
        return numpy.stack([numpy.asarray(h) for h in m4_streams(params, s[:, :-1], cfg)], axis=1)  # [n, L+1, T, E]
    _check_sequences(s_fit, W_fit, ("s_fit", "W_fit"))
    _check_sequences(s_eval, W_eval, ("s_eval", "W_eval"))
    return linear_probe_w(features(s_fit), W_fit, features(s_eval), W_eval, ridge)


def fresh_query_probe(predict, s, rng, W=None, eta=None):
    """The linear map the model applies to a fresh current state: Gamma_hat [n, T, d, d] at
    each position r, read from the outputs f_r when the state x_r is replaced, in every role
    (query, key, value, residual), by u = +-rho q_j for an orthonormal frame q_1..q_d drawn
    per sequence and position from rng, with the context x_0..x_{r-1} of s [n, T+1, d] kept:
        Gamma_hat = sum_j (f_r(rho q_j) - f_r(-rho q_j)) / (2 rho) q_j^T,
    rho [T] the root-mean-square norm of s's states at r. The antithetic pair removes every
    even term: for a model of degree <= 2 in x_r (M1, theory.raw_token_gd_construction) this
    is the exact linear part, whatever the frame, and the transition (s_{r-1}, u) that the
    replacement creates only adds such even terms. For a nonlinear model it is the odd part
    at the data's scale averaged over directions (Stein: a linear regression of f_r on
    Gaussian u reads the mean Jacobian).

    Why not `probe`: it differentiates where x_r acts as the query of the two-stream model
    (icar.transformer_two_streams), holding s_r fixed as a key and value. A raw-token M4
    without residual (train.py's nonaug) can only carry s_r forward through attention, and
    the trained one reads it mostly through the VALUE of key t = r: at the quick scale with
    random starts (L = 2, H = 8, seed 0; the first layer's head 0 puts 0.94 of its
    positional weight on t = r, and removing it raises the loss from 0.29 to 0.79), at r = 19
    the total derivative d f_r / d s_r splits into a key/value path (cosine +0.65 to W, norm
    1.21 of the total) and the query path `probe` reads (norm 0.28, cosine -0.77 to the
    key/value path: it corrects it, and -0.48 to W). The query path is nearly blind to the
    query's scale (LayerNorm after linear scores: scaling x_r by 1.5 as a query moves f_r by
    4%), so it cannot be a linear map Gamma x_r. The total derivative reads +0.66 but mixes
    in d Gamma / d s_r (for M1: eta (s_{r-1}^* s_r) I, from the transition into s_r); this
    probe holds the context fixed, removes that by symmetry and reads +0.81 (+0.87 to one
    GD step). It reads the map, not where it comes from: the model trained from a fixed
    start reads +0.70 from its first tokens; the causal tests above tell the two apart.

    predict: the model's ordinary prediction x [m, T, d] -> [m, T, d] on any batch size m
    (`model_predictor`). Returns "Gamma", "step" [T] (the one-GD-step size that fits Gamma
    best: sum <C, Gamma> / sum ||C||^2 over sequences, C = C_{r-1} the context's transitions),
    and per position [T] "err_*", "cos_*" (as `probe`) to W (if given), least squares on the
    context (ls, W_hat at r - 1) and one GD step eta C_{r-1} (gd1; eta [T] the step at each r,
    default the optimal step for the r - 1 transitions, optimal_gd_step shifted by one); NaN
    where the reference is 0 (r = 0 for ls and gd1). d f_r / d x_r for complex data is read
    along real directions (exact where f is holomorphic in x_r, as in `probe`)."""
    if not callable(predict):
        raise ValueError(f"predict must be a function x [m, T, d] -> [m, T, d], got {type(predict).__name__}")
    if not isinstance(rng, numpy.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    n, T, d = _check_sequences(s, W)
    if eta is not None and icar.check_data(eta, "eta", "T", finite=True) != (T,):
        raise ValueError(f"eta must have shape [T] = {(T,)} to match s, got shape {numpy.shape(eta)}")
    x0 = numpy.asarray(s[:, :-1])                                           # [n, T, d]
    rho = numpy.sqrt(numpy.mean(numpy.sum(numpy.abs(_float64(x0)) ** 2, axis=-1), axis=0))  # [T]
    Z = rng.standard_normal((n, T, d, d))
    Q, R = numpy.linalg.qr(Z)                                               # [n, T, d, d]: columns q_j
    Q = Q * numpy.sign(numpy.diagonal(R, axis1=-2, axis2=-1))[..., None, :]  # Haar frames
    Gamma = numpy.zeros((n, T, d, d), dtype=numpy.result_type(x0, 1.0))
    for r in range(T):  # one batch of 2 d n sequences per position, outside any derivative
        u = rho[r] * numpy.swapaxes(Q[:, r], -1, -2)                        # [n, d (j), d]: u_j
        xs = numpy.repeat(x0[None, None], 2, axis=0).repeat(d, axis=1)     # [2, d, n, T, d]
        xs[:, :, :, r] = numpy.stack([numpy.swapaxes(u, 0, 1), -numpy.swapaxes(u, 0, 1)])  # +-u_j
        f = numpy.asarray(predict(xs.reshape(2 * d * n, T, d).astype(x0.dtype)))  # [2 d n, T, d]
        if f.shape != (2 * d * n, T, d):
            raise ValueError(f"predict must return [m, T, d] = {(2 * d * n, T, d)}, got shape {f.shape}")
        f = f[:, r].reshape(2, d, n, -1)                                    # [2, d (j), n, d]
        odd = numpy.moveaxis((f[0] - f[1]) / 2, 0, -1)                      # [n, d, d (j)]
        Gamma[:, r] = (odd @ numpy.swapaxes(Q[:, r], -1, -2)) / rho[r]      # [n, d, d]
    host, G = _float64(s), _float64(Gamma)
    C, _ = context_sums(host[:, :-1])                                       # [n, T, d, d]
    zero = numpy.zeros_like(C[:, :1])
    C = numpy.concatenate([zero, C[:, :-1]], axis=1)                        # C_{r-1}: before s_r
    ls = numpy.concatenate([zero, least_squares(host)[:, :-1]], axis=1)
    if eta is None:
        eta = numpy.concatenate([[0.0], optimal_gd_step(host, 1)[:-1]])
    eta = _float64(eta)
    refs = {"ls": ls, "gd1": eta[None, :, None, None] * C}
    if W is not None:
        refs = dict(W=numpy.broadcast_to(_float64(W)[:, None], G.shape), **refs)
    num = numpy.sum(numpy.real(numpy.conj(C) * G), axis=(0, 2, 3))
    den = numpy.sum(numpy.abs(C) ** 2, axis=(0, 2, 3))
    out = {"Gamma": Gamma, "step": numpy.divide(num, den, out=numpy.full_like(num, numpy.nan), where=den > 0)}
    out.update(_compare(G, refs))
    return out
