"""icar: data and every Transformer of "How do Transformers perform In-Context Autoregressive
Learning?" (Sander, Giryes, Suzuki, Blondel, Peyre, ICML 2024), in NumPy that autograd can differentiate.

A sequence follows s_{t+1} = W s_t (+ sigma eps_t) with a fresh context matrix W per sequence. Every
model maps inputs s_1..s_T of shape [n, T, d] to a prediction of s_{t+1} at every position t (causal),
so the all-prefix and last-token losses are one line (`mse(f, s[:, 1:])`, `mse(f[:, -1:], s[:, -1:])`).

Index (names of paper.md):
    sample_sequences     context-matrix families: "unitary", "orthogonal" (commuting 2x2 rotations),
                         "haar" (non-commuting O(d)), "angle" (d = 1, theta ~ U[0, 2 pi / mu], Fig. 6)
    augment              tokens e_t = (0, s_t, s_{t-1}) of M1 and M4 (augmented)
    augmented_linear     M1, one layer of linear attention on augmented tokens; full (W_KQ, W_V) or block (A, B)
    diagonal_heads       M2, diagonal multi-head linear attention with positional matrix P; the query
                         is the second-to-last token
    pe_only              M3, only P is trained (d = 1 in the paper, C = I here for any d)
    transformer          M4, the experiments' Transformer (augmented and non-augmented), one
                         transformer_layer per layer (fused.transformer: the same, faster)
    transformer_two_streams  M4 whose position-r query and residual stream start from another
                         input (the query of the in-context mapping; evaluate.probe)
    init_params          initial parameters of each model, from a np.random.Generator
    mse                  squared error ||f - y||^2, summed over d, averaged over the rest
    check_*              bad input: a ValueError naming the argument (models: keys, dtypes, shapes)

Conventions: positions are 0-based in code. Row r of P holds the weights used by the query at position
r (prefix length r + 1), so p_T of paper.md is P[r, r] and p_{T-1} is P[r, r-1]. Parameters are real;
data may be complex ("unitary", "angle"), and conj() is applied where paper.md writes a star. Constants
and masks come from the array module that owns the data (`array_module`), so the code runs on GPU arrays.
"""
import importlib
import numbers

import autograd.numpy as np
import numpy
from autograd.tracer import getval

FAMILIES = ("unitary", "orthogonal", "haar", "angle")
MODELS = ("augmented_linear", "diagonal_heads", "pe_only", "transformer")
LAYER_KEYS = ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O", "b_O", "ln_g", "ln_b")  # one layer of M4


# ----------------------------------------------------------------------------- checks

class Diverged(ValueError):
    """Training met a non-finite loss (raised by theory.train_population and train.run)."""
    exit_status = 1  # on a command line: the settings were valid, the run was not


