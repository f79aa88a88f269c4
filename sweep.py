"""sweep: one training run per point of a grid of settings, and the summary table.

    python sweep.py EXPERIMENT --sweep KEY=V1,V2,... [--sweep ...] [train.py's options]
                    [--jobs N | --cluster slurm|local [--slurm KEY=VALUE ...]] [--list] [--summary]

One run of train.py per point of the product grid, in runs/NAME/KEY=V,.../ (NAME: the
experiment unless --name), then a summary table printed and saved as runs/NAME/summary.json.
The sweeps of paper.md:
    python sweep.py augmented --sweep layers=1,2,3,4 --sweep attention=linear,softmax --sweep sigma=0,0.1
    python sweep.py nonaug --sweep heads=1,2,4,8,16,32,64 --sweep attention=linear,softmax --sweep sigma=0,0.1
    python sweep.py pe-only --sweep mu=50,100,200,300                        (Fig. 6)
The augmented summary puts each depth L next to k = L steps of GD with the optimal step.
`--jobs N` runs the points in N processes; `--list` prints one train.py command per point (for
a cluster) and runs nothing; `--summary` rebuilds the summary from the points' folders;
`--cluster slurm` submits each point as a SLURM job through submitit (requirements-cluster.txt;
`--slurm time=MINUTES`, repeatable: its sbatch settings) and waits for them, `--cluster local`
runs the same jobs on this machine.
Every point is checked before the first starts. A point that fails does not stop the others;
the sweep then exits 1 naming it. summary.json records the grid and the fixed settings: a
sweep of another grid or other settings under the same --name is refused before it trains
(another --name, or delete that summary.json). A sweep holds runs/NAME's lock, and reads each
point back under the point's lock and its metrics checked, before it writes summary.json.
"""
if __name__ == "__main__":  # a signal while the modules load: one line, nothing written (then run_command's handlers)
    import os as _os, signal as _signal
    for _s in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
        _signal.signal(_s, lambda n, _: (_os.write(2, f"sweep.py: interrupted by {_signal.Signals(n).name} while starting; nothing was written\n".encode()), _os._exit(128 + n)))
import contextlib
import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time

import numpy

import fused
import icar
import runs
import train
from runs import SweepIncomplete

CLUSTERS = ("slurm", "local")
# submitit's SLURM settings that --slurm may not set: lists, or more than one task per point
SLURM_OWN = {"setup", "teardown", "srun_args", "additional_parameters", "nodes", "ntasks_per_node"}


def _plan(experiment, grid, preset, runs_dir, name, overrides):
    """Check every point of the product grid {option: [values]} (settings, and the model built
    once on two sequences) before anything runs; return (folder of the sweep, [(point name
    K=V,..., point settings)])."""
    if not grid:
        raise ValueError("sweep needs at least one option with values")
    clash = set(grid) & set(overrides)
    if clash:
        raise ValueError(f"option(s) {sorted(clash)} are both swept and fixed; give each once")
    keys = list(grid)
    for k in keys:
        values = [train.config(experiment, preset, **overrides, **{k: v})[k] for v in grid[k]]
        if not values or len(set(values)) < len(values):
            raise ValueError(f"--sweep {k} needs distinct values, got {list(grid[k])}")
    points = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    base = runs.run_folder(runs_dir, experiment if name is None else name)
    plan = [(",".join(f"{k}={v}" for k, v in point.items()), point) for point in points]
    for sub, point in plan:
        runs.run_folder(base, sub)
        train.check_run(experiment, train.config(experiment, preset, **overrides, **point))
    runs.check_regular(os.path.join(base, "summary.json"), "a sweep's summary.json")  # before hours of training
    return base, plan


def _record(experiment, grid, preset, overrides):
    """What summary.json records of a sweep beside its rows: the grid {option: [values]} and
    the fixed settings (every result setting that is not swept, with the experiment and the
    preset), as JSON gives them back."""
    cfg = train.config(experiment, preset, **overrides)
    fixed = {k: v for k, v in cfg.items() if k not in grid and k not in train.NOT_RESULT}
    return json.loads(json.dumps({"grid": grid, "settings": dict(fixed, experiment=experiment, preset=preset)}))


