"""fused: the fused M4, icar.transformer computed without forming q, k, v, and M3's loss from
moments of the data. Every function here equals a plain one of icar.py (tested in
test_icar.py, values and gradients); icar.py is what to read to audit the model.

The reformulation: q, k, v are affine in z = (h, 1) (z = (x, 1) in the first layer, where
h = [x] * repeat), so q . conj(k) = z_r G_h conj(z_t) with G_h = [W_Q; b_Q]_h [W_K; b_K]_h^T
/ sqrt(E), and a_h @ v_h = (a_h @ z) [W_V; b_V]_h. The products over the [n, T, H, T]
attention weights then contract over dim z (d_in + 1 in the first layer) instead of the
embedding E, and each is one matrix product per sequence for all heads. Linear attention
is one autograd primitive with a hand-written VJP (linear_attention): it forms those weights
one cache-sized slice of the batch at a time (CHUNK_ENTRIES), in THREADS threads, skips a
quarter of the masked pairs (causal_blocks), and recomputes the weights in the backward
pass instead of storing them.

    transformer        M4, equals icar.transformer
    pe_only_objective  the loss and gradient of M3 (autograd on icar.pe_only, full batch)
                       from moments of the data (pe_only_moments) computed once
"""
import concurrent.futures
import functools
import os

import autograd.numpy as np
import numpy
from autograd.extend import defvjp_argnums, primitive
from autograd.tracer import Box

import icar
from icar import array_module, causal_mask, layernorm, softmax, swap

CHUNK_ENTRIES = {"cpu": 2 ** 18, "device": 2 ** 27}  # 1 MB of float32 stays in a CPU core's cache


