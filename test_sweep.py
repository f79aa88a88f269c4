"""Tests of sweep.py, grids of runs: the summary, every point checked before any trains, the
same files in process, in worker processes (--jobs) and from the listed commands (--list,
then --summary) and as cluster jobs (--cluster local), a failed point, and the bad options of
sweep.py. Which test proves which claim: docs/claims.md."""


import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import runs
import sweep
import train
from conftest import TINY, folder_bytes


# ---- one process -------------------------------------------------------------------------

def test_sweep_over_layers_writes_summary(tmp_path, capsys):
    argv = ["augmented", "--T", "4", "--n_train", "32", "--n_test", "16", "--n_probe", "0",
            "--steps", "2", "--batch", "0", "--quiet", "--runs_dir", str(tmp_path),
            "--sweep", "layers=1,2", "--sweep", "sigma=0,0.1"]
    assert sweep.main(argv) == 0
    with open(tmp_path / "augmented" / "summary.json") as f:
        rows = json.load(f)["rows"]
    assert [(r["layers"], r["sigma"]) for r in rows] == [(1, 0.0), (1, 0.1), (2, 0.0), (2, 0.1)]
    second = runs.load_run(str(tmp_path / "augmented" / "layers=2,sigma=0.1"))
    assert second["config"]["layers"] == 2 and second["config"]["sigma"] == 0.1
    assert rows[3]["gd_k=L"] == pytest.approx(float(np.mean(second["metrics"]["baseline_gd2"])))
    assert "gd_k=L" in capsys.readouterr().out


def test_sweeps_check_every_point_first_and_show_the_swept_key(tmp_path, capsys):
    with pytest.raises(ValueError, match="T must be an integer >= 2"):
        sweep.sweep("block", {"T": [5, 1]}, runs_dir=str(tmp_path), quiet=True,
                    **{k: v for k, v in TINY.items() if k != "T"})
    assert not (tmp_path / "block").exists()  # the good point did not train
    with pytest.raises(ValueError, match="distinct values"):
        sweep.sweep("block", {"lr": [0.1, 1e-1]}, runs_dir=str(tmp_path), quiet=True, **TINY)
    _, table = sweep.sweep("block", {"lr": [0.01, 0.02]}, runs_dir=str(tmp_path), quiet=True, **TINY)
    assert table.split()[0] == "lr" and "0.02" in table


# ---- sweeps beyond one process: --jobs, --list, --summary

SWEEP_ARGV = ["block", "--T", "5", "--n_train", "64", "--n_test", "32", "--n_probe", "0", "--steps", "6",
              "--checkpoint_every", "2", "--log_every", "2", "--sweep", "lr=0.01,0.02,0.05", "--sweep", "seed=3"]


