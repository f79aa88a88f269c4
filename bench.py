"""bench: the speed benchmark, a much shorter version of train.py: time one training step of
each paper-size workload.

    python bench.py [--repeats 5] [--micro 0] [--workloads nonaug,augmented,...] [--json FILE]
    python bench.py --device cupy [--out DIR]    the GPU check (below)
    python bench.py --device cupy --dry          the GPU check on gpu.py's CPU stand-in

Workloads (the authors' sizes, paper.md [code]):
    nonaug      M4 on raw tokens: batch 1024, 50 positions, d = 5 repeated twice (embed 10),
                64 heads, linear token scores times softmax positional scores, LayerNorm, no
                residual; Adam; float32 (--micro m: the gradient accumulated over slices of
                m sequences, as loss_and_grad_microbatched does)
    augmented   M4 on augmented tokens (size 15 = 3d): batch 1024, 50 positions, 1 head,
                linear attention, LayerNorm, residual; Adam; float32
    population  Fig. 3 right: GD on (A, B, P) through theory's population loss, d = 10,
                H = 8, T = 20, orthogonal family
    pe-only     Fig. 6: M3, T = 30, 1000 complex "angle" sequences (mu = 50), GD, lr 0.5,
                autograd through icar.pe_only
    pe-only-moments  the same GD steps through pe_only_objective (exact moments of the data)

For each: the median (and the minimum) over `repeats` timed steps after a warm-up step, the
peak of memory allocated during one step (tracemalloc, which NumPy reports its array buffers
to; BLAS work buffers are not included), the FLOP count of one step (below), the GFLOP/s it
implies, and that rate as a fraction of this machine's matrix-multiply rate in the same
precision, measured in the same process: the fastest of 15 products C = A @ B of [1024, 1024]
operands, with every BLAS thread and with one (the larger of the two is used: with other
processes on the machine, a threaded product can be the slower).

FLOP counts (transformer_flops, pe_only_flops, population_flops) count what the model
computes as written in its docstring, not what the code executes: a matrix product
[m, k] @ [k, p] costs 2mkp, an elementwise operation 1 per real entry (a complex product 6,
a complex-by-real product 2), and one training step (forward and backward) costs 3 times
the forward pass (each product's gradient takes two products of the same size). Masked
entries count as computed. fused.transformer, which training runs, executes fewer: see
transformer_flops(executed=True). pe-only-moments counts what it executes (2 T^3 + 10 T^2).

The process is set up as training should be: runs.tune_allocator() (glibc keeps freed memory
between steps) and runs.set_blas_threads(1) while the workloads run (fused.transformer runs
batch slices in fused.THREADS threads of its own); the output says which took effect.

The GPU check (`--device cupy`), run once on a machine with a CUDA GPU, CuPy and autograd
1.9.1 (`--dry`: anywhere, gpu.py's stand-in plays the GPU and the large size shrinks; it
checks this code and measures nothing):
  a. For each model (M1 full and block, M2, M3, M4 augmented and non-augmented, both as
     training runs it (fused.transformer) and plain (icar.transformer), the
     population loss of theory.py) on real and complex data: loss and gradients on the
     device, float64, must equal NumPy's to a relative 1e-10.
  b. One Adam step (value_and_grad + adam_update), float32, for the non-augmented M4 at a
     small size and at the authors' size (d = 5, T = 50, 64 heads, batch 1024): ms per step
     on the device and with NumPy on the CPU.
It prints a table, writes gpu_check.json into --out (default $OUT or the current folder),
and exits 1 if any comparison fails.
"""
if __name__ == "__main__":  # a signal while the modules load: one line, nothing written (then run_command's handlers)
    import os as _os, signal as _signal
    for _s in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
        _signal.signal(_s, lambda n, _: (_os.write(2, f"bench.py: interrupted by {_signal.Signals(n).name} while starting; nothing was written\n".encode()), _os._exit(128 + n)))
import datetime
import importlib.metadata
import os
import platform
import sys
import time
import tracemalloc

import numpy
from autograd import grad, value_and_grad

import fused
import gpu
import icar
import runs
import theory
import train

