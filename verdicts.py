"""verdicts: what a trained model computes, named from evaluate.py's causal tests, and every
result over seeds (a median with its range, a claim with its count).

    python verdicts.py RUNS/NAME [RUNS/NAME ...]    the causal tests, references and verdict of each run

The causal tests (battery, causal_tests): the model's late-position loss (r >= T/2) on fresh
sequences of its own law, of the other start, after a switch of W at t = 6 and with tokens 1-4
replaced by another sequence's, each next to one-step GD with its optimal step on the same
data; the influence of each input token on each output (evaluate.influence_map).

The verdict (VERDICTS, verdict; the rule was written before any run was classified):
    start lookup             fits its own data, fails on data of the other start
    early-context estimator  fits either start, fails after a switch and with tokens 1-4
                             replaced, most of its late influence on tokens 0-4
    whole-context learner    fits either start, recovers after a switch and with tokens
                             replaced as one-step GD does, its influence spread over the context
    none                     anything else (including tests between "fits" and "fails")
with "fits" a loss at most WORKS times one-step GD's on the same data and "fails" at least
FAILS times it (THRESHOLDS says why). Known answers (tests): one GD step (M1, and the raw-token
construction of theory.py) is a whole-context learner, least squares on the first k
transitions (early_least_squares) an early-context estimator, and the same that assumes the
fixed start instead of reading s_0 (start_lookup) a start lookup.

Aggregation over seeds (aggregate_rows): rows of figures.py from every seed -> one row per
quantity, numbers as the median with [min, max] and every seed's value, text as counts.
"""
if __name__ == "__main__":  # a signal while the modules load: one line, nothing written (then run_command's handlers)
    import os as _os, signal as _signal
    for _s in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
        _signal.signal(_s, lambda n, _: (_os.write(2, f"verdicts.py: interrupted by {_signal.Signals(n).name} while starting; nothing was written\n".encode()), _os._exit(128 + n)))
import collections
import numbers
import os
import sys

import autograd.numpy as anp
import numpy as np

import evaluate
import icar
import runs
import theory
import train

CAUSAL = dict(n=256, n_map=32, n_probe=64, switch=6, replaced=(1, 2, 3, 4))
OTHER = {"fixed": "random", "random": "fixed"}


def causal_tests(res, seed):
    """Arrays of evaluate.py's causal tests of a trained model (res: runs.load_run's result), on
    fresh sequences of its own law and of the other start: per-position losses (model, gd1,
    least squares, zero) on clean, other-start, switched and replaced data; the influence
    map; the loss with each head removed; the fresh-query probe; first-layer positional
    attention; and, for raw tokens, the comparison with theory.raw_token_gd_construction."""
    cfg, params = res["config"], res["params"]
    experiment = cfg["experiment"]
    mcfg = train.model_config(cfg, experiment) if train.EXPERIMENTS[experiment].transformer else None
    predict = evaluate.model_predictor(params, mcfg)
    out, rng, (s, W) = battery(predict, cfg, seed)
    if mcfg is None:  # M1-M3: no heads, streams or positional attention
        return out
    T = cfg["T"]
    ablation = evaluate.head_ablation(params, mcfg, s)
    out["ablated"], out["full"] = ablation["ablated"], ablation["full"]               # [L, H], scalar
    found = evaluate.fresh_query_probe(predict, s[:CAUSAL["n_probe"]], rng, W[:CAUSAL["n_probe"]])
    out["probe_cos_W"], out["probe_cos_gd1"] = found["cos_W"], found["cos_gd1"]       # [T]
    if mcfg["positional"]:
        layers = [icar.positional_attention(lay, params["pos"][:T]) for lay in params["layers"]]
        out["attention1"] = np.asarray(layers[0])                                     # [H, T, T]
        out.update(construction_similarity(s, predict, np.asarray(layers[0]), np.asarray(layers[-1]),
                                           out["ablated"][0]))
    return out


