"""Tests of runs.py, the files and processes of every command: npz and text files written
atomically and flushed, checkpoints and run folders (nothing saved is lost: an interrupted
write, a crash while checkpointing, a fresh run replacing an old one, a full disk), the
progress line, one-line errors and a closed pipe, the BLAS thread count; the README's set-up
and test lines, which CI runs; and what two processes and hostile files do (one process per
run folder, workers that die with their sweep, writes that never follow a link or replace a
special file, every file read checked for what it holds: missing, empty, truncated, a link,
too large, too deep, declaring too much or Python objects; run folders that are links). Which
test proves which claim: docs/claims.md."""
import argparse
import fcntl
import io
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import bench
import runs
import sweep
import train
from conftest import HERE, TINY, argv_of, finished_run, flat, folder_bytes


# ---- files: atomic, flushed, npz round trips ---------------------------------------------

def test_flatten_roundtrip_keeps_lists():
    tree = {"layers": [{"W": np.ones(2)}, {"W": np.zeros(3)}], "b": np.arange(2.0)}
    back = runs.unflatten(flat(tree))
    assert isinstance(back["layers"], list) and len(back["layers"]) == 2
    assert np.array_equal(back["layers"][1]["W"], np.zeros(3))


def test_interrupted_write_leaves_previous_file(tmp_path):
    path = str(tmp_path / "metrics.npz")
    runs.save_npz(path, {"x": np.arange(3.0)})

    def crash(f):  # a partial write, then the process is interrupted
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.atomic_write(path, crash)
    assert np.array_equal(runs.load_npz(path)["x"], np.arange(3.0))
    assert os.listdir(tmp_path) == ["metrics.npz"]