def _show(grid, settings, keys=()):
    """A sweep as its command line says it: EXPERIMENT --sweep K=V1,V2 ... [with K=V, ...] (keys:
    the settings to show)."""
    words = [settings["experiment"]] if "experiment" in settings else []
    words += [f"--sweep {k}={','.join(map(str, v))}" for k, v in grid.items()]
    keys = [k for k in keys if k != "experiment"]
    if keys:
        words.append("with " + ", ".join(f"{k}={settings[k]}" if k in settings else f"no {k}" for k in keys))
    return " ".join(words)


def _check_summary(base, record):
    """ValueError (exit status 2) unless base/summary.json is absent or summarises the sweep
    `record` (_record: the same grid and fixed settings: a rerun, --resume, --summary), so that
    two sweeps of other grids under one --name never overwrite each other's summary; FileFault
    if it is not a sweep's summary. Reads only."""
    path = os.path.join(base, "summary.json")
    if not os.path.lexists(path):
        return
    saved = runs.load_json(path, "a sweep's summary.json")
    if (not isinstance(saved, dict) or not isinstance(saved.get("grid"), dict)
            or not all(isinstance(v, list) for v in saved["grid"].values())
            or not isinstance(saved.get("settings", {}), dict)):
        raise runs.FileFault(f"{path}: not a sweep's summary (a JSON object with a 'grid' of value lists); "
                             f"delete it to summarise this sweep there")
    # a summary written before settings were recorded is checked on its grid alone
    other = train.changed_settings(saved["settings"], record["settings"]) if "settings" in saved else []
    if saved["grid"] != record["grid"] or other:
        raise ValueError(f"{path} summarises another sweep ({_show(saved['grid'], saved.get('settings', {}), other)}), "
                         f"not this one ({_show(record['grid'], record['settings'], other)}); use another --name "
                         f"for this sweep or delete {path}")


def _summarize(experiment, record, base, results):
    """Write base/summary.json of the finished points' results (every metric read checked
    first: nothing is written if one is bad); return the printable table. The caller holds
    base's lock."""
    rows = [_summary_row(experiment, r, list(record["grid"])) for r in results]
    runs.save_json(os.path.join(base, "summary.json"), dict(record, rows=rows))
    columns = list(dict.fromkeys(c for row in rows for c in row))  # gd_k=L only where L <= gd_steps
    return "\n".join(["  ".join(f"{c:>14}" for c in columns)] +
                     ["  ".join(f"{train.fmt(row.get(c, '')):>14}" for c in columns) for row in rows])


def _read_point(experiment, preset, base, sub, point, overrides):
    """(result, None) of a point's finished run of the sweep's settings, read under the point's
    lock, so that a run being written by another process is never read half-written
    (ValueError naming the point and the holder, exit status 2); or (None, a line saying why
    there is none). A point folder that does not exist is not created."""
    folder = runs.run_folder(base, sub)
    if not os.path.isdir(folder):
        return None, f"point {sub} has no finished run: no folder {folder}"
    try:
        with runs.locked(folder):
            result = runs.load_run(folder)
    except ValueError as e:  # held by another process, or no working locks there
        raise ValueError(f"point {sub}: {e}") from None
    except runs.FileFault as e:
        return None, f"point {sub} has no finished run: {e}"
    want = dict(train.config(experiment, preset, **overrides, **point), experiment=experiment, preset=preset)
    other = train.changed_settings(result["config"], want)
    if other:
        return None, f"point {sub}: {folder} holds a run of other settings {other}"
    return result, None


def _watch_parent(parent):
    """Exit this worker at once when its parent process is gone (killed with -9: nothing
    else would stop it)."""
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def _point(experiment, preset, base, sub, resume, overrides):
    """One sweep point in a process of its own (a worker, a cluster job), with one BLAS
    thread: None, or the failure as one line (the other points go on)."""
    runs.set_up_process()
    try:
        train.run(experiment, preset, base, sub, resume, True, **overrides)
        return None
    except (ValueError, runs.FileFault, OSError, MemoryError) as e:
        return runs.fault_line(e)