def cores():
    """The cores this process may run on (its CPU affinity where the system says)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# threads over batch slices (NumPy releases the GIL inside products and elementwise loops); read
# at call time: sweep.py's workers set it so that workers x THREADS <= cores()
THREADS = cores()
_POOLS = {}
os.register_at_fork(after_in_child=_POOLS.clear)  # a forked child has none of the threads


def batch_chunks(n, entries_per_row, xp):
    """Slices of a batch of n rows, each holding about CHUNK_ENTRIES entries (at least one row)."""
    step = max(1, CHUNK_ENTRIES["cpu" if xp is numpy else "device"] // entries_per_row)
    return [slice(i, i + step) for i in range(0, n, step)]


GROUPS = 8  # slices are summed in this many groups whatever THREADS is: the same bits anywhere


def _over_slices(fn, slices, threaded):
    """[fn(group) for each group of consecutive slices], in order: GROUPS groups (fewer if there
    are fewer slices), run in THREADS threads where `threaded` (NumPy arrays that autograd does
    not trace), else one after another. The grouping, and so every sum over groups, does not
    depend on THREADS: a run gives the same bits with any number of threads."""
    size = -(-len(slices) // min(GROUPS, len(slices)))
    groups = [slices[i:i + size] for i in range(0, len(slices), size)]
    k = min(THREADS, len(groups)) if threaded else 1
    if k <= 1:
        return [fn(group) for group in groups]
    if k not in _POOLS:
        _POOLS[k] = concurrent.futures.ThreadPoolExecutor(k)
    return list(_POOLS[k].map(fn, groups))


def _real_if(x, target):
    """x, without its imaginary part where the target (an argument) is real."""
    return np.real(x) if numpy.iscomplexobj(x) and not numpy.iscomplexobj(target) else x


def causal_blocks(T):
    """Blocks [r0, r1) of query positions, each reading keys t < r1 only: two blocks of
    about equal work, which skip a quarter of the [T, T] products above the diagonal."""
    r = min(T - 1, max(1, round(T / 2 ** 0.5)))
    return [(0, r), (r, T)] if T > 1 else [(0, T)]


@primitive
def linear_attention(zG, z, w):
    """Linear causal attention of every head, one batch slice at a time:
        y[:, (r, h)] = sum_{t<=r} w[r, h, t] (zG[:, (r, h)] . conj(z_t)) z_t,
    zG [n, T*H, D] (rows z_r G_h), z [n, T, D], w [T, H or 1, T] (entries t > r unused)
    -> [n, T*H, D]. Equal to the plain products ((zG @ z^*) * tril(w)) @ z; a slice's
    [m, T, H, T] weights are formed in cache, block by block of causal_blocks, and
    recomputed in the backward pass rather than stored."""
    n, T, D = z.shape
    H = zG.shape[1] // T
    xp = array_module(z)
    y = xp.empty(zG.shape, dtype=numpy.result_type(zG.dtype, z.dtype, w.dtype))
    zt = xp.ascontiguousarray(swap(xp.conj(z)))                # [n, D, T]
    blocks = [(r0, r1, xp.ascontiguousarray(w[r0:r1, :, :r1])) for r0, r1 in causal_blocks(T)]

    def run(slices):
        for c in slices:
            for r0, r1, wb in blocks:  # rows (r, h) of the block, keys t < r1
                rows = slice(r0 * H, r1 * H)
                scores = zG[c, rows] @ zt[c, :, :r1]            # [m, b*H, D] @ [m, D, r1] -> [m, b*H, r1]
                a = (scores.reshape(-1, r1 - r0, H, r1) * wb).reshape(scores.shape)  # [m, b*H, r1]
                xp.matmul(a, z[c, :r1], out=y[c, rows])         # [m, b*H, r1] @ [m, r1, D] -> [m, b*H, D]
    _over_slices(run, batch_chunks(n, H * T * T, xp), xp is numpy)
    return y


def _swapped(x):
    """x with its last two axes swapped, copied to contiguous memory (faster products) unless
    x is traced by autograd (higher derivatives)."""
    x = swap(x)
    return x if isinstance(x, Box) else array_module(x).ascontiguousarray(x)


def _linear_attention_vjp(argnums, y, args, kwargs):
    """The gradients autograd derives from the plain products, one slice and block at a
    time, in autograd operations so that they can be differentiated again."""
    zG, z, w = args
    n, T, D = z.shape
    H = zG.shape[1] // T
    blocks = causal_blocks(T)

    def vjp(g):                                                 # g [n, T*H, D]
        # autograd's functions only where a value is traced: they cost microseconds a call
        xp = np if any(isinstance(v, Box) for v in (g, zG, z, w)) else array_module(z)
        zc = xp.conj(z)                                         # [n, T, D]
        zt, zct = _swapped(z), _swapped(zc)                     # [n, D, T] each
        wbs = [w[r0:r1, :, :r1] if xp is np else xp.ascontiguousarray(w[r0:r1, :, :r1])
               for r0, r1 in blocks]                            # [b, H, r1] each

        def run(slices):
            parts, g_w = {0: [], 1: []}, [0.0] * len(blocks)
            for c in slices:
                g_zG, g_z = [], 0.0
                for k, ((r0, r1), wb) in enumerate(zip(blocks, wbs)):
                    rows = slice(r0 * H, r1 * H)
                    scores = xp.reshape(zG[c, rows] @ zct[c, :, :r1], (-1, r1 - r0, H, r1))  # [m, b, H, r1]
                    g_a = xp.reshape(g[c, rows] @ zt[c, :, :r1], (-1, r1 - r0, H, r1))      # [m, b, H, r1]
                    g_scores = xp.reshape(g_a * wb, (-1, (r1 - r0) * H, r1))  # [m, b*H, r1]
                    if 0 in argnums:
                        g_zG.append(g_scores @ zc[c, :r1])      # [m, b*H, r1] @ [m, r1, D]
                    if 1 in argnums:
                        a = xp.reshape(scores * wb, (-1, (r1 - r0) * H, r1))  # [m, b*H, r1]
                        g_zr = swap(a) @ g[c, rows] + xp.conj(swap(g_scores) @ zG[c, rows])  # [m, r1, D]
                        g_z = g_z + xp.concatenate([g_zr, xp.zeros_like(zc[c, r1:])], axis=1)  # [m, T, D]
                    if 2 in argnums:
                        g_aS = g_a * scores                     # [m, b, H, r1]
                        g_w[k] = g_w[k] + (g_aS[0] if len(g_aS) == 1 else xp.sum(g_aS, axis=0))
                if 0 in argnums:
                    parts[0].append(xp.concatenate(g_zG, axis=1))  # [m, T*H, D]
                if 1 in argnums:
                    parts[1].append(g_z)                        # [m, T, D]
            return parts, g_w
        results = _over_slices(run, batch_chunks(n, H * T * T, array_module(z)), xp is numpy)
        grads = {i: xp.concatenate([p for parts, _ in results for p in parts[i]], axis=0)
                 for i in (0, 1) if i in argnums}
        if 2 in argnums:  # blocks summed over the threads, padded with zeros for t >= r1
            g_w = []
            for k, (r0, r1) in enumerate(blocks):
                total = 0.0
                for _, part in results:
                    total = total + part[k]                     # [b, H, r1]
                g_w.append(xp.concatenate([total, xp.zeros((r1 - r0, H, T - r1), dtype=total.dtype)], axis=2))
            g_w = xp.concatenate(g_w, axis=0)                   # [T, H, T]
            if w.shape[1] == 1:                                 # w was broadcast over heads
                g_w = xp.sum(g_w, axis=1, keepdims=True)
            grads[2] = g_w
        return tuple(_real_if(grads[i], args[i]) for i in argnums)
    return vjp


defvjp_argnums(linear_attention, _linear_attention_vjp)


def _fold(W, b, r):
    """Weights W [H, E, E] and biases b [H, E] acting on h = [x] * r, as [H, E/r + 1, E]
    acting on (x, 1): h W + b = (x, 1) [sum of the r row blocks of W; b]."""
    H, E, _ = W.shape
    return np.concatenate([np.sum(np.reshape(W, (H, r, E // r, E)), axis=1), b[:, None]], axis=1)  # [H, E/r + 1, E]


def transformer(params, x, cfg):
    """Equals icar.transformer(params, x, cfg): tokens x [n, T, d_in] -> [n, T, d_out].

    Per layer, z = (x, 1) or (h, 1) [n, T, D] and, per head, G_h [D, D] (module docstring):
        scores[(r, h), t] = z_r G_h conj(z_t)                     the scores q . conj(k) / sqrt(E)
        y[(r, h)] = sum_t a[(r, h), t] z_t                         a @ v = y [W_V; b_V]_h
    Linear attention runs through linear_attention, softmax attention through plain products.
    """
    n, T, d_in = icar.check_tokens(x, cfg)
    xp = array_module(x)
    E, H = cfg["repeat"] * d_in, cfg["heads"]
    mask = causal_mask(xp, T, x)                                # [T, T]
    ones = xp.ones((n, T, 1), dtype=x.dtype)
    h = np.concatenate([x] * cfg["repeat"], axis=-1)            # [n, T, E]
    for i, layer in enumerate(params["layers"]):  # layers differ in parameters, a short fixed loop
        z = np.concatenate([x if i == 0 else h, ones], axis=-1)  # [n, T, D], D = d_in + 1 or E + 1
        D, r = z.shape[-1], cfg["repeat"] if i == 0 else 1
        Wq, Wk, Wv = (_fold(layer["W_" + k], layer["b_" + k], r) for k in "QKV")  # [H, D, E] each
        G = (Wq @ swap(Wk)) / E ** 0.5                          # [H, D, D]
        # 2-D products over the n T rows: their weight gradients are one product each
        zG = np.reshape(z, (n * T, D)) @ np.reshape(np.transpose(G, (1, 0, 2)), (D, H * D))  # [n*T, H*D]
        zG = np.reshape(zG, (n, T * H, D))                      # [n, T*H, D]: row (r, h) = z_r G_h
        if cfg["positional"]:
            pos = icar.positional_attention(layer, params["pos"][:T])  # [H, T, T], 0 for t > r
            pos = np.transpose(pos, (1, 0, 2))                  # [T, H, T] as the scores
        if cfg["attention"] == "linear":  # the positional weights already hold the mask
            y = linear_attention(zG, z, pos if cfg["positional"] else mask[:, None])  # [n, T*H, D]
        else:
            scores = np.reshape(zG @ swap(np.conj(z)), (n, T, H, T))  # [n, T, H, T]: query r, head h, key t
            a = softmax(np.real(scores), mask[:, None])        # [n, T, H, T]
            if cfg["positional"]:
                a = a * pos                                     # [n, T, H, T] * [T, H, T]
            y = np.reshape(a, (n, T * H, T)) @ z                # [n, T*H, T] @ [n, T, D] -> [n, T*H, D]
        U = np.reshape(Wv @ layer["W_O"], (H * D, E))           # [H, D, E] @ [E, E] -> [H*D, E]
        out = np.reshape(np.reshape(y, (n * T, H * D)) @ U, (n, T, E)) + layer["b_O"]  # [n, T, E]
        if cfg["layernorm"]:
            out = layernorm(out, layer["ln_g"], layer["ln_b"])
        h = h + out if cfg["residual"] else out
    return h @ params["W_out"] + params["b_out"]                # [n, T, d_out]


# ----------------------------------------------------------------------------- M3 from moments

def pe_only_moments(s, first=1):
    """The training loss of M3, mse(icar.pe_only(params, s[:, :-1])[:, first:], s[:, 1 + first:]),
    as a quadratic in P from moments of s [n, T+1, d]: (M [T, T, T], b [T, T], c).

    M3 is linear in P: with u[n, r, t] = conj(s_{r-1}) s_t^2 (per coordinate),
    f_r = sum_t P[r, t] u[n, r, t], so the loss is sum_r (p_r^T M_r p_r - 2 b_r . p_r) + c with
    M_r = Re(U_r^* U_r) / N, b_r = Re(U_r^* y_r) / N over the N = n (T - first) d-vectors
    averaged (rows r < first are 0), p_r the row r of P * mask.
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
    return M, b, c


