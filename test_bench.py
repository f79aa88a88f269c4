"""Tests of bench.py: the FLOP counts by hand, the JSON it writes, its bad command lines, and
the GPU check on the strict stand-in (`python bench.py --device cupy --dry`). Which test
proves which claim: docs/claims.md."""


import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import bench
import icar
from conftest import HERE


# ---- the benchmark -----------------------------------------------------------------------

def test_flop_counts_by_hand():
    # one layer, n = 2, T = 3, d_in = 1, repeat = 2 (E = 2), H = 1, d_out = 1, positional
    cfg = icar.transformer_config(d_in=1, d_out=1, T=3, heads=1, repeat=2, positional=True)
    qkv, scores_av, mask_pos = 3 * 2 * 2 * 3 * 2 * 2, 2 * 2 * 2 * 9 * 2, 2 * 2 * 9
    w_o, heads_sum = 2 * 2 * 3 * 4, 2 * 3 * 2
    positional, readout = 2 * 2 * 3 * 2 * 2 + 2 * 9 * 2, 2 * 2 * 3 * 2
    assert bench.transformer_flops(cfg, 2, 3) == 3 * (qkv + scores_av + mask_pos + w_o + heads_sum
                                                           + positional + readout)
    assert bench.pe_only_flops(2, 3, 1, complex_data=False) == 3 * (2 * 9 * 2 + 2 * 3 + 3 * 2 * 3)


def test_bench_writes_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "matmul_rate", lambda dtype: 100.0)  # no 1024^3 products here
    out = tmp_path / "bench.json"
    assert bench.main(["--workloads", "pe-only", "--repeats", "2", "--no-tune-allocator",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["workloads"]["pe-only"]
    assert row["ms_per_step"] > 0 and row["peak_MB"] > 0
    assert row["gflop_per_step"] == pytest.approx(bench.pe_only_flops(1000, 30, 1) / 1e9, rel=1e-12)
    assert row["gflops"] == pytest.approx(row["gflop_per_step"] / row["ms_per_step"] * 1e3)
    assert row["fraction_of_matmul"] == pytest.approx(row["gflops"] / 100.0)
    assert row["meets_target"] == (row["ms_per_step"] <= 0.5)
    assert set(result["matmul_gflops"]) == {"float32", "float64"}
    assert "pe-only" in capsys.readouterr().out


def test_bench_rejects_unknown_workload(capsys):
    assert bench.main(["--workloads", "nonaug,fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fast" in err[0] and "nonaug" in err[0]


def test_bench_reports_bad_arguments_in_one_line():
    for argv in (["--repeats", "x"], ["--repeats", "0"], ["--repeats", "1e20"], ["--workloads", ""],
                 ["--workloads", "nonaug,nonaug"], ["--json", "a", "--json", "b"], ["--device", "tpu"],
                 ["--dry", "--repeats", "3"], ["--out", "."], ["--dry", "--device", "numpy"], ["--json", ""],
                 ["--workloads", "quick-nonag"]):
        out = subprocess.run([sys.executable, "bench.py", *argv], cwd=HERE, capture_output=True, text=True)
        assert out.returncode == 2 and out.stderr.startswith("bench.py: "), (argv, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and argv[0] in out.stderr, (argv, out.stderr)


# ---- the GPU check, dry, on the stand-in -------------------------------------------------

def test_gpu_check_dry_run_on_the_stand_in(tmp_path):
    out = subprocess.run([sys.executable, "bench.py", "--device", "cupy", "--dry"], cwd=HERE,
                         capture_output=True, text=True, env=dict(os.environ, OUT=str(tmp_path)))
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    models = [c["model"] for c in report["comparisons"]]
    assert report["all_ok"] and report["dry"] and len(models) == 18
    assert sum(m.startswith("M4 plain") for m in models) == 4  # icar.transformer beside fused


def test_flop_counts_of_the_other_branches_by_hand():
    """Without positions (the mask once, no positional scores), fused's executed products
    (z = (x, 1) of size D = d_in + 1 in the first layer, E + 1 after; linear attention over
    causal_blocks(3) = (0, 2), (2, 3): 2 * 2 + 1 * 3 = 7 pairs), and complex M3 data."""
    plain = icar.transformer_config(d_in=1, d_out=1, T=3, heads=1, repeat=2, positional=False)
    qkv, scores_av, mask, w_o, heads_sum, readout = 3 * 2 * 2 * 3 * 2 * 2, 2 * 2 * 2 * 9 * 2, 2 * 9, 2 * 2 * 3 * 4, 2 * 3 * 2, 2 * 2 * 3 * 2
    assert bench.transformer_flops(plain, 2, 3) == 3 * (qkv + scores_av + mask + w_o + heads_sum + readout)
    cfg = icar.transformer_config(d_in=1, d_out=1, T=3, heads=1, repeat=2, positional=True, layers=2)
    n, T, E, H, pairs = 2, 3, 2, 1, 7
    positional = 4 * T * E * H * E + 2 * H * T * T * E + 2 * n * H * pairs  # embeddings; weights times scores
    layers = [2 * n * T * D * H * D + 4 * n * H * pairs * D + 2 * n * T * H * D * E + positional for D in (2, 3)]
    assert bench.transformer_flops(cfg, n, T, executed=True) == 3 * (sum(layers) + 2 * n * T * E * 1)
    assert bench.pe_only_flops(2, 3, 1) == 3 * (2 * 2 * 9 * 2 + (6 + 8) * 2 * 3)


def test_the_gpu_check_fails_a_device_whose_numbers_differ(monkeypatch):
    """compare() flags every model whose loss or gradients on the device are off by more than
    TOL (here a device that scales its inputs by 1 + 1e-6), and says the check failed."""
    real = bench.cases
    monkeypatch.setattr(bench, "cases", lambda rng: {k: v for k, v in real(rng).items() if k.startswith(("M1", "M3"))})
    rows, ok = bench.compare(np, np.asarray)
    assert ok and len(rows) == 6 and all(r["ok"] for r in rows)
    off = types.SimpleNamespace(asarray=lambda a: np.asarray(a) * (1 + 1e-6))
    rows, ok = bench.compare(off, np.asarray)
    assert not ok and len(rows) == 6 and not any(r["ok"] for r in rows)
