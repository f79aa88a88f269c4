"""Tests of train.py, one run and its command line: the optimisers against a scalar
reference, resume bit-identical (and refusing changed settings, damaged or foreign
checkpoints), divergence, dtypes, every experiment end to end, and the bad command lines of
train.py (one line on stderr, exit 2, no file touched). Which test proves which claim:
docs/claims.md."""


import os
import re
import subprocess
import sys

import numpy as np
import pytest

import evaluate
import icar
import runs
import sweep
import train
from conftest import HERE, TINY, argv_of, finished_run, flat, folder_bytes


# ---- optimisers --------------------------------------------------------------------------

def test_adam_matches_scalar_reference_and_gd_is_one_line():
    rng = np.random.default_rng(0)
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
        x -= 0.1 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    assert p["layers"][0]["w"][1, 0] == pytest.approx(x, abs=1e-15)
    assert state["t"] == 3
    q = train.gd_update(params, grads[0], 0.5)
    assert np.array_equal(q["a"], params["a"] - 0.5 * grads[0]["a"])


def test_flat_adam_is_adam_update_bit_for_bit_and_repacks_trees_it_did_not_return():
    """train.FlatAdam (the training loop's Adam: one vector for every parameter) gives
    adam_update's bits step after step, its trees keep the key order of the parameters, and
    trees it did not return (members retired: indexed copies) are packed afresh."""
    rng = np.random.default_rng(1)
    params = {"z": rng.standard_normal((3, 2)), "a": rng.standard_normal(3),
              "layers": [{"w": rng.standard_normal((3, 2, 2)), "b": rng.standard_normal((3, 1))}] * 2}
    grad = lambda: train.tree_map(lambda p: rng.standard_normal(p.shape) * 10.0 ** rng.integers(-3, 3), params)
    ref, ref_state = params, train.adam_init(params)
    flat, state, adam = params, train.adam_init(params), train.FlatAdam()
    for k in range(5):
        g = grad()
        ref, ref_state = train.adam_update(ref, g, ref_state, 0.03)
        flat, state = adam.step(flat, g, state, 0.03)
        if k == 2:  # a member retired: indexed copies of every tree
            keep = np.array([0, 2])
            cut = lambda tree: train.tree_map(lambda p: p[keep], tree)
            ref, ref_state = cut(ref), dict(ref_state, m=cut(ref_state["m"]), v=cut(ref_state["v"]))
            flat, state = cut(flat), dict(state, m=cut(state["m"]), v=cut(state["v"]))
            params = cut(params)
        assert list(flat) == list(ref) == ["z", "a", "layers"] and list(flat["layers"][1]) == ["w", "b"]
        for tree, want in ((flat, ref), (state["m"], ref_state["m"]), (state["v"], ref_state["v"])):
            for x, y in zip(train.tree_leaves(tree), train.tree_leaves(want)):
                assert x.shape == y.shape and np.array_equal(x, y)
        assert state["t"] == ref_state["t"] == k + 1
    with pytest.raises(ValueError, match="does not match its parameter"):
        adam.step(flat, dict(flat, a=np.ones(5)), state, 0.03)


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf"), -float("inf")])
def test_optimisers_refuse_a_learning_rate_that_is_not_finite_and_positive(lr):
    params = {"a": np.ones(2)}
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        train.gd_update(params, params, lr)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        train.adam_update(params, params, train.adam_init(params), lr)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        train.FlatAdam().step(params, params, train.adam_init(params), lr)


# ---- resume, divergence, dtypes ----------------------------------------------------------

