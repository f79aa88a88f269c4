"""Every fast path of icar against a plain reference written here, and the benchmark's
training-step and command-line pieces."""
import json

import autograd.numpy as np
import numpy
import pytest
from autograd import grad, value_and_grad
from autograd.misc import flatten
from autograd.test_util import check_grads

import bench_part
import icar


# ----------------------------------------------------------------------------- references

def ref_softmax(z, mask):
    z = np.where(mask > 0, z, -numpy.inf)
    e = np.exp(z - np.max(z, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def ref_transformer(params, x, cfg):
    """M4 of paper.md section 3, head by head: q, k, v of each head, scores q.k^*/sqrt(E)."""
    n, T, d_in = x.shape
    E = cfg["repeat"] * d_in
    mask = numpy.tril(numpy.ones((T, T)))
    h = np.concatenate([x] * cfg["repeat"], axis=-1)
    for L in params["layers"]:
        total = 0.0
        for i in range(cfg["heads"]):
            q = h @ L["W_Q"][i] + L["b_Q"][i]                       # [n, T, E]
            k = h @ L["W_K"][i] + L["b_K"][i]
            v = h @ L["W_V"][i] + L["b_V"][i]
            scores = q @ np.swapaxes(np.conj(k), 1, 2) / numpy.sqrt(E)  # [n, T, T]
            a = scores * mask if cfg["attention"] == "linear" else ref_softmax(np.real(scores), mask)
            if cfg["positional"]:
                p = params["pos"][:T]
                pq, pk = p @ L["W_Q"][i] + L["b_Q"][i], p @ L["W_K"][i] + L["b_K"][i]
                a = a * ref_softmax(pq @ pk.T / numpy.sqrt(E), mask)
            total = total + a @ v
        out = total @ L["W_O"] + L["b_O"]
        if cfg["layernorm"]:
            mu = np.mean(out, axis=-1, keepdims=True)
            var = np.mean(np.abs(out - mu) ** 2, axis=-1, keepdims=True)
            out = (out - mu) / np.sqrt(var + 1e-5) * L["ln_g"] + L["ln_b"]
        h = h + out if cfg["residual"] else out
    return h @ params["W_out"] + params["b_out"]


def ref_pe_only(P, s):
    """M3 position by position: f_r = conj(s_{r-1}) sum_{t<=r} P[r, t] s_t^2, f_0 = 0."""
    rows = [0 * s[:, 0]]
    for r in range(1, s.shape[1]):
        rows.append(np.conj(s[:, r - 1]) * sum(P[r, t] * s[:, t] ** 2 for t in range(r + 1)))
    return np.stack(rows, axis=1)


def _perturbed(params, rng, scale=0.3):
    """Parameters with nonzero biases and LayerNorm terms, so that every path is exercised."""
    return bench_part.tree_map(lambda p: p + scale * rng.standard_normal(p.shape), params)


M4_CASES = {  # name: (family, augmented input, config overrides)
    "nonaug": ("haar", False, dict(repeat=2, heads=3, layers=2, positional=True, residual=False)),
    "augmented": ("haar", True, dict(repeat=1, heads=2, layers=3, positional=False, residual=True)),
    "softmax_positional": ("haar", False, dict(repeat=2, heads=2, layers=2, attention="softmax",
                                                positional=True, residual=True)),
    "complex_linear": ("unitary", False, dict(repeat=3, heads=2, layers=2, positional=True,
                                              residual=True, layernorm=False)),
    "complex_softmax": ("unitary", True, dict(repeat=1, heads=2, layers=2, attention="softmax",
                                              residual=False)),
}


@pytest.mark.parametrize("chunk", [1, 2, None])
@pytest.mark.parametrize("case", sorted(M4_CASES))
def test_transformer_matches_per_head_reference(case, chunk, monkeypatch):
    family, augmented, overrides = M4_CASES[case]
    rng = numpy.random.default_rng(len(case))
    d, T, n = 2, 6, 5
    per_row = T * overrides["heads"] * T                           # entries of [T, H, T]
    if chunk is not None:  # slices of `chunk` sequences, the last one shorter
        monkeypatch.setitem(icar.CHUNK_ENTRIES, "cpu", chunk * per_row)
    s, _ = icar.sample_sequences(rng, n, T, d, family)
    x = icar.augment(s[:, :-1]) if augmented else s[:, :-1]
    cfg = icar.transformer_config(d_in=x.shape[-1], d_out=d, T=T + 2, **overrides)
    params = _perturbed(icar.init_params("transformer", rng, cfg=cfg), rng)
    assert len(icar._batch_chunks(n, per_row, numpy)) == (1 if chunk is None else -(-n // chunk))
    numpy.testing.assert_allclose(icar.transformer(params, x, cfg), ref_transformer(params, x, cfg),
                                  rtol=0, atol=1e-10)

    def loss(model):
        return lambda p: icar.mse(model(p, x, cfg), s[:, 1:])
    fast, ref = flatten(grad(loss(icar.transformer))(params))[0], flatten(grad(loss(ref_transformer))(params))[0]
    numpy.testing.assert_allclose(fast, ref, rtol=0, atol=1e-10 * max(1.0, numpy.abs(ref).max()))


def test_transformer_float32_stays_float32():
    rng = numpy.random.default_rng(1)
    cfg = icar.transformer_config(d_in=3, d_out=3, T=5, heads=2, repeat=2, positional=True,
                                  residual=False)
    params = bench_part.tree_map(lambda p: p.astype(numpy.float32),
                                 icar.init_params("transformer", rng, cfg=cfg))
    s, _ = icar.sample_sequences(rng, 4, 5, 3, "haar")
    loss, g = value_and_grad(lambda p: icar.mse(icar.transformer(p, s[:, :-1].astype(numpy.float32),
                                                                 cfg), s[:, 1:].astype(numpy.float32)))(params)
    assert loss.dtype == numpy.float32
    assert {leaf.dtype for leaf in [g["W_out"], g["pos"]] + list(g["layers"][0].values())} == {numpy.dtype("float32")}
    # gradients of the parameters are cast back to their dtype; the input's shows the whole chain
    x, y = s[:, :-1].astype(numpy.float32), s[:, 1:].astype(numpy.float32)
    assert grad(lambda x: icar.mse(icar.transformer(params, x, cfg), y))(x).dtype == numpy.float32


@pytest.mark.parametrize("complex_data", [False, True])
@pytest.mark.parametrize("heads_of_w", [3, 1])
def test_linear_attention_gradients(complex_data, heads_of_w, monkeypatch):
    monkeypatch.setitem(icar.CHUNK_ENTRIES, "cpu", 1)             # one sequence per slice
    rng = numpy.random.default_rng(2)
    n, T, H, D = 3, 4, 3, 2

    def draw(*shape):
        x = rng.standard_normal(shape)
        return x + 1j * rng.standard_normal(shape) if complex_data else x
    zG, z = draw(n, T * H, D), draw(n, T, D)
    w = rng.standard_normal((T, heads_of_w, T)) * numpy.tril(numpy.ones((T, T)))[:, None]
    plain = ((zG @ numpy.conj(numpy.swapaxes(z, 1, 2))).reshape(n, T, H, T) * w).reshape(n, T * H, T) @ z
    numpy.testing.assert_allclose(icar._linear_attention(zG, z, w), plain, rtol=0, atol=1e-12)
    check_grads(lambda zG, z, w: icar._linear_attention(zG, z, w), modes=["rev"], order=1)(zG, z, w)


def test_pe_only_matches_reference():
    rng = numpy.random.default_rng(3)
    s, _ = icar.sample_sequences(rng, 6, 7, 2, "unitary")
    P = rng.standard_normal((7, 7))
    x, y = s[:, :-1], s[:, 1:]
    numpy.testing.assert_allclose(icar.pe_only({"P": P}, x), ref_pe_only(P, x), rtol=0, atol=1e-12)
    g_fast = grad(lambda P: icar.mse(icar.pe_only({"P": P}, x), y))(P)
    g_ref = grad(lambda P: icar.mse(ref_pe_only(P * numpy.tril(numpy.ones((7, 7))), x), y))(P)
    numpy.testing.assert_allclose(g_fast, g_ref, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- training step

def test_microbatched_gradient_equals_full_batch():
    rng = numpy.random.default_rng(4)
    cfg = icar.transformer_config(d_in=3, d_out=3, T=6, heads=4, repeat=2, positional=True,
                                  residual=False)
    params = _perturbed(icar.init_params("transformer", rng, cfg=cfg), rng)
    s, _ = icar.sample_sequences(rng, 7, 6, 3, "haar")

    def loss(p, s):
        return icar.mse(icar.transformer(p, s[:, :-1], cfg), s[:, 1:])
    full_loss, full = value_and_grad(loss)(params, s)
    for micro in (1, 3, 7, 100):  # 3 leaves a shorter last slice
        part_loss, part = bench_part.loss_and_grad_microbatched(loss, params, s, micro)
        assert abs(part_loss - full_loss) <= 1e-6
        numpy.testing.assert_allclose(flatten(part)[0], flatten(full)[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="micro"):
        bench_part.loss_and_grad_microbatched(loss, params, s, 0)


def test_flop_counts_by_hand():
    # one layer, n = 2, T = 3, d_in = 1, repeat = 2 (E = 2), H = 1, d_out = 1, positional
    cfg = icar.transformer_config(d_in=1, d_out=1, T=3, heads=1, repeat=2, positional=True)
    qkv, scores_av, mask_pos, w_o, heads_sum = 3 * 2 * 2 * 3 * 2 * 2, 2 * 2 * 2 * 9 * 2, 2 * 2 * 9, 2 * 2 * 3 * 4, 2 * 3 * 2
    positional, readout = 2 * 2 * 3 * 2 * 2 + 2 * 9 * 2, 2 * 2 * 3 * 2
    assert bench_part.transformer_flops(cfg, 2, 3) == 3 * (qkv + scores_av + mask_pos + w_o + heads_sum
                                                           + positional + readout)
    assert bench_part.pe_only_flops(2, 3, 1, complex_data=False) == 3 * (2 * 9 * 2 + 2 * 3 + 3 * 2 * 3)


# ----------------------------------------------------------------------------- command line

def test_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_part.bench(["--workloads", "pe-only", "--repeats", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    row = result["workloads"]["pe-only"]
    assert row["ms_per_step"] > 0 and row["peak_MB"] > 0
    assert row["gflops"] == pytest.approx(row["gflop_per_step"] / row["ms_per_step"] * 1e3)
    assert set(result["matmul_gflops"]) == {"float32", "float64"}
    assert "pe-only" in capsys.readouterr().out


def test_bench_rejects_unknown_workload(capsys):
    assert bench_part.bench(["--workloads", "nonaug,fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fast" in err[0] and "nonaug" in err[0]