def test_atomic_writes_of_figures_are_flushed_to_disk(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    runs.save_text(str(tmp_path / "a" / "x.txt"), "hello")
    runs.save_npz(str(tmp_path / "y.npz"), {"y": np.ones(2)})
    assert len(synced) == 2 and (tmp_path / "a" / "x.txt").read_text() == "hello"
    assert os.listdir(tmp_path / "a") == ["x.txt"]


# ---- run folders and checkpoints: nothing saved is lost ----------------------------------

def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    kw = dict(TINY, d=2, n_probe=0)
    full = train.run("block", runs_dir=str(tmp_path), name="full", quiet=True, **kw)
    savez, calls = np.savez, []

    def crash(f, **arrays):
        calls.append(1)
        if len(calls) == 3:  # the checkpoint of step 4, half written
            f.write(b"PK\x03\x04 partial")
            raise KeyboardInterrupt
        savez(f, **arrays)

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        train.run("block", runs_dir=str(tmp_path), name="cut", quiet=True, **kw)
    monkeypatch.setattr(np, "savez", savez)
    assert int(runs.load_npz(str(tmp_path / "cut" / "checkpoint.npz"))["step"]) == 2
    resumed = train.run("block", runs_dir=str(tmp_path), name="cut", resume=True, quiet=True, **kw)
    assert np.array_equal(full["params"]["A"], resumed["params"]["A"])
    assert np.array_equal(full["metrics"]["train_loss"], resumed["metrics"]["train_loss"])


def test_a_fresh_run_leaves_no_file_of_an_earlier_run(tmp_path):
    train.run("block", runs_dir=str(tmp_path), quiet=True, **TINY)
    before = folder_bytes(tmp_path / "block")
    with pytest.raises(ValueError):  # a start that fails leaves the earlier run as it was
        train.run("block", runs_dir=str(tmp_path), quiet=True, **dict(TINY, init_scale=1e200))
    assert folder_bytes(tmp_path / "block") == before
    train.run("block", runs_dir=str(tmp_path), quiet=True, **dict(TINY, steps=3))
    assert sorted(os.listdir(tmp_path / "block")) == [".lock", "checkpoint.npz", "config.json", "metrics.npz",
                                                      "params.npz"]
    assert runs.load_run(str(tmp_path / "block"))["metrics"]["steps_done"] == 3


def _crash_at(monkeypatch, nth):
    """runs.save_checkpoint interrupted (Ctrl-C) at its nth call."""
    real, calls = runs.save_checkpoint, []

    def checkpoint(*args):
        calls.append(1)
        if len(calls) == nth:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(runs, "save_checkpoint", checkpoint)


def test_a_failed_fresh_run_over_a_finished_one_leaves_it_byte_identical(tmp_path, monkeypatch, capsys):
    """Interrupted while writing its first checkpoint or after later ones, diverged late, or
    a bad file found late: the finished run is as it was, and the line says so. A fresh run
    that finishes replaces it."""
    before = finished_run(tmp_path)
    argv = ["block", "--runs_dir", str(tmp_path), "--quiet", "--seed", "5", *argv_of(dict(TINY, checkpoint_every=2))]
    for nth in (1, 3):
        _crash_at(monkeypatch, nth)
        assert train.main(argv) == 130
        assert capsys.readouterr().err.splitlines() == [
            f"train.py: interrupted by SIGINT; stopped before it finished: {tmp_path / 'block'} holds its earlier "
            f"finished run, as it was"]
        assert folder_bytes(tmp_path) == before
    monkeypatch.undo()
    assert train.main([*argv, "--lr", "1e300"]) == 1                         # diverges after its first step
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith(f"{tmp_path / 'block'} holds its earlier finished run, as it was")
    assert folder_bytes(tmp_path) == before
    monkeypatch.setattr(train, "_evaluate", lambda *a: (_ for _ in ()).throw(runs.FileFault("late: a bad file")))
    assert train.main(argv) == 1
    assert folder_bytes(tmp_path) == before
    monkeypatch.undo()
    assert train.main(argv) == 0
    assert runs.load_config(str(tmp_path / "block"))["seed"] == 5


def test_a_fresh_run_over_an_unfinished_one_replaces_it_after_its_first_checkpoint(tmp_path, monkeypatch):
    before = finished_run(tmp_path)
    for f in ("params.npz", "metrics.npz"):  # an interrupted earlier run: its checkpoint only
        (tmp_path / "block" / f).unlink()
    before = folder_bytes(tmp_path)
    _crash_at(monkeypatch, 1)  # killed while writing the first one
    with pytest.raises(KeyboardInterrupt):
        train.run("block", runs_dir=str(tmp_path), quiet=True, **dict(TINY, seed=5))
    assert folder_bytes(tmp_path) == before
    _crash_at(monkeypatch, 2)  # killed after the first checkpoint: it has taken over
    with pytest.raises(KeyboardInterrupt, match="holds this run's last checkpoint"):
        train.run("block", runs_dir=str(tmp_path), quiet=True, **dict(TINY, seed=5, checkpoint_every=2))
    assert sorted(os.listdir(tmp_path / "block")) == [".lock", "checkpoint.npz", "config.json"]
    monkeypatch.undo()
    resumed = train.run("block", runs_dir=str(tmp_path), quiet=True, resume=True,
                        **dict(TINY, seed=5, checkpoint_every=2))
    whole = train.run("block", runs_dir=str(tmp_path / "whole"), quiet=True, **dict(TINY, seed=5))
    np.testing.assert_array_equal(resumed["params"]["A"], whole["params"]["A"])


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    before = finished_run(tmp_path)

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    assert train.main(["block", "--steps", "3", "--runs_dir", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"train.py: cannot write {tmp_path}/block/.fresh/config.json: "
                                        "No space left on device"]
    assert folder_bytes(tmp_path) == before  # no .tmp file, the earlier run intact
    monkeypatch.undo()
    (tmp_path / "block" / "params.npz").unlink()
    (tmp_path / "block" / "params.npz").mkdir()  # a result path that is a folder: found first
    assert train.main(["block", "--steps", "3", "--runs_dir", str(tmp_path), "--quiet"]) == 2
    assert "params.npz is a folder" in capsys.readouterr().err


# ---- the process: progress, one-line errors, a closed pipe, BLAS threads -----------------

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
        progress = runs.Progress(10, quiet=False, stream=stream)
        for step in (0, 5, 10):
            progress.show(step, 1.0, 2.0, final=step == 10)
        text = "".join(stream)
        assert text.count("\r") == (3 if tty else 0) and text.count("\n") == (1 if tty else 3)
        assert "step 10/10" in text and "steps/s" in text and "left" in text
    quiet = Stream(False)
    runs.Progress(10, quiet=True, stream=quiet).show(0, 1.0, 2.0)
    assert quiet == []


def test_a_closed_pipe_ends_a_command_quietly():
    code = "import runs; runs.run_command(lambda: print('x' * 10 ** 6) or 0)"
    p = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()  # as `| head` does
    err = p.stderr.read()
    assert p.wait() == 0 and err == b""
    for script in ("train.py", "sweep.py", "bench.py", "figures.py"):
        assert "run_command(main)" in open(os.path.join(HERE, script)).read()

    def closed():  # print() into a pipe whose reader has gone
        raise BrokenPipeError(32, "Broken pipe")
    with pytest.raises(BrokenPipeError):  # not turned into "train.py: Broken pipe", exit 1
        runs.one_line_errors("train.py", closed)


def test_set_blas_threads_round_trip():
    previous = runs.set_blas_threads(1)
    if previous is None:
        pytest.skip("NumPy is not linked to an OpenBLAS found in /proc/self/maps")
    try:
        assert runs.set_blas_threads(previous) == 1
    finally:
        runs.set_blas_threads(previous)


# ---- the README's set-up and test lines, as CI runs them ---------------------------------

def test_ci_runs_the_readme_set_up_and_test_lines():
    """.ci/run is the README's set-up line (without figures.py), the README's install of the
    optional cluster extra, then the README's test line, in that order and nothing else."""
    readme = open(os.path.join(HERE, "README.md")).read()
    section = readme.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    block = section.split("```")[1].strip().splitlines()
    extra = [c for c in section.replace("\n", " ").split("`") if "requirements-cluster.txt" in c]
    ci = [line for line in open(os.path.join(HERE, ".ci", "run")).read().splitlines()
          if line and not line.startswith(("#", "set ", "cd ", "rm "))]
    assert len(block) == 2 and extra == [".venv/bin/python -m pip install -r requirements-cluster.txt"]
    assert ci == [block[0].split(" && .venv/bin/python figures.py")[0], extra[0], block[1]]
    assert block[0].startswith("python3 -m venv .venv && ")


# ==== two processes and hostile files =======================================================

SMALL = dict(T=5, n_train=64, n_test=32, n_probe=0, checkpoint_every=100, log_every=100)  # ~1 ms a step


def lock_held(run_dir):
    """Whether another process holds run_dir's lock."""
    try:
        fd = os.open(os.path.join(run_dir, ".lock"), os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def wait_for(condition, seconds=60):
    end = time.time() + seconds
    while not condition():
        assert time.time() < end, "timed out"
        time.sleep(0.01)


def run_files(folder):
    return {k: v for k, v in folder_bytes(folder).items() if k in ("params.npz", "metrics.npz")}


# ---- one process per run folder ------------------------------------------------------------

def test_two_processes_on_one_run_folder(tmp_path):
    """Rounds of two runs on one folder, with kill -9 in between: the second exits 2 with one
    line naming the folder and the holder's pid and changes nothing; the survivor's files
    equal an uninterrupted run of its own seed; the folder always loads."""
    steps = 2500  # the holder trains for 2 s: longer than the other's start-up
    ref = {s: run_files(train.run("block", runs_dir=str(tmp_path / f"ref{s}"), quiet=True, seed=s,
                                  steps=steps, **SMALL)["dir"]) for s in (1, 2)}
    runs_dir, run_dir = tmp_path / "runs", tmp_path / "runs" / "block"

    def start(seed, *extra):
        return subprocess.Popen([sys.executable, "train.py", "block", "--runs_dir", str(runs_dir), "--seed",
                                 str(seed), "--steps", str(steps), "--quiet", *argv_of(SMALL), *extra],
                                cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for round_, (first, second, kill) in enumerate([(1, 2, False), (2, 1, True), (1, 2, True)]):
        holder = start(first)
        wait_for(lambda: lock_held(run_dir))
        before = folder_bytes(run_dir)
        other = start(second)
        out, err = other.communicate(timeout=60)
        assert other.returncode == 2 and out == "", err
        assert err.splitlines() == [f"train.py: {run_dir} is in use by another process (pid {holder.pid}); "
                                    "wait for it to end or use another --name"]
        if kill:
            time.sleep(0.2 * round_)
            holder.kill()
            holder.wait()
            cfg = json.loads((run_dir / "config.json").read_text())
            if (run_dir / "checkpoint.npz").exists() and cfg["seed"] == first and not (run_dir / "params.npz").exists():
                resumed = start(first, "--resume")  # the killed run's checkpoint belongs to it
                assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
        else:
            assert holder.wait(timeout=120) == 0, holder.stderr.read()
            assert folder_bytes(run_dir) != before
        loaded = runs.load_run(str(run_dir))  # the folder always loads, and holds one seed's run
        assert run_files(run_dir) == ref[loaded["config"]["seed"]]


def test_a_locked_folder_refuses_resume_sweep_points_and_figures(tmp_path):
    """The lock is taken by run and resume, by each sweep point and by figures' training and
    data caches, before anything is read: here this process holds it and another one asks."""
    import figures  # matplotlib: only where a figure is made
    finished_run(tmp_path)
    before = folder_bytes(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import runs, sys, time\nwith runs.locked(sys.argv[1]), "
                               "runs.locked(sys.argv[2]):\n    print('held', flush=True); time.sleep(60)",
                               str(tmp_path / "block"), str(tmp_path / "sweep" / "seed=0")],
                              cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ValueError, match=rf"block is in use by another process \(pid {holder.pid}\)"):
            train.run("block", runs_dir=str(tmp_path), quiet=True, resume=True, **TINY)
        with pytest.raises(runs.SweepIncomplete, match="in use by another process"):
            sweep.sweep("block", {"seed": [0]}, runs_dir=str(tmp_path), name="sweep", quiet=True, **TINY)
        ctx = argparse.Namespace(runs=str(tmp_path), preset="quick", retrain=False, quiet=True, timings=[])
        with pytest.raises(ValueError, match=r"in use by another process .*; wait for it to end or use another --runs folder$"):
            figures.train_cached(ctx, "block", "block", **TINY)  # figures.py has --runs, not --name
    finally:
        holder.kill()
        holder.wait()
    assert {k: v for k, v in folder_bytes(tmp_path).items() if not k.startswith("sweep")} == before


def test_the_lock_is_taken_again_inside_one_process(tmp_path):
    folder = str(tmp_path / "a")
    with runs.locked(folder):
        with runs.locked(folder):  # figures' training takes it, then train.run inside
            assert lock_held(folder)
        assert lock_held(folder)  # the inner block did not release it
    assert not lock_held(folder)


# ---- signals and workers -------------------------------------------------------------------

def children(pid):
    """Pids of the live (not zombie) processes whose parent is pid."""
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(p))
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


SWEEP = ["block", "--sweep", "seed=1,2", "--steps", "4000", "--quiet", "--jobs", "2", *argv_of(SMALL)]


def sweep_files(folder):
    return {k: v for k, v in folder_bytes(folder).items() if k.endswith(("params.npz", "metrics.npz", "summary.json"))}


@pytest.fixture(scope="module")
def uninterrupted_sweep(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    assert sweep.main(SWEEP + ["--runs_dir", str(folder)]) == 0
    return sweep_files(folder)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_killing_a_sweep_parent_leaves_no_worker_and_a_rerun_completes(tmp_path, signum, uninterrupted_sweep):
    err_file = open(tmp_path / "stderr", "w")  # not a pipe: a worker must not die of its closing
    parent = subprocess.Popen([sys.executable, "sweep.py", *SWEEP, "--runs_dir", str(tmp_path / "a")],
                              cwd=HERE, stdout=subprocess.DEVNULL, stderr=err_file)
    points = [tmp_path / "a" / "block" / f"seed={s}" for s in (1, 2)]
    wait_for(lambda: all(lock_held(p) for p in points))  # both workers are training
    workers = children(parent.pid)
    parent.send_signal(signum)
    sent = time.time()
    parent.wait(timeout=30)
    err = (tmp_path / "stderr").read_text()
    if signum == signal.SIGTERM:  # it stops its workers and exits at once, in one line
        assert parent.returncode == 128 + signal.SIGTERM and time.time() - sent < 2
        assert err.splitlines()[-1].startswith("sweep.py: interrupted by SIGTERM; ")
    # each worker had seconds of training left: gone within 1 s of its parent
    wait_for(lambda: not any(alive(w) for w in workers), seconds=1)
    assert sweep.main(SWEEP + ["--runs_dir", str(tmp_path / "a")]) == 0
    assert len(uninterrupted_sweep) == 5 and sweep_files(tmp_path / "a") == uninterrupted_sweep


def test_a_signal_during_a_deferred_step_takes_effect_after_it():
    """runs.signals_deferred: the move of a fresh run's files and its record are one step."""
    done = []
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as a command line has it
    try:
        with pytest.raises(KeyboardInterrupt):
            with runs.signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                done.append(1)
    finally:
        signal.signal(signal.SIGINT, before)
    assert done == [1]


def test_sigterm_ends_a_run_in_one_line_and_resume_finishes_it(tmp_path):
    argv = [sys.executable, "train.py", "block", "--runs_dir", str(tmp_path), "--steps", "30000", "--quiet",
            *argv_of(SMALL)]
    p = subprocess.Popen(argv, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "block" / "checkpoint.npz").exists())  # moved and recorded as one step
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143 and err.splitlines() == [
        f"train.py: interrupted by SIGTERM; {tmp_path / 'block'} holds this run's last checkpoint "
        "(python train.py ... --resume continues it)"]


def test_an_interruption_before_the_first_checkpoint_says_the_earlier_run_is_intact(tmp_path, monkeypatch, capsys):
    before = finished_run(tmp_path)

    def stop(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(runs, "save_checkpoint", stop)
    assert train.main(["block", "--runs_dir", str(tmp_path), "--quiet", "--seed", "3", *argv_of(TINY)]) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"train.py: interrupted by SIGINT; stopped before it finished: {tmp_path / 'block'} holds its earlier "
        f"finished run, as it was"]
    assert folder_bytes(tmp_path) == before
    monkeypatch.setattr(runs, "save_checkpoint", stop)  # no earlier run
    assert train.main(["block", "--runs_dir", str(tmp_path / "new"), "--quiet", *argv_of(TINY)]) == 130
    assert capsys.readouterr().err.splitlines() == [
        f"train.py: interrupted by SIGINT; stopped before its first checkpoint: {tmp_path / 'new' / 'block'} is as it was"]


# ---- writes that never leave their folder ---------------------------------------------------

@pytest.mark.parametrize("name", ["config.json", "checkpoint.npz", "params.npz", "metrics.npz", ".lock",
                                  "checkpoint.npz.tmp", "config.json.tmp", ".fresh", ".replaced",
                                  ".fresh/config.json"])
def test_planted_links_are_never_followed(tmp_path, capsys, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    (outside / "config.json").write_bytes(b"precious too")
    runs_dir = tmp_path / "runs"
    finished_run(runs_dir)
    link = runs_dir / "block" / name
    if name.startswith(".fresh/"):
        link.parent.mkdir()  # a stale stage holding a link
    if link.exists():
        link.unlink()
    os.symlink(outside if name in (".fresh", ".replaced") else outside / "victim", link)
    before = folder_bytes(outside)
    for extra in ([], ["--resume"]):
        code = train.main(["block", "--runs_dir", str(runs_dir), "--quiet", *argv_of(TINY), *extra])
        err = capsys.readouterr().err
        assert code == 0 or len(err.strip().splitlines()) == 1, (extra, err)
        assert folder_bytes(outside) == before and not (outside / "victim").is_symlink(), extra
    assert sorted(os.listdir(outside)) == ["config.json", "victim"]


def special_nodes(folder):
    """(name, make) of a fifo and, where this user may make one, a character device."""
    nodes = [("fifo", lambda p: os.mkfifo(p))]
    try:
        os.mknod(folder / "probe-device", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        os.unlink(folder / "probe-device")
        nodes.append(("device", lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))))
    except (PermissionError, OSError):
        pass
    return nodes


def node_state(path):
    st = os.lstat(path)
    return stat.S_IFMT(st.st_mode), st.st_rdev


def test_result_paths_at_a_fifo_or_a_device_are_refused_and_left_as_they_are(tmp_path, capsys):
    import figures  # matplotlib: only where a figure is made
    for kind, make in special_nodes(tmp_path):
        where = tmp_path / kind
        finished_run(where / "runs")
        cases = [
            (where / "bench.json", lambda p: bench.main(["--json", str(p), "--workloads", "population"])),
            (where / "gpu" / "gpu_check.json", lambda p: bench.main(["--dry", "--out", str(p.parent)])),
            (where / "out" / "summary.md",
             lambda p: figures.main(["fig1", "--out", str(p.parent), "--runs", str(where / "r"), "--quiet"])),
            (where / "out2" / "fig1.png",
             lambda p: figures.main(["fig1", "--out", str(p.parent), "--runs", str(where / "r"), "--quiet"])),
            (where / "runs" / "block" / "params.npz",
             lambda p: train.main(["block", "--runs_dir", str(where / "runs"), "--quiet", *argv_of(TINY)])),
        ]
        for path, command in cases:
            path.parent.mkdir(exist_ok=True)
            if path.exists():
                path.unlink()
            make(path)
            state = node_state(path)
            assert command(path) == 2, (kind, path)
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and str(path) in err, (kind, err)
            assert node_state(path) == state, (kind, path)
            with pytest.raises(ValueError, match="is a fifo, device node or socket"):
                runs.save_json(str(path), {})  # the library's own writes refuse it too
            assert node_state(path) == state, (kind, path)


# ---- files of the right format with the wrong content --------------------------------------

def npz_edit(change):
    def edit(path):
        z = dict(np.load(path))
        change(z)
        np.savez(open(path, "wb"), **z)
    return edit


def json_write(obj):
    return lambda path: path.write_text(json.dumps(obj))


CKPT, CONFIG, PARAMS, METRICS = "checkpoint.npz", "config.json", "params.npz", "metrics.npz"
MALFORMED = [
    (CONFIG, json_write([])), (CONFIG, json_write(None)), (CONFIG, json_write("x")), (CONFIG, json_write(3)),
    (CONFIG, json_write({})), (CONFIG, json_write({"experiment": 3})),
    (CKPT, npz_edit(lambda z: z.pop("history/train_loss"))),
    (CKPT, npz_edit(lambda z: z.update({"params/A": z["params/A"].astype(int)}))),
    (CKPT, npz_edit(lambda z: z.update({"params/A": z["params/A"].astype(str)}))),
    (CKPT, npz_edit(lambda z: z.update({"params/A": z["params/A"] + 1j}))),
    (CKPT, npz_edit(lambda z: z.update(step=np.asarray(5.5)))),
    (CKPT, npz_edit(lambda z: z.update(step=np.asarray([1, 2])))),
    (CKPT, npz_edit(lambda z: z.update(step=np.asarray(z["step"] - 1)))),  # history longer than step
    (CKPT, npz_edit(lambda z: z.update({"history/test_loss": z["history/test_loss"][:-1]}))),
    (CKPT, npz_edit(lambda z: z.pop("opt/m/A"))),
    (CKPT, npz_edit(lambda z: z.pop("opt_t"))),
    (CKPT, npz_edit(lambda z: z.update(perm=z["perm"].astype(float)))),
    (CKPT, npz_edit(lambda z: z.update(rng=np.asarray("not a generator")))),
    (CKPT, npz_edit(lambda z: z.pop("settings"))),
    (CKPT, npz_edit(lambda z: z.update(pos=np.asarray("0")))),
    (CKPT, lambda path: np.save(open(path, "wb"), np.ones(3))),  # a .npy file under the name
    (CKPT, lambda path: __import__("zipfile").ZipFile(path, "w").writestr("step.txt", "1")),
    (PARAMS, npz_edit(lambda z: z.update(A=z["A"].astype(int)))),
    (PARAMS, npz_edit(lambda z: z.update(A=z["A"].astype(str)))),
    (PARAMS, npz_edit(lambda z: z.update(A=z["A"] + 1j))),
    (METRICS, npz_edit(lambda z: z.update(test_loss=z["test_loss"].astype(str)))),
]
FIGURE_FILES = [
    ("summary.json", json_write([])), ("summary.json", json_write({"fig1": 3})),
    ("summary.json", json_write({"fig1": {"preset": "quick", "rows": "x"}})),
    ("summary.json", json_write({"fig1": {"preset": "quick", "rows": [{"quantity": 1}]}})),
    ("seconds.json", json_write("abc")), ("seconds.json", json_write([])),
    ("seconds.json", json_write({"seconds": "abc", "config_sha1": "x"})),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A finished one-point sweep (runs/block/seed=0), a cached figures run (runs/cached) with
    its seconds.json, and a figures summary (out/summary.json)."""
    import figures  # matplotlib: only where a figure is made
    root = tmp_path_factory.mktemp("template")
    sweep.sweep("block", {"seed": [0]}, runs_dir=str(root / "runs"), quiet=True, **TINY)
    ctx = argparse.Namespace(runs=str(root / "runs"), preset="quick", retrain=False, quiet=True, timings=[])
    figures.train_cached(ctx, "block", "cached", **TINY)
    assert figures.main(["fig1", "--out", str(root / "out"), "--runs", str(root / "runs"), "--quiet"]) == 0
    return root


@pytest.mark.parametrize("name, damage", MALFORMED + FIGURE_FILES)
def test_a_malformed_file_is_one_line_and_exit_1_and_changes_nothing(tmp_path, template, capsys, name, damage):
    import figures  # matplotlib: only where a figure is made
    root = tmp_path / "t"
    shutil.copytree(template, root)
    point = root / "runs" / "block" / "seed=0"
    path = {"summary.json": root / "out" / name, "seconds.json": root / "runs" / "cached" / name}.get(name, point / name)
    damage(path)
    before = folder_bytes(root)
    if name in (CONFIG, CKPT):
        code = train.main(["block", "--runs_dir", str(point.parent), "--name", "seed=0", "--seed", "0",
                           "--resume", "--quiet", *argv_of(TINY)])
    elif name in (PARAMS, METRICS):
        code = sweep.main(["block", "--sweep", "seed=0", "--runs_dir", str(root / "runs"), "--summary",
                           *argv_of(TINY)])
    elif name == "summary.json":
        code = figures.main(["fig1", "--out", str(root / "out"), "--runs", str(root / "runs"), "--quiet"])
    else:
        ctx = argparse.Namespace(runs=str(root / "runs"), preset="quick", retrain=False, quiet=True, timings=[])
        code = runs.one_line_errors("figures.py", lambda: figures.train_cached(ctx, "block", "cached", **TINY))
    out = capsys.readouterr()
    assert code == 1, out.err
    assert len(out.err.strip().splitlines()) == 1 and str(path) in out.err, out.err
    assert folder_bytes(root) == before


# ---- every file read: missing, damaged, a link, too deep, too big ---------------------------

def npy_header(shape, descr):
    """The magic and header of an .npy file declaring shape and dtype descr, and no data."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})
    return out.getvalue()


def first_entry(data):
    """Damage: the first entry of an .npz file (its first array) replaced by the bytes data."""
    def damage(path):
        with zipfile.ZipFile(path) as z:
            entries = {info.filename: z.read(info) for info in z.infolist()}
        entries[next(iter(entries))] = data
        with zipfile.ZipFile(path, "w") as z:
            for name, raw in entries.items():
                z.writestr(name, raw)
    return damage


def moved_out_and_linked(path):
    """Damage: the intact file moved out of the run folder, a symbolic link to it left in its place."""
    outside = path.parent.parent / "outside"
    outside.mkdir(exist_ok=True)
    shutil.move(path, outside / path.name)
    os.symlink(outside / path.name, path)


def grown(path):
    with open(path, "r+b") as f:  # sparse: instant
        f.truncate(runs.JSON_BYTES + 1)


READERS = {  # every kind of file read, and the reader that reads it from a run folder
    CONFIG: lambda run: runs.load_config(str(run)),
    "summary.json": lambda run: runs.load_json(str(run / "summary.json"), "the summary of earlier figures"),
    PARAMS: lambda run: runs.load_run(str(run)),
    METRICS: lambda run: runs.load_run(str(run)),
    CKPT: lambda run: runs.load_checkpoint(str(run / CKPT), np.asarray),
}
DAMAGES = {  # name: (the kinds of file it applies to, damage, what the one line says)
    "missing": ("json npz", lambda p: p.unlink(), "no such file"),
    "empty": ("json npz", lambda p: p.write_bytes(b""), None),
    "truncated": ("json npz", lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]), None),
    "a symlink": ("json npz", moved_out_and_linked, "not a regular file"),
    "nested 101 deep": ("json", lambda p: p.write_text("[" * 101 + "]" * 101), "nested deeper than 100 levels"),
    "deeper than the parser goes": ("json", lambda p: p.write_text("[" * 200000 + "]" * 200000),
                                    "nested deeper than 100 levels"),
    "too large": ("json", grown, f"holds {(64 << 20) + 1} bytes"),
    "huge header": ("npz", first_entry(npy_header((10 ** 11,), "<f8")),
                    "declares 100000000000 entries of float64 (800 GB)"),
    "object dtype": ("npz", first_entry(npy_header((3,), "|O")), "holds Python objects"),
}


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """A finished tiny run (its four files) with a figures summary.json beside them, every file
    read back intact."""
    run = tmp_path_factory.mktemp("one") / "block"
    train.run("block", runs_dir=str(run.parent), quiet=True, **TINY)
    runs.save_json(str(run / "summary.json"), {"fig1": {"preset": "quick", "rows": []}})
    for read in READERS.values():
        read(run)
    return run


@pytest.mark.parametrize("name, damage", [(n, d) for n in READERS for d, (kinds, _, _) in DAMAGES.items()
                                          if n.rsplit(".")[-1] in kinds.split()])
def test_every_file_read_refuses_a_missing_damaged_linked_or_hostile_file_in_one_line(one_run, tmp_path, name,
                                                                                    damage):
    """Each kind of file read, each way it can be bad: a FileFault naming the file in one line,
    never a traceback (RecursionError, MemoryError), never read through a link."""
    run = tmp_path / "block"
    shutil.copytree(one_run, run)
    _, spoil, says = DAMAGES[damage]
    spoil(run / name)
    with pytest.raises(runs.FileFault) as e:
        READERS[name](run)
    assert str(run / name) in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert says is None or says in str(e.value), str(e.value)


def test_a_caller_bounds_what_an_npz_file_may_declare(one_run):
    with pytest.raises(runs.FileFault, match=r"metrics.npz: entry '\w+' declares .* at most 1e-06 GB in all"):
        runs.load_npz(str(one_run / METRICS), max_bytes=1000)
    assert runs.load_npz(str(one_run / METRICS)).keys() == runs.load_run(str(one_run))["metrics"].keys()


@pytest.mark.parametrize("swapped", ["link", "fifo"])
def test_a_link_or_fifo_swapped_in_after_the_check_is_not_read(one_run, tmp_path, monkeypatch, swapped):
    """The lstat check passes (a regular file), then a link or a fifo takes its place before the
    open: O_NOFOLLOW and fstat on the opened file refuse it, and a fifo never blocks the read."""
    run = tmp_path / "block"
    shutil.copytree(one_run, run)
    path, regular, real = run / CONFIG, os.lstat(run / CONFIG), os.lstat
    shutil.move(path, tmp_path / "intact.json")
    os.symlink(tmp_path / "intact.json", path) if swapped == "link" else os.mkfifo(path)
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: regular if str(p) == str(path) else real(p, *a, **k))
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the read waited on the fifo"))
    signal.alarm(5)
    try:
        with pytest.raises(runs.FileFault, match=f"{path}: not a regular file"):
            runs.load_config(str(run))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def rng_state(change):
    """Damage: the checkpoint's generator state (JSON) changed by change(state)."""
    def edit(z):
        state = json.loads(str(z["rng"]))
        change(state)
        z["rng"] = np.asarray(json.dumps(state))
    return npz_edit(edit)