@pytest.mark.parametrize("experiment,extra", [
    ("block", dict(d=2, batch=16)),                      # minibatches: the shuffle RNG matters
    ("augmented", dict(d=2, layers=2, batch=16, steps=5)),  # list-of-dict parameters
    ("pe-only", dict(target_loss=0.0)),                  # plain GD
])
def test_resume_equals_uninterrupted(tmp_path, monkeypatch, experiment, extra):
    kw = dict(TINY, **extra)
    full = train.run(experiment, runs_dir=str(tmp_path), name="full", quiet=True, **kw)

    owner, name = (train, "gd_update") if full["config"]["optimizer"] == "gd" else (train.FlatAdam, "step")
    update, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # after the checkpoint at step 2, before step 4
            raise KeyboardInterrupt
        return update(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.run(experiment, runs_dir=str(tmp_path), name="cut", quiet=True, **kw)
    monkeypatch.setattr(owner, name, update)
    assert not os.path.exists(tmp_path / "cut" / "params.npz")
    resumed = train.run(experiment, runs_dir=str(tmp_path), name="cut", resume=True, quiet=True,
                        **kw)
    a, b = flat(full["params"]), flat(resumed["params"])
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    for k in ("train_loss", "test_loss", "test_step"):
        assert np.array_equal(full["metrics"][k], resumed["metrics"][k]), k
    loaded = runs.load_run(resumed["dir"])
    assert all(np.array_equal(a[k], v) for k, v in flat(loaded["params"]).items())
    assert loaded["config"]["seed"] == 0 and "numpy" in loaded["config"]["versions"]
    assert np.array_equal(loaded["metrics"]["test_loss_position"],
                             resumed["metrics"]["test_loss_position"])


# ---- stacks of seeds ---------------------------------------------------------------------

STACKED = {  # every experiment figures.py trains, at a tiny size; M4 in minibatches (the stacked path)
    "augmented": dict(d=2, layers=2, batch=16),
    "nonaug": dict(d=2, layers=2, heads=2, batch=16),
    "block": dict(d=2, batch=16),
    "diagonal": dict(d=2),
    "pe-only": dict(target_loss=0.0),
    "population": dict(d=2, heads=2, T=4, steps=5),
}


def _same_run(a, b, exact):
    """Parameters and metrics of two runs equal (bit for bit where exact, else to rounding)."""
    for x, y in ((flat(a["params"]), flat(b["params"])), (a["metrics"], b["metrics"])):
        assert x.keys() == y.keys()
        for k in x:
            if exact:
                assert np.array_equal(x[k], y[k], equal_nan=True), k
            else:
                np.testing.assert_allclose(x[k], y[k], rtol=1e-9, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("experiment", sorted(STACKED))
def test_each_stack_member_equals_the_lone_run_with_its_seed(tmp_path, experiment):
    kw = dict(TINY, **STACKED[experiment]) if experiment != "population" else STACKED[experiment]
    stack = train.run_seeds(experiment, "1-3", runs_dir=str(tmp_path), name="s", quiet=True, **kw)
    assert [os.path.basename(r["dir"]) for r in stack] == ["s-seed1", "s-seed2", "s-seed3"]
    m4 = experiment in ("augmented", "nonaug")  # one computation: equal to rounding, else bit for bit
    for seed, member in zip((1, 2, 3), stack):
        lone = train.run(experiment, runs_dir=str(tmp_path), name=f"lone{seed}", quiet=True, seed=seed, **kw)
        assert member["config"] == dict(lone["config"])
        _same_run(member, lone, exact=not m4)
    # members differ: each has its own data, initialisation and minibatch order
    assert not np.array_equal(flat(stack[0]["params"])[next(iter(flat(stack[0]["params"])))],
                              flat(stack[1]["params"])[next(iter(flat(stack[1]["params"])))])
    again = train.run(experiment, runs_dir=str(tmp_path), name="s-seed2", quiet=True, seed=2, resume=False, **kw)
    _same_run(again, stack[1], exact=not m4)  # a member's folder is a lone run's folder


@pytest.mark.parametrize("experiment", ["nonaug", "block"])
def test_a_resumed_stack_equals_an_uninterrupted_one(tmp_path, monkeypatch, experiment):
    kw = dict(TINY, **STACKED[experiment])
    full = train.run_seeds(experiment, [0, 1], runs_dir=str(tmp_path), name="full", quiet=True, **kw)
    update, calls = train.FlatAdam.step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # after the checkpoint at step 2, before step 4
            raise KeyboardInterrupt
        return update(*args, **kwargs)

    monkeypatch.setattr(train.FlatAdam, "step", interrupted)
    with pytest.raises(KeyboardInterrupt, match="hold their runs' last checkpoints"):
        train.run_seeds(experiment, [0, 1], runs_dir=str(tmp_path), name="cut", quiet=True, **kw)
    monkeypatch.setattr(train.FlatAdam, "step", update)
    assert not os.path.exists(tmp_path / "cut-seed0" / "params.npz")
    # one member resumed alone first: the stack then continues from two different steps
    train.run(experiment, runs_dir=str(tmp_path), name="cut-seed1", quiet=True, seed=1, resume=True, **kw)
    resumed = train.run_seeds(experiment, [0, 1], runs_dir=str(tmp_path), name="cut", quiet=True, resume=True, **kw)
    for a, b in zip(full, resumed):
        _same_run(a, b, exact=True)


def test_seeds_on_the_command_line(tmp_path, capsys):
    argv = ["block", "--runs_dir", str(tmp_path), "--quiet", "--d", "2", *argv_of(TINY)]
    assert train.main([*argv, "--seeds", "0-1,4"]) == 0
    out = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["block-seed0", "block-seed1", "block-seed4"]
    assert out.count("saved in") == 3
    for bad, why in (("3-1", "ranges from low to high"), ("a", "integers >= 0"), ("0-5000", "at most 1024"),
                     ("\u00b2", "--seeds must be seeds like"), ("0-\u00b2", "--seeds must be seeds like")):
        assert train.main([*argv, "--seeds", bad]) == 2
        assert why in capsys.readouterr().err
    assert train.main([*argv, "--seeds", "0-1", "--seed", "2"]) == 2
    assert capsys.readouterr().err.strip() == "train.py: give either --seed (one run) or --seeds (a stack), not both"
    assert sorted(os.listdir(tmp_path)) == ["block-seed0", "block-seed1", "block-seed4"]


def test_a_diverged_member_stops_alone(tmp_path, monkeypatch):
    """A member whose loss becomes NaN is reported (exit status 1 on the command line) and
    keeps its last checkpoint; the others finish and are saved."""
    datasets = train.datasets

    def poisoned(cfg):  # a sequence of seed 0's second minibatch is NaN: it diverges at step 1
        s_train, s_test, W = datasets(cfg)
        if cfg["seed"] == 0:
            s_train = s_train.copy()
            s_train[train._generators(0)[3].permutation(cfg["n_train"])[20]] = np.nan
        return s_train, s_test, W

    monkeypatch.setattr(train, "datasets", poisoned)
    with pytest.raises(icar.Diverged, match=r"^seed 0: training loss is nan at step 1: .* \(step 0\) is kept in "):
        train.run_seeds("block", [0, 1], runs_dir=str(tmp_path), name="d", quiet=True, **dict(TINY, d=2, batch=16))
    assert sorted(os.listdir(tmp_path / "d-seed0")) == [".lock", "checkpoint.npz", "config.json"]
    monkeypatch.setattr(train, "datasets", datasets)
    lone = train.run("block", runs_dir=str(tmp_path), name="lone", quiet=True, seed=1, **dict(TINY, d=2, batch=16))
    _same_run(runs.load_run(str(tmp_path / "d-seed1")), lone, exact=True)


def test_a_start_that_fails_before_any_file_leaves_no_folder(tmp_path, monkeypatch):
    """Out of memory while sampling the data: no run folder left behind; a folder that was
    there before is kept."""
    def no_memory(cfg):
        raise MemoryError
    monkeypatch.setattr(train, "datasets", no_memory)
    with pytest.raises(MemoryError):
        train.run("block", runs_dir=str(tmp_path), name="a", quiet=True, **TINY)
    with pytest.raises(MemoryError):
        train.run_seeds("block", [0, 1], runs_dir=str(tmp_path), name="s", quiet=True, **TINY)
    assert os.listdir(tmp_path) == []
    (tmp_path / "b").mkdir()
    with pytest.raises(MemoryError):
        train.run("block", runs_dir=str(tmp_path), name="b", quiet=True, **TINY)
    assert os.listdir(tmp_path) == ["b"]


def test_changed_settings_sees_a_setting_on_either_side_alone():
    """A result setting that only the saved run has (or only the wanted one) is a change; the
    settings that may change on --resume and the versions are not."""
    want = train.config("block", **TINY)                                      # no mu: not family angle
    assert "mu" not in want and train.changed_settings(want, dict(want)) == []
    assert train.changed_settings(dict(want, mu=50.0), want) == ["mu"]          # saved only
    assert train.changed_settings(want, dict(want, mu=50.0)) == ["mu"]          # wanted only
    assert train.changed_settings(dict(want, lr=1.0, extra=1), want) == ["extra", "lr"]
    saved = dict(want, versions={"code": "x"}, checkpoint_every=7)
    del saved["log_every"]
    assert train.changed_settings(saved, want) == []


def test_resume_refuses_changed_settings(tmp_path):
    train.run("block", runs_dir=str(tmp_path), quiet=True, **dict(TINY, n_probe=0))
    with pytest.raises(ValueError, match=r"\['lr'\]"):
        train.run("block", runs_dir=str(tmp_path), resume=True, quiet=True, lr=0.5, **dict(TINY, n_probe=0))


@pytest.mark.parametrize("damage, code, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), 1, r"checkpoint.npz: cannot be read as a checkpoint"),
    (lambda p: p.write_bytes(b""), 1, r"checkpoint.npz: cannot be read as a checkpoint"),
    (lambda p: p.write_bytes(bytes(range(256)) * 8), 1, r"checkpoint.npz: cannot be read as a checkpoint"),
    (lambda p: np.savez(open(p, "wb"), step=np.asarray(1)), 1, r"checkpoint.npz: an incomplete checkpoint"),
    (lambda p: (p.parent / "config.json").unlink(), 1, r"config.json: no such file"),
    (lambda p: (p.parent / "config.json").write_text("{bad json"), 1, r"config.json: not valid JSON"),
    (lambda p: runs.save_npz(str(p), dict(np.load(p), step=np.asarray(99))), 1,
     r"checkpoint.npz: an incomplete checkpoint.*history holds 5 training losses at step 99"),
    (lambda p: runs.save_npz(str(p), dict(np.load(p), step=np.asarray(99),
                                          **{"history/train_loss": np.zeros(99)})), 2,
     r"does not belong to this run: its step 99 is past steps=5"),
    (lambda p: runs.save_npz(str(p), {k: (np.zeros((3, 3)) if k.endswith("/A") else v)
                                      for k, v in np.load(p).items()}), 2,
     r"does not belong to this run: its parameters"),
    (lambda p: runs.save_npz(str(p), {k: (np.zeros((3, 3)) if k == "params/A" else v)
                                      for k, v in np.load(p).items()}), 2,
     r"does not belong to this run: its parameters"),
])
def test_resume_refuses_damaged_or_foreign_checkpoints(tmp_path, capsys, damage, code, message):
    argv = ["block", "--steps", "5", "--n_train", "16", "--n_test", "8", "--n_probe", "4",
            "--runs_dir", str(tmp_path), "--quiet"]
    assert train.main(argv) == 0
    capsys.readouterr()
    damage(tmp_path / "block" / "checkpoint.npz")
    before = folder_bytes(tmp_path)
    assert train.main(argv + ["--resume"]) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert folder_bytes(tmp_path) == before


def test_divergence_stops_and_keeps_last_finite_checkpoint(tmp_path, capsys):
    kw = dict(TINY, optimizer="gd", lr=1e6, steps=100, checkpoint_every=1, n_probe=0)
    with pytest.raises(icar.Diverged, match=r"at step \d+.*learning rate 1000000.0 is likely too large") as e:
        train.run("block", runs_dir=str(tmp_path), quiet=True, **kw)
    step = int(str(e.value).split("at step ")[1].split(":")[0])
    z = runs.load_npz(str(tmp_path / "block" / "checkpoint.npz"))
    assert int(z["step"]) == step - 1
    assert all(np.all(np.isfinite(v)) for k, v in z.items() if k.startswith("params/"))
    # the command line: one line on stderr, non-zero status
    argv = ["block", "--runs_dir", str(tmp_path), "--quiet"] + [
        a for k, v in kw.items() for a in (f"--{k}", str(v))]
    assert train.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "learning rate" in err[0] and f"step {step}" in err[0]


def test_divergence_at_the_first_step_and_on_the_population_loss(tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match=r"non-finite loss \(nan\).*init_scale 1e\+200 is too large"):
        train.run("block", runs_dir=str(tmp_path), quiet=True, **dict(TINY, init_scale=1e200))
    assert not (tmp_path / "block").exists()  # found before any file was written
    # a loss finite on check_run's 2 sequences but not on the training data: Diverged at step 0
    monkeypatch.setattr(train, "check_run", lambda experiment, cfg: None)
    with pytest.raises(icar.Diverged, match=r"at step 0, before any update.*nothing was saved"):
        train.run("block", runs_dir=str(tmp_path), quiet=True, **dict(TINY, init_scale=1e200))
    assert not (tmp_path / "block").exists()  # nothing of the run, not even its folder
    assert train.main(["population", "--lr", "1e9", "--runs_dir", str(tmp_path), "--quiet"]) == 1
    assert "population loss became" in capsys.readouterr().err


def test_pe_only_in_float32_trains_in_float32(tmp_path):
    result = train.run("pe-only", runs_dir=str(tmp_path), quiet=True, **dict(TINY, dtype="float32"))
    assert result["params"]["P"].dtype == np.float32


# ---- what one training step and the metrics read -------------------------------------------

def _plain_loss(experiment, cfg, params, s):
    """icar's own model of `experiment` (not the fused one that training runs) at params on
    s [n, T+1, d], over the positions of the training loss."""
    x = s[:, :-1]
    f = {"block": lambda: icar.augmented_linear(params, icar.augment(x)),
         "diagonal": lambda: icar.diagonal_heads(params, x), "pe-only": lambda: icar.pe_only(params, x),
         "augmented": lambda: icar.transformer(params, icar.augment(x), train.model_config(cfg, experiment)),
         "nonaug": lambda: icar.transformer(params, x, train.model_config(cfg, experiment))}[experiment]()
    at = slice(-1, None) if cfg["loss"] == "last" else slice(1 if experiment in ("diagonal", "pe-only") else 0, None)
    return float(icar.mse(f[:, at], s[:, 1:][:, at]))


@pytest.mark.parametrize("experiment, extra", [
    ("diagonal", dict(d=2, heads=2)), ("pe-only", dict(family="unitary", d=2)), ("pe-only", dict(mu=5.0)),
    ("block", dict(d=2, loss="last")), ("block", dict(d=2, family="unitary")),
    ("augmented", dict(d=2, family="unitary")), ("nonaug", dict(d=2, heads=2, family="unitary")),
    ("nonaug", dict(d=2, heads=2, family="haar")), ("nonaug", dict(d=2, heads=2, loss="last"))])
def test_the_first_training_loss_is_the_models_loss_at_its_initial_parameters(tmp_path, experiment, extra):
    """train_loss[0] (full batch) equals icar's model at the initial parameters on the training
    data, over the loss's positions: r >= 1 for M2 and M3 (position 0 has no query), only the
    last with loss="last"; complex data (unitary) and the M4 stack path included."""
    settings = dict(TINY, batch=0, steps=1, **extra)
    cfg = train.config(experiment, **settings)
    res = train.run(experiment, runs_dir=str(tmp_path), quiet=True, **settings)
    params = train.init_model(experiment, cfg, train._generators(cfg["seed"])[2])
    s = train.datasets(cfg)[0]
    assert res["metrics"]["train_loss"][0] == pytest.approx(_plain_loss(experiment, cfg, params, s), rel=1e-10)


def test_the_last_step_is_logged_with_the_test_loss_of_the_saved_parameters(tmp_path):
    """steps = 5 with log_every = 2: test losses at steps 0, 2, 4 and at the last step 5, whose
    value is the saved model's loss on the test set (positions of the training loss)."""
    settings = dict(TINY, d=2, steps=5, log_every=2)
    res = train.run("diagonal", runs_dir=str(tmp_path), quiet=True, **settings)
    m = res["metrics"]
    assert list(m["test_step"]) == [0, 2, 4, 5] and len(m["test_loss"]) == 4
    cfg = train.config("diagonal", **settings)
    s_test = train.datasets(cfg)[1]
    assert m["test_loss"][-1] == pytest.approx(_plain_loss("diagonal", cfg, res["params"], s_test), rel=1e-10)


def test_each_epoch_visits_every_training_sequence_once(tmp_path, monkeypatch):
    """Minibatches of one epoch are a partition of the training set (a permutation cut into
    n_train / batch pieces), and the next epoch starts a new permutation."""
    seen = []
    ex = train.EXPERIMENTS["block"]

    def recording(cfg):
        predict = ex.predictor(cfg)
        return lambda params, x: (seen.append(np.array(x)), predict(params, x))[1]
    monkeypatch.setitem(train.EXPERIMENTS, "block", ex._replace(predictor=recording))
    settings = dict(TINY, n_train=64, batch=16, steps=11)
    train.run("block", runs_dir=str(tmp_path), quiet=True, **settings)
    s = train.datasets(train.config("block", **settings))[0][:, :-1]
    index = {x.tobytes(): i for i, x in enumerate(s)}
    batches = [[index[x.tobytes()] for x in b] for b in seen if len(b) == 16]  # not the 2 of check_run nor the test set
    assert len(batches) == 12
    for epoch in range(3):
        rows = [i for b in batches[4 * epoch:4 * epoch + 4] for i in b]
        assert sorted(rows) == list(range(64)), epoch
    assert batches[0] != batches[4]


def test_the_probe_compares_with_the_one_step_gd_of_the_baselines(tmp_path):
    """The probe's gd1 reference takes baseline_gd1's step (the optimal step on the whole test
    set), not one refitted on the n_probe sequences it probes."""
    settings = dict(TINY, d=2, n_test=32, n_probe=4)
    res = train.run("block", runs_dir=str(tmp_path), quiet=True, **settings)
    cfg = train.config("block", **settings)
    _, s_test, W_test = train.datasets(cfg)
    s = s_test[:4]
    want = evaluate.probe(evaluate.query_predictor(res["params"], s[:, :-1]), s, W_test[:4],
                          eta=evaluate.optimal_gd_step(s_test, 1))
    for k in ("err_W", "cos_W", "err_ls", "err_gd1", "cos_gd1"):
        np.testing.assert_allclose(res["metrics"]["probe_" + k], want[k], rtol=1e-10, err_msg=k)
    refitted = evaluate.probe(evaluate.query_predictor(res["params"], s[:, :-1]), s, W_test[:4])
    assert np.nanmax(np.abs(refitted["err_gd1"] - want["err_gd1"])) > 1e-5  # the test can tell


# ---- the command line --------------------------------------------------------------------

def test_every_experiment_runs_end_to_end(tmp_path, capsys):
    tiny = ["--T", "5", "--n_train", "32", "--n_test", "16", "--n_probe", "2", "--steps", "3",
            "--quiet", "--runs_dir", str(tmp_path)]
    for experiment in ("augmented", "nonaug", "block", "diagonal", "pe-only"):
        extra = ["--batch", "16"] if experiment in ("augmented", "nonaug") else []
        extra += ["--heads", "2"] if experiment == "nonaug" else []
        assert train.main([experiment] + tiny + extra) == 0, experiment
        result = runs.load_run(str(tmp_path / experiment))
        m = result["metrics"]
        assert len(m["train_loss"]) == 4 and m["test_loss_position"].shape == (5,)
        assert np.isfinite(m["test_loss"]).all()
    assert train.main(["population", "--steps", "3", "--d", "4", "--heads", "2", "--T", "5",
                       "--runs_dir", str(tmp_path)]) == 0
    assert len(runs.load_run(str(tmp_path / "population"))["metrics"]["train_loss"]) == 4
    assert "model" in capsys.readouterr().out
    assert train.main(["augmented", "--help"]) == 0
    assert "--layers" in capsys.readouterr().out


def test_ignored_settings_are_not_stored_and_help_lists_only_allowed_families(tmp_path, capsys):
    result = train.run("pe-only", runs_dir=str(tmp_path), quiet=True, **dict(TINY, family="unitary"))
    assert "mu" not in result["config"] and result["config"]["family"] == "unitary"
    assert train.main(["population", "--help"]) == 0
    family = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--family")]
    assert family and "(unitary, orthogonal);" in family[0]


# ---- bad command lines: one line on stderr, no file touched ------------------------------

@pytest.mark.parametrize("argv", [
    ["augmented", "--lr", "abc"], ["nosuch"], ["block", "--steps", "-1"],
    ["block", "--heads", "2"], ["pe-only", "--dtype", "float16"], ["augmented", "--backend", "cupy"],
    ["bench", "--bogus"], ["bench", "--json", "/nonexistent/bench.json"], ["block", "--n_probe", "600"],
    ["diagonal", "--family", "angle"],
])
def test_bad_arguments_exit_2_with_one_line(argv):
    out = subprocess.run([sys.executable, "train.py", *argv], cwd=HERE, capture_output=True, text=True)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("train.py: ")


def _bad_commands(runs, a_file):
    """(argv, exit status) of command lines that must fail with one line and touch no file."""
    r = ["--runs_dir", str(runs), "--quiet"]
    two = [
        (["block", "--T", "1"], 2), (["diagonal", "--family", "orthogonal", "--d", "3"], 2),
        (["pe-only", "--d", "2"], 2), (["pe-only", "--family", "orthogonal"], 2),
        (["block", "--init_scale", "1e200"], 2), (["block", "--name", "../x"], 2),
        (["block", "--name", "/tmp/icar-abs"], 2), (["block", "--name", ".."], 2),
        (["block", "--name", "."], 2), (["block", "--name", ""], 2), (["block", "--name", "a/b"], 2),
        (["block", "--name", ".hidden"], 2), (["block", "--name", "-x"], 2),
        (["block", "--steps", "5", "--steps", "7"], 2),
        (["block", "--sweep", "lr=0.1", "--sweep", "lr=0.2"], 2),
        (["block", "--sweep", "lr=0.1,1e-1"], 2), (["block", "--steps", "1e30"], 2),
        (["block", "--steps", "10000000000000"], 2), (["pe-only", "--family", "unitary", "--mu", "7"], 2),
        (["block", "--runs_dir", "/dev/null"], 2), (["block", "--runs_dir", "/proc/icar-runs"], 2),
        (["block", "--runs_dir", a_file], 2), (["block", "--sweep", "T=5,1"], 2),
        (["block", "--bogus", "1"], 2), (["block", "--steps"], 2), (["block", "steps"], 2),
        (["nope"], 2), ([], 2), (["block", "--preset", "huge"], 2), (["block", "--family", "angle"], 2),
        (["population", "--family", "haar"], 2), (["population", "--family", "orthogonal", "--d", "5"], 2),
        (["block", "--batch", "100000"], 2), (["block", "--n_probe", "100000"], 2),
        (["block", "--lr", "nan"], 2), (["block", "--lr", "-1"], 2), (["block", "--sigma", "inf"], 2),
        (["block", "--dtype", "float16"], 2), (["block", "--backend", "cupy"], 2),
        (["block", "--name", "other", "--resume"], 2), (["block", "--sweep", "lr"], 2),
        (["block", "--sweep", "bogus=1,2"], 2), (["block", "--sweep", "steps=5", "--steps", "5"], 2),
        (["block", "--name", "x", "--name", "y"], 2), (["block", "--resume", "--resume"], 2),
        (["diagonal", "--heads", "0"], 2), (["block", "--form", "diag"], 2), (["block", "--seed", "-1"], 2),
        (["block", "--resume", "--steps", "9"], 2), (["block", "--sweep", "form=block,full,diag"], 2),
        (["block", "--jobs", "2"], 2), (["block", "--runs_dir", ""], 2), (["block", "--preset", ""], 2),
        (["block", "--sigma", "1e200"], 2),
    ]
    return [(argv if not argv or argv[0] == "nope" else
             argv[:1] + (r[2:] if "--runs_dir" in argv else r) + argv[1:], code) for argv, code in two]


def test_bad_command_lines_give_one_line_and_touch_no_file(tmp_path, capsys):
    """More than 40 bad command lines after a finished run: each prints one line on stderr,
    exits 2, and leaves every file under the runs folder byte-identical (and writes nothing)."""
    runs, a_file = tmp_path / "runs", tmp_path / "a_file"
    a_file.write_text("not a folder")
    before = finished_run(runs)
    table = _bad_commands(runs, str(a_file))
    assert len(table) >= 40
    for argv, code in table:
        main, prefix = (sweep.main, "sweep.py: ") if "--sweep" in argv else (train.main, "train.py: ")
        assert main(argv) == code, argv
        out = capsys.readouterr()
        assert len(out.err.strip().splitlines()) == 1 and out.err.startswith(prefix), (argv, out.err)
        assert out.out == "", argv
        assert folder_bytes(runs) == before, argv
    assert sorted(os.listdir(runs)) == ["block"] and not os.path.exists("/tmp/icar-abs")


@pytest.mark.parametrize("key, ok, bad", [
    ("steps", [1, train.MAX_INT], [0, train.MAX_INT + 1]), ("T", [2], [1]), ("d", [1], [0]),
    ("n_train", [1], [0]), ("gd_steps", [1, train.MAX_GD_STEPS], [0, train.MAX_GD_STEPS + 1]),
    ("seed", [0, train.MAX_INT], [-1, train.MAX_INT + 1]), ("sigma", [0.0], [-1e-9, float("inf")]),
    ("lr", [1e-300], [0.0, float("nan"), float("inf")]), ("batch", [0, 4096], [-1, 4097]), ("n_probe", [0, 512], [-1, 513]),
    ("checkpoint_every", [1], [0]), ("log_every", [1], [0]), ("init_scale", [1e-300], [0.0]),
    ("target_loss", [0.0], [-1.0]),
])
def test_every_option_at_its_boundaries(key, ok, bad):
    """Each numeric option of block at the edge of what is allowed, and one past it: refused by
    config or by check_run (which builds the run on two sequences), before any file."""
    for value in ok:
        cfg = train.config("block", **{key: value})
        train.check_run("block", cfg)
        assert cfg[key] == value
    for value in bad:
        with pytest.raises(ValueError, match=key):
            train.check_run("block", train.config("block", **{key: value}))


def test_too_large_a_noise_is_blamed_on_sigma_and_too_large_an_init_on_init_scale():
    with pytest.raises(ValueError, match=r"the sampled data overflow in float64: sigma 1e\+200 is too large"):
        train.check_run("block", train.config("block", sigma=1e200))
    with pytest.raises(ValueError, match=r"init_scale 1e\+200 is too large"):
        train.check_run("block", train.config("block", init_scale=1e200))