def test_sweep_in_process_in_workers_and_from_listed_commands_writes_identical_files(tmp_path, capsys):
    """The same sweep run in this process, in 2 worker processes, and as the commands of --list
    run one by one in fresh interpreters (then --summary): bit-identical params.npz and
    metrics.npz of every point, and the same summary.json."""
    folders = {way: tmp_path / way for way in ("in_process", "jobs", "listed")}
    assert sweep.main(SWEEP_ARGV + ["--runs_dir", str(folders["in_process"]), "--quiet"]) == 0
    capsys.readouterr()
    assert sweep.main(SWEEP_ARGV + ["--runs_dir", str(folders["jobs"]), "--jobs", "2"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert sum("started" in line for line in err) == 3 and sum("finished" in line for line in err) == 3
    assert sweep.main(SWEEP_ARGV + ["--runs_dir", str(folders["listed"]), "--list", "--quiet"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 3 and not folders["listed"].exists()  # --list writes nothing
    for command in commands:
        out = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    assert sweep.main(SWEEP_ARGV + ["--runs_dir", str(folders["listed"]), "--summary"]) == 0
    assert "0.05" in capsys.readouterr().out
    files = {way: {k: v for k, v in folder_bytes(folder).items()
                   if k.endswith(("params.npz", "metrics.npz", "summary.json"))}
             for way, folder in folders.items()}
    assert len(files["in_process"]) == 3 * 2 + 1
    assert files["in_process"] == files["jobs"] == files["listed"]


def test_a_failed_sweep_point_keeps_the_others_and_exits_1(tmp_path, capsys):
    argv = ["block", "--T", "5", "--n_train", "64", "--n_test", "32", "--n_probe", "0", "--steps", "50",
            "--checkpoint_every", "1", "--optimizer", "gd", "--sweep", "lr=0.01,1e6", "--quiet"]
    for jobs in ("1", "2"):
        folders = tmp_path / jobs
        assert sweep.main(argv + ["--runs_dir", str(folders), "--jobs", jobs]) == 1
        out = capsys.readouterr()
        assert len(out.err.strip().splitlines()) == 1 and "point lr=1000000.0 failed" in out.err
        assert "0.01" in out.out
        with open(folders / "block" / "summary.json") as f:
            assert [row["lr"] for row in json.load(f)["rows"]] == [0.01]
        assert (folders / "block" / "lr=0.01" / "metrics.npz").exists()


def test_bad_sweep_process_options_give_one_line_and_touch_no_file(tmp_path, capsys):
    folders, argv = tmp_path / "folders", SWEEP_ARGV[:-4] + ["--quiet"]
    assert sweep.main(argv + ["--runs_dir", str(folders), "--sweep", "lr=0.01"]) == 0  # one point of two
    before = folder_bytes(folders)
    grid_args = ["--sweep", "lr=0.01,0.02"]
    table = [(["--jobs", "0"] + grid_args, 2), (["--jobs", "x"] + grid_args, 2), (["--jobs", "-1"] + grid_args, 2),
             (["--jobs"] + grid_args, 2), (["--jobs", "2"], 2), (["--list"], 2), (["--summary"], 2),
             (["--list", "--jobs", "2"] + grid_args, 2), (["--list", "--summary"] + grid_args, 2),
             (["--summary", "--jobs", "2"] + grid_args, 2), (["--summary", "--resume"] + grid_args, 2),
             (["--jobs", "2", "--jobs", "2"] + grid_args, 2), (["--list", "--sweep", "T=5,1"], 2),
             (["--summary", "--sweep", "T=5,1"], 2), (["--summary"] + grid_args, 1),
             (["--summary", "--seed", "7", "--sweep", "lr=0.01"], 1)]
    for extra, code in table:
        assert sweep.main(argv + ["--runs_dir", str(folders)] + extra) == code, extra
        out = capsys.readouterr()
        assert len(out.err.strip().splitlines()) == 1 and out.err.startswith("sweep.py: "), extra
        assert folder_bytes(folders) == before, extra
    assert sweep.main(argv + ["--runs_dir", str(folders), "--summary", "--sweep", "lr=0.01"]) == 0


RESULT_SETTINGS = [("seed", 1), ("n_train", 32), ("T", 6), ("family", "haar"), ("lr", 0.02), ("steps", 7),
                   ("init_scale", 0.2), ("sigma", 0.1), ("s1", "fixed"), ("loss", "all"), ("batch", 16),
                   ("n_test", 16), ("n_probe", 2), ("gd_steps", 2), ("form", "full"), ("optimizer", "gd"),
                   ("d", 2), ("dtype", "float32"), ("target_loss", 0.5), ("backend", "cupy")]


@pytest.fixture(scope="module")
def one_point(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one_point")
    sweep.sweep("block", {"lr": [0.01]}, runs_dir=str(folder), quiet=True, **TINY)
    return folder


@pytest.mark.parametrize("key, value", RESULT_SETTINGS)
def test_the_summary_refuses_a_point_trained_with_any_other_result_setting(one_point, tmp_path, capsys, key, value):
    """--summary reads the points' folders: a point whose config.json differs from the sweep's
    settings in any result setting is refused (exit 1), and no file is written."""
    folder = tmp_path / "r"
    shutil.copytree(one_point, folder)
    path = folder / "block" / "lr=0.01" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **{key: value})))
    before = folder_bytes(folder)
    argv = ["block", "--sweep", "lr=0.01", "--runs_dir", str(folder), "--summary"]
    argv += [a for k, v in TINY.items() for a in (f"--{k}", str(v))]
    assert sweep.main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"sweep.py: point lr=0.01: {folder}/block/lr=0.01 holds a run of other "
                                        f"settings {[key]}"]
    assert folder_bytes(folder) == before
    assert set(k for k, _ in RESULT_SETTINGS) | {"checkpoint_every", "log_every"} >= set(
        k for k in train.config("block") if k not in ("checkpoint_every", "log_every"))


def test_listed_commands_carry_resume_and_every_setting(tmp_path, capsys):
    argv = ["block", "--sweep", "lr=0.01,0.02", "--runs_dir", str(tmp_path), "--list", "--resume", "--steps", "9"]
    assert sweep.main(argv) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 2 and all(c.split().count("--resume") == 1 for c in commands)
    assert all("--steps 9" in c and "--lr 0.0" in c for c in commands)
    assert not tmp_path.joinpath("block").exists()


def test_resume_continues_points_with_a_checkpoint_and_starts_the_others(tmp_path):
    """An interrupted sweep leaves some points finished or checkpointed and others never
    started: --resume continues the first and starts the second afresh, and the files equal an
    uninterrupted sweep's."""
    sweep.sweep("block", {"lr": [0.01]}, runs_dir=str(tmp_path / "a"), quiet=True, **TINY)
    sweep.sweep("block", {"lr": [0.01, 0.02]}, runs_dir=str(tmp_path / "a"), quiet=True, resume=True, **TINY)
    sweep.sweep("block", {"lr": [0.01, 0.02]}, runs_dir=str(tmp_path / "b"), quiet=True, **TINY)
    files = [{k: v for k, v in folder_bytes(tmp_path / w).items() if k.endswith(("params.npz", "metrics.npz"))}
             for w in "ab"]
    assert len(files[0]) == 4 and files[0] == files[1]


# ---- sweeps as cluster jobs: --cluster (submitit's LocalExecutor runs SLURM's code path here)

CLUSTER_ARGV = ["block", "--T", "5", "--n_train", "64", "--n_test", "32", "--n_probe", "0", "--steps", "6",
                "--checkpoint_every", "2", "--log_every", "2", "--sweep", "lr=0.01,0.02", "--quiet"]


def run_files(folder):
    """{path: bytes} of every point's files and the summary, not the lock or submitit's logs."""
    return {k: v for k, v in folder_bytes(folder).items() if not k.endswith(".lock") and ".submitit" not in k}


def test_a_sweep_as_local_cluster_jobs_writes_the_files_of_a_local_sweep(tmp_path, capsys):
    """Each point's params.npz, metrics.npz, checkpoint.npz and config.json, and summary.json,
    are the same bytes whether the points ran in this process or as submitit jobs."""
    pytest.importorskip("submitit")
    tables = []
    for way, extra in (("local", ["--jobs", "1"]), ("jobs", ["--cluster", "local"])):
        assert sweep.main(CLUSTER_ARGV + ["--runs_dir", str(tmp_path / way)] + extra) == 0
        tables.append(capsys.readouterr().out)
    files = [run_files(tmp_path / way) for way in ("local", "jobs")]
    assert len(files[0]) == 2 * 4 + 1 and files[0] == files[1]  # 4 files a point, and summary.json
    assert tables[0] == tables[1] and "0.02" in tables[0]
    assert len(list((tmp_path / "jobs" / "block" / ".submitit").glob("*_log.err"))) == 2  # one job a point


def test_resume_through_local_cluster_jobs_after_a_finished_sweep_changes_nothing(tmp_path, capsys):
    pytest.importorskip("submitit")
    argv = CLUSTER_ARGV + ["--runs_dir", str(tmp_path), "--cluster", "local"]
    assert sweep.main(argv) == 0
    before = run_files(tmp_path)
    assert sweep.main(argv + ["--resume"]) == 0
    assert run_files(tmp_path) == before
    assert len(list((tmp_path / "block" / ".submitit").glob("*_log.err"))) == 4  # the points ran again
    capsys.readouterr()


def test_bad_cluster_options_give_one_line_exit_2_and_touch_no_file(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    argv = CLUSTER_ARGV[:-1] + ["--runs_dir", str(tmp_path)]
    table = [(["--cluster", "pbs"], "unknown cluster 'pbs'; allowed: slurm, local"),
             (["--cluster", "slurm", "--slurm", "time"], "--slurm needs KEY=VALUE (time=120, partition=gpu), got 'time'"),
             (["--cluster", "slurm", "--slurm", "time="], "--slurm needs KEY=VALUE"),
             (["--cluster", "slurm", "--slurm", "=5"], "--slurm needs KEY=VALUE"),
             (["--cluster", "slurm", "--slurm", "bogus=1"], "unknown --slurm setting 'bogus'; allowed: account, "),
             (["--cluster", "slurm", "--slurm", "setup=x"], "unknown --slurm setting 'setup'"),
             (["--cluster", "slurm", "--slurm", "time=5", "--slurm", "time=6"], "--slurm time is given twice"),
             (["--cluster", "slurm", "--slurm", "partition=gpu"], "--cluster slurm needs --slurm time=MINUTES"),
             (["--cluster", "local", "--slurm", "time=5"], "--slurm sets the jobs of --cluster slurm"),
             (["--slurm", "time=5"], "--slurm sets the jobs of --cluster slurm"),
             (["--cluster", "local", "--jobs", "2"], "--cluster runs one job per point"),
             (["--cluster", "local", "--list"], "--list runs no training, so --cluster has no use"),
             (["--cluster", "local", "--summary"], "--summary runs no training, so --cluster has no use"),
             (["--cluster", "local", "--cluster", "local"], "option --cluster is given twice")]
    if shutil.which("srun") is None:
        table.append((["--cluster", "slurm", "--slurm", "time=5"], "--cluster slurm needs SLURM (no srun on PATH"))
    for extra, message in table:
        assert sweep.main(argv + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"sweep.py: {message}"), (extra, err)
        assert not tmp_path.joinpath("block").exists(), extra
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed: import submitit fails
    assert sweep.main(argv + ["--cluster", "local"]) == 2
    assert capsys.readouterr().err == ("sweep.py: --cluster local needs submitit: "
                                       "pip install -r requirements-cluster.txt\n")
    assert not tmp_path.joinpath("block").exists()