PAPER_WORKLOADS = ("nonaug", "augmented", "population", "pe-only", "pe-only-moments")
# the quick scale (train.py's quick preset: T 20, d 5, batch 64, float64): nonaug L 2, H 8 and
# augmented L 1, as training steps them (a stack of 1, or of 8 members: ms per member), and
# through autograd on fused.transformer, the lone step before stacks (-autograd)
QUICK = {"quick-nonaug": ("nonaug", dict(layers=2, heads=8)), "quick-augmented": ("augmented", dict(layers=1))}
QUICK_WORKLOADS = tuple(f"{k}{v}" for k in QUICK for v in ("", "-x8", "-autograd"))
WORKLOADS = PAPER_WORKLOADS + QUICK_WORKLOADS
QUICK_STEPS = 20  # steps per timed call of a quick workload
TARGET_MS = {"nonaug": 1200.0, "augmented": 50.0, "population": 0.3, "pe-only": 0.5,
             "pe-only-moments": 0.5}


# ----------------------------------------------------------------------------- training step

def loss_and_grad_microbatched(loss_fn, params, batch, micro):
    """value_and_grad(loss_fn)(params, batch), computed over slices of at most `micro`
    sequences and combined with weights (slice size / batch size).

    loss_fn(params, s) must average over the first axis of s (as icar.mse does), so that
    the combination is the full-batch loss and gradient up to rounding; the memory the
    gradient takes is that of one slice.
    """
    micro = icar.check_int("micro", micro, 1)
    n = batch.shape[0]
    step = value_and_grad(loss_fn)
    if micro >= n:
        return step(params, batch)
    loss, grads = 0.0, None
    for start in range(0, n, micro):
        part = batch[start:start + micro]
        w = part.shape[0] / n                                   # Python float: keeps float32
        value, g = step(params, part)
        loss = loss + w * value
        grads = (train.tree_map(lambda g: w * g, g) if grads is None
                 else train.tree_map(lambda acc, g: acc + w * g, grads, g))
    return loss, grads


# ----------------------------------------------------------------------------- FLOP counts

def transformer_flops(cfg, n, T, executed=False):
    """FLOPs of one training step of M4 (icar.transformer) on n sequences of T tokens.

    Forward, per layer, as the docstring writes it (E = repeat * d_in, H heads):
        q, k, v          3 * 2 n T E (H E)
        q . k, a @ v     2 * 2 n H T^2 E
        a = scores*mask  n H T^2 (and n H T^2 more with positional weights)
        W_O              2 n T E^2 (after the sum over heads, n H T E)
        positional       2 * 2 T E (H E) + 2 H T^2 E (batch-independent)
    plus the read-out 2 n T E d_out; a step is 3 forward passes.
    executed=True counts fused.transformer's products instead: with z = (h, 1) of size D
    (d_in + 1 in the first layer, E + 1 after), z G [2 n T D H D], scores and a @ z
    [2 * 2 n H P D] over the P (query, key) pairs formed (T^2, or fewer with linear
    attention's causal blocks), and the output [2 n T (H D) E].
    """
    E, H = cfg["repeat"] * cfg["d_in"], cfg["heads"]
    pairs = (sum((r1 - r0) * r1 for r0, r1 in fused.causal_blocks(T)) if cfg["attention"] == "linear"
             else T * T)
    total = 0
    for layer in range(cfg["layers"]):
        if executed:
            D = (cfg["d_in"] if layer == 0 else E) + 1
            fwd = 2 * n * T * D * H * D + 4 * n * H * pairs * D + 2 * n * T * H * D * E
        else:
            fwd = 6 * n * T * E * H * E + 4 * n * H * T * T * E + 2 * n * T * E * E + n * H * T * E
        fwd += n * H * (pairs if executed else T * T) * (2 if cfg["positional"] else 1)
        if cfg["positional"]:
            fwd += 4 * T * E * H * E + 2 * H * T * T * E
        total += fwd
    total += 2 * n * T * E * cfg["d_out"]
    return 3 * total


def pe_only_flops(n, T, d, complex_data=True):
    """FLOPs of one GD step of icar.pe_only: the product (P * mask) s^2 [T, T] @ [T, n d]
    (2 T^2 n d real, twice that on complex data), the query product (n T d, 6 each on
    complex data) and the squared error (3 per real entry, 8 per complex one); 3 forward
    passes per step."""
    c = 2 if complex_data else 1
    fwd = c * 2 * T * T * n * d + ((6 if complex_data else 1) + (8 if complex_data else 3)) * n * T * d
    return 3 * fwd