def _finite_real(value):
    """Whether value is a finite real number (never a bool; a Python int past float's range is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return bool(numpy.isfinite(float(value)))
    except OverflowError:
        return False


def check_int(name, value, low):
    if isinstance(low, bool) or not isinstance(low, numbers.Integral):
        raise ValueError(f"low (the least {name} allowed) must be an integer, got {low!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if value > 2 ** 62:  # past this no size or count fits memory or a float's 53 bits
        raise ValueError(f"{name} must be an integer at most 2^62, got {value!r}")
    return int(value)


def check_real(name, value, low=None, strict=False):
    """float(value) for a finite real number (never a bool) >= low (> low if strict)."""
    if low is not None and not _finite_real(low):
        raise ValueError(f"low (the bound on {name}) must be None or a finite number, got {low!r}")
    if not isinstance(strict, bool):
        raise ValueError(f"strict must be True or False, got {strict!r}")
    if not _finite_real(value) or (low is not None and (value <= low if strict else value < low)):
        rule = "" if low is None else f" {'>' if strict else '>='} {low}"  # "", " >= 0" or " > 0"
        raise ValueError(f"{name} must be a finite number{rule}, got {value!r}")
    return float(value)


def check_choice(name, value, allowed):
    if not isinstance(allowed, (tuple, list, set, frozenset, dict)):
        raise ValueError(f"allowed (the choices of {name}) must be a tuple, list or set, got {type(allowed).__name__}")
    try:
        known = value in allowed
    except (TypeError, ValueError):  # an unhashable value and a set, an array compared elementwise
        known = False
    if not known:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(map(str, allowed))}")
    return value


def check_params(name, params, *allowed):
    """The key set (one of `allowed`, tuples of names) of the dict `params`, checked exactly."""
    params = getval(params)  # a dict, also while autograd traces it
    for keys in allowed:
        if not isinstance(keys, (tuple, list)) or not all(isinstance(k, str) for k in keys):
            raise ValueError(f"allowed (key sets of {name}) must be tuples of names, got {keys!r}")
        if isinstance(params, dict) and set(params) == set(keys):
            return keys
    got = sorted(params, key=str) if isinstance(params, dict) else type(params).__name__
    raise ValueError(f"{name} must be a dict with keys {' or '.join(map(str, allowed))}, got {got}")


def check_shape(name, array, shape):
    """A parameter: a real float array of the given shape."""
    if not isinstance(shape, (tuple, list)) or not all(
            isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 0 for k in shape):
        raise ValueError(f"shape (of {name}) must be a tuple of sizes >= 0, got {shape!r}")
    if getattr(getattr(getval(array), "dtype", None), "kind", None) != "f":
        raise ValueError(f"{name} must be a real float array, got {getattr(getval(array), 'dtype', type(getval(array)).__name__)}")
    if tuple(numpy.shape(array)) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(numpy.shape(array))}, expected {tuple(shape)} to match the data")


def check_data(s, name="s", axes="n, T, d", finite=False):
    """The shape of s, a float or complex array with the named axes (None: any), each >= 1; O(1) on
    autograd boxes and GPU arrays, except finite=True: a scan for NaN and inf (entry points, not models)."""
    if axes is not None and not isinstance(axes, str):
        raise ValueError(f"axes must be None or axis names such as 'n, T, d', got {axes!r}")
    if not isinstance(finite, (bool, numpy.bool_)):
        raise ValueError(f"finite must be True or False, got {finite!r}")
    s = getval(s)
    if getattr(getattr(s, "dtype", None), "kind", None) not in ("f", "c"):
        raise ValueError(f"{name} must be a float or complex array, got {getattr(s, 'dtype', type(s).__name__)}")
    if axes and (numpy.ndim(s) != axes.count(",") + 1 or min(numpy.shape(s)) < 1):
        raise ValueError(f"{name} must have shape [{axes}] with {axes} >= 1, got shape {numpy.shape(s)}")
    if finite and not array_module(s).all(array_module(s).isfinite(s)):
        raise ValueError(f"{name} must be finite, got NaN or inf")
    return tuple(numpy.shape(s))


def array_module(x):
    """The array module (numpy, or cupy for GPU arrays) that owns x, seen through autograd boxes."""
    if isinstance(x := getval(x), (numpy.ndarray, numpy.generic, numbers.Number)):
        return numpy
    if hasattr(x, "__array_namespace__"):
        return x.__array_namespace__()
    package = type(x).__module__.partition(".")[0]  # CuPy < 14: the package that defines the type
    if package in ("builtins", "numpy"):  # None, a str, list, dict or function is no array
        raise ValueError(f"x must be an array (NumPy's, or a GPU array such as CuPy's), got {type(x).__name__}")
    return importlib.import_module(package)


# ----------------------------------------------------------------------------- data

def sample_sequences(rng, n, T, d, family, sigma=0.0, s1="random", mu=None):
    """Sample n sequences s_1..s_{T+1} of s_{t+1} = W s_t + sigma eps_t.

    Returns (s, W): s [n, T+1, d], W [n, d, d]; complex for "unitary" and "angle". s1="random":
    unit-modulus eigen-coordinates with uniform phases ("unitary", "angle"), 2-D blocks of norm sqrt(2)
    with uniform phase ("orthogonal"), uniform on the sphere ("haar"). s1="fixed": all ones ("unitary",
    "angle", "orthogonal") or 1/sqrt(d) ("haar")."""
    if not isinstance(rng, numpy.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    n, T, d = check_int("n", n, 1), check_int("T", T, 2), check_int("d", d, 1)
    check_choice("family", family, FAMILIES)
    check_choice("s1", s1, ("random", "fixed"))
    sigma = check_real("sigma", sigma, 0)
    if family == "orthogonal" and d % 2:
        raise ValueError(f"family 'orthogonal' needs an even d, got d={d}")
    if family == "angle":
        if d != 1:
            raise ValueError(f"family 'angle' needs d=1, got d={d}")
        mu = check_real("mu (family 'angle')", mu, 0, strict=True)
        if not numpy.isfinite(2 * numpy.pi / mu):
            raise ValueError(f"mu (family 'angle') is too small: 2 pi / mu overflows, got {mu!r}")
    elif mu is not None:
        raise ValueError(f"mu is only used by family 'angle', got mu={mu!r} for {family!r}")

    if family in ("unitary", "angle"):
        top = 2 * numpy.pi / (mu if family == "angle" else 1.0)
        lam = numpy.exp(1j * rng.uniform(0, top, (n, d)))                       # [n, d]
        W = lam[:, :, None] * numpy.eye(d)                                       # [n, d, d]
        phase = rng.uniform(0, 2 * numpy.pi, (n, d)) if s1 == "random" else numpy.zeros((n, d))
        x = numpy.exp(1j * phase)                                                # [n, d]
    elif family == "orthogonal":
        theta = rng.uniform(0, 2 * numpy.pi, (n, d // 2))                        # [n, d/2]
        c, s = numpy.cos(theta), numpy.sin(theta)
        R = numpy.stack([numpy.stack([c, -s], -1), numpy.stack([s, c], -1)], -2)  # [n, d/2, 2, 2]
        W = numpy.einsum("kl,nkij->nkilj", numpy.eye(d // 2), R).reshape(n, d, d)  # blocks on the diagonal
        phase = (rng.uniform(0, 2 * numpy.pi, (n, d // 2)) if s1 == "random"
                 else numpy.full((n, d // 2), numpy.pi / 4))
        x = numpy.sqrt(2) * numpy.stack([numpy.cos(phase), numpy.sin(phase)], -1).reshape(n, d)  # [n, d]
    else:  # haar: QR of a Gaussian matrix, signs fixed so that Q is Haar-distributed
        Q, R = numpy.linalg.qr(rng.standard_normal((n, d, d)))                   # [n, d, d]
        W = Q * numpy.sign(numpy.diagonal(R, axis1=1, axis2=2))[:, None, :]
        x = rng.standard_normal((n, d)) if s1 == "random" else numpy.ones((n, d))
        x /= numpy.linalg.norm(x, axis=1, keepdims=True)                        # [n, d] on the sphere

    s = numpy.empty((n, T + 1, d), dtype=W.dtype)
    s[:, 0] = x
    noise = numpy.zeros((n, T, d))
    if sigma > 0:  # E|eps_i|^2 = 1 for real and complex noise
        eps = rng.standard_normal((2 if W.dtype.kind == "c" else 1, n, T, d))     # [1 or 2, n, T, d]
        noise = sigma * (eps[0] if len(eps) == 1 else (eps[0] + 1j * eps[1]) / numpy.sqrt(2))  # [n, T, d]
    for t in range(T):  # the recursion is sequential; the batch is not
        s[:, t + 1] = (W @ s[:, t, :, None])[..., 0] + noise[:, t]                # [n, d]
    return s, W


def augment(s):
    """Tokens e_t = (0_d, s_t, s_{t-1}) with s_0 = 0: [n, T, d] -> [n, T, 3d]."""
    n, T, d = check_data(s)
    xp = array_module(s)
    prev = np.concatenate([xp.zeros((n, 1, d), dtype=s.dtype), s[:, :-1]], axis=1)  # [n, T, d]
    return np.concatenate([xp.zeros((n, T, d), dtype=s.dtype), s, prev], axis=2)  # [n, T, 3d]


def mse(f, y):
    """Squared error ||f - y||^2 summed over the last axis, averaged over the others."""
    if check_data(f, "f", None) != check_data(y, "y", None) or not numpy.ndim(f):
        raise ValueError(f"f and y must have the same shape [..., d], got f {numpy.shape(f)}, y {numpy.shape(y)}")
    r = f - y
    sq = np.real(r * np.conj(r)) if numpy.iscomplexobj(r) else r * r
    # divided by a Python int: mean's gradient divides by a NumPy integer, which turns float32 into float64
    return np.sum(sq) / (numpy.size(r) // numpy.shape(r)[-1])


def causal_mask(xp, T, like=None):
    """[T, T] lower-triangular ones: query position r sees keys t <= r. In the real precision
    of the array `like` (float32 for complex64 data), so that a mask never upcasts float32."""
    if not (callable(getattr(xp, "tril", None)) and callable(getattr(xp, "ones", None))):
        raise ValueError(f"xp must be an array module (numpy, or cupy for GPU arrays), got {type(xp).__name__}")
    check_int("T", T, 1)
    if like is not None and getattr(getattr(getval(like), "dtype", None), "kind", None) not in ("f", "c"):
        raise ValueError(f"like must be None or a float or complex array, got "
                         f"{getattr(getval(like), 'dtype', type(getval(like)).__name__)}")
    dtype = numpy.float64 if like is None else numpy.finfo(like.dtype).dtype
    return xp.tril(xp.ones((T, T), dtype=dtype))


def swap(x):
    """x with its last two axes swapped: [..., a, b] -> [..., b, a]."""
    if getattr(getval(x), "ndim", 0) < 2:  # also no list: the models take arrays
        raise ValueError(f"x must be an array with at least 2 axes, got shape {getattr(getval(x), 'shape', type(getval(x)).__name__)}")
    return np.swapaxes(x, -1, -2)


# ----------------------------------------------------------------------------- M1

def augmented_linear(params, e):
    """M1: one layer of linear causal attention on augmented tokens e [n, T, 3d] -> [n, T, d].

    Full form {"W_KQ", "W_V"} ([3d, 3d] each):
        f_r = block_1[ sum_{t<=r} (W_V e_t)(e_t^* W_KQ e_r) ].
    Block form {"A", "B"} ([d, d] each): f_r = B (sum_{t<=r} s_t s_{t-1}^*) A s_r, which is the full
    form with W_KQ's (3, 2) block = A and W_V's (1, 2) block = B."""
    n, T, D = check_data(e, "e")
    if D % 3:
        raise ValueError(f"augmented tokens must have size 3d, got {D}")
    d = D // 3
    mask = causal_mask(array_module(e), T, e)                                    # [T, T]
    if check_params("params", params, ("W_KQ", "W_V"), ("A", "B")) == ("W_KQ", "W_V"):  # full, else block
        check_shape("W_KQ", params["W_KQ"], (D, D))
        check_shape("W_V", params["W_V"], (D, D))
        q = e @ swap(params["W_KQ"])                           # [n, T, 3d] rows W_KQ e_r
        scores = (q @ swap(np.conj(e))) * mask                 # [n, T, T]: e_t^* W_KQ e_r
        v = e @ swap(params["W_V"])                            # [n, T, 3d]
        return (scores @ v)[..., :d]                            # [n, T, T] @ [n, T, 3d] -> [n, T, d]
    check_shape("A", params["A"], (d, d))
    check_shape("B", params["B"], (d, d))
    s, prev = e[..., d:2 * d], e[..., 2 * d:]                   # [n, T, d] each
    q = s @ swap(params["A"])                                  # [n, T, d] rows A s_r
    scores = (q @ swap(np.conj(prev))) * mask                  # [n, T, T]: s_{t-1}^* A s_r
    return (scores @ s) @ swap(params["B"])                    # [n, T, d]


# ----------------------------------------------------------------------------- M2, M3

def diagonal_heads(params, s):
    """M2: diagonal multi-head linear attention, s [n, T, d] -> [n, T, d].

    Heads h have key-query diag(A_h) and value diag(B_h) (A, B [H, d], C = B^T A) and P [T, T] weighs
    key t for query position r:
        f_{r,i} = sum_{t<=r} P[r, t] s_{t,i} sum_j C_ij conj(s_{r-1,j}) s_{t,j},
    with s_{-1} = 0, so the first position always predicts 0."""
    n, T, d = check_data(s)
    check_params("params", params, ("A", "B", "P"))
    H = check_int("H (rows of A)", numpy.shape(params["A"])[0] if numpy.ndim(params["A"]) == 2 else 0, 1)
    check_shape("A", params["A"], (H, d))
    check_shape("B", params["B"], (H, d))
    check_shape("P", params["P"], (T, T))
    xp = array_module(s)
    query = np.concatenate([xp.zeros((n, 1, d), dtype=s.dtype), np.conj(s[:, :-1])], axis=1)  # [n, T, d]: conj(s_{r-1})
    q = query[:, None] * params["A"][None, :, None, :]          # [n, H, T, d]
    scores = q @ swap(s)[:, None]                              # [n, H, T, d] @ [n, 1, d, T] -> [n, H, T, T]
    scores = scores * (params["P"] * causal_mask(xp, T, s))     # [n, H, T, T]
    heads = scores @ s[:, None]                                 # [n, H, T, d]
    return np.sum(heads * params["B"][None, :, None, :], axis=1)  # [n, T, d]


def pe_only(params, s):
    """M3: only P [T, T] is trained; f_{r,i} = conj(s_{r-1,i}) sum_{t<=r} P[r, t] s_{t,i}^2.

    This is M2 with C = I (paper.md uses d = 1, C = 1)."""
    n, T, d = check_data(s)
    check_params("params", params, ("P",))
    check_shape("P", params["P"], (T, T))
    xp = array_module(s)
    query = np.concatenate([xp.zeros((n, 1, d), dtype=s.dtype), np.conj(s[:, :-1])], axis=1)  # [n, T, d]: conj(s_{r-1})
    s2 = np.reshape(np.transpose(s * s, (1, 0, 2)), (T, n * d))  # [T, n*d]: one product for the batch
    Ps2 = (params["P"] * causal_mask(xp, T, s)) @ s2            # [T, T] @ [T, n*d] -> [T, n*d]
    return query * np.transpose(np.reshape(Ps2, (T, n, d)), (1, 0, 2))  # [n, T, d]


# ----------------------------------------------------------------------------- M4

TRANSFORMER_DEFAULTS = dict(
    d_in=5,             # token size (3d for augmented tokens)
    d_out=5,            # size of the predicted state
    T=50,               # longest sequence (rows of the position embeddings)
    layers=1,           # L
    heads=1,            # H, each of head size = embed
    repeat=1,           # r: the input is repeated r times, embed = r * d_in
    attention="linear",  # token scores: "linear" (masked, no normalisation) or "softmax"
    positional=False,   # multiply by softmax((Q p_r).(K p_t) / sqrt(embed)) of learned positions
    layernorm=True,     # LayerNorm on each attention output
    residual=True,      # h <- h + LayerNorm(attention(h)), else h <- LayerNorm(attention(h))
)


def _broadcasts(shape, to):
    """Whether an array of shape `shape` broadcasts to shape `to` (and no further)."""
    if len(shape) <= len(to) and tuple(shape) == tuple(to)[len(to) - len(shape):]:  # the common case, fast
        return True
    try:
        return numpy.broadcast_shapes(shape, to) == tuple(to)
    except ValueError:
        return False


def transformer_config(**overrides):
    """A complete, checked M4 configuration: TRANSFORMER_DEFAULTS with overrides."""
    unknown = set(overrides) - set(TRANSFORMER_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown transformer option(s) {sorted(unknown)}; "
                         f"allowed: {', '.join(TRANSFORMER_DEFAULTS)}")
    cfg = dict(TRANSFORMER_DEFAULTS, **overrides)
    for key in ("d_in", "d_out", "T", "layers", "heads", "repeat"):
        check_int(key, cfg[key], 1)
    check_choice("attention", cfg["attention"], ("linear", "softmax"))
    for key in ("positional", "layernorm", "residual"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"{key} must be True or False, got {cfg[key]!r}")
    return cfg


def check_config(cfg):
    """cfg, a complete M4 configuration: every key of TRANSFORMER_DEFAULTS, each value as
    transformer_config allows (as transformer_config returns it)."""
    check_params("cfg", cfg, tuple(TRANSFORMER_DEFAULTS))
    transformer_config(**cfg)
    return cfg


def softmax(z, mask):
    """Softmax of z over the last axis where mask > 0 (0 elsewhere). Shifting by the row maximum of those
    entries leaves it unchanged, so the shift is a constant for autograd (no gradient through max); masked
    entries become -inf before exp, so a large masked score can neither overflow nor take part in the shift."""
    shape = check_data(z, "z", None)
    if numpy.iscomplexobj(getval(z)) or not shape or shape[-1] < 1:
        raise ValueError(f"z must be a real float array [..., K] with K >= 1, got {getval(z).dtype} of shape {shape}")
    if (getattr(getattr(getval(mask), "dtype", None), "kind", None) not in ("f", "i", "u", "b")
            or not _broadcasts(numpy.shape(mask), shape)):
        raise ValueError(f"mask must be a real array that broadcasts to z's shape {shape}, got "
                         f"{getattr(getval(mask), 'dtype', type(getval(mask)).__name__)} of shape {numpy.shape(getval(mask))}")
    xp = array_module(z)
    keep = mask > 0
    shift = xp.max(xp.where(keep, getval(z), -numpy.inf), axis=-1, keepdims=True)
    w = np.exp(np.where(keep, z - shift, -numpy.inf))
    return w / np.sum(w, axis=-1, keepdims=True)


def layernorm(x, g, b, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * g + b over the last axis of x [..., E]. Means are products with
    [E, 1] averaging weights: their gradients are single products, where mean's broadcast and divide
    take several passes."""
    shape = check_data(x, "x", None)
    if not shape or shape[-1] < 1:
        raise ValueError(f"x must be an array [..., E] with E >= 1, got shape {shape}")
    for name, v in (("g", g), ("b", b)):
        if getattr(getattr(getval(v), "dtype", None), "kind", None) != "f" or not _broadcasts(numpy.shape(v), shape):
            raise ValueError(f"{name} must be a real float array that broadcasts to x's shape {shape}, got "
                             f"{getattr(getval(v), 'dtype', type(getval(v)).__name__)} of shape {numpy.shape(getval(v))}")
    check_real("eps", eps, 0)
    avg = array_module(x).full((x.shape[-1], 1), 1.0 / x.shape[-1], dtype=numpy.finfo(x.dtype).dtype)
    xc = x - x @ avg                                            # [n, T, E] - [n, T, 1]
    sq = np.real(xc * np.conj(xc)) if numpy.iscomplexobj(xc) else xc * xc
    return xc * (sq @ avg + eps) ** -0.5 * g + b                # [n, T, E]


