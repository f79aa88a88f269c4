"""Tests of figures.py: every figure drawn at a tiny size with labels, titles and colour bars
(checked on the matplotlib objects), the summary files, the command line and its bad input,
and the cache of runs and data. figures.py (and so matplotlib) is imported inside each test.
The numbers each figure reports are tested with their claims in test_icar.py. Which test
proves which claim: docs/claims.md."""


import argparse
import json
import os
import re

import numpy as np
import pytest

import icar
import runs
import theory
import train
from conftest import HERE, TINY, folder_bytes, rng


def png_ok(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000


# ---- every figure, tiny ------------------------------------------------------------------

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


def check_figure_labels(fig, name):
    """Every plot of fig has x and y labels (3-D: also z) and a title; the figure is named
    ("Fig. N", "R1", "R2/R3") in its suptitle or, with one plot, in that plot's title; every
    heat map has a colour bar."""
    import matplotlib.collections
    tag = {"r1": "R1", "r2r3": "R2/R3"}.get(name, "Fig. " + name[3:])
    plots = [ax for ax in fig.axes if not hasattr(ax, "_colorbar")]
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    assert tag in suptitle or (len(plots) == 1 and tag in plots[0].get_title()), name
    for ax in plots:
        assert ax.get_title(), (name, "title")
        assert ax.get_xlabel() and ax.get_ylabel(), (name, ax.get_title())
        if ax.name == "3d":
            assert ax.get_zlabel(), (name, ax.get_title())
        maps = list(ax.images) + [c for c in ax.collections if isinstance(c, matplotlib.collections.QuadMesh)]
        assert all(m.colorbar is not None for m in maps), (name, ax.get_title(), "colour bar")
    return sum(len(ax.images) for ax in plots)


def test_every_figure_function_writes_a_png_with_labels_titles_and_colour_bars(tmp_path, monkeypatch):
    import figures
    out = str(tmp_path)
    made = {}

    def save_png(fig, out_dir, name):  # figures.save_figure without the PDF, keeping the figure
        made[name] = fig
        path = os.path.join(out_dir, name + ".png")
        fig.savefig(path, dpi=40)
        return path

    monkeypatch.setattr(figures, "save_figure", save_png)
    s, W = figures.trajectories_3d(rng(9), 2, 6)
    paths = [figures.plot_fig1(s, W, out)]
    p, losses = theory.train_population(2, 2, 4, "unitary", 1e-2, 5, rng(10))
    panel = dict(title="t", A=p["A"], B=p["B"], P=p["P"], losses=losses)
    paths.append(figures.plot_fig3([panel, panel], out))
    paths.append(figures.plot_fig4(rng(11).random(50) * (rng(12).random(50) > 0.8), rng(13).random(50), out, "x"))
    paths.append(figures.plot_fig5(fake_metrics(6, 2), {1: fake_metrics(6, 2), 2: fake_metrics(6, 2, 2)}, out))
    P = np.tril(rng(14).standard_normal((5, 5)))
    closed = theory.pe_only_trajectory(5, mu=50.0, eta=0.1, steps=3)
    paths.append(figures.plot_fig6([dict(mu=50.0, P=P, steps=3, closed_row=closed[-1], sample_row=P[-1],
                                         n_train=10)] * 2, out))
    cfg = icar.transformer_config(d_in=2, d_out=2, T=6, heads=2, repeat=2, positional=True, residual=False)
    p = icar.init_params("transformer", rng(15), cfg=cfg)
    att = icar.positional_attention(p["layers"][0], p["pos"][:6])
    raw = {(L, H): dict(fake_metrics(6, 2, seed=L + H), mech_prev_share=rng(L).random(H),
                        mech_readout_r2=np.r_[np.nan, rng(L).random(5)])
           for L, H in ((1, 1), (1, 2), (2, 2), (3, 2))}
    paths.append(figures.plot_fig7(raw, {1: fake_metrics(6, 2), 2: fake_metrics(6, 2)}, 2, att, out))
    assert {r["quantity"] for r in figures.fig7_rows(raw, {2: fake_metrics(6, 2)}, 2)} >= {
        "L=2, H=2: largest previous-token share of a first-layer head", "L=3, H=2: test MSE against 3-step GD"}
    paths.append(figures.plot_r1([3, 4, 6], 2, np.array([0.3, 0.25, 0.17]), np.array([0.7, 0.6, 0.4]), out))
    data = figures.compute_r2r3(2, 3, 2, (1e-2, 20), (1e-2, 20))
    paths.append(figures.plot_r2r3(data["loss"], 2, 3, out))
    heat_maps = {}
    for name, path in zip(("fig1", "fig3", "fig4", "fig5", "fig6", "fig7", "r1", "r2r3"), paths):
        assert path == os.path.join(out, name + ".png") and png_ok(path)
        heat_maps[name] = check_figure_labels(made[name], name)
        figures.plt.close(made[name])
    assert heat_maps == {"fig1": 0, "fig3": 8, "fig4": 0, "fig5": 2, "fig6": 2, "fig7": 1, "r1": 0, "r2r3": 0}


def test_figure_check_finds_a_missing_colour_bar_label_or_name():
    """check_figure_labels can fail: each defect alone is caught."""
    import figures
    for defect in ("colour bar", "label", "name"):
        fig, ax = figures.plt.subplots()
        ax.imshow(np.eye(2))
        if defect != "colour bar":
            fig.colorbar(ax.images[0], ax=ax)
        ax.set_xlabel("x")
        ax.set_ylabel("" if defect == "label" else "y")
        ax.set_title("Fig. 9: t" if defect != "name" else "t")
        with pytest.raises(AssertionError):
            check_figure_labels(fig, "fig9")
        figures.plt.close(fig)


# ---- command line, cache, summary --------------------------------------------------------

def test_write_summary_merges_figures_and_escapes_cells(tmp_path):
    import figures
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


def test_command_line_rejects_bad_input_with_one_line(capsys):
    import figures
    for argv in (["fig9"], ["--preset", "huge"], ["--nope"], ["fig4", "--embeddings", "missing.npy"]):
        assert figures.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("figures.py: error:")


def test_fig4_without_extras_exits_2_by_name_and_is_skipped_otherwise(tmp_path, monkeypatch, capsys):
    import figures
    monkeypatch.setattr(figures, "fig4_missing", lambda embeddings=None: ["tokenizers"])
    assert figures.main(["fig4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "requirements-fig4.txt" in err and err.count("\n") == 1
    monkeypatch.setattr(figures, "FIGURES", ("fig1", "fig4"))
    assert figures.main(["--out", str(tmp_path), "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fig4"]["note"].startswith("skipped") and summary["fig1"]["rows"]
    assert png_ok(str(tmp_path / "fig1.png")) and not (tmp_path / "fig4.png").exists()
    assert (tmp_path / "fig1.pdf").read_bytes().startswith(b"%PDF")


def test_train_cached_reuses_a_finished_run_and_retrains_on_request(tmp_path):
    import figures
    ctx = argparse.Namespace(runs=str(tmp_path), preset="quick", retrain=False, quiet=True)
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


def test_train_cached_resumes_an_interrupted_run(tmp_path, monkeypatch, capsys):
    """figures.py --preset paper killed inside a training run continues from its checkpoint
    and ends with the bits of an uninterrupted run."""
    import figures
    ctx = argparse.Namespace(runs=str(tmp_path), preset="quick", retrain=False, quiet=False)
    small = dict(TINY, family="haar", d=2)
    whole = figures.train_cached(ctx, "block", "whole", **small)
    real, calls = runs.save_checkpoint, []

    def killed(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(runs, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        figures.train_cached(ctx, "block", "cut", **small)
    monkeypatch.setattr(runs, "save_checkpoint", real)
    capsys.readouterr()
    again = figures.train_cached(ctx, "block", "cut", **small)
    assert "resuming block" in capsys.readouterr().err
    assert np.array_equal(again["params"]["A"], whole["params"]["A"])
    np.testing.assert_array_equal(again["metrics"]["train_loss"], whole["metrics"]["train_loss"])


def test_train_cached_retrains_a_run_made_by_other_code(tmp_path, monkeypatch):
    """A run whose config.json holds another code fingerprint, or none, is stale."""
    import figures
    ctx = argparse.Namespace(runs=str(tmp_path), preset="quick", retrain=False, quiet=True)
    small = dict(T=4, mu=50.0, n_train=20, n_test=8, n_probe=0, steps=3, gd_steps=1)
    first = figures.train_cached(ctx, "pe-only", "pe", **small)
    path = os.path.join(first["dir"], "params.npz")
    stamp = os.stat(path).st_mtime_ns
    monkeypatch.setattr(runs, "code_fingerprint", lambda names: "0" * 40)
    figures.train_cached(ctx, "pe-only", "pe", **small)
    assert os.stat(path).st_mtime_ns != stamp
    stamp = os.stat(path).st_mtime_ns
    figures.train_cached(ctx, "pe-only", "pe", **small)  # now the same code: reused
    assert os.stat(path).st_mtime_ns == stamp
    config_path = os.path.join(first["dir"], "config.json")
    saved = json.loads(open(config_path).read())
    del saved["versions"]["code"]
    with open(config_path, "w") as f:
        json.dump(saved, f)
    figures.train_cached(ctx, "pe-only", "pe", **small)
    assert os.stat(path).st_mtime_ns != stamp


def test_cached_data_depends_on_code_settings_and_keeps_compute_seconds(tmp_path, monkeypatch):
    import figures
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.arange(3.0) * len(calls)}

    ctx = argparse.Namespace(timings=[])
    get = lambda settings: figures.cached(str(tmp_path), "t", compute, False, settings, ctx)  # noqa: E731
    assert np.array_equal(get({"d": 2})["x"], [0, 1, 2]) and len(calls) == 1
    assert set(get({"d": 2})) == {"x"} and len(calls) == 1  # reused, without the cache's own keys
    assert [t["reused"] for t in ctx.timings] == [False, True]
    assert ctx.timings[1]["seconds"] == ctx.timings[0]["seconds"] > 0
    get({"d": 3})
    assert len(calls) == 2  # other settings
    monkeypatch.setattr(runs, "code_fingerprint", lambda names: "0" * 40)
    get({"d": 3})
    assert len(calls) == 3  # other code of icar, theory or train
    monkeypatch.setattr(runs, "code_fingerprint", lambda names: ("1" if "figures.py" in names else "0") * 40)
    get({"d": 3})
    assert len(calls) == 4  # other code of figures.py
    get({"d": 3})
    assert len(calls) == 4
    other = lambda: figures.cached(str(tmp_path), "t", compute, False, {"d": 3}, ctx, code=("verdicts.py",))  # noqa: E731
    other()
    assert len(calls) == 5  # computed by other code (the causal tests: verdicts.py)
    monkeypatch.setattr(runs, "code_fingerprint", lambda names: ("2" if "figures.py" in names else "0") * 40)
    other()
    assert len(calls) == 5  # figures.py changed, verdicts.py did not


def test_r2r3_cache_key_holds_its_sizes(tmp_path, monkeypatch):
    import figures
    tiny = dict(d=2, T=3, seeds=1, unitary=(1e-2, 3), orthogonal=(1e-2, 3))
    monkeypatch.setitem(figures.R2R3_SIZES, "quick", tiny)
    ctx = argparse.Namespace(runs=str(tmp_path), preset="quick", retrain=False, seed=0, out=str(tmp_path),
                                     timings=[])
    figures.run_r2r3(ctx)
    monkeypatch.setitem(figures.R2R3_SIZES, "quick", dict(tiny, seeds=2))
    figures.run_r2r3(ctx)
    assert [t["reused"] for t in ctx.timings] == [False, False]
    figures.run_r2r3(ctx)
    assert [t["reused"] for t in ctx.timings] == [False, False, True]


def test_unusable_folders_and_fig4_files_exit_2_with_one_line(tmp_path, capsys):
    import figures
    plain = tmp_path / "file"
    plain.write_text("x")
    bad_npy = tmp_path / "bad.npy"
    bad_npy.write_text("not an array")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    ok_npy = tmp_path / "ok.npy"
    np.save(ok_npy, np.ones((3, 2)))
    cases = [(["fig1", "--out", str(plain / "x")], "--out", plain / "x"),
             (["fig1", "--runs", str(plain / "x"), "--out", str(tmp_path)], "--runs", plain / "x")]
    if not figures.fig4_missing(str(bad_npy)):
        fig4 = ["fig4", "--text", figures.DEFAULT_TEXT, "--out", str(tmp_path), "--runs", str(tmp_path)]
        cases += [(fig4 + ["--tokenizer", str(bad_json), "--embeddings", str(ok_npy)], "--tokenizer", bad_json),
                  (fig4 + ["--tokenizer", str(bad_json), "--embeddings", str(bad_npy)], "--embeddings", bad_npy)]
    for argv, option, path in cases:
        assert figures.main(argv + ["--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("figures.py: error: " + option) and str(path) in err


def test_load_token_table_names_the_bad_file_and_what_it_expects(tmp_path):
    import figures
    cases = {"text.npy": lambda p: p.write_text("not an array"), "empty.npy": lambda p: p.write_bytes(b""),
             "vector.npy": lambda p: np.save(p, np.ones(3)), "words.npy": lambda p: np.save(p, np.array([["a"]])),
             "table.npz": lambda p: np.savez(p, E=np.ones((2, 2)))}
    for name, make in cases.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(ValueError, match="2-D real array") as e:
            figures.load_token_table(str(path))
        assert str(path) in str(e.value)
    np.save(tmp_path / "ok.npy", np.ones((4, 3), dtype=np.float32))
    assert figures.load_token_table(str(tmp_path / "ok.npy")).dtype == np.float64


def test_runtime_of_a_reused_figure_is_its_compute_time(tmp_path, monkeypatch):
    """The summary shows the seconds the computation took, marked when reused from the
    cache; figures.main sets the process up as train.main does."""
    import figures
    monkeypatch.setitem(figures.R2R3_SIZES, "quick", dict(d=2, T=3, seeds=1, unitary=(1e-2, 3), orthogonal=(1e-2, 3)))
    set_up = []
    monkeypatch.setattr(runs, "set_up_process", lambda: set_up.append(1))
    real = figures.compute_r2r3
    monkeypatch.setattr(figures, "compute_r2r3", lambda **kw: (figures.time.sleep(0.5), real(**kw))[1])
    argv = ["r2r3", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"), "--quiet"]
    assert figures.main(argv) == 0 and set_up == [1]
    first = json.loads((tmp_path / "summary.json").read_text())["r2r3"]
    assert first["cached"] == "none" and first["seconds"] >= 0.5
    assert figures.main(argv) == 0
    again = json.loads((tmp_path / "summary.json").read_text())["r2r3"]
    assert again["cached"] == "all" and again["seconds"] >= 0.5
    assert f"| r2r3 | quick | (cached, computed in {again['seconds']:.1f} s) |" in (tmp_path / "summary.md").read_text()
    assert figures.compute_seconds(1.0, [{"seconds": 5.0, "load": 0.2, "reused": True},
                                         {"seconds": 0.5, "load": 0.0, "reused": False}]) == (5.8, "some")
    assert figures.compute_seconds(1.0, [{"seconds": None, "load": 0.2, "reused": True}]) == (None, "all")
    assert figures.runtime_cell(5.8, "some") == "5.8 (partly cached)" and figures.runtime_cell(2.0, "none") == "2.0"


def test_figures_retrain_a_cached_run_with_a_truncated_metrics_file(tmp_path, capsys):
    import figures
    ctx = argparse.Namespace(runs=str(tmp_path), preset="quick", retrain=False, quiet=False)
    small = dict(T=4, mu=50.0, n_train=20, n_test=8, n_probe=0, steps=3, gd_steps=1)
    first = figures.train_cached(ctx, "pe-only", "pe", **small)
    path = tmp_path / "pe" / "metrics.npz"
    path.write_bytes(path.read_bytes()[:60])
    capsys.readouterr()
    again = figures.train_cached(ctx, "pe-only", "pe", **small)
    err = capsys.readouterr().err
    assert re.search(r"retraining: .*metrics.npz: cannot be read as a run's metrics", err), err
    np.testing.assert_array_equal(again["params"]["P"], first["params"]["P"])


def test_figures_names_a_damaged_summary_in_one_line(tmp_path, capsys):
    import figures
    (tmp_path / "summary.json").write_text("{not json")
    before = (tmp_path / "summary.json").read_bytes()
    assert figures.main(["fig1", "--out", str(tmp_path), "--runs", str(tmp_path / "runs"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"summary.json: not valid JSON", err[0]), err
    assert (tmp_path / "summary.json").read_bytes() == before


def test_figures_recompute_a_damaged_cache(tmp_path):
    import figures
    calls = []
    compute = lambda: calls.append(1) or {"x": np.arange(3)}  # noqa: E731
    figures.cached(str(tmp_path), "t", compute, False, {"a": 1})
    path = tmp_path / "figures-t" / "data.npz"
    path.write_bytes(path.read_bytes()[:50])  # truncated
    np.testing.assert_array_equal(figures.cached(str(tmp_path), "t", compute, False, {"a": 1})["x"],
                                  np.arange(3))
    assert len(calls) == 2


def test_the_cache_key_covers_every_module_that_defines_a_result_and_every_setting(tmp_path):
    """train.CODE (config.json's code fingerprint, figures' cache key) names every project module
    that train imports, except runs (files) and gpu (the same numbers on another device), and
    the fingerprint changes when any one of them changes by one byte; a cached run is reused
    only with every setting equal."""
    import ast
    import shutil
    import subprocess
    import sys

    import figures
    tree = ast.parse(open(os.path.join(HERE, "train.py")).read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    project = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py")}
    assert {m + ".py" for m in (imported & project) - {"runs", "gpu"}} | {"train.py"} == set(train.CODE)

    def fingerprint(folder):
        return subprocess.run([sys.executable, "-c", "import runs; print(runs.code_fingerprint("
                               f"{train.CODE!r}))"], cwd=folder, capture_output=True, text=True).stdout
    for name in ("runs.py",) + train.CODE:
        shutil.copy(os.path.join(HERE, name), tmp_path / name)
    base = fingerprint(tmp_path)
    assert base.strip() == runs.code_fingerprint(train.CODE)
    for name in train.CODE:
        original = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(original + b"\n")
        assert fingerprint(tmp_path) != base, name
        (tmp_path / name).write_bytes(original)
    want = train.config("block", **TINY)
    saved = dict(want, versions={"code": runs.code_fingerprint(train.CODE)})
    assert figures.matches(saved, want) == (True, True)
    for key, value in want.items():
        other = dict(saved, **{key: value + 1 if isinstance(value, (int, float)) else value + "x"})
        assert figures.matches(other, want)[0] is (key in train.NOT_RESULT), key
    assert figures.matches(dict(saved, versions={"code": "0" * 40}), want) == (True, False)


def test_pretrain_trains_the_stacks_side_by_side_as_one_process_would(tmp_path, monkeypatch):
    """figures.py trains the stacks of its figures in worker processes (both cores), each
    member's files byte-identical to those trained in this process; the figure then reuses them."""
    import figures
    monkeypatch.setitem(figures.R1_SIZES, "quick", dict(d=2, Ts=(4, 6, 8), train=dict(n_train=64, n_test=32, steps=5)))
    monkeypatch.setattr(figures.fused, "cores", lambda: 2)

    def ctx(folder, jobs):
        return argparse.Namespace(preset="quick", runs=str(tmp_path / folder), retrain=False, quiet=True,
                                  seeds=[0, 1], jobs=jobs, timings=[])
    side = ctx("side", 2)
    figures.pretrain(side, ["r1", "fig1"])                                   # 3 stacks, 2 processes
    names = sorted(os.listdir(tmp_path / "side"))
    assert names == sorted(f"r1-T{T}-quick-seed{s}" for T in (4, 6, 8) for s in (0, 1))
    alone = ctx("alone", 1)
    figures.pretrain(alone, ["r1"])                                          # one process: nothing here
    assert not os.path.exists(tmp_path / "alone")
    figures.trained(alone, figures.r1_specs("quick"))
    for name in names:
        for f in ("params.npz", "metrics.npz", "checkpoint.npz", "config.json"):
            assert (tmp_path / "side" / name / f).read_bytes() == (tmp_path / "alone" / name / f).read_bytes(), (name, f)
    figures.trained(side, figures.r1_specs("quick"))
    assert [t["reused"] for t in side.timings] == [True] * 6 and all(t["seconds"] > 0 for t in side.timings)


def test_figures_processes_on_one_out_keep_each_others_summary_rows(tmp_path):
    """Three processes write the summary of one --out at once: every figure's rows remain
    (each read-merge-write holds OUT's lock)."""
    import subprocess
    import sys
    code = ("import figures, os, sys, time\n"
            "name = sys.argv[1]\n"
            "open(sys.argv[3] + name, 'w').close()\n"              # ready; then all start at once
            "while not os.path.exists(sys.argv[3] + 'go'):\n"
            "    time.sleep(0.005)\n"
            "for k in range(60):\n"
            "    figures.write_summary(sys.argv[2], {name: {'rows': [figures.row(name, f'q{k}', k)], 'seconds': 1.0,"
            " 'note': ''}}, 'quick')\n")
    out, gate = tmp_path / "out", str(tmp_path) + "/"
    procs = [subprocess.Popen([sys.executable, "-c", code, name, str(out), gate], cwd=HERE)
             for name in ("fig1", "fig3", "r1")]
    import time
    while not all(os.path.exists(gate + name) for name in ("fig1", "fig3", "r1")):
        time.sleep(0.01)
    open(gate + "go", "w").close()
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    tmp_path = out
    import figures
    recorded = figures.recorded_summary(str(tmp_path))
    assert sorted(recorded) == ["fig1", "fig3", "r1"]
    assert all(r["rows"][0]["quantity"] == "q59" for r in recorded.values())


@pytest.mark.parametrize("value", [{"a": 1}, [[1, 2]], True and {"x": None}])
def test_a_summary_value_that_is_not_a_cell_is_refused_before_anything_is_written(tmp_path, value):
    import figures
    (tmp_path / "summary.json").write_text(json.dumps({"fig1": {"preset": "quick", "seconds": 1.0, "note": "",
                                                                "rows": [{"quantity": "q", "value": value,
                                                                          "expected": None, "source": ""}]}}))
    before = folder_bytes(tmp_path)
    with pytest.raises(runs.FileFault, match="not a summary of figures"):
        figures.write_summary(str(tmp_path), {"r1": {"rows": [], "seconds": 1.0, "note": ""}}, "quick")
    assert {k: v for k, v in folder_bytes(tmp_path).items() if k != ".lock"} == before


def test_sigterm_while_workers_train_stops_them_at_once(tmp_path):
    """figures.py signalled (only its own pid, as kill or a scheduler does) while its workers
    train: one line, exit 143 within seconds, no worker left."""
    import signal
    import subprocess
    import sys
    import time
    p = subprocess.Popen([sys.executable, "figures.py", "r1", "--seeds", "2", "--quiet", "--runs", str(tmp_path / "runs"),
                          "--out", str(tmp_path / "out")], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    while not (tmp_path / "runs").exists() or not os.listdir(tmp_path / "runs"):  # the workers have started
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.1)
    time.sleep(1.0)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and time.time() - t0 < 10
    assert err.splitlines()[-1].startswith("figures.py: error: interrupted by SIGTERM")
    ps = subprocess.run(["pgrep", "-f", str(tmp_path / "runs")], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


def test_compare_names_its_reference_and_what_is_wrong(tmp_path, capsys):
    import figures
    out = ["starts", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--quiet", "--compare"]
    assert figures.main(out + [str(tmp_path)]) == 2
    assert "--compare: " in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1, 2]")
    assert figures.main(out + [str(tmp_path / "list.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compare: " in err and "list.json: not a summary of figures" in err
    assert "--out" not in err and "delete it" not in err


# ---- the starts figure: its runs, its cache, its rows --------------------------------------

@pytest.mark.parametrize("preset", ["quick", "paper"])
def test_starts_specs_train_each_model_from_its_own_start_and_reuse_figs_5_and_7(preset):
    """Each (kind, L, start) run starts from `start` and differs from the other start's run in
    s1 alone; the fixed-start runs are the very runs (name and settings) of Figs. 5 and 7."""
    import figures
    import verdicts
    specs = figures.starts_specs(preset)
    assert len({name for _, name, _ in specs.values()}) == len(specs)
    raw7 = figures.fig7_specs(preset)[0]
    for (kind, L, start), (experiment, name, overrides) in specs.items():
        cfg = train.config(experiment, preset, **overrides)
        assert cfg["s1"] == start and cfg["layers"] == L, (kind, L, start)
        assert experiment == {"raw": "nonaug", "aug": "augmented"}[kind]
        other_experiment, _, other_overrides = specs[kind, L, verdicts.OTHER[start]]
        other = train.config(other_experiment, preset, **other_overrides)
        assert {k for k in cfg if cfg[k] != other[k]} == {"s1"}
        if start == "fixed":
            same = raw7[L, figures.FIG7[preset]["depth_heads"]] if kind == "raw" else figures.fig5_specs(preset)[L]
            assert same[:2] == (experiment, name) and train.config(same[0], preset, **same[2]) == cfg


def test_the_starts_cache_key_holds_each_runs_settings(tmp_path, monkeypatch):
    """run_starts keeps the causal tests of each run in the cache and computes them again for a
    run whose result settings changed (any one: the run's settings are in the key), only for it."""
    import figures
    import verdicts
    ctx = argparse.Namespace(runs=str(tmp_path), preset="quick", retrain=False, quiet=True, seeds=[0], timings=[])
    specs = figures.starts_specs("quick")

    def results(changed=None, **change):
        out = {}
        for key, (experiment, name, overrides) in specs.items():
            cfg = dict(train.config(experiment, "quick", **overrides, seed=0), experiment=experiment, preset="quick")
            if key == changed:
                cfg.update(change)
            out[key] = {0: {"config": cfg, "dir": os.path.join(str(tmp_path), train.seed_folder(name, 0)),
                            "metrics": {}, "params": {}}}
        return out

    computed = []
    monkeypatch.setattr(verdicts, "causal_tests", lambda r, s: computed.append(r["config"]) or {"x": np.zeros(1)})

    class Done(Exception):
        pass

    def done(tests):  # the tests are all cached before any is measured: stop there
        raise Done

    monkeypatch.setattr(verdicts, "measures", done)

    def run(res):
        monkeypatch.setattr(figures, "trained", lambda ctx, specs: res)
        computed.clear()
        with pytest.raises(Done):
            figures.run_starts(ctx)
        return list(computed)

    assert len(run(results())) == len(specs)
    assert run(results()) == []
    for change in (dict(lr=0.02), dict(n_train=1000), dict(sigma=0.1), dict(family="orthogonal", d=4)):
        again = run(results(("raw", 2, "random"), **change))
        assert len(again) == 1 and all(again[0][k] == v for k, v in change.items()), change
    assert len(run(results())) == 1                                          # back to the first settings


def test_starts_rows_read_the_share_of_tokens_0_to_4_on_late_outputs_as_verdicts_does():
    """The influence share row of the starts figure is verdicts.measures' "first": tokens 0-4
    (columns) over the outputs r >= T / 2 (rows), nothing else."""
    import figures
    import verdicts
    T = 10
    tests = {f"{d}_{k}": np.r_[np.full(T // 2, 100.0), np.full(T // 2, v)]
             for d in ("clean", "other", "switch", "replaced") for k, v in (("model", 2.0), ("gd1", 4.0))}
    influence = np.zeros((T, T))
    influence[T // 2:] = np.arange(1.0, T + 1)                               # column t weighs t + 1
    influence[:T // 2] = 50.0                                                 # early outputs: not read
    tests.update(influence=influence, probe_cos_W=np.zeros(T), probe_cos_gd1=np.zeros(T),
                 ablated=np.ones((1, 2)), full=1.0)
    rows = figures.starts_rows({("aug", 1, "fixed"): tests}, {("aug", 1, "fixed"): {}})
    share = [r for r in rows if "share of the influence of tokens 0-4 on outputs r >= 5" in r["quantity"]]
    assert len(share) == 1
    assert share[0]["value"] == pytest.approx(15 / 55) == verdicts.measures(tests)["first"]
    loss = [r for r in rows if "test MSE on its own law" in r["quantity"]]
    assert loss[0]["value"] == 2.0 and loss[0]["expected"] == 4.0


def test_expectations_hold_at_their_bounds_and_fail_past_them():
    """figures.EXPECT's checks over seeds: "at least 2 of 5" holds at 2 of 5, not at 1; a
    median "at least 2" holds at exactly 2; an expectation of a model not run is left out."""
    import figures

    def found(lookups, switches):
        return {("raw", 2, "fixed"): [{"verdict": "start lookup" if i < lookups else "none", "switch": v}
                                      for i, v in enumerate(switches)]}
    rows = figures.expectation_rows(found(2, [1.0, 2.0, 3.0, 2.0, 1.5]))
    assert [r["value"] for r in rows] == ["holds (2 of 5)", "holds (2)"]
    assert [r["expected"] for r in rows] == [">= 0.4", ">= 2"]
    rows = figures.expectation_rows(found(1, [1.0, 1.9, 3.0, 1.9, 1.5]))
    assert [r["value"] for r in rows] == ["FAILS (1 of 5)", "FAILS (1.9)"]
    never = [r for r in figures.expectation_rows({("raw", 2, "random"): [
        {"verdict": v, "other": 1.0} for v in ("none", "none", "whole-context learner", "none", "none")]})
        if "never a start lookup" in r["quantity"]]
    assert len(never) == 1 and never[0]["value"] == "holds (0 of 5)"


def test_compare_names_every_verdict_row_that_differs_or_that_one_summary_lacks():
    import figures

    def summary(rows):
        return {"starts": {"rows": [{"quantity": q, "value": v} for q, v in rows.items()]}}
    q1, q2, q3 = "x: verdict (verdicts.py)", "expected of y", "z: verdict (verdicts.py)"
    reference = summary({q1: "none: 5 of 5", q2: "holds (3 of 5)", "a number": 1.0})
    now = summary({q1: "none: 5 of 5", q2: "FAILS (1 of 5)", q3: "start lookup: 1 of 1", "a number": 2.0})
    lines = figures.compare(reference, now, ["starts"])
    assert len(lines) == 2
    assert lines[0] == f"differs: starts | {q2}: holds (3 of 5) in the reference, FAILS (1 of 5) now"
    assert lines[1] == f"differs: starts | {q3}: absent in the reference, start lookup: 1 of 1 now"
    assert figures.compare(now, reference, ["starts"])[1].endswith("start lookup: 1 of 1 in the reference, absent now")
    assert figures.compare(reference, reference, ["starts"]) == []


def test_a_one_seed_point_trains_at_the_first_seed_only_and_its_figure_says_so(tmp_path, monkeypatch):
    """figures.ONE_SEED (the authors'-scale Fig. 7 L = 1, H = 64): that point trains at the
    first seed alone, the others at every seed; by_seed keeps each point under the seeds it
    has, and Fig. 7 says which point is one seed."""
    import figures
    monkeypatch.setitem(figures.R1_SIZES, "quick", dict(d=2, Ts=(4, 6), train=dict(n_train=32, n_test=16, steps=3)))
    monkeypatch.setitem(figures.ONE_SEED, "quick", ("r1-T6-quick",))
    ctx = argparse.Namespace(preset="quick", runs=str(tmp_path / "runs"), retrain=False, quiet=True,
                             seeds=[3, 4], jobs=1, timings=[])
    got = figures.by_seed(figures.trained(ctx, figures.r1_specs("quick")))
    assert sorted(os.listdir(tmp_path / "runs")) == ["r1-T4-quick-seed3", "r1-T4-quick-seed4", "r1-T6-quick-seed3"]
    assert {s: sorted(v) for s, v in got.items()} == {3: [4, 6], 4: [4]}
    cfg = icar.transformer_config(d_in=2, d_out=2, T=6, heads=2, repeat=2, positional=True, residual=False)
    p = icar.init_params("transformer", rng(15), cfg=cfg)
    att = icar.positional_attention(p["layers"][0], p["pos"][:6])
    made = {}
    monkeypatch.setattr(figures, "save_figure", lambda fig, out_dir, name: made.setdefault(name, fig))
    one = lambda k: dict(fake_metrics(6, 2, seed=k), mech_prev_share=rng(k).random(2),
                         mech_readout_r2=np.r_[np.nan, rng(k).random(5)])
    raw = {(1, 1): [one(1), one(2)], (1, 2): [one(3)], (2, 2): [one(4), one(5)]}
    figures.plot_fig7(raw, {1: [one(6), one(7)], 2: [one(8), one(9)]}, 2, att, str(tmp_path), seed=(4, 1),
                      single={(1, 2): 3})
    texts = [t.get_text() for ax in made["fig7"].axes for t in
             (ax.get_legend().get_texts() if ax.get_legend() else [])] + [ax.get_title() for ax in made["fig7"].axes]
    assert any("H = 2: seed 3 only" in t for t in texts)
    assert any(t.startswith("query-path probe") and "L = 1, H = 2, seed 3 (one seed)" in t for t in texts)
    assert any("L = 2, H = 2, seed 4" in t for t in texts)


def test_compare_without_verdicts_to_compare_and_two_presets_in_one_out_are_refused(tmp_path, capsys):
    """--compare of figures that have no verdict rows would pass whatever happened: refused;
    so is a reference of the other preset, and an --out whose summary holds the other preset's
    figures (one table would mix two scales): one line, exit 2, nothing written."""
    import figures
    args = ["--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"), "--quiet"]
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"starts": {"preset": "quick", "seconds": 1.0, "note": "", "rows": []}}))
    assert figures.main(["fig1", "fig3"] + args + ["--compare", str(ref)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compare compares the verdicts and expectations of starts" in err
    assert figures.main(["starts", "--preset", "paper"] + args + ["--compare", str(ref)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds the quick preset's verdicts, not those of --preset paper" in err
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "runs")
    assert figures.main(["fig1"] + args) == 0                      # a quick summary in out/
    before = (tmp_path / "out" / "summary.json").read_bytes()
    assert figures.main(["fig1", "--preset", "paper"] + args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds figures of the quick preset" in err and "another --out" in err
    assert (tmp_path / "out" / "summary.json").read_bytes() == before
    assert figures.main(["fig1"] + args) == 0                      # the same preset: merged as before
