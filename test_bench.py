"""Tests of bench.py: the FLOP counts by hand, the JSON it writes, its bad command lines, and
the GPU check on the strict stand-in (`python bench.py --device cupy --dry`). Which test
proves which claim: docs/claims.md."""


import json
import os
import subprocess
import sys

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
