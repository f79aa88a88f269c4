"""theory: the closed forms of "How do Transformers perform In-Context Autoregressive
Learning?" (results R1-R4 of paper.md), and gradient descent on the population losses.

What is marked [derived] was derived from the models rather than quoted from the paper
(paper.md section 4 marks all of R1-R4 so); the tests check each closed form against Monte
Carlo with the models of icar.py and against trained models.

Index (names of paper.md):
    R1  gd_step_size, gd_loss           M1 as one gradient step on the inner objective:
                                        eta* = 1 / (T + d - 2), L* = d (d - 1) / (T + d - 2)
    R2  population_loss(..., "unitary")   M2 on the unitary family, per prefix length and
        population_loss_per_prefix        summed; minimum (d - H)_+
    R3  population_loss(..., "orthogonal")  M2 on the commuting orthogonal family, in its
        eigen_coordinates                    complex eigen-basis; minimum (d - 2H)_+
    R2, R3  min_loss, minimiser         the minimum over C = B^T A with H heads, and one
                                        global minimiser as icar.diagonal_heads parameters
    R2, R3  population_loss_and_grad,   hand-derived gradient and gradient descent on (A, B, P)
            train_population            (the route of the paper's Fig. 3)
    R4  pe_only_system, pe_only_loss,   M3: the quadratic loss p^T M p - 2 b^T p + 1 of each
        pe_only_solution,               row of P, its minimum-norm minimiser, and the exact
        pe_only_trajectory              gradient-descent path from P = 0
    sec. 5  raw_token_gd_construction   paper.md section 5 [derived]: weights of a 2-layer
                                        raw-token M4, a previous-token head, then M1's GD step
                                        averaged over the r transitions seen

Conventions (those of icar.py): positions are 0-based; the query of position r is s_{r-1},
and row r of P weighs the keys t <= r, so p_T of paper.md is P[r, r] and p_{T-1} is
P[r, r-1]. Position 0 has a zero query and predicts 0 (loss d whatever the parameters), so
"summed over prefix lengths" means rows r = 1..T-1 (prefix lengths 2..T), the same T - 1
terms as the authors' script; the mean of icar.mse over all T positions is
(d + sum of the T - 1 terms) / T. Entries of P above the diagonal never enter.

The diagonal model M2 is not basis-free: R3 holds for the orthogonal family written in its
complex eigen-basis (eigen_coordinates of icar's real samples), not on the real rotation
coordinates that icar.sample_sequences returns.
"""
import autograd.numpy as np
import numpy
from autograd.tracer import getval

import icar
from icar import check_choice, check_data, check_int, check_params, check_real, check_shape

FAMILIES = ("unitary", "orthogonal")
LOSSES = ("last", "all")


# ----------------------------------------------------------------------------- checks

def _check_square(name, M, low, finite):
    """The size k >= low of M, a float or complex [k, k] matrix ([d, d] for C, else [T, T]); finite: no
    NaN or inf (a scan, left out where autograd trains through the loss, as icar's models do)."""
    k = "d" if name == "C" else "T"
    size = check_data(M, name, f"{k}, {k}", finite)[0]
    if numpy.iscomplexobj(getval(M)):
        raise ValueError(f"{name} must be real (the population losses are derived for real C and P), "
                         f"got {getval(M).dtype}")
    if numpy.shape(M) != (size, size) or size < low:
        raise ValueError(f"{name} must be a square [{k}, {k}] matrix with {k} >= {low}, got shape {numpy.shape(M)}")
    return size


def _check_family(family, d):
    check_choice("family", family, FAMILIES)
    if family == "orthogonal" and d % 2:
        raise ValueError(f"family 'orthogonal' needs an even d, got d={d}")


# ----------------------------------------------------------------------------- R1

def gd_step_size(T, d, loss="last"):
    """R1 [derived]: the optimal step eta of M1 with A = I, B = eta I (one GD step from W_0 = 0).

    loss="last": the loss of the prediction of s_{T+1} from T tokens, eta* = 1/(T + d - 2).
    loss="all": one eta shared by the prefixes with k = 1..T-1 transitions (positions
    r = 1..T-1), eta* = sum_k k / sum_k k (k + d - 1). Unitary or commuting orthogonal W,
    random phases of s_1.
    """
    T, d = check_int("T", T, 2), check_int("d", d, 1)
    check_choice("loss", loss, LOSSES)
    if loss == "last":
        return 1.0 / (T + d - 2)
    k = numpy.arange(1, T)                                                  # [T-1]
    return float(numpy.sum(k) / numpy.sum(k * (k + d - 1)))