def construction_similarity(s, predict, first, last, ablated_first):
    """How a trained raw-token M4 compares with theory.raw_token_gd_construction: the cosine of
    its most previous-token first-layer head's positional attention to the construction's
    layer 1 (all weight on t = r - 1), its largest first-layer weight on t = r (a
    current-token head: the construction keeps s_r in a residual stream, this model has
    none), the last layer's positional attention against the construction's layer 2 (uniform
    over 1 <= t <= r: 1 - total variation, mean over heads and rows r >= 1), the share of the
    model's predictions explained by the construction's function family (one GD step with a
    step fitted per position: f_r ~ a_r C_r s_r), and the loss with that head removed."""
    T = first.shape[-1]
    r = np.arange(1, T)
    prev = np.zeros((T, T))
    prev[r, r - 1] = 1.0
    shares = first[:, r, r - 1].mean(axis=1)                                          # [H]
    h = int(np.argmax(shares))
    cos = np.sum(first[h] * prev) / (np.linalg.norm(first[h][1:]) * np.linalg.norm(prev))
    uniform = np.tril(np.ones((T, T)), 0)
    uniform[:, 0] = 0.0
    uniform[0, 0] = 1.0
    uniform /= uniform.sum(axis=1, keepdims=True)                                     # [T, T]
    tv = 0.5 * np.abs(last - uniform[None]).sum(axis=-1)[:, 1:].mean()
    x, f = s[:, :-1], np.asarray(predict(s[:, :-1]))                                  # [n, T, d]
    C, _ = evaluate.context_sums(x)
    g = (C @ x[..., None])[..., 0]                                                    # [n, T, d]: C_r s_r
    a = np.sum(f * g, axis=(0, 2)) / np.maximum(np.sum(g * g, axis=(0, 2)), 1e-300)   # [T]
    explained = 1 - np.sum((f - a[None, :, None] * g)[:, 1:] ** 2) / np.sum(f[:, 1:] ** 2)
    return {"sim_prev_cos": cos, "sim_prev_head": h, "sim_current": float(first[:, r, r].mean(axis=1).max()),
            "sim_last_tv": tv, "sim_gd_explained": explained, "sim_prev_ablated": ablated_first[h]}


# ----------------------------------------------------------------------------- the verdict

# Thresholds, fixed before any trained model was classified. A ratio is the model's mean
# late-position loss over one-step GD's (optimal step per position) on the same data.
#   WORKS 1.5: the learners of the quick scale reach 0.7-1.4 times one-step GD on the data
#     they learn from (figures/summary.md, the starts rows: own data 0.114-0.339 against
#     0.115-0.353, the augmented model after a switch 0.511-0.564 against 0.511-0.546).
#   FAILS 2.0: the failures seen are 3 times one-step GD or more (a switch: 1.6-1.75 against
#     0.52-0.54; the fixed-start lookup on random starts: 1.9 against about 0.55); between
#     the two a test decides nothing and the verdict is "none".
#   EARLY 0.5: share of the influence of tokens 0-4 on the outputs r >= T/2. Influence
#     spread evenly over the r + 1 tokens seen gives 5 / (r + 1), 0.25-0.45 for r = 10-19
#     (T = 20) and below 0.2 for T = 50: above one half the first tokens dominate.
THRESHOLDS = dict(works=1.5, fails=2.0, early=0.5)
VERDICTS = ("start lookup", "early-context estimator", "whole-context learner", "none")
FIRST = 5  # tokens 0-4: the "first tokens" of the influence share
# one-step GD whose loss is below this fraction of the model's fits the data exactly (the
# pe-only law, a single angle, is learnt from one transition: GD's loss is ~1e-31): a ratio
# to it reads rounding, so there is none (NaN, shown "-"), and no verdict but "none"
EXACT = 1e-12


