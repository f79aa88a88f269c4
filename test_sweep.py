"""Tests of sweep.py, grids of runs: the summary, every point checked before any trains, the
same files in process, in worker processes (--jobs) and from the listed commands (--list,
then --summary) and as cluster jobs (--cluster local), a failed point, and the bad options of
sweep.py. Which test proves which claim: docs/claims.md."""


import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import runs
import sweep
import train
from conftest import HERE, TINY, argv_of, folder_bytes


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


def test_summary_rows_average_the_loss_positions_and_record_only_the_fixed_settings(tmp_path):
    """M2 (position 0 has no query) is summarised over r >= 1, or the last position with
    loss=last; an augmented depth L = gd_steps is put next to gd_steps-step GD; summary.json's
    settings are the fixed ones, without the swept option."""
    small = dict(TINY, d=2, n_probe=0)
    results, _ = sweep.sweep("diagonal", {"loss": ["all", "last"]}, runs_dir=str(tmp_path), quiet=True, **small)
    saved = json.loads((tmp_path / "diagonal" / "summary.json").read_text())
    for result, row in zip(results, saved["rows"]):
        at = slice(1, None) if result["config"]["loss"] == "all" else slice(-1, None)
        for key, metric in (("test_loss", "test_loss_position"), ("gd1", "baseline_gd1"),
                            ("least_squares", "baseline_least_squares")):
            assert row[key] == pytest.approx(float(np.mean(result["metrics"][metric][at])), rel=1e-12), key
    fixed = set(train.config("diagonal", **small)) - {"loss"} - train.NOT_RESULT
    assert set(saved["settings"]) == fixed | {"experiment", "preset"} and saved["grid"] == {"loss": ["all", "last"]}
    results, _ = sweep.sweep("augmented", {"layers": [1, 2]}, runs_dir=str(tmp_path), quiet=True,
                             **dict(small, gd_steps=2, batch=0, steps=2))
    rows = json.loads((tmp_path / "augmented" / "summary.json").read_text())["rows"]
    assert rows[1]["gd_k=L"] == pytest.approx(float(np.mean(results[1]["metrics"]["baseline_gd2"])), rel=1e-12)


def test_a_swept_option_may_be_spelled_with_a_dash_as_on_train_py(tmp_path, capsys):
    argv = ["block", "--T", "5", "--runs_dir", str(tmp_path), "--sweep", "n-train=16,32", "--list"]
    assert sweep.main(argv) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 2 and "--n_train 16" in commands[0] and "n_train=32" in commands[1]
    assert not os.listdir(tmp_path)


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
             (["--summary", "--sweep", "T=5,1"], 2),
             (["--summary"] + grid_args, 2), (grid_args, 2), (["--list"] + grid_args, 2),  # another grid
             (["--summary", "--seed", "7", "--sweep", "lr=0.01"], 2)]  # other fixed settings
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
    (tmp_path / "a" / "block" / "summary.json").unlink()  # interrupted: no summary (of another grid) yet
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


def test_ctrl_c_stops_the_local_cluster_jobs_with_their_checkpoints(tmp_path):
    """Ctrl-C in a sweep of --cluster local: the jobs it started on this machine stop too
    (submitit lets a job pass SIGTERM by; the sweep sends SIGINT), one line, exit 130, and
    --resume continues each point from its checkpoint."""
    pytest.importorskip("submitit")
    import signal
    import time
    argv = [a for a in CLUSTER_ARGV if a != "--quiet"]
    argv[argv.index("--steps") + 1] = "200000"                       # minutes: still running when stopped
    parent = subprocess.Popen([sys.executable, os.path.join(HERE, "sweep.py")] + argv + [
        "--runs_dir", str(tmp_path), "--cluster", "local"], stderr=subprocess.PIPE, text=True, cwd=HERE)
    jobs, lines = [], []
    while len(jobs) < 2:
        lines.append(parent.stderr.readline())
        assert lines[-1], lines
        jobs += [int(j) for j in re.findall(r"submitted \(job (\d+)\)", lines[-1])]
    checkpoints = [tmp_path / "block" / f"lr={lr}" / "checkpoint.npz" for lr in ("0.01", "0.02")]
    deadline = time.monotonic() + 120
    while not all(c.exists() for c in checkpoints):                 # each job is training
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.2)
    parent.send_signal(signal.SIGINT)
    err = parent.communicate(timeout=60)[1]
    assert parent.returncode == 130
    assert err.strip().splitlines()[-1].startswith("sweep.py: interrupted by SIGINT; its local jobs are stopped")

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
        except FileNotFoundError:
            return False
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in jobs):
        assert time.monotonic() < deadline, [pid for pid in jobs if alive(pid)]
        time.sleep(0.2)
    assert all(c.exists() for c in checkpoints)


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


