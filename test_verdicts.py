"""Tests of verdicts.py: the verdict rule on models whose answer is known (one GD step, the
raw-token construction, least squares on the first k transitions, the same assuming the
fixed start), each verdict shown to fail when one of its conditions fails, the aggregation
over seeds, and the command line on finished runs (one line and exit 2 for anything else).
Sizes: the quick M4 law (d = 5, T = 20, Haar W) on 128 sequences."""
import json
import os
import shutil

import numpy as np
import pytest

import evaluate
import icar
import runs
import theory
import train
import verdicts
from conftest import TINY


@pytest.fixture(autouse=True)
def small(monkeypatch):
    monkeypatch.setitem(verdicts.CAUSAL, "n", 128)
    monkeypatch.setitem(verdicts.CAUSAL, "n_map", 16)


def law(start):
    return train.config("nonaug", "quick", s1=start)


def known(start):
    """{name: (predict, expected verdict)} on the quick M4 law from `start`."""
    cfg = law(start)
    d, T = cfg["d"], cfg["T"]
    s, _ = train.sample(cfg, np.random.default_rng(5), 256)
    eta = float(np.mean(evaluate.optimal_gd_step(s, 1)[T // 2:]))           # one GD step's size late
    params, mcfg = theory.raw_token_gd_construction(d, T, eta * 0.75 * T, 30.0)
    fixed = np.ones(d) / np.sqrt(d)                                        # the fixed start of "haar"
    return {"M1, one GD step": (verdicts.gd_step_model(eta), "whole-context learner"),
            "raw-token construction": (lambda x: icar.transformer(params, x, mcfg), "whole-context learner"),
            "least squares, first 5 transitions": (verdicts.early_least_squares(5), "early-context estimator"),
            "least squares, first 6 transitions": (verdicts.early_least_squares(6), "early-context estimator"),
            "least squares from the assumed fixed start": (verdicts.start_lookup(5, fixed),
                                                           "start lookup" if start == "fixed" else "none")}


@pytest.mark.parametrize("start", ["fixed", "random"])
def test_models_of_known_answer_get_their_verdict(start):
    for name, (predict, want) in known(start).items():
        m = verdicts.measures(verdicts.battery(predict, law(start), 0)[0])
        assert verdicts.verdict(m) == want, (name, m)


def test_the_fixed_start_lookup_is_exact_on_its_own_data_only():
    predict = verdicts.start_lookup(5, np.ones(5) / np.sqrt(5))
    m = verdicts.measures(verdicts.battery(predict, law("fixed"), 1)[0])
    assert m["own_model"] < 1e-12 and m["other"] > 10


# a measures dict of each verdict, and every way one of its conditions can fail
BASE = {"whole-context learner": dict(own=1.1, other=1.1, switch=1.0, replaced=1.05, first=0.24),
        "early-context estimator": dict(own=0.0, other=0.0, switch=3.8, replaced=14.0, first=0.64),
        "start lookup": dict(own=0.0, other=980.0, switch=3.8, replaced=900.0, first=0.74)}
BREAKS = {"whole-context learner": [("own", 1.6), ("other", 1.6), ("switch", 1.6), ("replaced", 1.6),
                                    ("first", 0.5)],
          "early-context estimator": [("own", 1.6), ("other", 1.6), ("switch", 1.9), ("replaced", 1.9),
                                      ("first", 0.49)],
          "start lookup": [("own", 1.6), ("other", 1.99)]}


@pytest.mark.parametrize("name", sorted(BASE))
def test_each_verdict_fails_when_one_of_its_conditions_fails(name):
    assert verdicts.verdict(BASE[name]) == name
    for key, value in BREAKS[name]:
        assert verdicts.verdict(dict(BASE[name], **{key: value})) != name, (name, key, value)


def test_measures_read_late_positions_and_the_first_five_tokens():
    T = 8
    tests = {f"{d}_{k}": np.r_[np.full(T // 2, 100.0), np.full(T // 2, v)]
             for d in ("clean", "other", "switch", "replaced") for k, v in (("model", 2.0), ("gd1", 4.0))}
    influence = np.zeros((T, T))
    influence[T // 2:, :5] = 3.0
    influence[T // 2:, 5:] = 1.0
    influence[:T // 2] = 50.0                                                 # early outputs: not read
    m = verdicts.measures(dict(tests, influence=influence))
    assert m["own"] == m["other"] == m["switch"] == m["replaced"] == 0.5
    assert m["first"] == pytest.approx(15 / 18)


def test_no_ratio_to_a_one_step_gd_that_fits_exactly_and_the_verdict_is_none():
    """Where one-step GD's loss is rounding (the pe-only law: ~1e-31), model / gd1 would print
    1e29: the ratio is NaN, shown "-" with a line that says why, and the verdict is "none"."""
    T = 8
    tests = {f"{d}_{k}": np.full(T, v) for d in ("clean", "other", "switch", "replaced")
             for k, v in (("model", 0.05), ("gd1", 1e-31))}
    tests["other_gd1"] = np.full(T, 0.05 * 1e-11)                            # above the floor: a ratio
    m = verdicts.measures(dict(tests, influence=np.ones((T, T))))
    assert np.isnan(m["own"]) and np.isnan(m["switch"]) and m["other"] == pytest.approx(1e11)
    assert m["own_gd1"] == 1e-31 and verdicts.verdict(m) == "none"
    lines = verdicts.table([("pe", m, verdicts.verdict(m))]).splitlines()
    assert lines[1].split() == ["pe", "-", "100000000000.000", "-", "-", "0.625", "none"]
    assert lines[2].startswith("-: one-step GD fits that data exactly")
    assert len(verdicts.table([("x", dict(m, own=1.0, other=1.0, switch=1.0, replaced=1.0), "none")]).splitlines()) == 2


def test_aggregate_rows_gives_medians_ranges_and_counts():
    rows = {s: [{"figure": "f", "quantity": "loss", "value": v, "expected": e, "source": "x"},
                {"figure": "f", "quantity": "nearest", "value": w, "expected": None, "source": "x"}]
            for s, v, e, w in ((0, 3.0, 1.0, "gd1"), (1, 1.0, 3.0, "ls"), (2, 1.5, 2.0, "gd1"))}
    loss, nearest = verdicts.aggregate_rows(rows)
    assert loss["value"] == 1.5 and loss["range"] == [1.0, 3.0] and loss["per_seed"] == [3.0, 1.0, 1.5]
    assert loss["expected"] == 2.0 and loss["seeds"] == [0, 1, 2]
    assert nearest["value"] == "gd1: 2 of 3, ls: 1 of 3"
    assert verdicts.median_seed({0: 3.0, 1: 1.0, 2: 2.0}) == 2
    assert verdicts.median_seed({0: 3.0, 1: 1.0, 2: 2.0, 3: 4.0}) == 2


def test_the_command_line_gives_a_verdict_per_run_and_one_line_otherwise(tmp_path, capsys):
    kw = dict(TINY, T=14, d=3, heads=2, layers=2, batch=16, n_test=64)
    train.run("nonaug", runs_dir=str(tmp_path), name="a", quiet=True, **kw)
    train.run("block", runs_dir=str(tmp_path), name="b", quiet=True, **dict(TINY, T=14, d=3))
    assert verdicts.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:7] == ["run", "own", "other", "switch", "replaced", "first", "verdict"]
    assert [line.split()[0] for line in out[1:]] == ["a", "b"]
    assert all(any(line.endswith(v) for v in verdicts.VERDICTS) for line in out[1:])
    train.run("population", runs_dir=str(tmp_path), name="p", quiet=True, d=2, heads=2, T=4, steps=2)
    train.run("nonaug", runs_dir=str(tmp_path), name="short", quiet=True, **dict(kw, T=8))
    (tmp_path / "damaged").mkdir()
    for f in ("config.json", "params.npz", "metrics.npz"):
        (tmp_path / "damaged" / f).write_bytes(b"")
    damaged = []  # a finished run whose files say something else: one line naming the file, exit 1
    for name, change in (("t_text", lambda c, p: c.update(T="14")), ("no_attention", lambda c, p: c.pop("attention")),
                         ("heads", lambda c, p: c.update(heads=4)), ("nan", lambda c, p: p.update({"W_out": p["W_out"] * np.nan})),
                         ("cut", lambda c, p: p.update({"W_out": p["W_out"][:1]}))):
        shutil.copytree(tmp_path / "a", tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        params = dict(np.load(tmp_path / name / "params.npz"))
        change(config, params)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        np.savez(tmp_path / name / "params.npz", **params)
        file = "params.npz" if name in ("nan", "cut", "heads") else "config.json"  # heads: shapes disagree
        damaged.append(([str(tmp_path / name)], 1, f"{name}/{file}: "))
    for argv, code, message in damaged + [([], 2, "name one or more run folders"),
                                ([str(tmp_path / "none")], 2, "is not a finished run"),
                                ([str(tmp_path / "p")], 2, "has no model of sequences to test"),
                                ([str(tmp_path / "short")], 2, "the causal tests need T >= 10"),
                                ([str(tmp_path / "damaged")], 1, "damaged/config.json: not valid JSON")]:
        assert verdicts.main(argv) == code, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("verdicts.py: ") and message in err, err


def test_the_thresholds_are_inclusive():
    """"fits" is at most WORKS times one-step GD and "fails" at least FAILS times it: a ratio
    exactly at a threshold counts (the verdict rule of the module docstring)."""
    works, fails = verdicts.THRESHOLDS["works"], verdicts.THRESHOLDS["fails"]
    assert verdicts.verdict(dict(BASE["start lookup"], own=works, other=fails)) == "start lookup"
    assert verdicts.verdict(dict(BASE["whole-context learner"], own=works, other=works, switch=works,
                                 replaced=works)) == "whole-context learner"
    assert verdicts.verdict(dict(BASE["early-context estimator"], other=works, switch=fails, replaced=fails,
                                 first=verdicts.THRESHOLDS["early"])) == "early-context estimator"


@pytest.mark.parametrize("T", [8, 9])
def test_measures_start_at_position_t_over_2(T):
    """Late positions are r >= T // 2: the first of them counts as much as the others."""
    late = np.arange(T) >= T // 2
    model = np.where(late, np.arange(T) - T // 2 + 1.0, 100.0)             # 1, 2, ... from r = T // 2
    tests = {f"{d}_{k}": v for d in ("clean", "other", "switch", "replaced")
             for k, v in (("model", model), ("gd1", np.where(late, 4.0, 1.0)))}
    influence = np.ones((T, T))
    influence[T // 2, :5] = 10.0                                             # the first late output
    m = verdicts.measures(dict(tests, influence=influence))
    assert m["own"] == pytest.approx(np.mean(model[late]) / 4.0) and m["own_model"] == np.mean(model[late])
    n = T - T // 2
    assert m["first"] == pytest.approx((50 + 5 * (n - 1)) / (50 + 5 * (n - 1) + (T - 5) * n))


def test_the_battery_scores_the_data_it_names():
    """clean: the sequences drawn first from the generator [seed, 16]; replaced: the same with
    tokens 1-4 taken from the previous sequence of the batch (np.roll over sequences)."""
    cfg = law("random")
    predict = verdicts.gd_step_model(0.05)
    out, _, (s, _) = verdicts.battery(predict, cfg, 3)
    drawn, _ = train.sample(cfg, np.random.default_rng([3, 16]), verdicts.CAUSAL["n"])
    np.testing.assert_array_equal(s, drawn)
    for name, data in (("clean", drawn), ("replaced", evaluate.replace_tokens(drawn, np.roll(drawn, 1, axis=0),
                                                                              [1, 2, 3, 4]))):
        want = evaluate.score(predict, data, gd_steps=1)
        for k in ("model", "gd1", "least_squares", "zero"):
            np.testing.assert_allclose(out[f"{name}_{k}"], want[k], rtol=1e-12, err_msg=(name, k))


def test_construction_similarity_on_hand_made_attention():
    """An exact previous-token head and a causal mean in the last layer (weight 1/(r+1) on
    t = 0..r, where the construction puts 1/r on t = 1..r: total variation 1/(r+1)), with
    predictions of one GD step (explained exactly)."""
    T, H = 6, 2
    r = np.arange(1, T)
    prev = np.zeros((T, T))
    prev[r, r - 1] = 1.0
    prev[0, 0] = 1.0
    first = np.stack([np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None], prev])  # head 1: previous token
    last = np.broadcast_to(np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None], (H, T, T))
    s, _ = train.sample(law("random"), np.random.default_rng(4), 64)
    sim = verdicts.construction_similarity(s, verdicts.gd_step_model(0.3), first, last, np.array([0.7, 0.9]))
    assert sim["sim_prev_head"] == 1 and sim["sim_prev_cos"] == pytest.approx(1.0, abs=1e-12)
    assert sim["sim_current"] == pytest.approx(np.mean(1 / np.arange(2, T + 1)), rel=1e-12)  # head 0's t = r
    assert sim["sim_last_tv"] == pytest.approx(np.mean(1 / (r + 1)), rel=1e-12)
    assert sim["sim_gd_explained"] == pytest.approx(1.0, abs=1e-12) and sim["sim_prev_ablated"] == 0.9
