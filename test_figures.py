"""Tests of figures.py: the Fig. 4 fitting and shuffling on synthetic data, the summary
numbers against closed forms, every figure function at a tiny size, and the command line."""
import json
import os

import numpy as np
import pytest

import figures
import icar
import theory


def rng(seed=0):
    return np.random.default_rng(seed)


def png_ok(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


# ============================================================================ Fig. 4 logic

def test_ar_refit_is_exact_on_ar_data_and_not_on_shuffled_tokens():
    """Windows of 5 states of s_{t+1} = W s_t in d = 3 (4 transitions > d): the least-squares
    W is the true one and the roll-out is exact; shuffled tokens break the recursion."""
    s, _ = icar.sample_sequences(rng(1), 200, 4, 3, "haar")                    # [200, 5, 3]
    _, err = figures.ar_refit(s)
    assert np.max(err) < 1e-20
    _, err_shuffled = figures.ar_refit(figures.shuffle_tokens(s, rng(2)))
    assert np.mean(err_shuffled > 1e-6) > 0.9 and np.mean(err_shuffled) > 1e-3


def test_ar_refit_matches_per_window_lstsq():
    """The Gram-matrix route equals numpy.linalg.lstsq window by window (minimum norm),
    including windows with a repeated token (rank-deficient inputs)."""
    s = rng(3).standard_normal((6, 5, 8))
    s[0, 3] = s[0, 1]                                                          # repeated token
    s /= np.linalg.norm(s, axis=-1, keepdims=True)
    rollout, err = figures.ar_refit(s)
    for i in range(len(s)):
        Wt = np.linalg.lstsq(s[i, :-1], s[i, 1:], rcond=None)[0]                 # [d, d] = W^T
        ref = [s[i, 0]]
        for _ in range(4):
            ref.append(ref[-1] @ Wt)
        ref = np.stack(ref)
        assert np.allclose(rollout[i], ref, atol=1e-10)
        assert np.isclose(err[i], np.mean(np.sum((ref[1:] - s[i, 1:]) ** 2, -1)), atol=1e-12)
    assert err[0] > 1e-3 and np.max(err[1:]) < 1e-20  # only the repeated token breaks the fit


def test_shuffle_tokens_permutes_tokens_across_windows():
    s = rng(4).standard_normal((30, 5, 4))
    sh = figures.shuffle_tokens(s, rng(5))
    key = lambda x: np.sort(x.reshape(-1, 4).view([("", float)] * 4), axis=0)  # noqa: E731
    assert np.array_equal(key(s), key(sh)) and not np.array_equal(s, sh)


def test_token_windows_are_consecutive_unit_norm_and_check_ids():
    E = rng(6).standard_normal((10, 3)) * 5
    ids = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2])
    s = figures.token_windows(ids, E, length=5)
    assert s.shape == (2, 5, 3)
    assert np.allclose(np.linalg.norm(s, axis=-1), 1)
    assert np.allclose(s[1, 0], E[6] / np.linalg.norm(E[6]))
    assert figures.token_windows(ids, E, length=5, n=1).shape == (1, 5, 3)
    with pytest.raises(ValueError, match="embedding table has 10 rows"):
        figures.token_windows(np.array([0, 1, 2, 3, 10]), E)


def test_fig4_on_the_shipped_text_with_the_real_table(tmp_path):
    """With the optional extras: a slice of the shipped book gives windows of the 384-wide
    table, and real order is fitted exactly more often than shuffled tokens."""
    if figures.fig4_missing():
        pytest.skip("optional extras of requirements-fig4.txt not installed")
    with open(figures.DEFAULT_TEXT) as f:
        text = f.read()
    part = tmp_path / "part.txt"
    part.write_text(text[:40000])
    data = figures.compute_fig4(str(part), n=1500)
    assert data["dim"] == 384 and len(data["err_real"]) == 1500
    assert np.mean(data["err_real"] > figures.EXACT) < np.mean(data["err_shuffled"] > figures.EXACT)


# ============================================================================ summary numbers