def check_tokens(x, cfg, name="x"):
    """(n, T, d_in) of M4's tokens x [n, T, d_in] (named `name`), which cfg (check_config) must allow."""
    check_config(cfg)
    n, T, d_in = check_data(x, name)
    if d_in != cfg["d_in"] or T > cfg["T"]:
        raise ValueError(f"{name} has T={T}, d={d_in}; the configuration allows T <= {cfg['T']}, d = {cfg['d_in']}")
    return n, T, d_in


def check_layer(name, layer, E):
    """H, the heads of one layer of M4: `layer` has the keys LAYER_KEYS, real float arrays
    W_Q, W_K, W_V [H, E, E], b_Q, b_K, b_V [H, E], W_O [E, E], b_O, ln_g, ln_b [E], H >= 1."""
    check_params(name, layer, LAYER_KEYS)
    E, arrays = check_int("E", E, 1), getval(layer)
    H = numpy.shape(arrays["W_Q"])[0] if getattr(arrays["W_Q"], "ndim", None) == 3 else 1  # else named below
    shapes = dict(W_Q=(H, E, E), W_K=(H, E, E), W_V=(H, E, E), b_Q=(H, E), b_K=(H, E), b_V=(H, E),
                  W_O=(E, E), b_O=(E,), ln_g=(E,), ln_b=(E,))
    for key in LAYER_KEYS:  # the names are only formatted for an array that fails
        if getattr(getattr(arrays[key], "dtype", None), "kind", None) != "f" or getattr(arrays[key], "shape", None) != shapes[key]:
            check_shape(f"{name}['{key}']", arrays[key], shapes[key])
    return check_int(f"{name} heads (rows of W_Q)", H, 1)


