"""runs: the disk and shell boundary of icar's command lines. Imports no project module.

Files: every result is written atomically (atomic_write: a unique temporary file in the
target folder, then a rename) and read back through read_file, which reads regular files
only, never through a link, and turns every way a file can be missing or damaged into one
FileFault naming it; load_json and load_npz bound what a file may hold (size, nesting, the
arrays an .npz header declares) before reading it. Run folders: run_folder (never a link,
so runs stay below runs_dir), prepare_folder, locked (one process per folder; removes the
temporary files a killed writer left), replace_run (a fresh run replaces an earlier one
only after its first checkpoint), save_checkpoint / load_checkpoint. Shell: Parser
(argparse with one-line errors), one_line_errors (the error -> exit status mapping of every command line),
run_command, Progress, and the process set-up of training (set_up_process).

Exit statuses: 0 done; 1 a fault of the machine or of a file (FileFault, OSError, out of
memory), a diverged run or failed sweep points; 2 a bad argument (ValueError); 128 + the
signal's number for an interruption (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP).
"""
import argparse
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import tokenize
import zipfile

import numpy


# ----------------------------------------------------------------------------- files

class FileFault(Exception):
    """A file that cannot be written (a full disk, no permission) or read back (truncated,
    empty, foreign): a fault of the machine or of the file, not of the settings (exit status 1)."""


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once (umask can only be read by setting it)