@pytest.mark.parametrize("family, H", [("unitary", 4), ("orthogonal", 2)])
def test_fig3_rows_are_computed_from_the_parameters(family, H):
    """At an exact minimiser of R2/R3 the rows match their expected values; a perturbed P
    moves them (the numbers are computed, not typed)."""
    d, T = 4, 6
    star = theory.minimiser(d, H, family, c=-1.3, T=T)
    C = star["B"].T @ star["A"]
    losses = np.array([theory.population_loss(C, star["P"], family)])
    rows = {r["quantity"].split(": ", 1)[1]: r for r in
            figures.fig3_rows("x", family, star["A"], star["B"], star["P"], losses)}
    assert np.isclose(rows["c = mean diag of C"]["value"], -1.3)
    assert np.isclose(rows["c * p_T"]["value"], 1.0) and np.isclose(rows["c * p_T"]["expected"], 1.0)
    ratio = rows["p_(T-1) / p_T"]
    assert np.isclose(ratio["value"], ratio["expected"])
    assert np.isclose(ratio["expected"], 0.0 if family == "unitary" else -0.5)
    assert np.allclose(rows["singular values of C"]["value"], rows["singular values of C"]["expected"])
    assert rows["||A B^T - (tr/H) I|| / ||A B^T||"]["value"] < 1e-12
    assert abs(rows["final population loss (sum over T-1 prefixes)"]["value"]) < 1e-12
    P = star["P"].copy()
    P[-1, -2] += 0.1
    moved = {r["quantity"].split(": ", 1)[1]: r for r in figures.fig3_rows("x", family, star["A"], star["B"], P, losses)}
    assert not np.isclose(moved["p_(T-1) / p_T"]["value"], ratio["expected"])


def test_fig1_orbits_stay_on_circles():
    s, W = figures.trajectories_3d(rng(7), 4, 25)
    assert np.allclose(np.linalg.det(W), 1)
    rows = figures.fig1_rows(s, W)
    assert all(r["value"] < 1e-12 for r in rows)
    s[0, 5] += 1e-3  # a state off its circle must show
    assert max(r["value"] for r in figures.fig1_rows(s, W)) > 1e-4


def test_write_summary_merges_figures_and_escapes_cells(tmp_path):
    out = str(tmp_path)
    figures.write_summary(out, {"fig1": {"rows": [figures.row("fig1", "|x|", 1e-15, 0.0, "W")],
                                         "seconds": 1.0, "note": "a"}}, "quick")
    figures.write_summary(out, {"r1": {"rows": [figures.row("r1", "eta", np.float64(0.25), 0.2, "R1")],
                                       "seconds": 2.0, "note": "b"}}, "quick")
    text = (tmp_path / "summary.md").read_text()
    assert "| fig1 | \\|x\\| | 1.000e-15 | 0 | W |" in text
    assert "| r1 | eta | 0.25 | 0.2 | R1 |" in text
    assert set(json.loads((tmp_path / "summary.json").read_text())) == {"fig1", "r1"}
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


def test_positional_attention_is_a_causal_softmax():
    cfg = icar.transformer_config(d_in=3, d_out=3, T=6, heads=2, repeat=2, positional=True, residual=False)
    params = icar.init_params("transformer", rng(8), cfg=cfg)
    a = figures.positional_attention(params, 5)                                 # [2, 5, 5]
    assert a.shape == (2, 5, 5)
    assert np.allclose(a.sum(-1), 1) and np.all(np.triu(a, 1) == 0)
    lay, p = params["layers"][0], params["pos"][:5]
    h, r = 1, 3  # one entry by hand
    z = [(p[r] @ lay["W_Q"][h] + lay["b_Q"][h]) @ (p[t] @ lay["W_K"][h] + lay["b_K"][h]) / np.sqrt(6)
         for t in range(r + 1)]
    assert np.allclose(a[h, r, :r + 1], np.exp(z) / np.sum(np.exp(z)))


# ============================================================================ every figure, tiny

def fake_metrics(T, d, L=1, seed=0):
    g = rng(seed)
    m = {"test_loss_position": np.linspace(1, 0.3, T) + 0.01 * g.random(T)}
    for k in ("oracle", "least_squares", "gd1", "gd2", "gd3", "gd4", "last_value", "zero"):
        m["baseline_" + k] = np.linspace(1, 0.2, T) * g.uniform(0.5, 1.5)
    for k in ("W", "ls", "gd1"):
        m["probe_err_" + k] = g.random(T)
        m["probe_cos_" + k] = g.random(T)
    m["weights_KQ"] = g.standard_normal((L, 1, 3 * d, 3 * d))
    m["weights_V"] = g.standard_normal((L, 1, d, 3 * d))
    m["weights_share_KQ"] = g.random((L, 1))
    m["weights_share_V"] = g.random((L, 1))
    return m