# ---- a sweep's summary: read under locks, of one grid per --name, from checked metrics -----------

TINY_SETTINGS = dict(steps=2, T=5, n_train=64, n_test=32, n_probe=0)
GRID = ["--sweep", "lr=0.01,0.02"]


def tiny(*extra, experiment="block", **changed):
    """The command line of a tiny sweep: its settings (changed: some of them) and extra options."""
    return [experiment, "--quiet", *argv_of(dict(TINY_SETTINGS, **changed)), *extra]


TINY_ARGV = tiny()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny two-point sweep: RUNS/block/lr=0.01, lr=0.02 and summary.json."""
    folder = tmp_path_factory.mktemp("finished")
    assert sweep.main(TINY_ARGV + GRID + ["--runs_dir", str(folder)]) == 0
    return folder


def copy_of(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "r")
    return tmp_path / "r"


def sweep_options():
    """Every option sweep.py's command line has (its --help), for the messages that name one."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert sweep.main(["block", "--help"]) == 0
    return set(re.findall(r"--[a-z][a-z0-9_-]*", out.getvalue()))


def refused(argv, folder, code, capsys):
    """sweep.main(argv) on RUNS folder: exit status `code`, one line on stderr (returned, without
    the prefix) that names only options sweep.py has, and every file under folder unchanged:
    the same bytes, and summary.json not rewritten (its inode: a rewrite renames a new file in)."""
    before, summary = folder_bytes(folder), folder / "block" / "summary.json"
    inode = summary.stat().st_ino if summary.exists() else None
    assert sweep.main(argv + ["--runs_dir", str(folder)]) == code, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sweep.py: "), err
    assert set(re.findall(r"--[a-z][a-z0-9_-]*", err)) <= sweep_options(), err
    assert folder_bytes(folder) == before, argv
    assert (summary.stat().st_ino if summary.exists() else None) == inode, argv
    return err[len("sweep.py: "):].rstrip("\n")