def gd_loss(T, d, eta=None, loss="last"):
    """R1 [derived]: population loss of M1 with A = I, B = eta I (eta=None: the optimal step).

    A prefix with k transitions loses d [(eta k - 1)^2 + eta^2 k (d - 1)]; "last" takes
    k = T - 1 (minimum L* = d (d - 1) / (T + d - 2)), "all" sums k = 1..T-1 (positions
    r = 1..T-1; position 0 always adds d).
    """
    T, d = check_int("T", T, 2), check_int("d", d, 1)
    check_choice("loss", loss, LOSSES)
    eta = gd_step_size(T, d, loss) if eta is None else check_real("eta", eta)
    k = numpy.arange(T - 1, T) if loss == "last" else numpy.arange(1, T)   # transitions
    return float(d * numpy.sum((eta * k - 1) ** 2 + eta ** 2 * k * (d - 1)))


# ----------------------------------------------------------------------------- R2, R3

def pair_mask(d, family):
    """E = I_{d/2} kron sigma_x for "orthogonal" (conjugate pairs (2k, 2k+1)), 0 for "unitary"."""
    d = check_int("d", d, 1)
    _check_family(family, d)
    if family == "unitary":
        return numpy.zeros((d, d))
    return numpy.kron(numpy.eye(d // 2), numpy.array([[0.0, 1.0], [1.0, 0.0]]))


def position_masks(T):
    """Masks over [T, T] for rows r >= 1: diagonal (t = r), subdiagonal (t = r - 1), and
    S = {t <= r, t != r - 1}; row 0 is zero in all three."""
    T = check_int("T", T, 1)
    rows = (numpy.arange(T) >= 1)[:, None]                                 # [T, 1]
    diag = numpy.eye(T) * rows                                             # [T, T]
    sub = numpy.eye(T, k=-1)                                               # [T, T]
    S = (numpy.tril(numpy.ones((T, T))) - sub) * rows                      # [T, T]
    return diag, sub, S


def _taus(C, E):
    """tau1 = 1^T C^T C 1, tau2 = ||C||_F^2, tau3 = sum_i r_i (C o E) 1, tau4 = ||C o E||_F^2."""
    r = np.sum(C, axis=1)                                                  # [d] row sums
    CE = C * E                                                             # [d, d] pair entries
    return np.sum(r * r), np.sum(C * C), np.sum(r * np.sum(CE, axis=1)), np.sum(CE * CE)


def _check_CP(C, P, family, finite=False):
    d, T = _check_square("C", C, 1, finite), _check_square("P", P, 2, finite)
    _check_family(family, d)
    return d, T


def population_loss_per_prefix(C, P, family):
    """R2/R3 [derived]: population loss of icar.diagonal_heads at each position r = 1..T-1 -> [T-1].

    C = B^T A [d, d], P [T, T]. With p = P[r, :r+1], S = {t <= r, t != r - 1} and the taus
    of C (tau3 = tau4 = 0 for "unitary", which leaves R2):
        L_r = p_{r-1}^2 tau1 + (sum_S p_t^2) tau2 + 2 p_{r-1} (sum_S p_t) tau3
              + [(sum_S p_t)^2 - sum_S p_t^2] tau4 - 2 p_r tr(C) + d.
    "unitary": W = diag(lambda), lambda_i i.i.d. uniform on the circle, any phases of s_1.
    "orthogonal": the data in the complex eigen-basis (eigen_coordinates of icar's real
    samples), eigenvalues (e^{i theta_k}, e^{-i theta_k}) at coordinates (2k, 2k+1). The
    diagonal model is not basis-free: on the real rotation coordinates its loss differs.
    For "unitary" the authors' script has ||p||^2 in place of sum_S p_t^2 (an extra
    p_{r-1}^2 ||C||_F^2); Monte Carlo agrees with the form above. Vectorised over rows,
    differentiable with autograd.
    """
    d, T = _check_CP(C, P, family)
    xp = icar.array_module(P)  # masks on the device of P (GPU arrays refuse host ones)
    diag, sub, S = (xp.asarray(m) for m in position_masks(T))
    tau1, tau2, tau3, tau4 = _taus(C, xp.asarray(pair_mask(d, family)))
    pT = np.sum(P * diag, axis=1)[1:]                                      # [T-1] P[r, r]
    pT1 = np.sum(P * sub, axis=1)[1:]                                      # [T-1] P[r, r-1]
    PS = (P * S)[1:]                                                       # [T-1, T]
    S1, S2 = np.sum(PS, axis=1), np.sum(PS * PS, axis=1)                   # [T-1] each
    return (pT1 ** 2 * tau1 + S2 * tau2 + 2 * pT1 * S1 * tau3 + (S1 ** 2 - S2) * tau4
            - 2 * pT * np.sum(C * xp.eye(d)) + d)  # tr(C); trace has no GPU gradient


def population_loss(C, P, family):
    """R2/R3: population loss summed over positions r = 1..T-1 (prefix lengths 2..T), each
    prefix with its own row of P; see population_loss_per_prefix."""
    return np.sum(population_loss_per_prefix(C, P, family))


def eigen_coordinates(s):
    """Real "orthogonal" samples [n, T, d] -> complex eigen-coordinates [n, T, d].

    Block k of W is the rotation R(theta_k); coordinates (2k, 2k+1) become
    (x + i y, x - i y) / sqrt(2), which evolve by (e^{i theta_k}, e^{-i theta_k}) and keep
    the norm. R3 is the loss of icar.diagonal_heads on these coordinates.
    """
    n, T, d = check_data(s, finite=True)
    if numpy.iscomplexobj(s):
        raise ValueError("s must be real (icar's 'orthogonal' samples), got a complex array")
    if d % 2:
        raise ValueError(f"orthogonal data needs an even d, got d={d}")
    x, y = s[..., 0::2], s[..., 1::2]                                      # [n, T, d/2] each
    return numpy.stack([x + 1j * y, x - 1j * y], axis=-1).reshape(n, T, d) / numpy.sqrt(2)


def min_loss(d, H, family):
    """R2/R3 [derived]: the minimum per prefix over C = B^T A with H heads: (d - H)_+ for "unitary"
    (tr(C)^2 <= rank(C) ||C||_F^2), (d - 2H)_+ for "orthogonal"."""
    d, H = check_int("d", d, 1), check_int("H", H, 1)
    _check_family(family, d)
    return float(max(d - (H if family == "unitary" else 2 * H), 0))


def minimiser(d, H, family, c=1.0, kappa=1.0, T=20):
    """R2/R3 [derived]: parameters {"A", "B" [H, d], "P" [T, T]} of a global minimiser, for
    icar.diagonal_heads (on eigen_coordinates for "orthogonal"); T defaults to the paper's
    Fig. 3.

    "unitary": C = c I on the first min(H, d) coordinates, p_T = 1/c, all other p zero;
    with H = d, A B^T = c I_H. "orthogonal": C = c (I + kappa I_{d/2} kron sigma_x) on the
    first pairs, p_T = 1/c, p_{T-1} = -kappa / (1 + kappa) p_T. kappa = 1 is the rank-d/2
    member C = c (I kron 1 1^T), p_{T-1} = -1/(2c) (A B^T = 2c I_H at H = d/2); other
    kappa need H >= d. With H >= d/2, kappa = 1 reads the inner product of each block and
    predicts exactly on icar's real "orthogonal" coordinates too; other kappa only on
    eigen_coordinates. Every row r >= 1 of P holds (p_{T-1}, p_T) at (r-1, r); row 0 only
    p_T (its query is zero). Loss per prefix: min_loss(d, H, family).
    """
    d, H, T = check_int("d", d, 1), check_int("H", H, 1), check_int("T", T, 2)
    _check_family(family, d)
    c, kappa = check_real("c", c), check_real("kappa", kappa)
    if c == 0:
        raise ValueError(f"c must be nonzero (p_T = 1/c), got c={c!r}")
    A, B = numpy.zeros((H, d)), numpy.zeros((H, d))
    if family == "unitary":
        if kappa != 1.0:
            raise ValueError(f"kappa only parametrises 'orthogonal' minimisers; use kappa=1.0 "
                             f"for 'unitary', got {kappa!r}")
        k = min(H, d)
        A[:k, :k] = numpy.eye(k)
        B[:k, :k] = c * numpy.eye(k)
        pT1 = 0.0
    elif kappa == 1.0:
        k = min(H, d // 2)
        A[:k] = numpy.kron(numpy.eye(k, d // 2), numpy.ones(2))            # head h reads pair h
        B[:k] = c * A[:k]
        pT1 = -1 / (2 * c)
    else:
        if H < d or kappa == -1.0:
            raise ValueError(f"kappa != 1 needs H >= d and kappa != -1, got H={H}, d={d}, "
                             f"kappa={kappa!r}")
        v = numpy.array([[1.0, 1.0], [1.0, -1.0]]) / numpy.sqrt(2)           # eigenvectors of sigma_x
        A[:d] = numpy.kron(numpy.eye(d // 2), v)
        B[:d] = c * numpy.kron(numpy.eye(d // 2), numpy.diag([1 + kappa, 1 - kappa]) @ v)
        pT1 = -kappa / ((1 + kappa) * c)
    P = numpy.eye(T) / c + pT1 * numpy.eye(T, k=-1)                         # [T, T]
    return {"A": A, "B": B, "P": P}


# ----------------------------------------------------------------------------- Fig. 3 route

def population_loss_and_grad(params, family):
    """population_loss at C = B^T A and its gradient in {"A", "B", "P"}, derived by hand.

    With a1 = sum_r p_{r-1}^2, a2 = sum_r sum_S p^2, a3 = sum_r p_{r-1} sum_S p,
    a4 = sum_r [(sum_S p)^2 - sum_S p^2], a5 = sum_r p_r:
        L = a1 tau1 + a2 tau2 + 2 a3 tau3 + a4 tau4 - 2 a5 tr(C) + (T - 1) d,
        dL/dC = 2 a1 r 1^T + 2 a2 C + 2 a3 (o 1^T + diag(r) E) + 2 a4 C o E - 2 a5 I,
    r = C 1, o = (C o E) 1; dL/dA = B dL/dC, dL/dB = A (dL/dC)^T. A few NumPy calls on
    [d, d] and [T, T] arrays, so one step costs microseconds where autograd costs
    milliseconds.
    """
    check_params("params", params, ("A", "B", "P"))
    A, B, P = params["A"], params["B"], params["P"]
    if check_data(A, "A", "H, d", finite=True) != check_data(B, "B", "H, d", finite=True):
        raise ValueError(f"A and B must have the same shape [H, d], got A {A.shape}, B {B.shape}")
    check_shape("A", A, A.shape)  # real: the population losses are derived for real C and P
    check_shape("B", B, B.shape)
    C = B.T @ A                                                            # [d, d]
    d, T = _check_CP(C, P, family, finite=True)
    diag, sub, S = position_masks(T)
    E = pair_mask(d, family)
    return _loss_and_grad(A, B, P, E, diag, sub, S)


def loss_and_grad_with_masks(A, B, P, E, diag, sub, S):
    """population_loss_and_grad of (A, B, P) given E = pair_mask(d, family) and (diag, sub, S)
    = position_masks(T), for any family and masks: real float arrays A, B [H, d], P and each
    mask [T, T], E [d, d]; shapes and dtypes are checked, values are not. train_population
    runs the same step without the checks."""
    H, d = check_data(A, "A", "H, d")
    T = check_data(P, "P", "T, T")[0]
    for name, M, shape in (("A", A, (H, d)), ("B", B, (H, d)), ("P", P, (T, T)), ("E", E, (d, d)),
                           ("diag", diag, (T, T)), ("sub", sub, (T, T)), ("S", S, (T, T))):
        check_shape(name, M, shape)
    return _loss_and_grad(A, B, P, E, diag, sub, S)


def _loss_and_grad(A, B, P, E, diag, sub, S):
    """loss_and_grad_with_masks without its checks."""
    C = B.T @ A                                                            # [H, d]^T @ [H, d] -> [d, d]
    d, T = C.shape[0], P.shape[0]
    r = C.sum(axis=1)                                                      # [d]
    CE = C * E                                                             # [d, d]
    o = CE.sum(axis=1)                                                     # [d]
    tau1, tau2, tau3, tau4, trC = r @ r, numpy.sum(C * C), r @ o, numpy.sum(CE * CE), numpy.trace(C)
    pT1 = (P * sub).sum(axis=1)                                            # [T] P[r, r-1], 0 at r = 0
    PS = P * S                                                             # [T, T]
    S1, S2 = PS.sum(axis=1), (PS * PS).sum(axis=1)                         # [T] each
    a1, a2, a3 = pT1 @ pT1, S2.sum(), pT1 @ S1
    a4, a5 = S1 @ S1 - a2, numpy.sum(P * diag)
    loss = a1 * tau1 + a2 * tau2 + 2 * a3 * tau3 + a4 * tau4 - 2 * a5 * trC + (T - 1) * d
    G = (2 * a1 * r[:, None] + 2 * a2 * C + 2 * a3 * (o[:, None] + r[:, None] * E)
         + 2 * a4 * CE - 2 * a5 * numpy.eye(d))                           # [d, d] dL/dC
    dP = (S * (2 * tau2 * PS + 2 * tau3 * pT1[:, None] + 2 * tau4 * (S1[:, None] - PS))
          + sub * (2 * tau1 * pT1 + 2 * tau3 * S1)[:, None] - 2 * trC * diag)  # [T, T]
    return loss, {"A": B @ G, "B": A @ G.T, "P": dP}


def train_population(H, d, T, family, lr, steps, rng):
    """Gradient descent on (A, B, P) through population_loss (the paper's Fig. 3 route).

    Start: A, B [H, d] and P [T, T] with entries N(0, 0.1^2) from rng (icar.init_params);
    plain GD with step lr on the loss summed over positions r = 1..T-1, as the authors'
    script. Returns (params, losses): losses [steps + 1] holds the loss before each step
    and after the last one. "unitary" runs reach min_loss. "orthogonal" runs often do not:
    for H <= d/2 the loss has spurious local minima (zero gradient, positive semi-definite
    Hessian) where a head reads the difference of a conjugate pair (the sine of the angle)
    instead of its sum; for d/2 < H < d some runs drift off along kappa -> -1 of R3's
    family, the loss creeping toward 0 while the weights grow until a fixed lr oscillates.
    A smaller or larger init scale or lr does not avoid either.
    """
    H, d, T = check_int("H", H, 1), check_int("d", d, 1), check_int("T", T, 2)
    _check_family(family, d)
    lr, steps = check_real("lr", lr, 0, strict=True), check_int("steps", steps, 0)
    params = icar.init_params("diagonal_heads", rng, d=d, T=T, H=H, scale=0.1)
    A, B, P = params["A"], params["B"], params["P"]
    masks = position_masks(T)
    E = pair_mask(d, family)
    losses = numpy.empty(steps + 1)
    with numpy.errstate(over="ignore", invalid="ignore"):  # divergence is reported below
        for i in range(steps + 1):
            loss, g = _loss_and_grad(A, B, P, E, *masks)
            losses[i] = loss
            if not numpy.isfinite(loss):
                raise icar.Diverged(f"population loss became {loss} at step {i}: lr={lr} is too "
                                 f"large; allowed: a smaller lr")
            if i < steps:
                A, B, P = A - lr * g["A"], B - lr * g["B"], P - lr * g["P"]
    return {"A": A, "B": B, "P": P}, losses


# ----------------------------------------------------------------------------- R4

def _angle_phi(mu, phi):
    """The characteristic function k -> E[exp(i k theta)] given mu (theta ~ U[0, 2 pi / mu])
    or phi itself; exactly one of the two."""
    if (mu is None) == (phi is None):
        raise ValueError("give exactly one of mu (theta ~ U[0, 2 pi / mu]) and phi "
                         f"(a characteristic function), got mu={mu!r}, phi={phi!r}")
    if phi is not None:
        if not callable(phi):
            raise ValueError(f"phi must be callable, k -> E[exp(i k theta)], got {phi!r}")

        def checked(k):
            value = numpy.asarray(phi(k))
            if value.shape != numpy.shape(k) or value.dtype.kind not in "iufc" or not numpy.all(numpy.isfinite(value)):
                raise ValueError(f"phi must map an integer array k to finite numbers E[exp(i k theta)] of "
                                 f"k's shape {numpy.shape(k)}, got {value.dtype} of shape {value.shape}")
            return value

        return checked
    a = 2 * numpy.pi / check_real("mu", mu, 0, strict=True)

    def uniform(k):
        z = 1j * a * numpy.asarray(k, dtype=float)
        safe = numpy.where(z == 0, 1.0, z)
        return numpy.where(z == 0, 1.0, numpy.expm1(safe) / safe)

    return uniform


def pe_only_system(T, mu=None, phi=None):
    """R4 [derived]: M [T, T] and b [T] of the M3 loss p^T M p - 2 b^T p + 1 for T tokens (d = 1, C = 1).

    M_{tt'} = Re phi(2 (t - t')), b_t = Re phi(2 (t - (T - 1))), phi(k) = E[exp(i k theta)];
    mu: theta ~ U[0, 2 pi / mu] (icar family "angle"), phi(k) = (e^{2 pi i k/mu} - 1)/(2 pi i k/mu).
    Row r of P (r + 1 tokens) uses M[:r+1, :r+1] and b[T-1-r:], since M is Toeplitz.
    """
    T = check_int("T", T, 2)
    ph = _angle_phi(mu, phi)
    t = numpy.arange(T)
    M = numpy.real(ph(2 * (t[:, None] - t[None, :])))                       # [T, T]
    b = numpy.real(ph(2 * (t - (T - 1))))                                  # [T]
    return M, b


def _row_systems(T, mu, phi):
    """Per row r >= 1: (M_r [r+1, r+1], b_r [r+1]); index 0 is None (row 0 has zero query)."""
    M, b = pe_only_system(T, mu, phi)
    return [None] + [(M[:r + 1, :r + 1], b[T - 1 - r:]) for r in range(1, T)]


def pe_only_loss(P, mu=None, phi=None):
    """R4 [derived]: population loss of icar.pe_only (d = 1) at positions r = 1..T-1 -> [T-1];
    the mean of icar.mse over all T positions is (1 + sum) / T."""
    T = _check_square("P", P, 2, finite=True)
    M, _ = pe_only_system(T, mu, phi)
    t = numpy.arange(T)
    bmat = numpy.real(_angle_phi(mu, phi)(2 * (t[None, :] - t[:, None])))   # [T, T] b of row r at t
    Pm = P * numpy.tril(numpy.ones((T, T)))                                # [T, T]
    return (np.sum((Pm @ M) * Pm, axis=1) - 2 * np.sum(Pm * bmat, axis=1) + 1)[1:]


def pe_only_solution(T, mu=None, phi=None):
    """R4 [derived]: the minimum-norm minimiser P [T, T], row r = M_r^+ b_r (row 0 and the upper
    triangle zero), the limit of gradient descent from P = 0.

    b_r is the last column of M_r, so p = e_r (p_T = 1, f = conj(s_{r-1}) s_r^2 = s_{r+1})
    has zero loss for every angle law, and M_r^+ b_r is e_r projected on the range of M_r:
    e_r itself whenever M_r is nonsingular (any law with a density). Narrow angles make M_r
    so ill-conditioned that eigenvalues below T eps max(eig) are treated as zero here; the
    spread profiles that gradient descent shows there come from stopping early
    (pe_only_trajectory)."""
    rows = _row_systems(T, mu, phi)
    P = numpy.zeros((T, T))
    for r in range(1, T):  # rows are independent problems of different sizes
        lam, V = numpy.linalg.eigh(rows[r][0])
        keep = lam > T * numpy.finfo(float).eps * lam.max()
        P[r, :r + 1] = V[:, keep] @ ((V[:, keep].T @ rows[r][1]) / lam[keep])
    return P


def pe_only_trajectory(T, mu=None, phi=None, *, eta, steps):
    """R4 [derived]: the exact gradient-descent path of P from P = 0 with step eta on each row's loss
    p^T M_r p - 2 b_r^T p + 1:  p_k = (I - (I - 2 eta M_r)^k) M_r^+ b_r.

    steps: an integer k -> P_k [T, T], or a 1-D array of them -> [len, T, T]. GD with
    learning rate lr on the mean of icar.mse over all T positions is eta = lr / T.
    """
    return gd_path(_row_systems(T, mu, phi), eta=eta, steps=steps)


def gd_path(rows, *, eta, steps):
    """The exact gradient-descent path from P = 0, with step eta, of independent row losses
    p^T M_r p - 2 b_r^T p + c: p_k = (I - (I - 2 eta M_r)^k) M_r^+ b_r for row r >= 1.

    rows[r] = (M_r [r+1, r+1], b_r [r+1]) for r = 1..T-1 (rows[0] unused: row 0 stays 0), as
    _row_systems gives them for the population, or from a sample's moments. steps: an integer
    k -> P_k [T, T], or a 1-D array of them -> [len, T, T].
    """
    eta = check_real("eta", eta, 0, strict=True)
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError(f"rows must be a list [None, (M_1, b_1), .., (M_{{T-1}}, b_{{T-1}})], got {type(rows).__name__}")
    for r in range(1, len(rows)):
        if not isinstance(rows[r], (list, tuple)) or len(rows[r]) != 2:
            raise ValueError(f"rows[{r}] must be a pair (M_{r} [{r + 1}, {r + 1}], b_{r} [{r + 1}]), got {rows[r]!r}")
        for name, v, shape in ((f"rows[{r}][0] (M_{r})", rows[r][0], (r + 1, r + 1)),
                               (f"rows[{r}][1] (b_{r})", rows[r][1], (r + 1,))):
            check_data(v, name, None, finite=True)
            check_shape(name, v, shape)
    ks = numpy.asarray(steps)
    if ks.ndim > 1 or ks.size == 0 or not numpy.issubdtype(ks.dtype, numpy.integer) or (ks < 0).any():
        raise ValueError(f"steps must be an integer >= 0 or a 1-D array of them, got {steps!r}")
    k = numpy.atleast_1d(ks).astype(float)[:, None]                         # [K, 1]
    T = len(rows)
    out = numpy.zeros((k.shape[0], T, T))
    for r in range(1, T):  # rows are independent problems of different sizes
        lam, V = numpy.linalg.eigh(rows[r][0])                             # [r+1], [r+1, r+1]
        x = 2 * eta * lam                                                  # [r+1]
        # g(lam) = 2 eta sum_{j<k} (1 - x)^j, in the form that stays exact as lam -> 0
        stable = numpy.abs(x) < 1
        g = numpy.where(stable, -numpy.expm1(k * numpy.log1p(-numpy.where(stable, x, 0.0))),
                        1 - (1 - x) ** k)                                  # [K, r+1] 1 - (1 - x)^k
        small = numpy.abs(lam) < numpy.finfo(float).tiny ** 0.5
        g = numpy.where(small, 2 * eta * k, g / numpy.where(small, 1.0, lam))
        out[:, r, :r + 1] = (g * (V.T @ rows[r][1])) @ V.T                  # [K, r+1]
    return out if ks.ndim else out[0]


# ----------------------------------------------------------------------------- raw tokens need depth

def raw_token_gd_construction(d, T, eta, beta):
    """paper.md section 5 [derived]: weights of a 2-layer raw-token M4 whose prediction at
    r >= 1 tends, as beta grows, to M1's one GD step averaged over the r transitions seen:
        f_r = (eta / r) sum_{t=1}^{r} s_t (s_{t-1}^* s_r)   (icar.augmented_linear with A = I,
                                                             B = eta I, divided by r).
    Returns (params, cfg): cfg = icar.transformer_config(d_in=d, d_out=d, T=T, layers=2,
    heads=1, repeat=3, attention="linear", positional=True, layernorm=False, residual=True).

    The stream holds blocks B1, B2, B3 of size d, [x, x, x] at the input. Position embeddings
    live where token-reading maps are blind: (cos wt, sin wt) in B3's first two coordinates,
    w = 2 pi / T, and the first-key indicator [t = 0] in B2's first coordinate; B1 holds none.
    Layer 1 (previous-token head): W_Q, W_K read B3 - B1 (zero on [x, x, x]), so token
    scores are the constant b_Q . b_K / sqrt(E) = 1 (biases on a coordinate the maps never
    write); positional logits are 1 + kappa cos(w (t - r + 1)), kappa = beta / (1 - cos w):
    the query rotates p_r back by w, so the peak is t = r - 1 and every other key t <= r is at
    least beta lower (|t - r + 1| < T). The value x_t from B1 is written into B3:
    B3 = x_r + s_{r-1}. Layer 2 (one GD step): query x_r from B1, key B3 - B1 = s_{t-1},
    value eta sqrt(E) x_t written into B1. Its positional query is the bias -beta sqrt(E) on a
    key coordinate B2 - B1 that is 0 for tokens and [t = 0] for positions, so the positional
    softmax is uniform over t = 1..r, and key 0 is cut by beta: the 1/r remains because
    softmax rows sum to 1 and no stream carries the position. Read-out B1 - B2.

    Leakage: each copy misses s_{r-1} by at most 2 r exp(-beta) (unit-norm states), key 0
    keeps weight < exp(-beta): |f_r - ref_r| <= eta (2T + 2) exp(-beta) |s|^3. Position 0
    (no previous token) copies s_0 itself and keeps key 0 alone: f_0 = eta |s_0|^2 s_0 where
    M1 predicts 0. d >= 2: positions need three coordinates off what each layer reads."""
    d, T = check_int("d", d, 2), check_int("T", T, 2)
    eta, beta = check_real("eta", eta), check_real("beta", beta, 0, strict=True)
    E = 3 * d
    B1, B2, B3 = numpy.arange(d), d + numpy.arange(d), 2 * d + numpy.arange(d)
    cfg = icar.transformer_config(d_in=d, d_out=d, T=T, layers=2, heads=1, repeat=3, attention="linear",
                                  positional=True, layernorm=False, residual=True)
    w = 2 * numpy.pi / T
    a = numpy.sqrt(beta / (1 - numpy.cos(w)) * numpy.sqrt(E))  # scale of layer 1's Q and K
    R = numpy.array([[numpy.cos(w), -numpy.sin(w)], [numpy.sin(w), numpy.cos(w)]])  # (cos, sin)(wr) R: w(r-1)
    pos = numpy.zeros((T, E))
    pos[:, B3[:2]] = numpy.stack([numpy.cos(w * numpy.arange(T)), numpy.sin(w * numpy.arange(T))], -1)
    pos[0, B2[0]] = 1.0

    def layer():
        z = lambda *shape: numpy.zeros(shape)  # noqa: E731
        return {"W_Q": z(1, E, E), "W_K": z(1, E, E), "W_V": z(1, E, E), "W_O": z(E, E), "b_Q": z(1, E),
                "b_K": z(1, E), "b_V": z(1, E), "b_O": z(E), "ln_g": numpy.ones(E), "ln_b": z(E)}

    L1, L2 = layer(), layer()
    for name, M in (("W_Q", a * R), ("W_K", a * numpy.eye(2))):  # read B3 - B1: blind to [x, x, x]
        L1[name][0][numpy.ix_(B3[:2], [0, 1])], L1[name][0][numpy.ix_(B1[:2], [0, 1])] = M, -M
    L1["b_Q"][0, 2] = L1["b_K"][0, 2] = E ** 0.25            # token scores b_Q . b_K / sqrt(E) = 1
    L1["W_V"][0][B1, B1] = 1.0                               # value x_t
    L1["W_O"][B1, B3] = 1.0                                  # written into B3
    L2["W_Q"][0][B1, B1] = 1.0                               # query x_r
    L2["W_K"][0][B3, B1], L2["W_K"][0][B1, B1] = 1.0, -1.0   # key B3 - B1 = s_{t-1}
    L2["W_K"][0][B2[0], d], L2["W_K"][0][B1[0], d] = 1.0, -1.0  # key coordinate d: [t = 0] for positions
    L2["b_Q"][0, d] = -beta * numpy.sqrt(E)                  # positional logit -beta [t = 0]
    L2["W_V"][0][B1, B1] = eta * numpy.sqrt(E)               # value eta sqrt(E) x_t
    L2["W_O"][B1, B1] = 1.0                                  # written into B1
    W_out = numpy.zeros((E, d))
    W_out[B1, numpy.arange(d)], W_out[B2, numpy.arange(d)] = 1.0, -1.0  # B1 - B2: layer 2's output
    return {"layers": [L1, L2], "pos": pos, "W_out": W_out, "b_out": numpy.zeros(d)}, cfg