def _run_point(conn, parent, experiment, preset, base, sub, resume, threads, overrides):
    """One sweep point in a worker process that shares the machine's cores with the others:
    `threads` threads of its own (fused.THREADS). Sends _point's answer through conn."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    fused.THREADS = threads
    conn.send(_point(experiment, preset, base, sub, resume, overrides))


def sweep(experiment, grid, preset="quick", runs_dir="runs", name=None, resume=False, quiet=False,
          jobs=1, cluster=None, slurm=None, **overrides):
    """One run per point of the product of grid {option: [values]}, in runs_dir/name/K=V,.../,
    in this process (jobs=1), in `jobs` worker processes, each with cores // jobs threads, or
    as one submitit job per point (cluster "slurm", with the sbatch settings `slurm` {key:
    value}, or "local": the same jobs on this machine).

    Returns (results, table): the list of run results, read back from disk whichever way they
    ran, and the summary text (also saved as summary.json next to the runs). Every point is
    checked before the first starts (ValueError). A point that fails (Diverged, a full disk)
    does not stop the others: once all ran, the finished ones are summarised and
    SweepIncomplete names the failed ones. A summary.json already there of another grid or
    other fixed settings is refused (ValueError) before any file is made; RUNS/NAME's lock is
    held from that check to the summary's write, and each point is read back under its own
    lock (ValueError naming the holder if another process has it); a metric the summary reads
    that is missing, misshapen or not finite is a FileFault, with no summary written.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= train.MAX_INT:
        raise ValueError(f"jobs must be a whole number >= 1, got {jobs!r}")
    if cluster is not None:
        _check_cluster(cluster, slurm or {}, jobs)
    base, plan = _plan(experiment, grid, preset, runs_dir, name, overrides)
    record = _record(experiment, grid, preset, overrides)
    _check_summary(base, record)  # another sweep's summary there: refused before any file is made
    # one sweep process at a time under RUNS/NAME: its summary.json is checked, then written, by
    # one; the points are folders of their own, each locked by the process that trains it (this
    # one, a worker or a job), so holding base's lock meanwhile blocks none of them
    try:
        with runs.locked(base):
            _check_summary(base, record)
            failed = _run_points(experiment, preset, base, plan, resume, quiet, jobs, cluster, slurm, overrides)
            lines = [f"point {sub} failed: {why}" for sub, why in failed.items()]
            results = []
            for sub, point in plan:  # read back under each point's lock, whichever way it ran
                if sub not in failed:
                    result, why = _read_point(experiment, preset, base, sub, point, overrides)
                    results += [result] if why is None else []
                    lines += [] if why is None else [why]
            table = _summarize(experiment, record, base, results) if results else None
    except KeyboardInterrupt as e:  # between points, or before the first: said in the sweep's options
        e.args = e.args or (f"every file already written is intact; {_RERUN}",)
        raise
    if lines:
        raise SweepIncomplete(lines, table)
    return results, table


def _run_points(experiment, preset, base, plan, resume, quiet, jobs, cluster, slurm, overrides):
    """Train the points of plan as `sweep` says (this process, workers or cluster jobs);
    return {point: failure line}."""
    for sub, _ in plan:
        runs.prepare_folder(runs.run_folder(base, sub))
    # --resume continues the points with a checkpoint; the others (never started) start afresh
    resumes = {sub: resume and os.path.exists(os.path.join(base, sub, "checkpoint.npz")) for sub, _ in plan}
    if cluster is not None:
        return _run_on_cluster(experiment, preset, base, plan, resumes, quiet, cluster, slurm or {}, overrides)
    if jobs > 1:
        return _run_in_workers(experiment, preset, base, plan, resumes, quiet, jobs, overrides)
    failed = {}
    for sub, point in plan:
        if not quiet:
            runs.say(f"-- {experiment} {sub}")
        try:
            train.run(experiment, preset, base, sub, resumes[sub], quiet, **overrides, **point)
        except (ValueError, runs.FileFault, OSError, MemoryError) as e:
            failed[sub] = runs.fault_line(e)
        except KeyboardInterrupt as e:  # what is on disk, in the sweep's options
            e.args = (f"point {sub}: {_TRAIN_HINT.sub('', e.args[0]) if e.args else 'stopped'}; {_RERUN}",)
            raise
    return failed


