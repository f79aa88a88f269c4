"""bench: the speed benchmark, a much shorter version of train.py: time one training step of
each paper-size workload.

    python bench.py [--repeats 5] [--micro 0] [--workloads nonaug,augmented,...] [--json FILE]
    python train.py bench ...    the same

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

The process is set up as training should be: fused.tune_allocator() (glibc keeps freed memory
between steps) and fused.set_blas_threads(1) while the workloads run (fused.transformer runs
batch slices in fused.THREADS threads of its own); the output says which took effect.
"""
import os
import sys
import time
import tracemalloc

import numpy
from autograd import value_and_grad

import fused
import icar
import theory
import train

WORKLOADS = ("nonaug", "augmented", "population", "pe-only", "pe-only-moments")
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
    tuned = fused.tune_allocator() if tune else False
    rates = {k: matmul_rate(k) for k in ("float32", "float64")}
    blas_threads = fused.set_blas_threads(1)                    # None: BLAS left as it is
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
        if name in ("nonaug", "augmented"):
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
               "target_ms": TARGET_MS[name], "meets_target": 1e3 * med <= TARGET_MS[name],
               "peak_MB": peak / 1e6, "gflop_per_step": flops / 1e9, "gflops": gflops,
               "fraction_of_matmul": gflops / best, "precision": prec, "notes": notes}
        result["workloads"][name] = row
        print(f"{name:<15} {row['ms_per_step']:9.3f} ms/step (min {row['ms_min']:.3f}, target "
              f"{row['target_ms']:g})  peak {row['peak_MB']:8.1f} MB  {row['gflop_per_step']:9.4f} "
              f"GFLOP/step  {gflops:7.2f} GFLOP/s = {100 * row['fraction_of_matmul']:5.1f}% of "
              f"{prec} matmul  [{notes}]", file=out, flush=True)
    if blas_threads is not None:
        fused.set_blas_threads(blas_threads)
    result["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    print(f"load average after: {result['load_average']['after'][0]:.2f}", file=out)
    return result


def main(argv=None, prog="python bench.py", name="bench.py"):
    """Command line of the benchmark; returns the exit status. prog and name: how usage and
    error lines call it (train.py's alias passes its own)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = train.Parser(prog=prog, description="time one training step of each "
                     "paper-size workload")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per workload (median)")
    parser.add_argument("--micro", type=int, default=0,
                        help="micro-batch of the M4 workloads (0: the whole batch)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                        help="precision of the M4 workloads")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {', '.join(WORKLOADS)}")
    parser.add_argument("--no-tune-allocator", action="store_true",
                        help="leave glibc's malloc as it is (see fused.tune_allocator)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE")

    def command():
        args = parser.parse_args(argv)
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise ValueError(f"--json {args.json!r}: no such folder")
        if args.json and os.path.isdir(args.json):
            raise ValueError(f"--json {args.json!r} is a folder; expected a file name")
        result = run_benchmark([w for w in args.workloads.split(",") if w], args.repeats,
                               args.micro, args.dtype, tune=not args.no_tune_allocator)
        if args.json:
            train.save_json(args.json, result)
        return 0
    return train.one_line_errors(name, command)


if __name__ == "__main__":
    train.run_command(main)
