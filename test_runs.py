"""Tests of runs.py, the files and processes of every command: npz and text files written
atomically and flushed, checkpoints and run folders (nothing saved is lost: an interrupted
write, a crash while checkpointing, a fresh run replacing an old one, a full disk), the
progress line, one-line errors and a closed pipe, the BLAS thread count; and the README's
set-up and test lines, which CI runs. Which test proves which claim: docs/claims.md."""


import os
import subprocess
import sys

import numpy as np
import pytest

import runs
import train
from conftest import HERE, TINY, finished_run, flat, folder_bytes


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


def test_a_fresh_run_replaces_the_old_one_only_after_its_first_checkpoint(tmp_path, monkeypatch):
    before = finished_run(tmp_path)
    real = runs.save_checkpoint
    calls = []

    def crash(nth):
        def checkpoint(*args):
            calls.append(1)
            if len(calls) == nth:
                raise KeyboardInterrupt
            return real(*args)
        return checkpoint
    monkeypatch.setattr(runs, "save_checkpoint", crash(1))  # killed while writing the first one
    with pytest.raises(KeyboardInterrupt):
        train.run("block", runs_dir=str(tmp_path), quiet=True, **dict(TINY, seed=5))
    assert folder_bytes(tmp_path) == before
    calls.clear()
    monkeypatch.setattr(runs, "save_checkpoint", crash(2))  # killed after the first checkpoint
    with pytest.raises(KeyboardInterrupt):
        train.run("block", runs_dir=str(tmp_path), quiet=True, **dict(TINY, seed=5, checkpoint_every=2))
    assert sorted(os.listdir(tmp_path / "block")) == [".lock", "checkpoint.npz", "config.json"]
    monkeypatch.setattr(runs, "save_checkpoint", real)
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
    readme = open(os.path.join(HERE, "README.md")).read()
    block = readme.split("## Set up and run", 1)[1].split("```")[1].strip().splitlines()
    ci = [line for line in open(os.path.join(HERE, ".ci", "run")).read().splitlines()
          if line and not line.startswith(("#", "set ", "cd ", "rm "))]
    assert len(block) == 2 and ci == [block[0].split(" && .venv/bin/python figures.py")[0], block[1]]
    assert block[0].startswith("python3 -m venv .venv && ")