# an interrupted point's line from train.run, whose hint names train.py's command
_TRAIN_HINT = re.compile(r" \(python train\.py \.\.\. --resume continues (it|them)\)")
_RERUN = "the same sweep.py command with --resume continues its points from their last checkpoints"


def _run_in_workers(experiment, preset, base, plan, resumes, quiet, jobs, overrides):
    """Run the points of plan in `jobs` spawned processes, at most `jobs` at a time, with one
    progress line per point started and finished; return {point: failure line}. If this
    process is interrupted (Ctrl-C, SIGTERM), its workers are stopped before it exits; if it
    is killed, each worker notices within 0.2 s and exits (_watch_parent)."""
    workers = min(jobs, len(plan))
    threads = max(1, fused.cores() // workers)
    say = (lambda line: None) if quiet else runs.say
    failed, running, todo = {}, {}, list(plan)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads
    try:
        while todo or running:
            while todo and len(running) < workers:
                sub, point = todo.pop(0)
                say(f"-- {experiment} {sub}: started (threads={threads})")
                receive, send = context.Pipe(duplex=False)
                worker = context.Process(target=_run_point, args=(
                    send, os.getpid(), experiment, preset, base, sub, resumes[sub], threads, {**overrides, **point}))
                worker.start()
                send.close()
                running[worker.sentinel] = (worker, receive, sub, time.perf_counter())
            for sentinel in multiprocessing.connection.wait(list(running)):
                worker, receive, sub, t0 = running.pop(sentinel)
                worker.join()
                try:
                    why = receive.recv()
                except EOFError:  # killed, out of memory: it sent nothing
                    why = f"its worker process stopped (exit status {worker.exitcode})"
                receive.close()
                if why is not None:
                    failed[sub] = why
                say(f"-- {experiment} {sub}: {'failed' if why else 'finished'} "
                    f"({time.perf_counter() - t0:.1f} s)")
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: said in the sweep's options
        e.args = (f"its worker processes are stopped; every finished point and checkpoint is intact; {_RERUN}",)
        raise
    finally:  # interrupted: no worker outlives this process
        for worker, *_ in running.values():
            worker.terminate()
        for worker, receive, *_ in running.values():
            worker.join(5)
            if worker.is_alive():
                worker.kill()
            receive.close()
    return failed


def _check_cluster(cluster, slurm, jobs):
    """ValueError unless submitit can submit to `cluster` with the sbatch settings {key: value}."""
    icar.check_choice("cluster", cluster, CLUSTERS)
    if jobs != 1:
        raise ValueError("--cluster runs one job per point, so --jobs has no use with it; give one of them")
    try:
        import submitit
    except ImportError:
        raise ValueError(f"--cluster {cluster} needs submitit: pip install -r requirements-cluster.txt") from None
    if cluster != "slurm":
        return
    allowed = sorted(submitit.SlurmExecutor._valid_parameters() - SLURM_OWN)
    for key in slurm:
        icar.check_choice("--slurm setting", key, allowed)
    if "time" not in slurm:
        raise ValueError("--cluster slurm needs --slurm time=MINUTES (submitit's default stops a job after 5)")
    if shutil.which("srun") is None:
        raise ValueError("--cluster slurm needs SLURM (no srun on PATH here); run it where sbatch works, "
                         "or use --cluster local")


@contextlib.contextmanager
def _environment(**values):
    """os.environ with `values` set (None: unset) inside the block, as it was after it."""
    before = {k: os.environ.get(k) for k in values}
    def put(items):
        for k, v in items.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    put(values)
    try:
        yield
    finally:
        put(before)


@contextlib.contextmanager
def _stderr_to(path):
    """Standard error (file descriptor 2, what a process started inside inherits) appended to
    `path` inside the block (None: as it is): a local job's controller writes its lines, and a
    traceback when cancelled, there rather than on the terminal."""
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stderr.flush()
    saved, log = os.dup(2), os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    try:
        os.dup2(log, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(log)


def _run_on_cluster(experiment, preset, base, plan, resumes, quiet, cluster, slurm, overrides):
    """Run the points of plan as submitit jobs (one job array on SLURM), each _point in a
    process of its own, its logs in base/.submitit; wait for them all and return {point:
    failure line}. Interrupted, it leaves SLURM jobs running and stops local ones (SIGINT)."""
    import submitit
    here, folder = os.path.dirname(os.path.abspath(__file__)), os.path.join(base, ".submitit")
    say = (lambda line: None) if quiet else runs.say
    executor = submitit.AutoExecutor(folder, cluster=cluster)
    # a job imports train: PYTHONPATH starts with this folder, set in the job script on SLURM and
    # in the environment a local job inherits (no shell between the job and cancel's SIGINT)
    if cluster == "slurm":
        own = {f"slurm_{k}": v for k, v in slurm.items()}
        own["slurm_setup"] = [f"export PYTHONPATH={shlex.quote(here)}${{PYTHONPATH:+:$PYTHONPATH}}"]
    else:
        own = {"timeout_min": 7 * 24 * 60}  # submitit stops a local job after 2 minutes by default
    executor.update_parameters(name=os.path.basename(base), **own)
    path = here + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    with _environment(PYTHONPATH=path if cluster == "local" else os.environ.get("PYTHONPATH")), \
            _stderr_to(os.path.join(folder, "local-jobs.log") if cluster == "local" else None):
        with executor.batch():
            jobs = [(sub, executor.submit(_point, experiment, preset, os.path.abspath(base), sub, resumes[sub],
                                          {**overrides, **point})) for sub, point in plan]
    t0, subs, failed = time.perf_counter(), {job.job_id: sub for sub, job in jobs}, {}
    for sub, job in jobs:
        say(f"-- {experiment} {sub}: submitted (job {job.job_id})")
    try:
        for job in submitit.helpers.as_completed([job for _, job in jobs], poll_frequency=1):
            sub = subs[job.job_id]
            try:
                why = job.result()
            except submitit.core.utils.UncompletedJobError:  # killed, timed out: it returned nothing
                why = f"its job {job.job_id} ended without a result ({job.state}); log: {job.paths.stderr}"
            if why is not None:
                failed[sub] = why
            say(f"-- {experiment} {sub}: {'failed' if why else 'finished'} ({time.perf_counter() - t0:.1f} s)")
    except KeyboardInterrupt as e:
        if cluster == "local":  # jobs on this machine stop with the command that started them
            for _, job in jobs:  # SIGINT (submitit passes SIGTERM by): each keeps its last checkpoint
                job.cancel(check=False)
            e.args = (f"its local jobs are stopped, each with its last checkpoint (logs in {folder}); the "
                      f"same sweep.py command with --resume continues its points from their last checkpoints",)
        else:
            e.args = (f"the submitted jobs go on (logs in {folder}); once they end, --summary collects the "
                      f"sweep, or --resume reruns its unfinished points",)
        raise
    return failed


def summary(experiment, grid, preset="quick", runs_dir="runs", name=None, **overrides):
    """(results, table) of a sweep whose points ran elsewhere (sweep_commands), read from
    runs_dir/name/K=V,.../ without training; summary.json is written only when every point
    has a finished run of its settings, else SweepIncomplete names the others (no file touched)."""
    base, plan = _plan(experiment, grid, preset, runs_dir, name, overrides)
    record = _record(experiment, grid, preset, overrides)
    _check_summary(base, record)
    if not os.path.isdir(base):  # nothing ran here: no folder or lock file is made
        raise SweepIncomplete([f"point {sub} has no finished run: no folder {runs.run_folder(base, sub)}"
                               for sub, _ in plan])
    with runs.locked(base):  # as sweep: one process checks, then writes, summary.json
        _check_summary(base, record)
        results, missing = [], []
        for sub, point in plan:
            result, why = _read_point(experiment, preset, base, sub, point, overrides)
            results += [result] if why is None else []
            missing += [] if why is None else [why]
        if missing:
            raise SweepIncomplete(missing)
        return results, _summarize(experiment, record, base, results)


def sweep_commands(experiment, grid, preset="quick", runs_dir="runs", name=None, resume=False,
                   quiet=False, **overrides):
    """One shell command per point of the sweep (for a cluster's job array or GNU parallel),
    each a plain run writing runs_dir/name/K=V,.../ as `sweep` does, with absolute paths so
    that it runs from any folder. Checks every point, and the summary.json already there, as
    `sweep` does; writes nothing."""
    base, plan = _plan(experiment, grid, preset, runs_dir, name, overrides)
    _check_summary(base, _record(experiment, grid, preset, overrides))
    here = os.path.dirname(os.path.abspath(__file__))
    head = [sys.executable, os.path.join(here, "train.py"), experiment, "--preset", preset,
            "--runs_dir", os.path.abspath(base)]
    flags = ["--resume"] * resume + ["--quiet"] * quiet
    return [" ".join(shlex.quote(a) for a in head + ["--name", sub] + flags + [
        a for k, v in {**overrides, **point}.items() for a in (f"--{k}", str(v))])
        for sub, point in plan]


def _loss_positions(cfg, experiment):
    """The positions the training loss averages over."""
    if cfg["loss"] == "last":
        return slice(-1, None)
    return slice(train.EXPERIMENTS[experiment].first, None)


def _metric(result, key, shape, finite):
    """result's metrics[key] as an array, checked as the summary reads it: present, real
    numbers of `shape` (None: any length >= 1), finite at the index `finite` of its first
    axis; else FileFault naming metrics.npz and the entry (exit status 1: no summary is written)."""
    path, m = os.path.join(result["dir"], "metrics.npz"), result["metrics"]
    if key not in m:
        raise runs.FileFault(f"{path}: no entry {key!r}; expected a finished run's metrics")
    v = numpy.asarray(m[key])
    if v.dtype.kind not in "biuf" or v.ndim != len(shape) or any(
            n != want if want is not None else n < 1 for n, want in zip(v.shape, shape)):
        want = "[" + ", ".join("n >= 1" if n is None else str(n) for n in shape) + "]"
        why = f" (T = {result['config']['T']} in config.json)" if any(n is not None for n in shape) else ""
        raise runs.FileFault(f"{path}: entry {key!r} holds {v.dtype} of shape {list(v.shape)}; expected real "
                             f"numbers of shape {want}{why}")
    where = numpy.atleast_1d(numpy.arange(v.shape[0])[finite])
    bad = where[~numpy.isfinite(v[where])]
    if bad.size:
        raise runs.FileFault(f"{path}: entry {key!r} is {v[bad[0]]} at position {bad[0]}, which the summary "
                             f"reads; expected a finished run's finite losses")
    return v


def _summary_row(experiment, result, swept=()):
    """One row of the summary: the swept and model settings of a run and its losses, each
    metric it reads checked first (_metric: FileFault for a missing, misshapen or non-finite one)."""
    cfg = result["config"]
    row = {k: cfg[k] for k in (*swept, "layers", "heads", "attention", "sigma") if k in cfg}
    if experiment == train.POPULATION:
        row["loss"] = float(_metric(result, "train_loss", (None,), -1)[-1])
        return row
    at, T = _loss_positions(cfg, experiment), cfg["T"]
    row["test_loss"] = float(numpy.mean(_metric(result, "test_loss_position", (T,), at)[at]))
    if train.EXPERIMENTS[experiment].depth_vs_gd and cfg["layers"] <= cfg["gd_steps"]:  # baselines gd1..gd_steps
        row["gd_k=L"] = float(numpy.mean(_metric(result, f"baseline_gd{cfg['layers']}", (T,), at)[at]))
    row["gd1"] = float(numpy.mean(_metric(result, "baseline_gd1", (T,), at)[at]))
    row["least_squares"] = float(numpy.mean(_metric(result, "baseline_least_squares", (T,), at)[at]))
    return row


# ----------------------------------------------------------------------------- command line

def _grid(experiment, preset, specs):
    """{option: [values]} of the --sweep KEY=V1,V2,... specs, each value of the option's type."""
    cfg, grid = train.config(experiment, preset), {}
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"--sweep needs KEY=V1,V2,..., got {spec!r}")
        key, values = spec.split("=", 1)
        key = key.replace("-", "_")
        if key in grid:
            raise ValueError(f"--sweep {key} is given twice; give all its values in one --sweep")
        if key not in cfg:
            raise ValueError(f"unknown option --{key}; allowed: {', '.join('--' + k for k in cfg)}")
        kind = train.OPTIONS[key][0]
        try:
            grid[key] = [kind(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"--sweep {key} needs {kind.__name__} values, got {values!r}") from None
    return grid


def _slurm(specs):
    """{key: value} of the --slurm KEY=VALUE specs; a value of digits is a number (time=120)."""
    slurm = {}
    for spec in specs:
        key, _, value = spec.partition("=")
        if not key.isidentifier() or not value:
            raise ValueError(f"--slurm needs KEY=VALUE (time=120, partition=gpu), got {spec!r}")
        if key in slurm:
            raise ValueError(f"--slurm {key} is given twice; give each setting once")
        slurm[key] = int(value) if value.isdigit() else value
    return slurm


def main(argv=None):
    """Command line of a sweep; returns the exit status (2: bad arguments; 1: failed points)."""
    argv = sys.argv[1:] if argv is None else list(argv)

    def command():
        if not argv or argv[0] in ("-h", "--help"):
            if not argv:
                raise ValueError(f"name an experiment ({', '.join(train.COMMANDS)}); --help for more")
            print(__doc__.strip())
            return 0
        experiment, args = argv[0], argv[1:]
        p = train.parser(experiment, prog="python sweep.py")
        p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="one run per value; repeat for a product grid")
        p.add_argument("--jobs", type=int, action=runs.Once, help="run the points in N worker processes")
        p.add_argument("--cluster", action=runs.Once, metavar="slurm|local", help="submit each point as a job: slurm, or local (this machine)")
        p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                       help="an sbatch setting of --cluster slurm's jobs (time=MINUTES, partition=P, cpus_per_task=N)")
        p.add_argument("--list", action=runs.Once, flag=True, help="print one train.py command per point; run nothing")
        p.add_argument("--summary", action=runs.Once, flag=True, help="rebuild the summary from the points' folders")
        parsed = train.parse(args, p)
        if parsed is None:
            return 0
        flags, overrides, ns = parsed
        if "seeds" in flags:  # a grid over seed is --sweep seed=...; stacks are train.py's
            raise ValueError("--seeds trains one stack (python train.py EXPERIMENT --seeds ...); in a sweep "
                             "give --sweep seed=0,1,2")
        if not ns["sweep"]:
            raise ValueError("give --sweep KEY=V1,V2,... (one run: python train.py)")
        jobs, listing, summarise = ns["jobs"], bool(ns["list"]), bool(ns["summary"])
        cluster, slurm = ns["cluster"], _slurm(ns["slurm"])
        if slurm and cluster != "slurm":
            raise ValueError("--slurm sets the jobs of --cluster slurm; give both")
        given = {"list": listing, "summary": summarise, "jobs": jobs is not None, "resume": flags["resume"],
                 "cluster": cluster is not None}
        for a, b in (("list", "jobs"), ("list", "summary"), ("summary", "jobs"), ("summary", "resume"),
                     ("list", "cluster"), ("summary", "cluster")):
            if given[a] and given[b]:
                raise ValueError(f"--{a} runs no training, so --{b} has no use with it; give one of them")
        grid = _grid(experiment, flags["preset"], ns["sweep"])
        if listing:
            print("\n".join(sweep_commands(experiment, grid, **flags, **overrides)))
        elif summarise:
            del flags["resume"], flags["quiet"]
            print(summary(experiment, grid, **flags, **overrides)[1])
        else:
            runs.set_up_process()
            print(sweep(experiment, grid, jobs=1 if jobs is None else jobs, cluster=cluster, slurm=slurm,
                        **flags, **overrides)[1])
        return 0
    return runs.one_line_errors("sweep.py", command, "every file already written is intact (the same "
                                "sweep.py command with --resume continues from each point's last checkpoint)")


if __name__ == "__main__":
    runs.run_command(main)