def hold(*folders):
    """Another process holding the locks of folders (as test_runs.py's lock tests do), until killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import contextlib, runs, sys, time\n"
                               "with contextlib.ExitStack() as held:\n"
                               "    for f in sys.argv[1:]:\n        held.enter_context(runs.locked(f))\n"
                               "    print('held', flush=True); time.sleep(60)", *map(str, folders)],
                              cwd=HERE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


@contextlib.contextmanager
def holding(*folders):
    holder = hold(*folders)
    try:
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_point_held_by_another_process_is_not_read_for_the_summary(finished, tmp_path, capsys, monkeypatch):
    """--summary, and a sweep reading its points back after training them, read each point under
    its lock: a point that another process holds (a run being written) is one line naming it and
    the holder, exit 2, and summary.json is not written."""
    folder = copy_of(finished, tmp_path)
    point = folder / "block" / "lr=0.02"
    with holding(point) as holder:
        err = refused(TINY_ARGV + GRID + ["--summary"], folder, 2, capsys)
    assert err == (f"point lr=0.02: {point} is in use by another process (pid {holder.pid}); wait for it to end "
                   f"or use another --name")
    run = train.run
    holders = []

    def run_then_held(experiment, preset, base, sub, *args, **kw):  # another process takes it after training
        result = run(experiment, preset, base, sub, *args, **kw)
        if sub == "lr=0.02":
            holders.append(hold(point))
        return result
    monkeypatch.setattr(train, "run", run_then_held)
    try:  # the points are retrained (the same bytes), then lr=0.02 is refused before the summary
        err = refused(TINY_ARGV + GRID, folder, 2, capsys)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    assert err.startswith(f"point lr=0.02: {point} is in use by another process (pid {holders[0].pid}); ")


def test_a_sweep_name_held_by_another_sweep_is_refused_before_any_training(finished, tmp_path, capsys):
    """A sweep holds RUNS/NAME's lock from its check of summary.json to its write: a second sweep,
    or --summary, on that name meanwhile is one line naming the folder and the holder, exit 2."""
    folder = copy_of(finished, tmp_path)
    with holding(folder / "block") as holder:
        for extra in ([], ["--summary"], ["--resume", "--jobs", "2"]):
            err = refused(TINY_ARGV + GRID + extra, folder, 2, capsys)
            assert err == (f"{folder / 'block'} is in use by another process (pid {holder.pid}); wait for it to "
                           f"end or use another --name"), extra


def test_two_grids_under_one_name_are_refused_and_the_same_grid_reruns(finished, tmp_path, capsys):
    """summary.json records the grid and the fixed settings: a sweep, --summary or --list of
    another grid or other fixed settings under the same --name is one line naming both, exit 2,
    before anything is trained or written; the same sweep reruns, resumes and summarises."""
    folder = copy_of(finished, tmp_path)
    path = folder / "block" / "summary.json"
    err = refused(TINY_ARGV + ["--sweep", "lr=0.01"], folder, 2, capsys)
    assert err == (f"{path} summarises another sweep (block --sweep lr=0.01,0.02), not this one (block --sweep lr=0.01); "
                   f"use another --name for this sweep or delete {path}")
    err = refused(tiny(*GRID, steps=3), folder, 2, capsys)
    assert err.startswith(f"{path} summarises another sweep (block --sweep lr=0.01,0.02 with steps=2), not this "
                          f"one (block --sweep lr=0.01,0.02 with steps=3); use another --name")
    others = [tiny("--sweep", "lr=0.01,0.03"), tiny(*GRID, "--sweep", "seed=1"), tiny("--sweep", "seed=0,1"),
              tiny(*GRID, seed=1), tiny(*GRID, "--preset", "paper"), tiny(*GRID, sigma=0.1), tiny(*GRID, n_test=16)]
    for other in others:
        for extra in ([], ["--summary"], ["--list"], ["--resume"]):
            err = refused(other + extra, folder, 2, capsys)
            assert "summarises another sweep (block --sweep lr=0.01,0.02" in err and "use another --name" in err, err
    assert not (folder / "block" / "lr=0.03").exists() and not (folder / "block" / "seed=0").exists()
    (folder / "block" / ".lock").unlink()  # a summary from elsewhere: it is checked before the lock file is made
    for extra in ([], ["--summary"]):
        refused(tiny("--sweep", "lr=0.01", *extra), folder, 2, capsys)
    (folder / "block" / ".lock").touch()
    err = refused(tiny(*GRID, "--name", "block", experiment="augmented"), folder, 2, capsys)
    assert "another sweep (block --sweep lr=0.01,0.02 with " in err and "this one (augmented --sweep lr=" in err
    before = folder_bytes(folder)
    for same in (tiny(*GRID, "--summary"), tiny(*GRID, "--resume"), tiny(*GRID), tiny(*GRID, "--jobs", "2")):
        assert sweep.main(same + ["--runs_dir", str(folder)]) == 0, same  # the same sweep: the same files
        assert folder_bytes(folder) == before, same
    assert sweep.main(tiny(*GRID, "--runs_dir", str(folder), checkpoint_every=1)) == 0  # changes no result
    assert (folder / "block" / "summary.json").read_bytes() == before["block/summary.json"]
    assert sweep.main(tiny("--sweep", "lr=0.01", "--name", "other", "--runs_dir", str(folder))) == 0
    capsys.readouterr()
    (folder / "block" / "lr=0.02" / "metrics.npz").unlink()  # the same grid, a point unfinished: exit 1
    err = refused(TINY_ARGV + GRID + ["--summary"], folder, 1, capsys)
    assert err.startswith(f"point lr=0.02 has no finished run: {folder}/block/lr=0.02/metrics.npz: no such file")


@pytest.mark.parametrize("extra", [[], ["--summary"]])
def test_of_two_sweeps_racing_for_one_name_the_second_to_lock_it_is_refused(tmp_path, capsys, monkeypatch, extra):
    """Two sweeps of other grids started together under one --name both find no summary.json;
    the one that takes RUNS/NAME's lock second checks again under it: one line, exit 2, and the
    first one's summary and points are all there is."""
    base, locked, raced = tmp_path / "block", runs.locked, []
    base.mkdir()

    @contextlib.contextmanager
    def racing(run_dir, *args, **kw):  # the other sweep runs between this one's first check and its lock
        if os.path.realpath(run_dir) == os.path.realpath(base) and not raced:
            raced.append(None)  # once: the other sweep takes the lock through here too
            raced[0] = sweep.main(tiny("--sweep", "lr=0.02", "--runs_dir", str(tmp_path)))
        with locked(run_dir, *args, **kw):
            yield
    monkeypatch.setattr(runs, "locked", racing)
    assert sweep.main(tiny("--sweep", "lr=0.01", "--runs_dir", str(tmp_path), *extra)) == 2
    err = capsys.readouterr().err
    assert raced == [0] and err.count("\n") == 1 and err.startswith(
        f"sweep.py: {base / 'summary.json'} summarises another sweep (block --sweep lr=0.02), not this one "
        f"(block --sweep lr=0.01); use another --name"), err
    assert sorted(os.listdir(base)) == [".lock", "lr=0.02", "summary.json"]
    assert json.loads((base / "summary.json").read_text())["grid"] == {"lr": [0.02]}