def check_transformer(params, cfg):
    """M4's parameters for the configuration cfg (check_config): the keys layers, W_out, b_out
    (and pos if cfg["positional"]); layers a list of layers (check_layer) on the stream of
    size E = repeat * d_in, W_out [E, d_out], b_out [d_out], pos [T', E] with T' >= T."""
    check_config(cfg)
    check_params("params", params, ("layers", "W_out", "b_out") + (("pos",) if cfg["positional"] else ()))
    E, arrays = cfg["repeat"] * cfg["d_in"], getval(params)
    layers = getval(arrays["layers"])
    if not isinstance(layers, (list, tuple)):
        raise ValueError(f"params['layers'] must be a list of layers (dicts of arrays), got {type(layers).__name__}")
    for i, layer in enumerate(layers):
        check_layer(f"params['layers'][{i}]", layer, E)
    check_shape("W_out", arrays["W_out"], (E, cfg["d_out"]))
    check_shape("b_out", arrays["b_out"], (cfg["d_out"],))
    if cfg["positional"]:
        rows = numpy.shape(arrays["pos"])[0] if getattr(arrays["pos"], "ndim", None) == 2 else cfg["T"]
        check_shape("pos", arrays["pos"], (max(rows, cfg["T"]), E))


def positional_attention(layer, p):
    """softmax_{t<=r}((Q p_r) . (K p_t) / sqrt(E)) of one layer's heads, from the embeddings
    p [T, E] of the first T positions: [H, T, T], 0 for t > r (M4's positional weights)."""
    T, E = check_data(p, "p", "T, E")
    check_shape("p", p, (T, E))
    check_layer("layer", layer, E)
    pq = p @ layer["W_Q"] + layer["b_Q"][:, None]                 # [T, E] @ [H, E, E] -> [H, T, E]
    pk = p @ layer["W_K"] + layer["b_K"][:, None]                 # [H, T, E]
    return softmax((pq @ swap(pk)) / E ** 0.5, causal_mask(array_module(p), T, p))  # [H, T, T]