def check_regular(path, what="a result file"):
    """ValueError unless path is absent or a regular file: icar never writes through, or
    replaces, a link, a fifo, a device node, a socket or a folder."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise FileFault(f"{path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = ("a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode)
                else "a fifo, device node or socket")
        raise ValueError(f"{path} is {kind}; {what} must be a regular file or absent (nothing else "
                         f"is written through or replaced)")


def atomic_write(path, write):
    """write(binary file) into a new temporary file beside path (created exclusively with a
    unique name: a planted link is never followed), flushed to disk, then renamed to path: a
    reader sees the old or the new file, never a partial one. Creates path's folder if
    needed; ValueError if path exists as anything but a regular file (check_regular);
    FileFault naming path if the disk refuses."""
    check_regular(path)
    tmp = None
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600: results get the mode open() would give
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise FileFault(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.remove(tmp)


def read_file(path, what, read):
    """read(f), f the file path opened for binary reading, with every way the file can be
    missing, damaged or foreign turned into one FileFault naming the file and what it should
    have been. Only a regular file is read, never through a link: it is opened with O_NOFOLLOW
    and checked again with fstat once open, so a link or fifo swapped in after the lstat check
    is refused too (a device node is never opened)."""
    foreign = FileFault(f"{path}: not a regular file (a link, folder, fifo or device); expected {what}")
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise foreign
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a fifo swapped in: no wait
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise foreign
            return read(f)
    except FileNotFoundError:
        raise FileFault(f"{path}: no such file (expected {what})") from None
    except json.JSONDecodeError as e:
        raise FileFault(f"{path}: not valid JSON ({e}); expected {what}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a link swapped in after the lstat check
            raise foreign from None
        raise FileFault(f"{path}: cannot be read as {what} ({e.strerror or e})") from None
    except (ValueError, EOFError, KeyError, zipfile.BadZipFile,
            NotImplementedError,  # a zip feature numpy never writes (a newer zip version)
            tokenize.TokenError):  # numpy's parser of some damaged .npy headers
        raise FileFault(f"{path}: cannot be read as {what} (truncated, empty or not this kind of "
                        f"file)") from None


JSON_BYTES, JSON_DEPTH = 64 << 20, 100  # bounds of a JSON file read: icar writes far less
NPZ_BYTES = 2 ** 31                     # bound of the array bytes one .npz file may declare


def nesting(obj):
    """The nesting depth of a JSON value (1 for a number or a string, 2 for [1] or {"a": 1}),
    counted level by level: no recursion, however deep the value."""
    level, depth = [obj], 0
    while level:
        depth += 1
        level = [v for x in level if isinstance(x, (list, dict))
                 for v in (x.values() if isinstance(x, dict) else x)]
    return depth


def load_json(path, what="a JSON file"):
    """The JSON value in path (read_file's checks), FileFault naming it if it holds more than
    JSON_BYTES (fstat, before reading) or is nested deeper than JSON_DEPTH (deep input is never a
    RecursionError)."""
    def read(f):
        size = os.fstat(f.fileno()).st_size
        if size > JSON_BYTES:
            raise FileFault(f"{path}: holds {size} bytes; expected {what} of at most {JSON_BYTES >> 20} MB")
        try:
            obj = json.loads(f.read(JSON_BYTES + 1))  # + 1: a file grown since fstat is invalid JSON
            deep = nesting(obj) > JSON_DEPTH
        except RecursionError:  # deeper than the parser goes
            deep = True
        if deep:
            raise FileFault(f"{path}: JSON nested deeper than {JSON_DEPTH} levels; expected {what}")
        return obj
    return read_file(path, what, read)


def save_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


def save_json(path, obj):
    save_text(path, json.dumps(obj, indent=1, sort_keys=True))


def save_npz(path, arrays):
    """numpy.savez, with every entry dated 1980-01-01 (zip's first date) instead of now: the
    bytes depend on the arrays only, so a run writes the same file whenever, and in whichever
    process, it ran. ValueError for an entry that is not numbers or text (load_npz, which
    refuses pickles, could not read it back)."""
    for k, v in arrays.items():
        if numpy.asarray(v).dtype.kind not in "biufcU":
            raise ValueError(f"entry {k!r} of {path} must be an array of numbers or text, got "
                             f"{numpy.asarray(v).dtype}")

    def write(f):
        packed = io.BytesIO()
        numpy.savez(packed, **arrays)
        with zipfile.ZipFile(packed) as z, zipfile.ZipFile(f, "w", allowZip64=True) as out:
            for name in z.namelist():
                with z.open(name) as src, out.open(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)),
                                                   "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst)
    atomic_write(path, write)


def load_npz(path, what="a .npz file of arrays", max_bytes=NPZ_BYTES):
    """The arrays of a .npz file, {name: array} (read_file's checks). Each entry's .npy header
    is read before its array is allocated: FileFault naming the file and the entry for one that
    is not an .npy array, holds Python objects (pickles are never read), or declares more than
    max_bytes of data with the entries before it, so a damaged or hostile header costs no
    memory."""
    def read(f):
        arrays, total = {}, 0
        with zipfile.ZipFile(f) as z:
            for info in z.infolist():
                key = info.filename[:-len(".npy")]
                if (not info.filename.endswith(".npy") or info.compress_type != zipfile.ZIP_STORED
                        or info.flag_bits & 1):  # bit 0: encrypted
                    raise FileFault(f"{path}: entry {info.filename!r} is not an array as numpy.savez "
                                    f"stores it (uncompressed .npy); expected {what}")
                with z.open(info) as entry:
                    version = numpy.lib.format.read_magic(entry)
                    if version not in ((1, 0), (2, 0)):
                        raise ValueError(f"an .npy header of version {version}")
                    shape, _, dtype = (numpy.lib.format.read_array_header_1_0 if version == (1, 0) else
                                       numpy.lib.format.read_array_header_2_0)(entry)
                if dtype.hasobject:
                    raise FileFault(f"{path}: entry {key!r} holds Python objects ({dtype}), which are "
                                    f"never read; expected {what}")
                count = math.prod(shape)
                total += count * dtype.itemsize
                if total > max_bytes:
                    raise FileFault(f"{path}: entry {key!r} declares {count} entries of {dtype} "
                                    f"({count * dtype.itemsize / 1e9:.3g} GB); at most {max_bytes / 1e9:.3g} "
                                    f"GB in all are read from {what} (a damaged or foreign file)")
                with z.open(info) as entry:
                    arrays[key] = numpy.lib.format.read_array(entry, allow_pickle=False)
        return arrays
    return read_file(path, what, read)


def flatten(tree, prefix=""):
    """A nested dict / list of arrays as {"a/0/b": array}: the names of .npz files."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}/").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in flatten(sub, f"{prefix}{i}/").items()}
    return {prefix[:-1]: numpy.asarray(tree)}


def unflatten(flat):
    """The inverse of flatten (dicts keyed 0..k-1 become lists)."""
    tree = {}
    for key, value in flat.items():
        node, parts = tree, key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def lists(node):  # dicts keyed 0..k-1 were lists
        if not isinstance(node, dict):
            return node
        node = {k: lists(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[str(i)] for i in range(len(node))]
        return node
    return lists(tree)


def code_fingerprint(names):
    """SHA-1 of the project files `names` (beside this file): a result made by other code is
    stale."""
    digest = hashlib.sha1()
    for name in names:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def versions(names):
    """Python, NumPy and autograd versions and the fingerprint of the code `names`."""
    out = {"python": platform.python_version(), "code": code_fingerprint(names)}
    for package in ("numpy", "autograd"):
        out[package] = importlib.metadata.version(package)
    return out


def _check_arrays(path, arrays, kinds, what):
    """FileFault unless every array's dtype kind is in kinds ("f" float, "i" integer, ...)."""
    for k, v in arrays.items():
        if v.dtype.kind not in kinds:
            raise FileFault(f"{path}: entry {k!r} has dtype {v.dtype}; {what}")


def load_config(run_dir):
    """run_dir/config.json, a run's settings: FileFault naming it unless it is a JSON object
    with an 'experiment' name."""
    path = os.path.join(run_dir, "config.json")
    cfg = load_json(path, "a run's config.json")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("experiment"), str):
        raise FileFault(f"{path}: not a run's settings (a JSON object with an 'experiment' name), "
                        f"got {json.dumps(cfg)[:40]}")
    return cfg


def load_run(run_dir):
    """The result of a run read back from its folder: config, params, metrics, dir; FileFault
    naming the file if one is missing, damaged or holds the wrong kind of content."""
    cfg = load_config(run_dir)
    path = os.path.join(run_dir, "metrics.npz")
    metrics = load_npz(path, "a run's metrics")
    _check_arrays(path, metrics, "biufc", "metrics are numbers")
    metrics = {k: (float(v) if v.ndim == 0 and v.dtype.kind != "c" else v) for k, v in metrics.items()}
    path = os.path.join(run_dir, "params.npz")
    params = load_npz(path, "a run's parameters")
    _check_arrays(path, params, "f", "parameters are real float arrays")
    return {"config": cfg, "params": unflatten(params), "metrics": metrics, "dir": run_dir}


def digest(settings):
    """SHA-1 of a JSON-able dict (sorted keys): a checkpoint records the settings it belongs to."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, step, params, opt, rng, perm, pos, history, settings):
    """Write a training state: host parameters and Adam state (opt, or None for GD), the
    minibatch generator, the epoch's permutation and position in it, the loss history, and
    `settings`, the digest of the settings that produced it."""
    arrays = {f"params/{k}": v for k, v in flatten(params).items()}
    if opt is not None:
        arrays.update({f"opt/{k}": v for k, v in flatten({"m": opt["m"], "v": opt["v"]}).items()})
        arrays["opt_t"] = numpy.asarray(opt["t"])
    arrays.update(step=numpy.asarray(step), rng=numpy.asarray(json.dumps(rng.bit_generator.state)),
                  perm=numpy.asarray(perm, dtype=numpy.int64), pos=numpy.asarray(pos),
                  settings=numpy.asarray(settings),
                  **{f"history/{k}": numpy.asarray(v, dtype=numpy.int64 if k == "test_step" else numpy.float64)
                     for k, v in history.items()})
    save_npz(path, arrays)


_SCALARS = {"step": "i", "pos": "i", "opt_t": "i", "rng": "U", "settings": "U"}
_HISTORY = {"history/train_loss": "f", "history/test_step": "i", "history/test_loss": "f"}


def load_checkpoint(path, move):
    """(step, params, opt, rng, perm, pos, history, settings) of save_checkpoint, arrays passed
    through move (e.g. an array module's asarray). FileFault naming path unless every entry
    is present with its dtype and rank, the history is as long as `step` says, perm is a
    permutation of 0..len(perm)-1 with pos in 0..len(perm), and rng a state the generator
    takes (whether it fits a run is train's question)."""
    z = load_npz(path, "a checkpoint")

    def bad(why):
        return FileFault(f"{path}: an incomplete checkpoint, or one of other code ({why})")
    for k, kind in {**_SCALARS, **_HISTORY, "perm": "i"}.items():
        if k == "opt_t" and k not in z:
            continue
        if k not in z:
            raise bad(f"no entry {k!r}")
        if z[k].dtype.kind != kind or z[k].ndim != (0 if k in _SCALARS else 1):
            raise bad(f"entry {k!r} has dtype {z[k].dtype} and shape {z[k].shape}")
    groups = {g: {k[len(g) + 1:]: v for k, v in z.items() if k.startswith(g + "/")} for g in ("params", "opt")}
    _check_arrays(path, {k: v for k, v in z.items() if k.startswith(("params/", "opt/"))}, "f",
                  "parameters are real float arrays")
    if not groups["params"]:
        raise bad("no parameters")
    names = sorted(groups["params"])
    if ("opt_t" in z) != bool(groups["opt"]) or (groups["opt"] and sorted(groups["opt"]) != sorted(
            [f"m/{k}" for k in names] + [f"v/{k}" for k in names])):
        raise bad("its optimiser state does not name one moment of each kind per parameter")
    step, history = int(z["step"]), {k[len("history/"):]: list(z[k]) for k in _HISTORY}
    if len(history["train_loss"]) != step or len(history["test_step"]) != len(history["test_loss"]):
        raise bad(f"its history holds {len(history['train_loss'])} training losses at step {step}")
    perm, pos = z["perm"], int(z["pos"])
    if not numpy.array_equal(numpy.sort(perm), numpy.arange(len(perm))) or not 0 <= pos <= len(perm):
        raise bad(f"its minibatch order is not a permutation of {len(perm)} indices with position {pos} in it")
    try:  # any JSON: out-of-range, wrong-typed or too deep values are refused, never a traceback
        state = json.loads(str(z["rng"]))
        if not all(type(v) is int for v in (state["state"]["state"], state["state"]["inc"],
                                             state["has_uint32"], state["uinteger"])):
            raise TypeError  # the generator would take 1.5 or true for 1
        rng = numpy.random.default_rng()
        rng.bit_generator.state = state
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as e:
        raise bad(f"its generator state cannot be restored: {type(e).__name__}") from None
    opt = (dict(unflatten({k: move(v) for k, v in groups["opt"].items()}), t=int(z["opt_t"]))
           if "opt_t" in z else None)
    params = unflatten({k: move(v) for k, v in groups["params"].items()})
    return step, params, opt, rng, perm, pos, history, str(z["settings"])


# ----------------------------------------------------------------------------- run folders

RUN_FILES = ("config.json", "checkpoint.npz", "params.npz", "metrics.npz")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.,=+-]*")


def run_folder(runs_dir, name):
    """runs_dir/name, where name must be one plain folder name and runs_dir/name not a symbolic
    link, so that a run reads, writes (and replaces) files inside runs_dir only. runs_dir itself
    may be a link or lie under one; a sweep point, run_folder(base, sub) with base =
    run_folder(runs_dir, name), is refused if either level is a link."""
    if not isinstance(runs_dir, str) or not runs_dir:
        raise ValueError(f"runs_dir must name a folder, got {runs_dir!r}")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"run name {name!r} must be one plain folder name: letters, digits and "
                         f"_ . , = + -, not starting with '.' or '-'")
    _not_a_link(os.path.join(runs_dir, name))
    return os.path.join(runs_dir, name)


def _not_a_link(run_dir):
    if os.path.islink(run_dir):
        raise ValueError(f"the run folder {run_dir} is a symbolic link; expected a folder (nothing is "
                         f"read or written through a link)")


def make_folder(run_dir):
    """Create run_dir (and its parents); ValueError if it cannot hold a run's files or is a
    symbolic link (never created or written through)."""
    if not run_dir or not os.path.basename(os.path.normpath(run_dir)):
        raise ValueError(f"the run folder {run_dir!r} needs a name; expected a writable folder")
    _not_a_link(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the run folder {run_dir} ({e.strerror or e}); "
                         f"expected a writable folder") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ValueError(f"the run folder {run_dir} is not writable; expected a writable folder")


def prepare_folder(run_dir):
    """Create run_dir; ValueError if it cannot hold a run's files (a bad --runs_dir or name, a
    result path that is a folder or a link, an earlier start's files set aside)."""
    make_folder(run_dir)
    for f in RUN_FILES:
        check_regular(os.path.join(run_dir, f), "a run's file")
    if os.path.lexists(os.path.join(run_dir, ".replaced")):
        raise ValueError(f"{os.path.join(run_dir, '.replaced')} holds an earlier run's files, set "
                         f"aside by an interrupted start; move them back or delete the folder")


TEMPORARY = re.compile(r"\..+\.\w{8}\.tmp")  # atomic_write's mkstemp names: .NAME.XXXXXXXX.tmp


def remove_temporaries(run_dir):
    """Remove the temporary files that atomic_write leaves in run_dir when its process is
    killed between creating and renaming one (kill -9, a power cut); a link under such a name
    is removed itself, never its target, and folders are left alone. Returns the names removed.
    Only while holding run_dir's lock (locked calls it), when no writer can be at work there."""
    removed = []
    try:
        for name in sorted(os.listdir(run_dir)):
            path = os.path.join(run_dir, name)
            if TEMPORARY.fullmatch(name) and not stat.S_ISDIR(os.lstat(path).st_mode):
                os.remove(path)
                removed.append(name)
    except OSError as e:
        raise FileFault(f"cannot remove stale temporary files in {run_dir}: {e.strerror or e}") from None
    return removed


def fresh_stage(run_dir):
    """An empty run_dir/.fresh, made by this process, where a fresh run writes until its first
    checkpoint (an earlier start's stage is removed; a link there is refused, never followed)."""
    stage = os.path.join(run_dir, ".fresh")
    if os.path.islink(stage) or (os.path.lexists(stage) and not os.path.isdir(stage)):
        raise ValueError(f"{stage} is not a folder made by icar (a link or a file); remove it")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        os.mkdir(stage)
    except OSError as e:
        raise FileFault(f"cannot create {stage}: {e.strerror or e}") from None
    return stage


def replace_run(stage, run_dir):
    """Move a fresh run's files from stage into run_dir, in place of an earlier run's. The
    earlier files are first renamed into run_dir/.replaced (made here: never an existing
    folder or link), then removed: an interruption in between leaves every file on disk
    (prepare_folder then says where)."""
    aside = os.path.join(run_dir, ".replaced")
    try:
        os.mkdir(aside)
        for f in RUN_FILES:
            if os.path.lexists(os.path.join(run_dir, f)):
                os.replace(os.path.join(run_dir, f), os.path.join(aside, f))
        for f in os.listdir(stage):
            os.replace(os.path.join(stage, f), os.path.join(run_dir, f))
        os.rmdir(stage)
        shutil.rmtree(aside)
    except OSError as e:
        raise FileFault(f"cannot move the new run into {run_dir}: {e.strerror or e}") from None


_HELD = set()  # real paths of the folders this process holds locked


def _holder(path):
    """' (pid N)' of the process holding path's flock, from /proc/locks (Linux), else ''."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "FLOCK" in parts and parts[5].rsplit(":", 1)[-1] == str(inode):
                    return f" (pid {parts[4]})"
    except (OSError, IndexError):
        pass
    return ""


@contextlib.contextmanager
def locked(run_dir, wait=False, hint="use another --name"):
    """Hold run_dir's lock while the block runs: one process per run folder. The lock is an
    flock on run_dir/.lock, taken before anything in the folder is read or written and
    released by the kernel when its holder dies (kill -9 leaves no stale lock); a process
    may take it again inside the block. ValueError (exit status 2) naming the folder and the
    holder's pid if another process holds it, and on a file system that does not enforce
    flock (some NFS mounts), where two processes could not be kept apart. Taking it removes the
    temporary files an earlier holder left (remove_temporaries); a run_dir that is a link is
    refused (make_folder). wait=True waits for another holder instead (a step of
    milliseconds, such as figures.py's read-merge-write of its summary). hint: what the
    refusal suggests, in the words of the command that asks (its own options)."""
    make_folder(run_dir)
    key = os.path.realpath(run_dir)
    if key in _HELD:  # taken again inside the block that holds it
        yield
        return
    path = os.path.join(run_dir, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        raise ValueError(f"cannot open the lock {path} ({e.strerror or e}); it must be a regular "
                         f"file made by icar") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"the lock {path} is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise ValueError(f"{run_dir} is in use by another process{_holder(path)}; wait for it "
                             f"to end or {hint}") from None
        except OSError as e:  # no locks at all on this file system (ENOLCK on some NFS mounts)
            raise ValueError(f"cannot lock {run_dir} ({e.strerror or e}); use a local folder") from None
        probe = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        try:  # a second open file must be refused: else flock does nothing on this file system
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            raise ValueError(f"the file system of {run_dir} does not enforce file locks (flock), so "
                             f"two processes could not be kept apart; use a local folder")
        except BlockingIOError:
            pass
        finally:
            os.close(probe)
        remove_temporaries(run_dir)  # an earlier holder's, killed mid-write: no writer is left
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)  # releases the lock


# ----------------------------------------------------------------------------- command lines

def say(line):
    """Write one line to stderr. A reader that has gone away (a closed pipe, a closed stream)
    silences it for the rest of the process instead of stopping the command: progress and
    error lines are reports, never the reason a job fails or stops early."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):  # BrokenPipeError is an OSError
        _silence_stderr()


def _silence_stderr():
    """stderr to /dev/null from now on (file descriptor 2 too, for the interpreter's own writes)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    except OSError:
        pass
    sys.stderr = open(os.devnull, "w")


class Progress:
    """One updating line on a terminal, plain periodic lines otherwise, nothing when quiet."""

    def __init__(self, total, quiet, stream=None):
        self.total, self.quiet, self.stream = total, quiet, stream
        try:
            self.tty = (sys.stderr if stream is None else stream).isatty()
        except (AttributeError, ValueError, OSError):  # a closed stream
            self.tty = False
        self.first = None  # (step, time) of the first report: rates exclude start-up

    def show(self, step, train, test, final=False):
        if self.quiet:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = (step, now)
        done, elapsed = step - self.first[0], now - self.first[1]
        line = f"step {step}/{self.total}  train {train:.4g}  test {test:.4g}"
        if done > 0 and elapsed > 0:  # no rate before a second report
            rate = done / elapsed
            line += f"  {rate:.1f} steps/s  left {(self.total - step) / rate:.0f} s"
        stream = sys.stderr if self.stream is None else self.stream
        try:
            stream.write("\r" + line.ljust(78) + ("\n" if final else "") if self.tty else line + "\n")
            stream.flush()
        except (OSError, ValueError, AttributeError):  # its reader went away: no more progress
            self.quiet = True
            if self.stream is None:
                _silence_stderr()
class Parser(argparse.ArgumentParser):
    """argparse whose bad argument raises ValueError, which one_line_errors prints as one line
    with exit status 2."""

    def error(self, message):
        raise ValueError(message)


class Once(argparse.Action):
    """Store an option's value (a flag's: True), refusing a second occurrence (a typo, not an
    override). Unset options stay None."""

    def __init__(self, option_strings, dest, flag=False, **kwargs):
        super().__init__(option_strings, dest, nargs=0 if flag else None, default=None, **kwargs)
        self.flag = flag

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            raise ValueError(f"option {option_string} is given twice; give each option once")
        setattr(namespace, self.dest, True if self.flag else values)


class SweepIncomplete(Exception):
    """Points of a sweep that failed or have no finished run: `lines` (one per point) and
    `table`, the summary of the finished ones (None if none was summarised). Exit status 1."""

    def __init__(self, lines, table=None):
        super().__init__("; ".join(lines))
        self.lines, self.table = lines, table


INTERRUPTED = "every file already written is intact"


def one_line_errors(prefix, command, interrupted=INTERRUPTED):
    """command() -> exit status, with every error one line on stderr after prefix: 2 for a bad
    argument (ValueError), 1 for a ValueError whose class says `exit_status = 1` (a diverged
    run: the settings were valid), failed sweep points or a fault of the machine or of a
    file, 128 + the signal's number for an interruption (130 for Ctrl-C; the line ends with
    `interrupted`, what the command left, unless the interruption says it). The command lines
    of train, sweep, bench, figures and verdicts."""
    try:
        return command()
    except BrokenPipeError:  # the reader of stdout went away: run_command ends quietly
        raise
    except SweepIncomplete as e:
        if e.table is not None:
            print(e.table)
        for line in e.lines:
            say(f"{prefix}: {line}")
        return 1
    except ValueError as e:
        say(f"{prefix}: {e}")
        return getattr(e, "exit_status", 2)
    except (FileFault, OSError, MemoryError) as e:
        say(f"{prefix}: {fault_line(e)}")
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (run_command's handlers)
        signum = getattr(e, "signum", signal.SIGINT)
        why = e.args[0] if e.args else interrupted
        say(f"{prefix}: interrupted by {signal.Signals(signum).name}; {why}")
        return 128 + signum


def fault_line(e):
    """One line for a fault of the machine or of a file."""
    if isinstance(e, MemoryError):
        return "out of memory: try fewer sequences (n_train, n_test, batch) or a smaller model"
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (`signum`), handled as Ctrl-C is: one line, exit status 128 + signum."""

    def __init__(self, signum, *args):
        super().__init__(*args)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C, SIGTERM and SIGHUP that arrive while the block runs take effect when it ends,
    through the handlers that were in place: a step that must not be cut in two, such as
    moving a fresh run's files and recording that they moved. Python runs signal handlers in
    the main thread whichever thread the signal reaches, so the handlers are swapped for
    recorders there; in another thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    held = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
            for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        if caught:  # delivered now, as if it had come at this line
            handler = held[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


def run_command(main):
    """sys.exit(main()), with SIGTERM and SIGHUP (a scheduler, a closed terminal) raising
    Stopped like Ctrl-C, and quietly when the reader of standard output goes away first
    (`python train.py --help | head`)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # after the scripts' start-up handlers
    try:
        status = main()
        if sys.stdout is not None:  # None: started with standard output closed
            sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # for the flush at exit
        status = 0
    sys.exit(status)

# ----------------------------------------------------------------------------- process

def tune_allocator():
    """Let glibc's malloc keep freed memory for the next step; True where it took effect.

    By default glibc serves blocks over 128 kB with fresh pages from the system (raising
    that threshold only after freeing such a block) and returns freed memory at the top of
    its heap, so each training step pays page faults on its temporaries: a fresh process
    runs the pe-only step about twice as slowly. Up to 32 MB blocks come from the heap and
    up to 1 GB of freed memory is kept after this call. Elsewhere (no glibc) it does nothing.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                  # glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def set_blas_threads(k):
    """Set the number of threads of the OpenBLAS that NumPy calls; return the previous number,
    or None where none is found (another BLAS, or no /proc/self/maps).

    fused.transformer runs batch slices in its own threads (THREADS); OpenBLAS threading each of
    their small products as well puts more threads than cores to work, and on a machine
    with other load a threaded product waits for its descheduled helper: steps then take
    2-3 times longer at random. The benchmark times every workload with one BLAS thread.
    """
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1].lower()})
    except OSError:
        return None
    for path in paths:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{name}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{name}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    previous = get()
                    put(k)
                    return previous
    return None


def set_up_process():
    """What the command lines do before training: one BLAS thread (transformer runs batch
    slices in THREADS threads of its own; BLAS threads on top of them oversubscribe the
    cores, and a step then takes 2-3 times longer at random) and glibc's allocator keeping
    freed memory between steps (tune_allocator). Both change this process only."""
    set_blas_threads(1)
    tune_allocator()