@pytest.mark.parametrize("text", ["[]", '{"rows": []}', '{"grid": {"lr": 0.01}}', '{"grid": {}, "settings": 3}'])
def test_a_summary_json_that_is_not_a_sweeps_is_one_line_and_exit_1(finished, tmp_path, capsys, text):
    folder = copy_of(finished, tmp_path)
    path = folder / "block" / "summary.json"
    path.write_text(text)
    for extra in ([], ["--summary"], ["--list"]):
        err = refused(TINY_ARGV + GRID + extra, folder, 1, capsys)
        assert err.startswith(f"{path}: not a sweep's summary"), err


def test_a_summary_written_before_settings_were_recorded_is_checked_on_its_grid(finished, tmp_path, capsys):
    folder = copy_of(finished, tmp_path)
    path = folder / "block" / "summary.json"
    path.write_text(json.dumps({"grid": {"lr": [0.01, 0.02]}, "rows": []}))
    err = refused(tiny("--sweep", "lr=0.01", "--summary"), folder, 2, capsys)
    assert err.startswith(f"{path} summarises another sweep (--sweep lr=0.01,0.02), not this one (block --sweep "
                          f"lr=0.01); use another --name")
    assert sweep.main(tiny(*GRID, "--summary", "--runs_dir", str(folder))) == 0  # the same grid: rewritten
    assert path.read_bytes() == (finished / "block" / "summary.json").read_bytes()


def damaged(path, key, edit):
    """metrics.npz at path rewritten (a valid .npz) with entry key edited, or removed (edit None)."""
    metrics = dict(np.load(path))
    if edit is None:
        del metrics[key]
    else:
        metrics[key] = edit(metrics[key])
    runs.save_npz(str(path), metrics)


def nan_last(v):
    return np.concatenate([v[:-1], [np.nan]])


METRIC_DAMAGE = [
    ("test_loss_position", lambda v: v[:-1], "holds float64 of shape [4]; expected real numbers of shape [5] (T = 5"),
    ("test_loss_position", lambda v: v[None], "holds float64 of shape [1, 5]; expected real numbers of shape [5]"),
    ("test_loss_position", lambda v: v[0], "holds float64 of shape []; expected real numbers of shape [5]"),
    ("test_loss_position", lambda v: v.astype(complex), "holds complex128 of shape [5]; expected real numbers"),
    ("test_loss_position", None, "no entry 'test_loss_position'; expected a finished run's metrics"),
    ("test_loss_position", nan_last, "is nan at position 4, which the summary reads; expected"),
    ("test_loss_position", lambda v: np.concatenate([v[:-1], [np.inf]]), "is inf at position 4, which"),
    ("baseline_gd1", None, "no entry 'baseline_gd1'"),
    ("baseline_gd1", lambda v: np.concatenate([v, v]), "holds float64 of shape [10]; expected real numbers of shape [5]"),
    ("baseline_least_squares", nan_last, "is nan at position 4"),
    ("baseline_least_squares", None, "no entry 'baseline_least_squares'"),
]