def pe_only_objective(s, first=1):
    """loss_and_grad(params) -> (loss, {"P": gradient}) of the training loss of M3 (see
    pe_only_moments) from moments of the data computed once. A step costs O(T^3) instead of
    passes over the data; the values are those of autograd on icar.pe_only up to rounding.
    """
    M, b, c = pe_only_moments(s, first)
    xp = icar.array_module(s)
    mask = icar.causal_mask(xp, M.shape[0], s)                   # [T, T]

    def loss_and_grad(params):
        P = params["P"] * mask                                  # [T, T]
        MP = (M @ P[:, :, None])[..., 0]                        # [T, T, T] @ [T, T, 1] -> [T, T]
        loss = xp.sum(P * (MP - 2 * b)) + c
        return loss, {"P": 2 * (MP - b) * mask}
    return loss_and_grad


# ----------------------------------------------------------------------------- M4, stacked, by hand

# a member's attention weights [n, T*H, T] up to this many entries take the stacked path
STACK_ENTRIES = 2 ** 20
STACK_CHUNK = 2 ** 18  # attention weights of all members in one slice of the batch (cache-sized)


def _t(x):
    return numpy.swapaxes(x, -1, -2)


def stackable(cfg, n, dtype):
    """Whether stack_loss_and_grad serves M4 of cfg on batches of n sequences of dtype: real
    data, and attention weights small enough to form whole (the quick scale; larger batches
    take fused.transformer's sliced, threaded products through autograd)."""
    return numpy.dtype(dtype).kind == "f" and n * cfg["heads"] * cfg["T"] ** 2 <= STACK_ENTRIES