def transformer_layer(layer, h, cfg, pos=None, g=None):
    """One layer of M4, the stream h [n, T, E] -> the next one [n, T, E]; pos: params["pos"]
    (if cfg["positional"]). g [n, T, E], default h: the stream of queries and residual; keys and
    values come from h, so output position r depends on g only through g_r (evaluate.probe, through
    transformer_two_streams)."""
    check_config(cfg)
    n, T, E = check_data(h, "h", "n, T, E")
    check_layer("layer", layer, E)
    if g is not None and check_data(g, "g", "n, T, E") != (n, T, E):
        raise ValueError(f"g must have the shape of h {(n, T, E)}, got {numpy.shape(g)}")
    if cfg["positional"]:
        rows = check_data(pos, "pos", "T', E")[0]
        check_shape("pos", pos, (max(rows, T), E))
    g = h if g is None else g
    mask = causal_mask(array_module(h), T, h)                     # [T, T]
    q = g[:, None] @ layer["W_Q"] + layer["b_Q"][:, None]         # [n, 1, T, E] @ [H, E, E] -> [n, H, T, E]
    k = h[:, None] @ layer["W_K"] + layer["b_K"][:, None]         # [n, H, T, E]
    v = h[:, None] @ layer["W_V"] + layer["b_V"][:, None]         # [n, H, T, E]
    scores = (q @ swap(np.conj(k))) / E ** 0.5                    # [n, H, T, E] @ [n, H, E, T] -> [n, H, T, T]
    a = scores * mask if cfg["attention"] == "linear" else softmax(np.real(scores), mask)  # [n, H, T, T]
    if cfg["positional"]:
        a = a * positional_attention(layer, pos[:T])              # [n, H, T, T] * [H, T, T]
    out = np.sum(a @ v, axis=1) @ layer["W_O"] + layer["b_O"]     # sum over heads of [n, H, T, E] -> [n, T, E]
    if cfg["layernorm"]:
        out = layernorm(out, layer["ln_g"], layer["ln_b"])        # [n, T, E]
    return g + out if cfg["residual"] else out                    # [n, T, E]


