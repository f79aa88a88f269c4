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
"""
import math

import autograd.numpy as np
import numpy
from autograd import grad

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
    n, T, d = x.shape
    zero = numpy.zeros((n, 1, d, d), dtype=x.dtype)
    C = numpy.cumsum(x[:, 1:, :, None] * numpy.conj(x[:, :-1, None, :]), axis=1)  # [n, T-1, d, d]
    S = numpy.cumsum(x[:, :-1, :, None] * numpy.conj(x[:, :-1, None, :]), axis=1)
    return numpy.concatenate([zero, C], axis=1), numpy.concatenate([zero, S], axis=1)


def _apply(M, x):
    """M x per sequence and position."""
    return (M @ x[..., None])[..., 0]                          # [n, T, d, d] @ [n, T, d] -> [n, T, d]


def position_loss(f, y):
    """[n, T, d] -> [T]: the test loss per position, squared error summed over d, averaged over sequences."""
    return numpy.mean(numpy.sum(numpy.abs(f - y) ** 2, axis=-1), axis=0)


def gd_prediction(C, S, x, eta, k):
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
    if not isinstance(params, dict):
        raise ValueError(f"params must be a dict of arrays, got {type(params).__name__}")
    if "layers" in params:
        if cfg is None or not isinstance(cfg, dict):
            raise ValueError("cfg must be the icar.transformer_config of an M4 (params has 'layers')")
        if cfg["d_in"] == 3 * cfg["d_out"]:
            return _query_augmented_m4(params, s, cfg)
        if cfg["d_in"] == cfg["d_out"]:
            return _query_raw_m4(params, s, cfg)
        raise ValueError(f"cfg must have d_in = 3 d_out (augmented tokens) or d_in = d_out (raw "
                         f"tokens), got d_in={cfg['d_in']}, d_out={cfg['d_out']}")
    if "P" in params:
        return (_query_m2 if "A" in params else _query_m3)(params, s)
    if "A" in params or "W_KQ" in params:
        return _query_m1(params, s)
    raise ValueError(f"params must be those of M1 (A, B or W_KQ, W_V), M2 (A, B, P), M3 (P) or "
                     f"M4 (layers, W_out, b_out), got keys {sorted(params)}")


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
    C, _ = context_sums(host[:, :-1])
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
        icar.check_params("params", params, ("A", "B"), ("W_KQ", "W_V"))
    else:
        icar.check_params("params", params, ("layers", "W_out", "b_out"))  # no "pos": augmented tokens
        for i, layer in enumerate(params["layers"]):
            icar.check_params(f"params['layers'][{i}]", layer, icar.LAYER_KEYS)
            if numpy.shape(layer["W_Q"])[-2] != 3 * d:
                raise ValueError(f"params['layers'][{i}]['W_Q'] must have 3d = {3 * d} rows (augmented "
                                 f"tokens of d = {d}), got shape {numpy.shape(layer['W_Q'])}")
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


def mechanism(params, cfg, s_fit, s_eval):
    """mech_prev_share [H] and mech_readout_r2 [T] of a positional M4 (cfg: its
    icar.transformer_config): the read-out is fitted on inputs s_fit and scored on s_eval
    (each [n, T, d]; see readout_r2)."""
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