def population_flops(d, H, T):
    """FLOPs of one GD step on theory's population loss with its hand-written gradient:
    C = B^T A and the gradients B G, A G^T (3 * 2 H d^2), about 17 operations per entry of
    [d, d] arrays (taus, G) and 22 per entry of [T, T] arrays (row sums, dL/dP, the update)."""
    return 6 * H * d * d + 17 * d * d + 22 * T * T


# ----------------------------------------------------------------------------- measurement

def matmul_rate(dtype, size=1024, repeats=15):
    """This machine's matrix-multiply rate (GFLOP/s): the fastest of `repeats` products
    [size, size] @ [size, size] in `dtype` after a warm-up one (the least disturbed by other
    processes: the rate the machine can reach)."""
    rng = numpy.random.default_rng(0)
    A, B = (rng.standard_normal((size, size)).astype(dtype) for _ in range(2))
    return 2 * size ** 3 / min(_times(lambda: A @ B, repeats)) / 1e9


def _times(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _peak_bytes(fn):
    """Peak bytes allocated (tracemalloc, NumPy buffers included) while fn runs."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _cast(params, dtype):
    return train.tree_map(lambda p: p.astype(dtype), params)


class _Trainer:
    """A training loop's state, advanced one step per call (parameters and optimiser move);
    loss_and_grad(params) -> (loss, grads)."""

    def __init__(self, loss_and_grad, params, opt, lr):
        self.loss_and_grad, self.params, self.lr = loss_and_grad, params, lr
        self.opt = train.adam_init(params) if opt == "adam" else None

    def __call__(self):
        loss, grads = self.loss_and_grad(self.params)
        if self.opt is None:
            self.params = train.gd_update(self.params, grads, self.lr)
        else:
            self.params, self.opt = train.adam_update(self.params, grads, self.opt, self.lr)
        return loss


def _on(s, loss, micro=None):
    """loss_and_grad(params) of loss(params, s), over micro-batches where micro is given."""
    if micro:
        return lambda params: loss_and_grad_microbatched(loss, params, s, micro)
    step = value_and_grad(loss)
    return lambda params: step(params, s)


def _transformer_workload(name, dtype, micro, rng):
    cfg = train.config(name, "paper")                            # the authors' M4 training
    d, T, n = cfg["d"], cfg["T"], cfg["batch"]
    s, _ = icar.sample_sequences(rng, n, T, d, cfg["family"], s1=cfg["s1"])
    s = s.astype(dtype)                                         # [n, T+1, d]
    params = _cast(train.init_model(name, cfg, rng), dtype)
    predict = train.predictor(name, cfg)

    def loss(params, s):
        return icar.mse(predict(params, s[:, :-1]), s[:, 1:])

    step = _Trainer(_on(s, loss, micro), params, cfg["optimizer"], cfg["lr"])
    mcfg = train.model_config(cfg, name)
    flops = transformer_flops(mcfg, n, T)
    notes = (f"batch {n}, T {T}, embed {mcfg['repeat'] * mcfg['d_in']}, {mcfg['heads']} heads, "
             f"Adam, {numpy.dtype(dtype).name}, micro-batch {micro or n}; executed "
             f"{transformer_flops(mcfg, n, T, executed=True) / 1e9:.2f} GFLOP/step")
    return step, flops, notes


class _QuickStack:
    """S quick-scale runs of train.py's stacked loop, advanced one step per call: each
    member's minibatch of its own data, the stack's loss and gradient (fused.stack_loss_and_grad,
    or autograd on fused.transformer for one member: the lone step before stacks), Adam."""

    def __init__(self, name, S, use_autograd, overrides):
        cfg = train.config(name, "quick", **overrides)
        self.cfg, self.mcfg, self.name = cfg, train.model_config(cfg, name), name
        members = [train.config(name, "quick", **overrides, seed=k) for k in range(S)]
        self.data = [train.datasets(m)[0] for m in members]                      # [n, T+1, d] each
        inits = [train.init_model(name, m, train._generators(m["seed"])[2]) for m in members]
        self.params = inits[0] if use_autograd else train._stack(inits, numpy)
        self.opt, self.i, self.batch = train.adam_init(self.params), 0, cfg["batch"]
        self.adam = None if use_autograd else train.FlatAdam()  # the training loop's Adam (the lone step's before)
        predict = train.predictor(name, cfg)
        self.lone = value_and_grad(lambda p, s: icar.mse(predict(p, s[:, :-1]), s[:, 1:])) if use_autograd else None

    def __call__(self):
        lo = (self.i * self.batch) % self.cfg["n_train"]
        self.i += 1
        batches = [s[lo:lo + self.batch] for s in self.data]
        if self.lone is not None:
            loss, grads = self.lone(self.params, batches[0])
        else:
            loss, grads = fused.stack_loss_and_grad(self.params, *train.stacked_batch(self.name, batches), self.mcfg)
        if self.adam is None:
            self.params, self.opt = train.adam_update(self.params, grads, self.opt, self.cfg["lr"])
        else:
            self.params, self.opt = self.adam.step(self.params, grads, self.opt, self.cfg["lr"])
        return loss


def _quick_workload(workload):
    """(step, members, FLOPs per step, notes) of a quick-scale workload (QUICK_WORKLOADS)."""
    base = next(k for k in QUICK if workload.startswith(k))
    name, overrides = QUICK[base]
    S, use_autograd = (8 if workload.endswith("-x8") else 1), workload.endswith("-autograd")
    stack = _QuickStack(name, S, use_autograd, overrides)
    cfg = stack.cfg

    def step():  # QUICK_STEPS steps a call: one step is too short to time alone
        for _ in range(QUICK_STEPS):
            stack()
    flops = S * transformer_flops(stack.mcfg, cfg["batch"], cfg["T"])
    notes = (f"{name} L {cfg['layers']}, H {cfg['heads']}, batch {cfg['batch']}, T {cfg['T']}, d {cfg['d']}, "
             f"float64, Adam, " + ("autograd on fused.transformer" if use_autograd else
                                   f"a stack of {S} (fused.stack_loss_and_grad)"))
    return step, S, flops, notes


def _population_workload(steps):
    cfg = train.config("population", "paper")                   # Fig. 3 right
    d, H, T = cfg["d"], cfg["heads"], cfg["T"]

    def run():
        theory.train_population(H, d, T, cfg["family"], cfg["lr"], steps, numpy.random.default_rng(0))
    return run, steps, population_flops(d, H, T), f"d {d}, H {H}, T {T}, {steps} GD steps per call"


def _pe_only_workload(rng, moments):
    cfg = train.config("pe-only")                               # Fig. 6
    T, n, lr = cfg["T"], cfg["n_train"], cfg["lr"]
    s, _ = icar.sample_sequences(rng, n, T, cfg["d"], cfg["family"], mu=cfg["mu"])  # complex128 [n, T+1, 1]
    params = train.init_model("pe-only", cfg, rng)
    if moments:  # executed FLOPs: M P (2 T^3) and about 10 operations per entry of P
        step = _Trainer(fused.pe_only_objective(s), params, "gd", lr)
        return step, 2 * T ** 3 + 10 * T ** 2, (f"{n} sequences, T {T}, GD lr {lr:g} on "
                                               f"pe_only_objective (moments computed once, untimed)")

    def loss(params, s):  # position 0 has no query
        return icar.mse(icar.pe_only(params, s[:, :-1])[:, 1:], s[:, 2:])

    step = _Trainer(_on(s, loss), params, "gd", lr)
    return step, pe_only_flops(n, T, 1), f"{n} sequences, T {T}, complex128, GD lr {lr:g}, autograd"


def run_benchmark(workloads=WORKLOADS, repeats=5, micro=0, dtype="float32", population_steps=2000,
                  tune=True, out=None):
    """Time each workload, printing a line each to `out` (default sys.stdout); return the
    results as a dict (see the module docstring)."""
    out = sys.stdout if out is None else out
    for w in workloads:
        icar.check_choice("workload", w, WORKLOADS)
    repeats, micro = icar.check_int("repeats", repeats, 1), icar.check_int("micro", micro, 0)
    load_before = os.getloadavg()
    tuned = runs.tune_allocator() if tune else False
    rates = {k: matmul_rate(k) for k in ("float32", "float64")}
    blas_threads = runs.set_blas_threads(1)                    # None: BLAS left as it is
    one_thread = ({k: matmul_rate(k) for k in ("float32", "float64")} if blas_threads is not None
                  else None)
    result = {"matmul_gflops": rates, "matmul_gflops_one_blas_thread": one_thread,
              "cpus": os.cpu_count(), "fused_threads": fused.THREADS, "numpy": numpy.__version__,
              "repeats": repeats, "allocator_tuned": tuned,
              "blas_threads": {"matmul": blas_threads, "workloads": 1 if blas_threads else None},
              "workloads": {}}
    print(f"matrix multiply: {rates['float32']:.1f} GFLOP/s float32, {rates['float64']:.1f} "
          f"float64 ({os.cpu_count()} CPUs"
          + (f"; one BLAS thread: {one_thread['float32']:.1f}, {one_thread['float64']:.1f}"
             if one_thread else "")
          + f"); load average {load_before[0]:.2f}; allocator {'tuned' if tuned else 'as is'}; "
          f"workloads with {fused.THREADS} fused threads and "
          f"{'1 BLAS thread' if blas_threads else 'BLAS threads as they are'}", file=out)
    rng = numpy.random.default_rng(0)
    for name in workloads:
        members = 1
        if name in QUICK_WORKLOADS:
            fn, members, flops, notes = _quick_workload(name)
            per_call, prec = QUICK_STEPS, "float64"
        elif name in ("nonaug", "augmented"):
            fn, flops, notes = _transformer_workload(name, dtype, micro, rng)
            per_call, prec = 1, dtype
        elif name == "population":
            fn, per_call, flops, notes = _population_workload(population_steps)
            prec = "float64"
        else:
            fn, flops, notes = _pe_only_workload(rng, moments=name == "pe-only-moments")
            per_call, prec = 1, "float64"
        times = numpy.asarray(_times(fn, repeats)) / per_call
        peak = _peak_bytes(fn)
        med = float(numpy.median(times))
        gflops = flops / med / 1e9
        best = max(rates[prec], one_thread[prec]) if one_thread else rates[prec]
        row = {"ms_per_step": 1e3 * med, "ms_min": 1e3 * float(times.min()),
               "target_ms": TARGET_MS.get(name), "meets_target": (1e3 * med <= TARGET_MS[name]) if name in TARGET_MS else None,
               "peak_MB": peak / 1e6, "gflop_per_step": flops / 1e9, "gflops": gflops,
               "fraction_of_matmul": gflops / best, "precision": prec, "notes": notes,
               "members": members, "ms_per_member": 1e3 * med / members}
        result["workloads"][name] = row
        target = TARGET_MS.get(name)
        print(f"{name:<24} {row['ms_per_step']:9.3f} ms/step (min {row['ms_min']:.3f}, "
              + (f"target {target:g})" if target else f"{row['ms_per_member']:.3f} per member)")
              + f"  peak {row['peak_MB']:8.1f} MB  {row['gflop_per_step']:9.4f} "
              f"GFLOP/step  {gflops:7.2f} GFLOP/s = {100 * row['fraction_of_matmul']:5.1f}% of "
              f"{prec} matmul  [{notes}]", file=out, flush=True)
    if blas_threads is not None:
        runs.set_blas_threads(blas_threads)
    result["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    print(f"load average after: {result['load_average']['after'][0]:.2f}", file=out)
    return result


# ----------------------------------------------------------------------------- the GPU check

TOL = 1e-10


def next_state_loss(model):
    return lambda params, s: icar.mse(model(params, s[:, :-1]), s[:, 1:])


def cases(rng):
    """name -> (params, s, loss(params, s)) with float64 NumPy arrays."""
    out = {}
    for family in ("haar", "unitary"):
        s, _ = icar.sample_sequences(rng, 16, 10, 4, family)
        M1 = next_state_loss(lambda p, s: icar.augmented_linear(p, icar.augment(s)))
        for form in ("full", "block"):
            p = icar.init_params("augmented_linear", rng, d=4, form=form, scale=0.3)
            out[f"M1 {form} {family}"] = (p, s, M1)
        out[f"M2 {family}"] = (icar.init_params("diagonal_heads", rng, d=4, T=10, H=3, scale=0.3),
                               s, next_state_loss(icar.diagonal_heads))
        out[f"M3 {family}"] = ({"P": 0.3 * rng.standard_normal((10, 10))}, s, next_state_loss(icar.pe_only))
        for experiment in ("augmented", "nonaug"):
            cfg = train.config(experiment, d=4, T=10, heads=2)
            params, mcfg = train.init_model(experiment, cfg, rng), train.model_config(cfg, experiment)
            out[f"M4 {experiment} {family}"] = (params, s, next_state_loss(train.predictor(experiment, cfg)))
            tokens = icar.augment if experiment == "augmented" else (lambda s: s)
            out[f"M4 plain {experiment} {family}"] = (params, s, next_state_loss(
                lambda p, s, tokens=tokens, mcfg=mcfg: icar.transformer(p, tokens(s), mcfg)))
    for family in theory.FAMILIES:
        p = icar.init_params("diagonal_heads", rng, d=4, T=6, H=2, scale=0.5)
        out[f"population {family}"] = (
            p, {}, lambda p, _, f=family: theory.population_loss(p["B"].T @ p["A"], p["P"], f))
    return out


def compare(xp, asnumpy):
    rows, ok = [], True
    for name, (params, s, loss) in cases(numpy.random.default_rng(0)).items():
        value, g = loss(params, s), grad(loss)(params, s)
        params_d, s_d = train.tree_map(xp.asarray, params), train.tree_map(xp.asarray, s)
        try:
            value_d, g_d = loss(params_d, s_d), grad(loss)(params_d, s_d)
        except Exception as error:  # one model failing on the device must not hide the others
            rows.append({"model": name, "error": f"{type(error).__name__}: {error}", "ok": False})
            ok = False
            print(f"{name:28s} FAIL {type(error).__name__}: {error}")
            continue
        err = max(numpy.max(numpy.abs(asnumpy(a) - b)) / (1 + numpy.max(numpy.abs(b)))
                  for a, b in zip([value_d] + train.tree_leaves(g_d), [numpy.asarray(value)] + train.tree_leaves(g)))
        rows.append({"model": name, "max_rel_err": float(err), "ok": bool(err <= TOL)})
        ok &= bool(err <= TOL)
        print(f"{name:28s} max rel err {err:.1e}  {'ok' if err <= TOL else 'FAIL'}")
    return rows, ok


def time_steps(xp, sync, n, T, heads, steps):
    """ms per Adam step of the non-augmented M4, float32, and the dtypes it really ran in."""
    rng = numpy.random.default_rng(1)
    cfg = train.config("nonaug", d=5, T=T, heads=heads)
    predict = train.predictor("nonaug", cfg)
    s, _ = icar.sample_sequences(rng, n, T, 5, "haar")
    s = xp.asarray(s.astype(numpy.float32))
    params = train.tree_map(lambda a: xp.asarray(a.astype(numpy.float32)), train.init_model("nonaug", cfg, rng))
    step_fn = value_and_grad(next_state_loss(predict))
    state = train.adam_init(params)
    for i in range(steps + 1):  # step 0 warms up (CuPy compiles its kernels on first use)
        if i == 1:
            sync()
            start = time.perf_counter()
        loss, g = step_fn(params, s)
        params, state = train.adam_update(params, g, state, lr=1e-3)
    sync()
    ms = 1e3 * (time.perf_counter() - start) / steps
    return {"n": n, "T": T, "heads": heads, "steps": steps, "ms_per_step": ms,
            "loss_dtype": str(loss.dtype), "grad_dtype": str(train.tree_leaves(g)[0].dtype)}


def gpu_check(dry, out_dir):
    """Run the check of the module docstring (on the stand-in if dry); write
    out_dir/gpu_check.json; return the exit status (1 if a comparison fails)."""
    if dry:
        gpu.enable_autograd_for(gpu.Strict, gpu.STRICT)
        xp, sync, device = gpu.STRICT, lambda: None, "CPU stand-in (dry run)"
    else:
        xp = gpu.cupy_backend()  # without CuPy: ValueError, exit status 2
        device = xp.cuda.runtime.getDeviceProperties(0)["name"]
        device = device.decode() if isinstance(device, bytes) else device
        sync = xp.cuda.Device().synchronize
    assert icar.array_module(xp.zeros(1)) is xp, "icar.array_module does not find the device module"
    print(f"device: {device}")
    rows, ok = compare(xp, xp.asnumpy)
    sizes = [(64, 20, 8, 20), (16 if dry else 1024, 50, 64, 5)]  # small; the authors' nonaug size
    timing = []
    for n, T, heads, steps in sizes:
        for where, module, sync_ in (("device", xp, sync), ("numpy", numpy, lambda: None)):
            r = dict(time_steps(module, sync_, n, T, heads, 2 if where == "numpy" and n > 64 else steps),
                     backend=where)  # NumPy at the large size: 2 steps, seconds each
            timing.append(r)
            print(f"nonaug n={n} T={T} H={heads} {where:6s}: {r['ms_per_step']:9.1f} ms/step "
                  f"(loss {r['loss_dtype']}, grads {r['grad_dtype']})")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device, "dry": dry, "all_ok": bool(ok), "tolerance": TOL,
              "versions": {"python": platform.python_version(), "numpy": numpy.__version__,
                           "autograd": importlib.metadata.version("autograd"),
                           "cupy": None if dry else xp.__version__},
              "comparisons": rows, "timing": timing}
    path = os.path.join(out_dir, "gpu_check.json")
    runs.save_json(path, report)
    print(f"{'all comparisons ok' if ok else 'SOME COMPARISONS FAILED'}; wrote {path}")
    return 0 if ok else 1


MAX_REPEATS = 10000  # more timed steps than this is a typing error (hours at the paper size)


def _workloads(text):
    names = text.split(",")
    for w in names:
        if w not in WORKLOADS:
            raise ValueError(f"--workloads: unknown workload {w!r}; allowed: {', '.join(WORKLOADS)}")
    if len(set(names)) < len(names):
        raise ValueError(f"--workloads names a workload twice, got {text!r}; give each once")
    return names


def main(argv=None):
    """Command line of the benchmark and of the GPU check; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = runs.Parser(prog="python bench.py", allow_abbrev=False, description="time one "
                         "training step of each paper-size workload; --device cupy: the GPU check")
    once = dict(action=runs.Once)
    parser.add_argument("--repeats", type=int, help="timed steps per workload (median; default 5)", **once)
    parser.add_argument("--micro", type=int, help="micro-batch of the M4 workloads (default 0: the whole batch)", **once)
    parser.add_argument("--dtype", choices=("float32", "float64"),
                        help="precision of the M4 workloads (default float32)", **once)
    parser.add_argument("--workloads", help=f"comma-separated subset of {', '.join(WORKLOADS)} (default: all)", **once)
    parser.add_argument("--no-tune-allocator", action=runs.Once, flag=True,
                        help="leave glibc's malloc as it is (see runs.tune_allocator)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE", **once)
    parser.add_argument("--device", choices=("numpy", "cupy"),
                        help="numpy (default): the CPU benchmark; cupy: the GPU check", **once)
    parser.add_argument("--dry", action=runs.Once, flag=True, help="the GPU check on the CPU stand-in")
    parser.add_argument("--out", help="folder of gpu_check.json (default: $OUT or the current folder)", **once)

    def command():
        args = parser.parse_args(argv)
        check = args.device == "cupy" or args.dry
        cpu_only = [k for k in ("repeats", "micro", "dtype", "workloads", "json") if getattr(args, k) is not None]
        if check and (cpu_only or args.no_tune_allocator):
            raise ValueError(f"--{(cpu_only or ['no-tune-allocator'])[0]} is an option of the CPU "
                             f"benchmark, not of the GPU check (--device cupy / --dry)")
        if args.out is not None and not check:
            raise ValueError("--out is the folder of the GPU check (--device cupy / --dry); "
                             "the benchmark writes --json")
        if args.dry and args.device == "numpy":
            raise ValueError("--dry runs the GPU check on the stand-in; it has no use with --device numpy")
        if check:
            out = args.out or os.environ.get("OUT") or "."
            if not os.path.isdir(out):
                raise ValueError(f"--out {out!r}: no such folder")
            runs.check_regular(os.path.join(out, "gpu_check.json"), "--out's gpu_check.json")
            return gpu_check(bool(args.dry), out)
        repeats = 5 if args.repeats is None else args.repeats
        if not 1 <= repeats <= MAX_REPEATS:
            raise ValueError(f"--repeats must be 1 to {MAX_REPEATS}, got {repeats}")
        workloads = WORKLOADS if args.workloads is None else _workloads(args.workloads)
        if args.json is not None and not args.json:
            raise ValueError("--json needs a file name, got ''")
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise ValueError(f"--json {args.json!r}: no such folder")
        if args.json and os.path.isdir(args.json):
            raise ValueError(f"--json {args.json!r} is a folder; expected a file name")
        if args.json:  # before the minutes of timing: never written through a link or a device
            runs.check_regular(args.json, "--json")
        result = run_benchmark(workloads, repeats, args.micro or 0, args.dtype or "float32",
                               tune=not args.no_tune_allocator)
        if args.json:
            runs.save_json(args.json, result)
        return 0
    return runs.one_line_errors("bench.py", command, "bench.py writes its files (--json, the GPU "
                                "check's gpu_check.json) when it ends: none was written")


if __name__ == "__main__":
    runs.run_command(main)