def transformer(params, x, cfg):
    """M4: the experiments' Transformer, tokens x [n, T, d_in] -> predictions [n, T, d_out].

    Per layer (transformer_layer), with embed E = repeat * d_in and H heads of size E:
        q, k, v = h W_Q + b_Q, h W_K + b_K, h W_V + b_V           each [n, H, T, E]
        a = mask * (q . conj(k)) / sqrt(E)                         ("linear")
          = softmax_{t<=r}(Re(q . conj(k)) / sqrt(E))             ("softmax")
        a = a * softmax_{t<=r}((Q p_r) . (K p_t) / sqrt(E))        (if positional)
        h = [h +] LayerNorm(sum_heads(a @ v) W_O + b_O)
    from h = [x] * repeat, then f = h W_out + b_out. fused.transformer computes the same."""
    check_tokens(x, cfg)
    check_transformer(params, cfg)
    h = np.concatenate([x] * cfg["repeat"], axis=-1)              # [n, T, E]
    for layer in params["layers"]:  # layers differ in parameters, a short fixed loop
        h = transformer_layer(layer, h, cfg, params.get("pos"))   # [n, T, E]
    return h @ params["W_out"] + params["b_out"]                  # [n, T, d_out]


def transformer_two_streams(params, x, xq, cfg):
    """M4 where position r's own stream starts from xq_r [n, T, d_in] instead of x_r: keys
    and values at every position come from the ordinary stream of x, queries and the
    residual stream from xq (transformer_layer's g). At xq = x this is `transformer`; output
    position r depends on xq only through xq_r. evaluate.probe differentiates it in xq."""
    if check_tokens(x, cfg) != check_tokens(xq, cfg, "xq"):
        raise ValueError(f"x and xq must have the same shape [n, T, d_in], got {numpy.shape(x)} and {numpy.shape(xq)}")
    check_transformer(params, cfg)
    h = np.concatenate([x] * cfg["repeat"], axis=-1)              # [n, T, E]
    g = np.concatenate([xq] * cfg["repeat"], axis=-1)             # [n, T, E]
    for layer in params["layers"]:  # the two streams share keys and values
        h, g = (transformer_layer(layer, h, cfg, params.get("pos")),
                transformer_layer(layer, h, cfg, params.get("pos"), g))  # [n, T, E] each
    return g @ params["W_out"] + params["b_out"]                  # [n, T, d_out]


