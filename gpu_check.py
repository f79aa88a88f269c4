"""gpu_check: every model on real CuPy arrays against NumPy, and milliseconds per training step.

    python gpu_check.py          on a machine with a CUDA GPU, CuPy and autograd 1.9.1
    python gpu_check.py --dry    anywhere: the CPU stand-in of test_icar.py plays the GPU and
                                 the large size shrinks (checks this script, measures nothing)

1. For each model (M1 full and block, M2, M3, M4 augmented and non-augmented, both as
   training runs it (fused.transformer) and plain (icar.transformer), the population loss of
   theory.py) on real and complex data: loss and gradients on the device, float64,
   must equal NumPy's to a relative 1e-10.
2. One Adam step (value_and_grad + adam_update), float32, for the non-augmented M4 at a small
   size and at the authors' size (d = 5, T = 50, 64 heads, batch 1024): ms per step on the
   device and with NumPy on the CPU.
Prints a table, writes gpu_check.json into $OUT (or the current folder), and exits 1 if any
comparison fails.
"""
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time

import numpy
from autograd import grad, value_and_grad

import icar
import theory
import train

from train import cupy_backend, enable_autograd_for

TOL = 1e-10


def tree(f, t):
    if isinstance(t, dict):
        return {k: tree(f, v) for k, v in t.items()}
    if isinstance(t, list):
        return [tree(f, v) for v in t]
    return f(t)


def leaves(t):
    if isinstance(t, dict):
        return [x for k in sorted(t) for x in leaves(t[k])]
    if isinstance(t, list):
        return [x for v in t for x in leaves(v)]
    return [t]


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
        params_d, s_d = tree(xp.asarray, params), tree(xp.asarray, s)
        try:
            value_d, g_d = loss(params_d, s_d), grad(loss)(params_d, s_d)
        except Exception as error:  # one model failing on the device must not hide the others
            rows.append({"model": name, "error": f"{type(error).__name__}: {error}", "ok": False})
            ok = False
            print(f"{name:28s} FAIL {type(error).__name__}: {error}")
            continue
        err = max(numpy.max(numpy.abs(asnumpy(a) - b)) / (1 + numpy.max(numpy.abs(b)))
                  for a, b in zip([value_d] + leaves(g_d), [numpy.asarray(value)] + leaves(g)))
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
    params = tree(lambda a: xp.asarray(a.astype(numpy.float32)), train.init_model("nonaug", cfg, rng))
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
            "loss_dtype": str(loss.dtype), "grad_dtype": str(leaves(g)[0].dtype)}


def main(argv):
    dry = "--dry" in argv
    if set(argv) - {"--dry"}:
        print(f"unknown argument(s) {sorted(set(argv) - {'--dry'})}; allowed: --dry", file=sys.stderr)
        return 2
    if dry:
        from test_icar import STRICT, Strict
        enable_autograd_for(Strict, STRICT)
        xp, sync, device = STRICT, lambda: None, "CPU stand-in (dry run)"
    else:
        try:
            xp = cupy_backend()
        except ValueError as error:
            print(error, file=sys.stderr)
            return 2
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
    folder = os.environ.get("OUT") or "."
    path = os.path.join(folder, "gpu_check.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"{'all comparisons ok' if ok else 'SOME COMPARISONS FAILED'}; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