BAD_STATES = {
    "state=-1": rng_state(lambda s: s["state"].update(state=-1)),
    "inc=2**200": rng_state(lambda s: s["state"].update(inc=2 ** 200)),
    "state=1.5": rng_state(lambda s: s["state"].update(state=1.5)),
    "state=NaN": rng_state(lambda s: s["state"].update(state=float("nan"))),
    "inc='7'": rng_state(lambda s: s["state"].update(inc="7")),
    "has_uint32=2**70": rng_state(lambda s: s.update(has_uint32=2 ** 70)),
    "has_uint32=true": rng_state(lambda s: s.update(has_uint32=True)),
    "uinteger=-1": rng_state(lambda s: s.update(uinteger=-1)),
    "state=[1]": rng_state(lambda s: s.update(state=[1])),
    "MT19937": rng_state(lambda s: s.update(bit_generator="MT19937")),
    "[]": npz_edit(lambda z: z.update(rng=np.asarray("[]"))),
    "too deep": npz_edit(lambda z: z.update(rng=np.asarray("[" * 100000 + "]" * 100000))),
}
BAD_ORDERS = {
    "perm all 0": npz_edit(lambda z: z.update(perm=np.zeros_like(z["perm"]))),
    "perm - 1": npz_edit(lambda z: z.update(perm=z["perm"] - 1)),
    "perm + n": npz_edit(lambda z: z.update(perm=z["perm"] + len(z["perm"]))),
    "pos=-1": npz_edit(lambda z: z.update(pos=np.asarray(-1))),
    "pos=n+1": npz_edit(lambda z: z.update(pos=np.asarray(len(z["perm"]) + 1))),
}