# ----------------------------------------------------------------------------- parameters

def init_params(model, rng, d=None, T=None, H=None, form="block", cfg=None, scale=0.1):
    """Initial parameters of `model` from rng: a dict of real float64 arrays.

    augmented_linear: d, form "block" (A, B [d, d]) or "full" (W_KQ, W_V [3d, 3d]); diagonal_heads: d, T,
    H (A, B [H, d], P [T, T]); pe_only: T (P [T, T], zeros, as the authors start); transformer: cfg from
    transformer_config. Entries are N(0, scale^2), except transformer weights, N(0, 1/fan_in) with zero
    biases and unit LayerNorm gain."""
    check_choice("model", model, MODELS)
    if not isinstance(rng, numpy.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    scale = check_real("scale", scale, 0)
    if model == "augmented_linear":
        d = check_int("d", d, 1)
        check_choice("form", form, ("block", "full"))
        size, names = (d, ("A", "B")) if form == "block" else (3 * d, ("W_KQ", "W_V"))
        return {k: scale * rng.standard_normal((size, size)) for k in names}
    if model == "diagonal_heads":
        d, T, H = check_int("d", d, 1), check_int("T", T, 1), check_int("H", H, 1)
        return {"A": scale * rng.standard_normal((H, d)), "B": scale * rng.standard_normal((H, d)),
                "P": scale * rng.standard_normal((T, T))}
    if model == "pe_only":
        return {"P": numpy.zeros((check_int("T", T, 1),) * 2)}
    if not isinstance(cfg, dict) or not set(cfg) <= set(TRANSFORMER_DEFAULTS):
        raise ValueError(f"model 'transformer' needs cfg=transformer_config(...), a dict with keys among "
                         f"{', '.join(TRANSFORMER_DEFAULTS)}, got "
                         f"{sorted(cfg, key=str) if isinstance(cfg, dict) else type(cfg).__name__}")
    cfg = transformer_config(**cfg)
    E, Hh = cfg["repeat"] * cfg["d_in"], cfg["heads"]
    dense = lambda *shape: rng.standard_normal(shape) / numpy.sqrt(shape[-2])  # noqa: E731
    layers = [{"W_Q": dense(Hh, E, E), "W_K": dense(Hh, E, E), "W_V": dense(Hh, E, E), "W_O": dense(E, E),
               "b_Q": numpy.zeros((Hh, E)), "b_K": numpy.zeros((Hh, E)), "b_V": numpy.zeros((Hh, E)),
               "b_O": numpy.zeros(E), "ln_g": numpy.ones(E), "ln_b": numpy.zeros(E)} for _ in range(cfg["layers"])]
    params = {"layers": layers, "W_out": dense(E, cfg["d_out"]), "b_out": numpy.zeros(cfg["d_out"])}
    if cfg["positional"]:
        params["pos"] = rng.standard_normal((cfg["T"], E))
    return params