def measures(tests):
    """The numbers the verdict reads, from causal test arrays: {own, other, switch,
    replaced}: model / gd1 mean late loss on each data set; "first": the influence share of
    tokens 0-4 on the late outputs; and the raw means (model and gd1) behind each ratio."""
    T = len(tests["clean_model"])
    late = slice(T // 2, None)
    out = {}
    for key, data in (("own", "clean"), ("other", "other"), ("switch", "switch"), ("replaced", "replaced")):
        model, gd1 = float(np.mean(tests[f"{data}_model"][late])), float(np.mean(tests[f"{data}_gd1"][late]))
        ratio = model / gd1 if gd1 > EXACT * model else float("nan")  # one-step GD exact: no ratio
        out[key], out[key + "_model"], out[key + "_gd1"] = ratio, model, gd1
    influence = np.asarray(tests["influence"])[late]
    out["first"] = float(np.sum(influence[:, :FIRST]) / np.sum(influence))
    return out


def verdict(m, thresholds=THRESHOLDS):
    """The name (one of VERDICTS) of what a model computes, from measures(tests)."""
    works, fails, early = thresholds["works"], thresholds["fails"], thresholds["early"]
    if not m["own"] <= works:
        return "none"  # it does not even fit the data it was trained on
    if m["other"] >= fails:
        return "start lookup"
    if m["other"] <= works:
        if m["switch"] <= works and m["replaced"] <= works and m["first"] < early:
            return "whole-context learner"
        if m["switch"] >= fails and m["replaced"] >= fails and m["first"] >= early:
            return "early-context estimator"
    return "none"


# ----------------------------------------------------------------------------- known answers

def _prefix_least_squares(x, k, first=None, ridge=1e-9):
    """f_r = C S^-1 x_r from the transitions t < min(r, k) of x [n, T, d] (real), with x_0
    replaced by `first` [d] in those pairs if given; autograd-differentiable."""
    n, T, d = x.shape
    prev = x[:, :-1] if first is None else anp.concatenate([anp.broadcast_to(first, (n, 1, d)), x[:, 1:-1]], axis=1)
    nxt = x[:, 1:]                                                      # [n, T-1, d]
    C = anp.cumsum(nxt[:, :, :, None] * prev[:, :, None, :], axis=1)    # [n, T-1, d, d]
    S = anp.cumsum(prev[:, :, :, None] * prev[:, :, None, :], axis=1)
    zero = anp.zeros((n, 1, d, d))
    C, S = anp.concatenate([zero, C], axis=1), anp.concatenate([zero, S], axis=1)  # [n, T, d, d]: t < r
    upto = np.minimum(np.arange(T), k)                                  # the transitions used at r
    C, S = C[:, upto], S[:, upto] + ridge * np.eye(d)
    return anp.linalg.solve(anp.swapaxes(S, -1, -2), anp.swapaxes(C, -1, -2)).swapaxes(-1, -2) @ x[..., None]


def early_least_squares(k):
    """predict(x): least squares on the first k transitions only (an early-context estimator)."""
    return lambda x: _prefix_least_squares(x, k)[..., 0]


def start_lookup(k, first):
    """predict(x): least squares on the first k transitions with s_0 taken to be `first` (the
    fixed start [d]) instead of read from the context: exact from the fixed start only."""
    return lambda x: _prefix_least_squares(x, k, np.asarray(first, dtype=float))[..., 0]


def gd_step_model(eta):
    """predict(x): M1 with A = I, B = eta I: one GD step on the whole context (icar.augmented_linear)."""
    def predict(x):
        d = x.shape[-1]
        return icar.augmented_linear({"A": np.eye(d), "B": eta * np.eye(d)}, icar.augment(x))
    return predict


def battery(predict, cfg, seed):
    """(tests, rng, (s, W)): the per-position losses of predict (x [n, T, d] -> [n, T, d]) and of
    one-step GD, least squares and zero on CAUSAL["n"] fresh sequences of cfg's law (train.sample):
    as drawn ("clean"), from the other start ("other"), after W switches at t = 6 ("switch"),
    with tokens 1-4 from another sequence ("replaced"); the influence map ("influence")."""
    rng = np.random.default_rng([seed, 16])
    n = CAUSAL["n"]
    s, W = train.sample(cfg, rng, n)
    s_other, _ = train.sample(dict(cfg, s1=OTHER[cfg["s1"]]), rng, n)
    s_switch, _ = evaluate.switch_context(rng, s, W, CAUSAL["switch"])
    s_replaced = evaluate.replace_tokens(s, np.roll(s, 1, axis=0), CAUSAL["replaced"])
    out = {}
    for name, data in (("clean", s), ("other", s_other), ("switch", s_switch), ("replaced", s_replaced)):
        for k, v in evaluate.score(predict, data, gd_steps=1).items():
            out[f"{name}_{k}"] = v                                                    # [T]
    out["influence"] = evaluate.influence_map(predict, s[:CAUSAL["n_map"]])           # [T, T]
    return out, rng, (s, W)


# ----------------------------------------------------------------------------- over seeds

def _number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and np.isfinite(float(x))


def aggregate_rows(rows_by_seed):
    """{seed: [row]} (figures.row dicts, the rows of one figure at each seed) -> one row per
    quantity, in first-seen order: a number is the median over the seeds that have it, with
    "range" [min, max], "per_seed" and "seeds"; a text value is counted ("a: 3 of 5, b: 2 of
    5"); the expected value is the median where it is a number that moves with the seed (a
    baseline on each seed's test set), else the seeds' common value."""
    order, groups = [], {}
    for seed, rows in rows_by_seed.items():
        for r in rows:
            if r["quantity"] not in groups:
                order.append(r["quantity"])
                groups[r["quantity"]] = []
            groups[r["quantity"]].append((seed, r))
    out = []
    for quantity in order:
        items = groups[quantity]
        seeds, values = [s for s, _ in items], [r["value"] for _, r in items]
        expected = [r["expected"] for _, r in items]
        agg = dict(items[0][1], seeds=seeds)
        if all(_number(v) for v in values):
            v = np.asarray(values, dtype=float)
            agg.update(value=float(np.median(v)), range=[float(v.min()), float(v.max())],
                       per_seed=[float(x) for x in v])
        elif all(isinstance(v, str) for v in values):
            counts = collections.Counter(values)
            agg["value"] = ", ".join(f"{k}: {c} of {len(values)}" for k, c in counts.most_common())
        else:  # lists, NaN or mixed: every seed's value
            agg["value"] = values if len(values) > 1 else values[0]
        if all(_number(e) for e in expected) and len(set(map(float, expected))) > 1:
            agg["expected"] = float(np.median(np.asarray(expected, dtype=float)))
        elif any(e != expected[0] for e in expected):
            agg["expected"] = None
        sources = {r["source"] for _, r in items}
        if len(sources) > 1:
            agg["source"] = items[0][1]["source"] + f" (seed {seeds[0]}; differs by seed)"
        out.append(agg)
    return out


def median_seed(values):
    """The seed whose value is the median of {seed: value} (the lower one of an even count)."""
    ranked = sorted(values, key=lambda s: (values[s], s))
    return ranked[(len(ranked) - 1) // 2]


# ----------------------------------------------------------------------------- command line

COLUMNS = ("own", "other", "switch", "replaced", "first")


def describe(run_dir, seed=None):
    """(measures, verdict) of the finished run in run_dir (runs.load_run), its causal tests on
    fresh sequences drawn from `seed` (default: the run's own seed)."""
    res = checked_run(run_dir)
    if res["config"]["T"] < 2 * max(CAUSAL["replaced"]) + 2:
        raise ValueError(f"{run_dir} has T = {res['config'].get('T')}; the causal tests need T >= "
                         f"{2 * max(CAUSAL['replaced']) + 2} (a switch at t = {CAUSAL['switch']}, late positions r >= T/2)")
    m = measures(causal_tests(res, res["config"]["seed"] if seed is None else seed))
    return m, verdict(m)


def checked_run(run_dir):
    """runs.load_run(run_dir), its settings checked as train.config checks them and its
    parameters against the shapes of its model, all finite: FileFault naming the file
    otherwise (a damaged run, exit 1); ValueError for a finished run with no model of
    sequences (the population loss)."""
    res = runs.load_run(run_dir)
    saved, path = res["config"], os.path.join(run_dir, "config.json")
    experiment = saved.get("experiment")
    if experiment == train.POPULATION:
        raise ValueError(f"{run_dir} is a run of {experiment!r}, which has no model of sequences to test; "
                         f"allowed: runs of {', '.join(train.EXPERIMENTS)}")
    if experiment not in train.EXPERIMENTS:
        raise runs.FileFault(f"{path}: not the settings of a run (experiment {experiment!r})")
    try:
        options = {k: v for k, v in saved.items() if k in train.OPTIONS and k != "mu" or (k == "mu" and saved.get("family") == "angle")}
        cfg = train.config(experiment, saved.get("preset", "quick"), **options)
    except (ValueError, TypeError) as e:
        raise runs.FileFault(f"{path}: not the settings of a run ({e})") from None
    missing = sorted(set(cfg) - set(saved))
    if missing:
        raise runs.FileFault(f"{path}: not the settings of a run (no {', '.join(missing)})")
    want = {k: v.shape for k, v in runs.flatten(train.init_model(experiment, cfg, np.random.default_rng(0))).items()}
    have = runs.flatten(res["params"])
    path = os.path.join(run_dir, "params.npz")
    if {k: np.shape(v) for k, v in have.items()} != want:
        raise runs.FileFault(f"{path}: its parameters do not have the shapes of the model of its config.json")
    if not all(np.all(np.isfinite(v)) for v in have.values()):
        raise runs.FileFault(f"{path}: a parameter is not finite")
    return dict(res, config=dict(saved, **cfg))


def table(rows):
    """One line per run: its name, each ratio (model / one-step GD on the same data), the
    share of the first tokens' influence, and the verdict."""
    head = (f"{'run':<28} {'own':>7} {'other':>7} {'switch':>7} {'replaced':>8} {'first':>6}  verdict  "
            f"(losses / one-step GD's, mean over r >= T/2; first: influence share of tokens 0-4)")
    lines = [head]
    cell = lambda x, w: f"{x:{w}.3f}" if np.isfinite(x) else f"{'-':>{w}}"
    for name, m, v in rows:
        lines.append(f"{name:<28} {cell(m['own'], 7)} {cell(m['other'], 7)} {cell(m['switch'], 7)} "
                     f"{cell(m['replaced'], 8)} {cell(m['first'], 6)}  {v}")
    if any(not np.isfinite(m[k]) for _, m, _ in rows for k in ("own", "other", "switch", "replaced")):
        lines.append(f"-: one-step GD fits that data exactly (its loss under {EXACT:g} of the model's): no ratio")
    return "\n".join(lines)


def main(argv=None):
    """python verdicts.py RUN_DIR [RUN_DIR ...]: a table of the causal tests and the verdict
    of each finished run; exit status 2 for a folder that is not a finished run of a model
    of sequences (one line), 1 for a damaged file."""
    argv = sys.argv[1:] if argv is None else list(argv)

    def command():
        if not argv or argv[0] in ("-h", "--help"):
            if not argv:
                raise ValueError("name one or more run folders (runs/NAME); --help for more")
            print(__doc__.strip())
            return 0
        rows = []
        for run_dir in argv:
            if not os.path.isdir(run_dir) or not os.path.exists(os.path.join(run_dir, "metrics.npz")):
                raise ValueError(f"{run_dir} is not a finished run (a folder with config.json, params.npz "
                                 f"and metrics.npz, as train.py writes)")
        runs.set_up_process()
        for run_dir in argv:
            m, v = describe(run_dir)
            rows.append((os.path.basename(os.path.normpath(run_dir)), m, v))
        print(table(rows))
        return 0
    return runs.one_line_errors("verdicts.py", command, "verdicts.py writes no file: nothing was changed")


if __name__ == "__main__":
    runs.run_command(main)
