"""Tests of train.py: optimisers, checkpoints and resume, divergence, baselines against
paper.md's numbers, the Jacobian probe, weight blocks, and the command line."""
import json
import os
import subprocess
import sys

import autograd.numpy as anp
import numpy
import pytest
from autograd import grad

import icar
import train

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(T=5, n_train=64, n_test=32, n_probe=4, steps=6, checkpoint_every=2, log_every=2)


def flat(tree):
    return train._flatten(tree)


# ----------------------------------------------------------------------------- optimisers

def test_adam_matches_scalar_reference_and_gd_is_one_line():
    rng = numpy.random.default_rng(0)
    params = {"a": rng.standard_normal(3), "layers": [{"w": rng.standard_normal((2, 2))}]}
    grads = [tree for tree in (train.tree_map(lambda p: rng.standard_normal(p.shape), params)
                               for _ in range(3))]
    state = train.adam_init(params)
    p = params
    for g in grads:
        p, state = train.adam_update(p, g, state, 0.1)
    # reference: the textbook recursion on each scalar
    x, m, v = params["layers"][0]["w"][1, 0], 0.0, 0.0
    for t, g in enumerate(grads, 1):
        gi = g["layers"][0]["w"][1, 0]
        m, v = 0.9 * m + 0.1 * gi, 0.999 * v + 0.001 * gi ** 2
        x -= 0.1 * (m / (1 - 0.9 ** t)) / (numpy.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    assert p["layers"][0]["w"][1, 0] == pytest.approx(x, abs=1e-15)
    assert state["t"] == 3
    q = train.gd_update(params, grads[0], 0.5)
    assert numpy.array_equal(q["a"], params["a"] - 0.5 * grads[0]["a"])


# ----------------------------------------------------------------------------- files, resume

def test_flatten_roundtrip_keeps_lists():
    tree = {"layers": [{"W": numpy.ones(2)}, {"W": numpy.zeros(3)}], "b": numpy.arange(2.0)}
    back = train._unflatten(flat(tree))
    assert isinstance(back["layers"], list) and len(back["layers"]) == 2
    assert numpy.array_equal(back["layers"][1]["W"], numpy.zeros(3))


def test_interrupted_write_leaves_previous_file(tmp_path):
    path = str(tmp_path / "metrics.npz")
    train._save_npz(path, {"x": numpy.arange(3.0)})

    def crash(f):  # a partial write, then the process is interrupted
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train._atomic_write(path, crash)
    assert numpy.array_equal(train._load_npz(path)["x"], numpy.arange(3.0))
    assert os.listdir(tmp_path) == ["metrics.npz"]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    kw = dict(TINY, d=2, n_probe=0)
    full = train.run("block", runs_dir=str(tmp_path), name="full", quiet=True, **kw)
    savez, calls = numpy.savez, []

    def crash(f, **arrays):
        calls.append(1)
        if len(calls) == 3:  # the checkpoint of step 4, half written
            f.write(b"PK\x03\x04 partial")
            raise KeyboardInterrupt
        savez(f, **arrays)

    monkeypatch.setattr(numpy, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        train.run("block", runs_dir=str(tmp_path), name="cut", quiet=True, **kw)
    monkeypatch.setattr(numpy, "savez", savez)
    assert int(train._load_npz(str(tmp_path / "cut" / "checkpoint.npz"))["step"]) == 2
    resumed = train.run("block", runs_dir=str(tmp_path), name="cut", resume=True, quiet=True, **kw)
    assert numpy.array_equal(full["params"]["A"], resumed["params"]["A"])
    assert numpy.array_equal(full["metrics"]["train_loss"], resumed["metrics"]["train_loss"])


@pytest.mark.parametrize("experiment,extra", [
    ("block", dict(d=2, batch=16)),                      # minibatches: the shuffle RNG matters
    ("augmented", dict(d=2, layers=2, batch=16, steps=5)),  # list-of-dict parameters
    ("pe-only", dict(target_loss=0.0)),                  # plain GD
])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, experiment, extra):
    kw = dict(TINY, **extra)
    full = train.run(experiment, runs_dir=str(tmp_path), name="full", quiet=True, **kw)

    name = "gd_update" if full["config"]["optimizer"] == "gd" else "adam_update"
    update, calls = getattr(train, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # after the checkpoint at step 2, before step 4
            raise KeyboardInterrupt
        return update(*args, **kwargs)

    monkeypatch.setattr(train, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.run(experiment, runs_dir=str(tmp_path), name="cut", quiet=True, **kw)
    monkeypatch.setattr(train, name, update)
    assert not os.path.exists(tmp_path / "cut" / "params.npz")
    resumed = train.run(experiment, runs_dir=str(tmp_path), name="cut", resume=True, quiet=True,
                        **kw)
    a, b = flat(full["params"]), flat(resumed["params"])
    assert a.keys() == b.keys()
    for k in a:
        assert numpy.array_equal(a[k], b[k]), k
    for k in ("train_loss", "test_loss", "test_step"):
        assert numpy.array_equal(full["metrics"][k], resumed["metrics"][k]), k
    loaded = train.load(resumed["dir"])
    assert all(numpy.array_equal(a[k], v) for k, v in flat(loaded["params"]).items())
    assert loaded["config"]["seed"] == 0 and "numpy" in loaded["config"]["versions"]
    assert numpy.array_equal(loaded["metrics"]["test_loss_position"],
                             resumed["metrics"]["test_loss_position"])


def test_resume_refuses_changed_settings(tmp_path):
    train.run("block", runs_dir=str(tmp_path), quiet=True, **dict(TINY, n_probe=0))
    with pytest.raises(ValueError, match=r"\['lr'\]"):
        train.run("block", runs_dir=str(tmp_path), resume=True, quiet=True, lr=0.5, **dict(TINY, n_probe=0))


def test_divergence_stops_and_keeps_last_finite_checkpoint(tmp_path, capsys):
    kw = dict(TINY, optimizer="gd", lr=1e6, steps=100, checkpoint_every=1, n_probe=0)
    with pytest.raises(train.Diverged, match=r"at step \d+.*learning rate 1000000.0 is likely too large") as e:
        train.run("block", runs_dir=str(tmp_path), quiet=True, **kw)
    step = int(str(e.value).split("at step ")[1].split(":")[0])
    z = train._load_npz(str(tmp_path / "block" / "checkpoint.npz"))
    assert int(z["step"]) == step - 1
    assert all(numpy.all(numpy.isfinite(v)) for k, v in z.items() if k.startswith("params/"))
    # the command line: one line on stderr, non-zero status
    argv = ["block", "--runs_dir", str(tmp_path), "--quiet"] + [
        a for k, v in kw.items() for a in (f"--{k}", str(v))]
    assert train.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "learning rate" in err[0] and f"step {step}" in err[0]


# ----------------------------------------------------------------------------- baselines

def test_baselines_match_paper_numbers():
    """paper.md: d = 5, Haar, s_1 = 1/sqrt(5): one-step GD 0.80, 0.67, 0.42, 0.31, 0.25, 0.22
    after 1, 2, 5, 10, 20, 49 transitions (two decimals, so 0.005 of rounding plus 4
    standard errors); zero predictor 1; least squares exact from 5 transitions."""
    s, W = icar.sample_sequences(numpy.random.default_rng(1), 4096, 50, 5, "haar", s1="fixed")
    b = train.baselines(s, W, gd_steps=1)
    x, y = s[:, :-1], s[:, 1:]
    C, _ = train._context_sums(x)
    per = numpy.sum((train.optimal_gd_step(s)[None, :, None] * train._apply(C, x) - y) ** 2, -1)
    se = per.std(axis=0) / numpy.sqrt(len(per))
    for r, ref in zip((1, 2, 5, 10, 20, 49), (0.80, 0.67, 0.42, 0.31, 0.25, 0.22)):
        assert abs(b["gd1"][r] - ref) <= 0.005 + 4 * se[r], (r, b["gd1"][r])
    assert numpy.allclose(b["zero"], 1.0, atol=1e-12)
    assert numpy.all(b["least_squares"][5:] < 1e-16) and b["least_squares"][4] > 0.1
    assert numpy.all(b["oracle"] < 1e-25)
    assert numpy.allclose(b["last_value"], numpy.mean(numpy.sum((x - y) ** 2, -1), 0))


def test_k_step_gd_step_is_the_grid_minimum():
    s, W = icar.sample_sequences(numpy.random.default_rng(2), 256, 12, 3, "haar")
    x, y = s[:, :-1], s[:, 1:]
    C, S = train._context_sums(x)
    eta = train.optimal_gd_step(s, 3)
    best = train._position_loss(train._gd_prediction(C, S, x, eta, 3), y)
    grid = numpy.linspace(0, 2 * eta.max(), 2001)
    losses = numpy.stack([train._position_loss(
        train._gd_prediction(C, S, x, numpy.full(12, g), 3), y) for g in grid])  # [grid, T]
    assert numpy.all(best <= losses.min(axis=0) + 1e-12)
    # and one step through the same code equals the closed form of optimal_gd_step(s, 1)
    eta1 = train.optimal_gd_step(s, 1)
    one = train._position_loss(train._gd_prediction(C, S, x, eta1, 1), y)
    assert numpy.all(one <= numpy.stack([train._position_loss(
        train._gd_prediction(C, S, x, numpy.full(12, g), 1), y) for g in grid]).min(0) + 1e-12)


# ----------------------------------------------------------------------------- probe

def test_probe_m1_one_gd_step_and_oracle():
    """A = I, B = eta I: Gamma = eta sum_{t<=r} s_t s_{t-1}^* exactly (complex data); the
    oracle predictor gives W."""
    rng = numpy.random.default_rng(3)
    d, T, eta = 3, 6, 0.3
    s, W = icar.sample_sequences(rng, 8, T, d, "unitary")
    params = {"A": numpy.eye(d), "B": eta * numpy.eye(d)}
    cfg = train.config("block", d=d, T=T)
    predict = train.query_predictor("block", cfg, params, s[:, :-1])
    assert numpy.allclose(predict(s[:, :-1]), icar.augmented_linear(params, icar.augment(s[:, :-1])),
                          atol=1e-13)
    G = train.probe(predict, s, W)["Gamma"]
    want = numpy.zeros((8, d, d), complex)
    for r in range(T):  # reference: the sum written out
        if r:
            want = want + eta * s[:, r, :, None] * s[:, r - 1, None, :].conj()
        assert numpy.abs(G[:, r] - want).max() < 1e-12, r
    oracle = train.probe(lambda x: (W[:, None] @ x[..., None])[..., 0], s, W)
    assert numpy.abs(oracle["Gamma"] - W[:, None]).max() < 1e-14
    assert numpy.allclose(oracle["err_W"], 0, atol=1e-14) and numpy.allclose(oracle["cos_W"], 1)


def test_probe_full_form_equals_block_form():
    rng = numpy.random.default_rng(4)
    d, T = 2, 5
    s, W = icar.sample_sequences(rng, 4, T, d, "haar")
    A, B = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    full = {"W_KQ": numpy.zeros((3 * d, 3 * d)), "W_V": numpy.zeros((3 * d, 3 * d))}
    full["W_KQ"][2 * d:, d:2 * d], full["W_V"][:d, d:2 * d] = A, B
    cfg = train.config("block", d=d, T=T)
    pf = train.query_predictor("block", cfg, full, s[:, :-1])
    assert numpy.allclose(pf(s[:, :-1]), icar.augmented_linear(full, icar.augment(s[:, :-1])), atol=1e-13)
    Gf = train.probe(pf, s, W)["Gamma"]
    Gb = train.probe(train.query_predictor("block", cfg, {"A": A, "B": B}, s[:, :-1]), s, W)["Gamma"]
    assert numpy.abs(Gf - Gb).max() < 1e-12
    shares = train.weight_blocks("block", full, d)
    assert numpy.allclose(shares["share_KQ"], 1) and numpy.allclose(shares["share_V"], 1)


@pytest.mark.parametrize("experiment,attention", [("augmented", "linear"), ("nonaug", "softmax")])
def test_two_stream_transformer_is_icar_and_local(experiment, attention):
    rng = numpy.random.default_rng(5)
    d, T = 2, 5
    cfg = train.config(experiment, d=d, T=T, layers=2, heads=2, attention=attention)
    params = train.init_model(experiment, cfg, rng)
    s, W = icar.sample_sequences(rng, 3, T, d, "haar")
    predict = train.query_predictor(experiment, cfg, params, s[:, :-1])
    assert numpy.abs(predict(s[:, :-1]) - train.predictor(experiment, cfg)(params, s[:, :-1])).max() < 1e-12
    # output position r depends on the query states only through x_r
    g = grad(lambda x: anp.sum(predict(x)[:, 2]))(s[:, :-1])
    assert numpy.all(g[:, [0, 1, 3, 4]] == 0) and numpy.abs(g[:, 2]).max() > 1e-6
    # probe rows against central finite differences
    G = train.probe(predict, s, W)["Gamma"]
    h, j = 1e-6, 1
    e = numpy.zeros_like(s[:, :-1])
    e[..., j] = h
    fd = (predict(s[:, :-1] + e) - predict(s[:, :-1] - e)) / (2 * h)   # [n, T, d]: column j
    assert numpy.abs(G[..., j] - fd).max() < 1e-7


def test_weight_blocks_m4_reproduce_the_scores():
    """e_t^T KQ e_r equals the first layer's attention score q_r . k_t (zero biases)."""
    rng = numpy.random.default_rng(6)
    d = 2
    cfg = train.config("augmented", d=d, T=4, heads=2)
    params = train.init_model("augmented", cfg, rng)
    e = rng.standard_normal((3, 3 * d))
    layer = params["layers"][0]
    want = numpy.einsum("hri,hti->htr", e @ layer["W_Q"], e @ layer["W_K"])       # [H, t, r]
    KQ = train.weight_blocks("augmented", params, d)["KQ"][0]                       # [H, 3d, 3d]
    assert numpy.allclose(e @ KQ @ e.T, want, atol=1e-12)
    blocks = train.weight_blocks("augmented", params, d)
    by_hand = numpy.sum(KQ[:, 2 * d:, d:2 * d] ** 2, (1, 2)) / numpy.sum(KQ ** 2, (1, 2))
    assert numpy.allclose(blocks["share_KQ"][0], by_hand)


# ----------------------------------------------------------------------------- command line

@pytest.mark.parametrize("argv", [
    ["augmented", "--lr", "abc"], ["nosuch"], ["block", "--steps", "-1"],
    ["block", "--heads", "2"], ["pe-only", "--dtype", "float16"], ["augmented", "--backend", "cupy"],
])
def test_bad_arguments_exit_2_with_one_line(argv):
    out = subprocess.run([sys.executable, "train.py", *argv], cwd=HERE, capture_output=True, text=True)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("train.py: ")


def test_every_experiment_runs_end_to_end(tmp_path, capsys):
    tiny = ["--T", "5", "--n_train", "32", "--n_test", "16", "--n_probe", "2", "--steps", "3",
            "--quiet", "--runs_dir", str(tmp_path)]
    for experiment in ("augmented", "nonaug", "block", "diagonal", "pe-only"):
        extra = ["--batch", "16"] if experiment in ("augmented", "nonaug") else []
        extra += ["--heads", "2"] if experiment == "nonaug" else []
        assert train.main([experiment] + tiny + extra) == 0, experiment
        result = train.load(str(tmp_path / experiment))
        m = result["metrics"]
        assert len(m["train_loss"]) == 4 and m["test_loss_position"].shape == (5,)
        assert numpy.isfinite(m["test_loss"]).all()
    assert train.main(["population", "--steps", "3", "--d", "4", "--heads", "2", "--T", "5",
                       "--runs_dir", str(tmp_path)]) == 0
    assert len(train.load(str(tmp_path / "population"))["metrics"]["train_loss"]) == 4
    assert "model" in capsys.readouterr().out
    assert train.main(["augmented", "--help"]) == 0
    assert "--layers" in capsys.readouterr().out


def test_sweep_over_layers_writes_summary(tmp_path, capsys):
    argv = ["augmented", "--T", "4", "--n_train", "32", "--n_test", "16", "--n_probe", "0",
            "--steps", "2", "--batch", "0", "--quiet", "--runs_dir", str(tmp_path),
            "--sweep", "layers=1,2", "--sweep", "sigma=0,0.1"]
    assert train.main(argv) == 0
    with open(tmp_path / "augmented" / "summary.json") as f:
        rows = json.load(f)["rows"]
    assert [(r["layers"], r["sigma"]) for r in rows] == [(1, 0.0), (1, 0.1), (2, 0.0), (2, 0.1)]
    second = train.load(str(tmp_path / "augmented" / "layers=2,sigma=0.1"))
    assert second["config"]["layers"] == 2 and second["config"]["sigma"] == 0.1
    assert rows[3]["gd_k=L"] == pytest.approx(float(numpy.mean(second["metrics"]["baseline_gd2"])))
    assert "gd_k=L" in capsys.readouterr().out


def test_progress_updates_one_line_on_a_terminal_and_prints_lines_otherwise():
    class Stream(list):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

        def write(self, text):
            self.append(text)

        def flush(self):
            pass

    for tty in (True, False):
        stream = Stream(tty)
        progress = train._Progress(10, quiet=False, stream=stream)
        for step in (0, 5, 10):
            progress.show(step, 1.0, 2.0, final=step == 10)
        text = "".join(stream)
        assert text.count("\r") == (3 if tty else 0) and text.count("\n") == (1 if tty else 3)
        assert "step 10/10" in text and "steps/s" in text and "left" in text
    quiet = Stream(False)
    train._Progress(10, quiet=True, stream=quiet).show(0, 1.0, 2.0)
    assert quiet == []


def test_probe_of_the_r2_minimiser_is_w():
    """M2 at R2's global minimiser (C = c I, p_T = 1/c): Gamma = diag(s_r conj(s_{r-1}))
    = diag(lambda) = W at every position r >= 1."""
    theory = pytest.importorskip("theory")
    d, T = 3, 6
    params = theory.minimiser(d, d, "unitary", c=-1.2, T=T)
    s, W = icar.sample_sequences(numpy.random.default_rng(7), 5, T, d, "unitary")
    cfg = train.config("diagonal", d=d, T=T, heads=d)
    predict = train.query_predictor("diagonal", cfg, params, s[:, :-1])
    assert numpy.abs(predict(s[:, :-1]) - icar.diagonal_heads(params, s[:, :-1])).max() < 1e-13
    found = train.probe(predict, s, W)
    assert numpy.abs(found["Gamma"][:, 1:] - W[:, None]).max() < 1e-12
    assert numpy.all(found["err_W"][1:] < 1e-12)


@pytest.mark.parametrize("experiment", ["diagonal", "pe-only"])
def test_value_slot_predictors_are_the_models(experiment):
    rng = numpy.random.default_rng(8)
    d, T = 2, 5
    cfg = train.config(experiment, d=d, T=T)
    params = {"P": rng.standard_normal((T, T))}
    if experiment == "diagonal":
        params.update(A=rng.standard_normal((4, d)), B=rng.standard_normal((4, d)))
    s, W = icar.sample_sequences(rng, 3, T, d, "unitary")
    predict = train.query_predictor(experiment, cfg, params, s[:, :-1])
    assert numpy.abs(predict(s[:, :-1]) - train.predictor(experiment, cfg)(params, s[:, :-1])).max() < 1e-12
    x = s[:, :-1] + rng.standard_normal(s[:, :-1].shape)
    for r in range(T):  # position r reads x only at r, linearly, as the value of the newest token
        y = s[:, :-1].copy()
        y[:, r] = x[:, r]
        assert numpy.abs(predict(y)[:, r] - predict(x)[:, r]).max() < 1e-12
    assert numpy.allclose(predict(2 * x - s[:, :-1]) - predict(x), predict(x) - predict(s[:, :-1]))