@pytest.mark.parametrize("key, edit, says", METRIC_DAMAGE)
def test_a_damaged_metric_of_a_point_is_one_line_and_no_summary(finished, tmp_path, capsys, key, edit, says):
    """Every entry of metrics.npz the summary reads is checked (present, real, shape [T], finite
    where it is averaged): a bad one is one line naming the file and the entry, exit 1, and
    summary.json is not written."""
    folder = copy_of(finished, tmp_path)
    path = folder / "block" / "lr=0.02" / "metrics.npz"
    damaged(path, key, edit)
    err = refused(TINY_ARGV + GRID + ["--summary"], folder, 1, capsys)
    assert err.startswith(f"{path}: ") and key in err and says in err, err


def test_the_metrics_of_other_experiments_rows_are_checked(tmp_path, capsys):
    """The population row reads the last training loss; the augmented row its depth's GD
    baseline (gd_k=L, while L <= gd_steps)."""
    population = ["population", "--quiet", "--steps", "2", "--T", "5", "--sweep", "lr=0.01"]
    cases = [(population, "lr=0.01", "train_loss", nan_last, "is nan at position 2"),
             (population, "lr=0.01", "train_loss",
              lambda v: v[:0], "holds float64 of shape [0]; expected real numbers of shape [n >= 1]"),
             (tiny("--sweep", "layers=2", experiment="augmented"), "layers=2", "baseline_gd2", None,
              "no entry 'baseline_gd2'"),
             (tiny("--sweep", "layers=2", experiment="augmented"), "layers=2", "baseline_gd2", nan_last,
              "is nan at position 4")]
    for i, (argv, sub, key, edit, says) in enumerate(cases):
        folder = tmp_path / str(i)
        assert sweep.main(argv + ["--runs_dir", str(folder)]) == 0
        capsys.readouterr()
        path = folder / argv[0] / sub / "metrics.npz"
        damaged(path, key, edit)
        before = folder_bytes(folder)
        assert sweep.main(argv + ["--runs_dir", str(folder), "--summary"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"sweep.py: {path}: ") and says in err, err
        assert folder_bytes(folder) == before


def test_a_point_damaged_after_its_training_stops_the_summary(finished, tmp_path, capsys, monkeypatch):
    """A sweep reads the points it trained back as --summary does: a metric damaged between
    the training and the summary is one line, exit 1, and summary.json is not rewritten."""
    folder = copy_of(finished, tmp_path)
    path = folder / "block" / "lr=0.01" / "metrics.npz"
    run = train.run

    def run_then_damaged(experiment, preset, base, sub, *args, **kw):
        result = run(experiment, preset, base, sub, *args, **kw)
        if sub == "lr=0.01":
            damaged(path, "test_loss_position", nan_last)
        return result
    damaged(path, "test_loss_position", nan_last)  # the bytes the sweep will leave
    monkeypatch.setattr(train, "run", run_then_damaged)
    err = refused(TINY_ARGV + GRID, folder, 1, capsys)
    assert err.startswith(f"{path}: entry 'test_loss_position' is nan at position 4, which the summary reads")


def test_an_interrupted_sweep_says_what_to_run_in_sweep_py_options(finished, tmp_path, capsys, monkeypatch):
    """Ctrl-C in a point's training, or while workers train: one line, exit 130, naming the
    sweep's own --resume rather than train.py's or figures.py's commands."""
    folder = copy_of(finished, tmp_path)

    def interrupted(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "_train", interrupted)  # train.run says what is on disk, then the sweep
    err = refused(TINY_ARGV + GRID + ["--resume"], folder, 130, capsys)
    point = folder / "block" / "lr=0.01"
    assert err == (f"interrupted by SIGINT; point lr=0.01: {point} holds this run's last checkpoint; the same "
                   f"sweep.py command with --resume continues its points from their last checkpoints")
    wait, calls = sweep.multiprocessing.connection.wait, []

    def interrupted_once(*args, **kw):  # the first wait for a worker (not the joins that stop them)
        calls.append(1)
        return interrupted() if len(calls) == 1 else wait(*args, **kw)
    monkeypatch.setattr(sweep.multiprocessing.connection, "wait", interrupted_once)
    err = refused(TINY_ARGV + GRID + ["--jobs", "2"], folder, 130, capsys)
    assert err == ("interrupted by SIGINT; its worker processes are stopped; every finished point and checkpoint "
                   "is intact; the same sweep.py command with --resume continues its points from their last "
                   "checkpoints")