@pytest.mark.parametrize("damage, says", [pytest.param(d, "its generator state cannot be restored", id=k)
                                          for k, d in BAD_STATES.items()]
                         + [pytest.param(d, "its minibatch order is not a permutation", id=k)
                            for k, d in BAD_ORDERS.items()])
def test_a_checkpoint_with_a_bad_generator_state_or_order_is_one_line(one_run, tmp_path, damage, says):
    """Out-of-range, wrong-typed or too deep generator states, and a minibatch order that is not
    a permutation with its position in it: a FileFault naming the checkpoint, never OverflowError,
    TypeError or RecursionError."""
    path = tmp_path / CKPT
    shutil.copy(one_run / CKPT, path)
    damage(path)
    with pytest.raises(runs.FileFault) as e:
        runs.load_checkpoint(str(path), np.asarray)
    assert str(e.value).startswith(f"{path}: ") and says in str(e.value) and "\n" not in str(e.value)


# ---- run folders confined below runs_dir ---------------------------------------------------

def test_a_run_folder_that_is_a_link_or_lies_under_one_is_refused(tmp_path, capsys):
    """A run folder, a sweep's folder (between runs_dir and its points) or a sweep point that is
    a symbolic link: one line, exit 2, nothing written through it. runs_dir itself may be a link."""
    outside = tmp_path / "outside"
    before = finished_run(outside)
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    os.symlink(outside / "block", runs_dir / "block")  # the run folder
    os.symlink(outside, runs_dir / "sweep")             # the folder between runs_dir and the points
    (runs_dir / "points").mkdir()
    os.symlink(outside / "block", runs_dir / "points" / "seed=0")  # a point
    link = str(runs_dir / "block")
    for call in (lambda: runs.run_folder(str(runs_dir), "block"), lambda: runs.make_folder(link),
                 lambda: runs.prepare_folder(link), lambda: runs.locked(link).__enter__()):
        with pytest.raises(ValueError, match=f"^the run folder {link} is a symbolic link; expected a folder"):
            call()
    with pytest.raises(ValueError, match=f"^the run folder {runs_dir / 'sweep'} is a symbolic link; "):
        runs.run_folder(runs.run_folder(str(runs_dir), "sweep"), "block")  # a sweep point: each level checked
    commands = [(train.main, ["block"]), (train.main, ["block", "--resume"]),
                (sweep.main, ["block", "--sweep", "seed=0", "--name", "sweep"]),
                (sweep.main, ["block", "--sweep", "seed=0", "--name", "points"])]
    for main, argv in commands:
        assert main(argv + ["--runs_dir", str(runs_dir), "--quiet", *argv_of(TINY)]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is a symbolic link; expected a folder" in err[0], err
    assert folder_bytes(outside) == before


def test_runs_dir_itself_may_be_a_link_or_lie_under_one(tmp_path):
    (tmp_path / "disk").mkdir()
    os.symlink(tmp_path / "disk", tmp_path / "runs")
    res = train.run("block", runs_dir=str(tmp_path / "runs"), quiet=True, **TINY)
    assert res["dir"] == str(tmp_path / "runs" / "block")
    assert os.path.isfile(tmp_path / "disk" / "block" / "params.npz")
    deeper = runs.run_folder(str(tmp_path / "runs" / "a" / "b"), "c")  # runs_dir below a link
    runs.prepare_folder(deeper)
    assert os.path.isdir(tmp_path / "disk" / "a" / "b" / "c")


# ---- temporary files left by a kill -9 ------------------------------------------------------

def test_taking_a_folder_lock_removes_the_temporary_files_a_killed_writer_left(tmp_path):
    folder = tmp_path / "block"
    code = ("import runs, sys, time\n"
            "runs.atomic_write(sys.argv[1], lambda f: (f.write(b'half'), print('writing', flush=True), "
            "time.sleep(60)))")
    writer = subprocess.Popen([sys.executable, "-c", code, str(folder / "params.npz")], cwd=HERE,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    writer.kill()  # kill -9 between creating the temporary file and renaming it
    writer.wait()
    left = [f for f in os.listdir(folder) if f.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".params.npz.")
    (tmp_path / "victim").write_bytes(b"precious")
    os.symlink(tmp_path / "victim", folder / ".config.json.abcd1234.tmp")  # a link: removed itself
    (folder / ".checkpoint.npz.abcd1234.tmp").mkdir()                   # a folder: left alone
    for other in ("notes.tmp", ".notes.tmp", "checkpoint.npz.tmp"):      # not atomic_write's names
        (folder / other).write_text("mine")
    with runs.locked(str(folder)):
        assert sorted(os.listdir(folder)) == [".checkpoint.npz.abcd1234.tmp", ".lock", ".notes.tmp",
                                              "checkpoint.npz.tmp", "notes.tmp"]
    assert (tmp_path / "victim").read_bytes() == b"precious"
    assert runs.remove_temporaries(str(folder)) == []


# ---- a checkpoint from other settings --------------------------------------------------------

@pytest.mark.parametrize("key, value", [("seed", 1), ("n_train", 32), ("T", 6), ("family", "haar"),
                                        ("lr", 0.02), ("init_scale", 0.2), ("sigma", 0.1), ("s1", "fixed"),
                                        ("loss", "all"), ("batch", 16), ("n_test", 16), ("gd_steps", 2)])
def test_resume_refuses_a_checkpoint_of_other_settings_even_under_the_right_config(tmp_path, capsys, key, value):
    """Another process's checkpoint under this run's config.json (the race of two processes):
    refused (exit 2) for every result setting, even where the shapes agree."""
    base = ["block", "--runs_dir", str(tmp_path), "--quiet", *argv_of(TINY)]
    assert train.main(base + ["--name", "mine"]) == 0
    assert train.main(["block", "--runs_dir", str(tmp_path), "--quiet", "--name", "theirs",
                       *argv_of(dict(TINY, **{key: value}))]) == 0
    shutil.copy(tmp_path / "theirs" / "checkpoint.npz", tmp_path / "mine" / "checkpoint.npz")
    capsys.readouterr()
    before = folder_bytes(tmp_path)
    assert train.main(base + ["--name", "mine", "--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "does not belong to this run" in err, err
    assert folder_bytes(tmp_path) == before


def test_every_test_named_in_the_claim_index_exists():
    """docs/claims.md is the one claim -> test index: every `file::test` it names is defined there."""
    import re
    text = open(os.path.join(HERE, "docs", "claims.md")).read()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", text)
    assert len(named) > 100
    missing = [f"{f}::{t}" for f, t in named
               if not re.search(rf"^def {t}\(", open(os.path.join(HERE, f)).read(), re.M)]
    assert missing == []


def test_a_stale_stage_is_replaced_and_a_stale_set_aside_is_refused(tmp_path, capsys):
    """An earlier start's .fresh (stopped before its first checkpoint) is removed by the next
    start; an earlier replacement's .replaced (files set aside) stops every start with one line."""
    before = finished_run(tmp_path)
    (tmp_path / "block" / ".fresh").mkdir()
    (tmp_path / "block" / ".fresh" / "config.json").write_text("{}")
    (tmp_path / "block" / ".fresh" / "stale.npz").write_bytes(b"an earlier start's file")
    argv = ["block", "--runs_dir", str(tmp_path), "--quiet", "--seed", "3",
            *[a for k, v in TINY.items() for a in (f"--{k}", str(v))]]
    assert train.main(argv) == 0 and not (tmp_path / "block" / ".fresh").exists()
    assert sorted(os.listdir(tmp_path / "block")) == sorted(k.split("/", 1)[1] for k in before)  # nothing stale
    assert runs.load_run(str(tmp_path / "block"))["config"]["seed"] == 3
    (tmp_path / "block" / ".replaced").mkdir()
    (tmp_path / "block" / ".replaced" / "params.npz").write_bytes(before["block/params.npz"])
    capsys.readouterr()
    after = folder_bytes(tmp_path)
    for extra in ([], ["--resume"]):
        assert train.main(argv + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ".replaced holds an earlier run's files" in err[0]
        assert folder_bytes(tmp_path) == after



def test_results_get_the_mode_open_would_give(tmp_path):
    """Temporary files are made 0600; the renamed result gets 0666 less the umask, as before."""
    old = os.umask(0o022)
    try:
        runs.save_json(str(tmp_path / "a.json"), {})
        assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
    finally:
        os.umask(old)


# ---- readers that go away, signals while starting ------------------------------------------

def test_a_closed_stdout_or_stderr_never_fails_a_finished_run(tmp_path):
    """Standard output or error closed before the start (`>&-`, `2>&-`): the run finishes,
    writes its files and exits 0 (its report and progress lines go nowhere)."""
    args = " ".join(["block", "--runs_dir", str(tmp_path / "{}"), *argv_of(SMALL), "--steps", "3"])
    for name, redirect in (("out", ">&-"), ("err", "2>&- >/dev/null")):
        p = subprocess.run(f"{shlex.quote(sys.executable)} train.py {args.format(name)} {redirect}", shell=True,
                           cwd=HERE, capture_output=name == "out")
        assert p.returncode == 0, (name, p.stderr)
        assert (tmp_path / name / "block" / "params.npz").exists(), name


def test_a_reader_of_progress_lines_that_goes_away_does_not_stop_figures(tmp_path):
    """figures.py's progress lines piped into a reader that leaves after one line: every
    figure is still made, exit status 0."""
    cmd = (f"{shlex.quote(sys.executable)} figures.py fig1 fig6 --out {shlex.quote(str(tmp_path / 'out'))} "
           f"--runs {shlex.quote(str(tmp_path / 'runs'))} 2>&1 >/dev/null | head -1; exit ${{PIPESTATUS[0]}}")
    p = subprocess.run(["bash", "-c", cmd], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.count("\n") == 1
    assert {f for f in os.listdir(tmp_path / "out")} >= {"fig1.png", "fig6.png", "summary.md"}


def test_a_signal_while_the_modules_load_is_one_line_and_writes_nothing(tmp_path):
    """SIGTERM as soon as train.py has taken the signal (before numpy and the project load):
    one line, exit 143, no folder made."""
    p = subprocess.Popen([sys.executable, "train.py", "block", "--runs_dir", str(tmp_path / "runs")], cwd=HERE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def catches_sigterm():
        with open(f"/proc/{p.pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        return mask >> (signal.SIGTERM - 1) & 1
    wait_for(catches_sigterm)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143
    assert err.splitlines() == ["train.py: interrupted by SIGTERM while starting; nothing was written"]
    assert not os.path.exists(tmp_path / "runs")


# ---- small pieces every command relies on --------------------------------------------------

def test_a_fresh_stage_is_empty_whatever_an_earlier_start_left_there(tmp_path):
    stage = tmp_path / ".fresh"
    stage.mkdir()
    (stage / "params.npz").write_bytes(b"old")
    (stage / "sub").mkdir()
    (stage / "sub" / "x").write_text("x")
    assert runs.fresh_stage(str(tmp_path)) == str(stage)
    assert os.path.isdir(stage) and os.listdir(stage) == []
    assert runs.fresh_stage(str(tmp_path)) == str(stage) and os.listdir(stage) == []  # none there: made


def test_the_settings_digest_does_not_depend_on_key_order():
    a = {"lr": 0.1, "T": 5, "family": "haar", "nested": {"x": 1, "y": [1, 2]}}
    b = {"nested": {"y": [1, 2], "x": 1}, "family": "haar", "T": 5, "lr": 0.1}
    assert list(a) != list(b) and runs.digest(a) == runs.digest(b)
    assert runs.digest(a) != runs.digest(dict(a, T=6)) and len(runs.digest(a)) == 40
    cfg = train.config("block", **TINY)  # a run's settings, read back from JSON in another order
    assert runs.digest(dict(reversed(list(cfg.items())))) == runs.digest(cfg)


def test_each_option_and_each_flag_is_refused_the_second_time(tmp_path, capsys):
    parser = runs.Parser()
    parser.add_argument("--flag", action=runs.Once, flag=True)
    parser.add_argument("--value", action=runs.Once)
    assert vars(parser.parse_args([])) == {"flag": None, "value": None}
    assert vars(parser.parse_args(["--flag", "--value", "3"])) == {"flag": True, "value": "3"}
    for argv in (["--flag", "--flag"], ["--value", "1", "--value", "1"], ["--flag", "--value", "1", "--flag"]):
        with pytest.raises(ValueError, match="is given twice"):
            parser.parse_args(argv)
    import figures
    for main, argv in ((train.main, ["block", "--quiet", "--quiet"]), (train.main, ["block", "--resume", "--resume"]),
                       (sweep.main, ["block", "--sweep", "seed=0,1", "--list", "--list"]),
                       (sweep.main, ["block", "--sweep", "seed=0,1", "--summary", "--summary"]),
                       (bench.main, ["--dry", "--dry"]), (bench.main, ["--no-tune-allocator", "--no-tune-allocator"]),
                       (figures.main, ["fig1", "--quiet", "--quiet"]), (figures.main, ["fig1", "--retrain", "--retrain"])):
        flag = argv[-1]
        assert main(argv + ["--runs_dir" if main in (train.main, sweep.main) else "--out", str(tmp_path / "x")]
                    if main is not bench.main else argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flag} is given twice" in err, (argv, err)
    assert not os.path.exists(tmp_path / "x")


def test_unflatten_keeps_the_order_of_a_long_list():
    tree = {"layers": [{"W": np.full(2, float(i))} for i in range(12)], "pos": np.ones(3)}
    back = runs.unflatten(flat(tree))
    assert [float(layer["W"][0]) for layer in back["layers"]] == [float(i) for i in range(12)]


def test_json_as_deep_as_allowed_is_read_and_one_level_more_is_refused(tmp_path):
    path = tmp_path / "deep.json"
    for depth, ok in ((runs.JSON_DEPTH, True), (runs.JSON_DEPTH + 1, False)):
        path.write_text("[" * (depth - 1) + "1" + "]" * (depth - 1))
        if ok:
            assert runs.nesting(runs.load_json(str(path))) == depth
        else:
            with pytest.raises(runs.FileFault, match=f"nested deeper than {runs.JSON_DEPTH} levels"):
                runs.load_json(str(path))


def test_the_npz_bound_counts_every_entry_together(tmp_path):
    """Two entries of 800 bytes each: within a bound of 1600, over one of 1000 (neither alone is)."""
    path = str(tmp_path / "two.npz")
    runs.save_npz(path, {"a": np.zeros(100), "b": np.ones(100)})
    assert set(runs.load_npz(path, max_bytes=1600)) == {"a", "b"}
    with pytest.raises(runs.FileFault, match=r"entry 'b' declares 100 entries"):
        runs.load_npz(path, max_bytes=1000)


@pytest.mark.parametrize("module,own", [("train", "train.py --resume"), ("sweep", "sweep.py command with --resume"),
                                        ("figures", "figures.py again"), ("bench", "bench.py writes its files"),
                                        ("verdicts", "verdicts.py writes no file")])
def test_an_interruption_line_names_only_its_own_command(module, own, monkeypatch, capsys):
    """Ctrl-C in any command line: one line, exit 130, saying what that command left and
    naming no other command."""
    import importlib
    mod = importlib.import_module(module)
    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    real = runs.one_line_errors
    monkeypatch.setattr(runs, "one_line_errors", lambda prefix, command, *rest: real(prefix, stop, *rest))
    assert mod.main([]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted by SIGINT" in err[0] and own in err[0], err
    others = {"train.py", "sweep.py", "figures.py", "bench.py", "verdicts.py"} - {module + ".py"}
    assert not any(name in err[0] for name in others), err