@functools.lru_cache(maxsize=8)
def _keep(T):
    """The causal mask [T, T] (t <= r), read-only: made once per T, not once per slice."""
    keep = numpy.tril(numpy.ones((T, T), dtype=bool))
    keep.flags.writeable = False
    return keep


def _softmax(z, keep):
    """Softmax over the last axis where keep (icar.softmax: shifted by the kept maximum)."""
    w = numpy.exp(numpy.where(keep, z - numpy.max(numpy.where(keep, z, -numpy.inf), axis=-1, keepdims=True),
                              -numpy.inf))
    return w / numpy.sum(w, axis=-1, keepdims=True)


def _softmax_vjp(a, g):
    """The gradient of a softmax's input from that of its output a (masked entries: a = 0)."""
    return a * (g - numpy.sum(g * a, axis=-1, keepdims=True))


def _sum_rows(x):
    """x [S, ..., k] summed over every axis but the first and last -> [S, k] (one product)."""
    rows = numpy.reshape(x, (x.shape[0], -1, x.shape[-1]))
    return numpy.ones(rows.shape[1], dtype=x.dtype) @ rows


def _last_mean(x, avg):
    """The mean of x [..., E] over its last axis, [..., 1]: one matrix-vector product."""
    return numpy.reshape(numpy.reshape(x, (-1, x.shape[-1])) @ avg, x.shape[:-1] + (1,))