def test_every_figure_function_writes_a_png(tmp_path):
    out = str(tmp_path)
    s, W = figures.trajectories_3d(rng(9), 2, 6)
    paths = [figures.plot_fig1(s, W, out)]
    p, losses = theory.train_population(2, 2, 4, "unitary", 1e-2, 5, rng(10))
    panel = dict(title="t", A=p["A"], B=p["B"], P=p["P"], losses=losses)
    paths.append(figures.plot_fig3([panel, panel], out))
    paths.append(figures.plot_fig4(rng(11).random(50) * (rng(12).random(50) > 0.8), rng(13).random(50), out, "x"))
    paths.append(figures.plot_fig5(fake_metrics(6, 2), {1: fake_metrics(6, 2), 2: fake_metrics(6, 2, 2)}, out))
    P = np.tril(rng(14).standard_normal((5, 5)))
    closed = theory.pe_only_trajectory(5, mu=50.0, eta=0.1, steps=3)
    paths.append(figures.plot_fig6([dict(mu=50.0, P=P, steps=3, closed_row=closed[-1])] * 2, out))
    cfg = icar.transformer_config(d_in=2, d_out=2, T=6, heads=2, repeat=2, positional=True, residual=False)
    att = figures.positional_attention(icar.init_params("transformer", rng(15), cfg=cfg), 6)
    paths.append(figures.plot_fig7({1: fake_metrics(6, 2), 2: fake_metrics(6, 2)}, att, out))
    paths.append(figures.plot_r1([3, 4, 6], 2, np.array([0.3, 0.25, 0.17]), np.array([0.7, 0.6, 0.4]), out))
    data = figures.compute_r2r3(2, 3, 2, (1e-2, 20), (1e-2, 20))
    paths.append(figures.plot_r2r3(data["loss"], 2, 3, out))
    for name, path in zip(("fig1", "fig3", "fig4", "fig5", "fig6", "fig7", "r1", "r2r3"), paths):
        assert path == os.path.join(out, name + ".png") and png_ok(path)
        assert os.path.getsize(os.path.join(out, name + ".pdf")) > 1000


# ============================================================================ command line, cache

def test_command_line_rejects_bad_input_with_one_line(capsys):
    for argv in (["fig9"], ["--preset", "huge"], ["--nope"], ["fig4", "--embeddings", "missing.npy"]):
        assert figures.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("figures.py: error:")


def test_fig4_without_extras_exits_2_by_name_and_is_skipped_otherwise(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(figures, "fig4_missing", lambda embeddings=None: ["tokenizers"])
    assert figures.main(["fig4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "requirements-fig4.txt" in err and err.count("\n") == 1
    monkeypatch.setattr(figures, "FIGURES", ("fig1", "fig4"))
    assert figures.main(["--out", str(tmp_path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fig4"]["note"].startswith("skipped") and summary["fig1"]["rows"]
    assert png_ok(str(tmp_path / "fig1.png")) and not (tmp_path / "fig4.png").exists()


def test_train_cached_reuses_a_finished_run_and_retrains_on_request(tmp_path):
    ctx = figures.argparse.Namespace(runs=str(tmp_path), preset="quick", retrain=False, quiet=True)
    small = dict(T=4, mu=50.0, n_train=20, n_test=8, n_probe=0, steps=3, gd_steps=1)
    first = figures.train_cached(ctx, "pe-only", "pe", **small)
    path = os.path.join(first["dir"], "params.npz")
    stamp = os.stat(path).st_mtime_ns
    again = figures.train_cached(ctx, "pe-only", "pe", **small)
    assert os.stat(path).st_mtime_ns == stamp
    assert np.array_equal(again["params"]["P"], first["params"]["P"])
    other = figures.train_cached(ctx, "pe-only", "pe", **dict(small, steps=4))  # settings changed
    assert os.stat(path).st_mtime_ns != stamp and len(other["metrics"]["train_loss"]) == 5
    ctx.retrain = True
    stamp = os.stat(path).st_mtime_ns
    figures.train_cached(ctx, "pe-only", "pe", **dict(small, steps=4))
    assert os.stat(path).st_mtime_ns != stamp