def _tokens(x, M):
    """x [S, n, T, k] @ M [S, k, m] -> [S, n, T, m]: one product per member over its n T rows."""
    S, n, T, k = x.shape
    return numpy.reshape(numpy.reshape(x, (S, n * T, k)) @ M, (S, n, T, M.shape[-1]))


def _layer_shared(layer, p, cfg, D, r, T, keep):
    """What a layer of M4 shares across sequences, for every member: the folded projections
    Wq, Wk, Wv [S, H, D, E], Gc [S, D, H*D] (the G_h side by side), U [S, H*D, E] (W_V then
    W_O per head), and the positional weights pos [S, H, T, T] with their pq, pk (or None)."""
    S, H, E = layer["b_Q"].shape
    c = E ** 0.5
    Wq, Wk, Wv = (numpy.concatenate([numpy.sum(numpy.reshape(layer["W_" + k], (S, H, r, E // r, E)), axis=2),
                                     layer["b_" + k][:, :, None]], axis=2) for k in "QKV")  # [S, H, D, E]
    G = (Wq @ _t(Wk)) / c                                           # [S, H, D, D]
    Gc = numpy.reshape(numpy.transpose(G, (0, 2, 1, 3)), (S, D, H * D))
    U = numpy.reshape(Wv @ layer["W_O"][:, None], (S, H * D, E))   # [S, H*D, E]
    pos = pq = pk = None
    if cfg["positional"]:
        pq = p[:, None] @ layer["W_Q"] + layer["b_Q"][:, :, None]   # [S, H, T, E]
        pk = p[:, None] @ layer["W_K"] + layer["b_K"][:, :, None]   # [S, H, T, E]
        pos = _softmax((pq @ _t(pk)) / c, keep)                     # [S, H, T, T]
    # the weights of the token scores, contiguous so that products with them run in long loops
    w = numpy.transpose(pos, (0, 2, 1, 3)) if pos is not None else numpy.broadcast_to(keep[:, None], (1, T, H, T))
    return Wq, Wk, Wv, Gc, U, pos, pq, pk, numpy.ascontiguousarray(w, dtype=Wq.dtype)[:, None]  # [S or 1, 1, T, H, T]


def _chunk(params, shared, x, y, cfg, positions, count):
    """Forward and backward pass of M4 on one slice of the sequences of every member, x [S, m,
    T, d_in], y [S, m, T, d_out]: (the summed squared error [S], the parts of the gradient
    this slice adds: per layer gradients in Gc, U, the positional weights and LayerNorm)."""
    S, m, T, d_in = x.shape
    E, H, rep = cfg["repeat"] * d_in, cfg["heads"], cfg["repeat"]
    keep = _keep(T)                                                 # [T, T]
    ones = numpy.ones((S, m, T, 1), dtype=x.dtype)
    avg = numpy.full((E, 1), 1.0 / E, dtype=x.dtype)               # LayerNorm's means (icar.layernorm)
    h = numpy.concatenate([x] * rep, axis=-1)                      # [S, m, T, E]
    weights = [sh[8] for sh in shared]
    tapes = []
    for i, layer in enumerate(params["layers"]):
        _, _, _, Gc, U, pos, _, _, _ = shared[i]
        z = numpy.concatenate([x if i == 0 else h, ones], axis=-1)  # [S, m, T, D]
        D = z.shape[-1]
        zG = numpy.reshape(numpy.reshape(z, (S, m * T, D)) @ Gc, (S, m, T * H, D))  # row (r, h) = z_r G_h
        zt = numpy.ascontiguousarray(_t(z))                         # [S, m, D, T]: faster products
        scores = zG @ zt                                            # [S, m, T*H, T]
        w = weights[i]                                              # [S or 1, 1, T, H, T]
        s5 = numpy.reshape(scores, (S, m, T, H, T))
        A = s5 if cfg["attention"] == "linear" else _softmax(s5, keep[:, None])  # [S, m, T, H, T]
        a = numpy.reshape(A * w, (S, m, T * H, T))
        Y = numpy.reshape(a @ z, (S, m * T, H * D))                 # [S, m*T, H*D]
        out = numpy.reshape(Y @ U, (S, m, T, E)) + layer["b_O"][:, None, None]  # [S, m, T, E]
        xhat = rstd = None
        if cfg["layernorm"]:
            xc = out - _last_mean(out, avg)
            rstd = (_last_mean(xc * xc, avg) + 1e-5) ** -0.5        # [S, m, T, 1]
            xhat = xc * rstd
            out = xhat * layer["ln_g"][:, None, None] + layer["ln_b"][:, None, None]
        tapes.append((z, zt, zG, A, w, a, Y, xhat, rstd))
        h = h + out if cfg["residual"] else out
    f = _tokens(h, params["W_out"]) + params["b_out"][:, None, None]  # [S, m, T, d_out]

    err = (f - y)[:, :, positions]                                 # [S, m, P, d_out]
    sq = numpy.sum(numpy.reshape(err * err, (S, -1)), axis=1)     # [S]
    df = numpy.zeros_like(f)
    df[:, :, positions] = err * (2.0 / count)                       # [S, m, T, d_out]
    parts = {"W_out": _t(numpy.reshape(h, (S, m * T, E))) @ numpy.reshape(df, (S, m * T, -1)),
             "b_out": _sum_rows(df), "layers": [None] * len(tapes)}
    dh = _tokens(df, _t(params["W_out"]))                          # [S, m, T, E]
    for i in reversed(range(len(tapes))):
        layer, (_, _, _, Gc, U, pos, _, _, _) = params["layers"][i], shared[i]
        z, zt, zG, A, w, a, Y, xhat, rstd = tapes[i]
        D = z.shape[-1]
        g = {}
        d_out = dh
        if cfg["layernorm"]:
            g["ln_g"], g["ln_b"] = _sum_rows(dh * xhat), _sum_rows(dh)
            dx = dh * layer["ln_g"][:, None, None]
            d_out = rstd * (dx - _last_mean(dx, avg) - xhat * _last_mean(dx * xhat, avg))
        g["b_O"] = _sum_rows(d_out)
        d2 = numpy.reshape(d_out, (S, m * T, E))
        g["U"] = _t(Y) @ d2                                         # [S, H*D, E]
        dy = numpy.reshape(d2 @ _t(U), (S, m, T * H, D))            # [S, m, T*H, D]
        g_a = dy @ zt                                               # [S, m, T*H, T]
        g_a5 = numpy.reshape(g_a, (S, m, T, H, T))
        g_A = g_a5 * w
        if pos is not None:                                         # [S, T, H, T]
            g["w"] = numpy.reshape(_sum_rows(numpy.reshape(g_a5 * A, (S, m, -1))), (S, T, H, T))
        g_s = g_A if cfg["attention"] == "linear" else _softmax_vjp(A, g_A)
        g_s = numpy.reshape(g_s, (S, m, T * H, T))
        g_z = _t(a) @ dy + _t(g_s) @ zG                              # [S, m, T, D]: z as values and keys
        g_zG2 = numpy.reshape(g_s @ z, (S, m * T, D * H))          # [S, m*T, H*D]
        g["Gc"] = _t(numpy.reshape(z, (S, m * T, D))) @ g_zG2        # [S, D, H*D]
        parts["layers"][i] = g
        if i:
            g_z = g_z + numpy.reshape(g_zG2 @ _t(Gc), (S, m, T, D))
            dh = (dh if cfg["residual"] else 0.0) + g_z[..., :-1]
    return sq, parts


def _add(a, b):
    """The sum of two trees of gradient parts (dicts and lists of arrays)."""
    if isinstance(a, dict):
        return {k: _add(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(_add(u, v) for u, v in zip(a, b))
    return a + b


def stack_loss_and_grad(params, x, y, cfg, positions=slice(None)):
    """The losses and gradients of S models M4 at once, by hand (no autograd tracing).

    params: an icar.transformer parameter tree whose every array has a leading member axis S;
    x [S, n, T, d_in] tokens and y [S, n, T, d_out] targets of each member, real. Returns
    (loss [S], grads): loss[s] = icar.mse(f_s[:, positions], y[s][:, positions]) with f_s =
    icar.transformer(params_s, x[s], cfg), and grads its gradient in params_s, stacked like
    params. The products are fused.transformer's (z = (h, 1), G_h, one product per layer for
    every head), batched over the members; the backward pass is the chain rule written out
    layer by layer (tested against autograd on icar.transformer). Everything but the
    parameters is per sequence, so the batch runs in slices of about STACK_CHUNK attention
    weights (in cache), in fused.THREADS threads, each slice's forward and backward pass at
    once; the slices' parts are summed in a fixed order (the same bits with any THREADS).
    The parameters' own chain rule (folds, G, U, positions) runs once per step."""
    S, n, T, d_in = x.shape
    E, H, rep = cfg["repeat"] * d_in, cfg["heads"], cfg["repeat"]
    keep = _keep(T)
    p = params["pos"][:, :T] if cfg["positional"] else None          # [S, T, E]
    shared = [_layer_shared(layer, p, cfg, (d_in if i == 0 else E) + 1, rep if i == 0 else 1, T, keep)
              for i, layer in enumerate(params["layers"])]
    count = n * len(range(T)[positions])
    step = max(1, STACK_CHUNK // (S * H * T * T))
    if S * n * H * T * T >= STACK_CHUNK // 2:  # enough work for two threads: two slices at least
        step = min(step, -(-n // 2))
    slices = [slice(i, i + step) for i in range(0, n, step)]

    def run(group):
        total = None
        for c in group:
            part = _chunk(params, shared, x[:, c], y[:, c], cfg, positions, count)
            total = part if total is None else _add(total, part)
        return total
    parts = _over_slices(run, slices, True)
    sq, parts = functools.reduce(_add, parts)
    grads = {"W_out": parts["W_out"], "b_out": parts["b_out"], "layers": []}
    c = E ** 0.5
    g_p = 0.0
    for i, (layer, part) in enumerate(zip(params["layers"], parts["layers"])):
        Wq, Wk, Wv, _, _, pos, pq, pk, _ = shared[i]
        D, r = Wq.shape[2], rep if i == 0 else 1
        g = {k: part[k] for k in ("b_O",)}
        g["ln_g"], g["ln_b"] = ((part["ln_g"], part["ln_b"]) if cfg["layernorm"] else
                                (numpy.zeros_like(layer["ln_g"]), numpy.zeros_like(layer["ln_b"])))
        gU = numpy.reshape(part["U"], (S, H, D, E))
        g["W_O"] = numpy.sum(_t(Wv) @ gU, axis=1)                  # [S, E, E]
        g_G = numpy.transpose(numpy.reshape(part["Gc"], (S, D, H, D)), (0, 2, 1, 3)) / c  # [S, H, D, D]
        for k, gf in (("Q", g_G @ Wk), ("K", _t(g_G) @ Wq), ("V", gU @ _t(layer["W_O"])[:, None])):
            g["W_" + k] = numpy.concatenate([gf[:, :, :-1]] * r, axis=2)  # unfold [S, H, D, E]
            g["b_" + k] = gf[:, :, -1]
        if pos is not None:
            g_S = _softmax_vjp(pos, numpy.transpose(part["w"], (0, 2, 1, 3))) / c  # [S, H, T, T]
            g_pq, g_pk = g_S @ pk, _t(g_S) @ pq                     # [S, H, T, E] each
            g["W_Q"] = g["W_Q"] + _t(p)[:, None] @ g_pq
            g["W_K"] = g["W_K"] + _t(p)[:, None] @ g_pk
            g["b_Q"], g["b_K"] = g["b_Q"] + numpy.sum(g_pq, axis=2), g["b_K"] + numpy.sum(g_pk, axis=2)
            g_p = g_p + numpy.sum(g_pq @ _t(layer["W_Q"]) + g_pk @ _t(layer["W_K"]), axis=1)  # [S, T, E]
        grads["layers"].append(g)
    if cfg["positional"]:
        g_pos = numpy.zeros_like(params["pos"])
        g_pos[:, :T] = g_p
        grads["pos"] = g_pos
    return sq / count, grads
