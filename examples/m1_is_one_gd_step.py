"""M1 is one gradient step (paper.md R1): augmented linear attention in block form, f_r =
B (sum_{t<=r} s_t s_{t-1}^*) A s_r, trained on the last position (unitary W, random s_1), has
B A = eta* I, eta* = 1/(T+d-2): one GD step from W = 0 on 1/2 sum_t ||s_t - W s_{t-1}||^2, loss
L* = d(d-1)/(T+d-2) [derived]. Only the product is pinned: A and B alone are not multiples of I."""
import os
import sys

import numpy as np
from autograd import grad

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the library, from examples/
import icar  # noqa: E402
import theory  # noqa: E402
import train  # noqa: E402


def main(seed=0):
    d, T, n, steps, lr = 4, 10, 1024, 150, 3e-2
    rng = np.random.default_rng(seed)
    s, _ = icar.sample_sequences(rng, 2 * n, T, d, "unitary")         # [2n, T+1, d], complex
    e, y = icar.augment(s[:, :-1]), s[:, -1]                          # [2n, T, 3d], [2n, d]: s_{T+1}

    def objective(params, rows=slice(0, n)):  # last position; rows n..2n-1 are a fresh test set
        return icar.mse(icar.augmented_linear(params, e[rows])[:, -1], y[rows])

    params = icar.init_params("augmented_linear", rng, d=d)            # A, B [d, d], N(0, 0.1^2)
    state = train.adam_init(params)
    for _ in range(steps):
        params, state = train.adam_update(params, grad(objective)(params), state, lr)
    BA = params["B"] @ params["A"]                                     # [d, d]
    eta, eta_star = np.trace(BA) / d, theory.gd_step_size(T, d)        # trained and R1 step
    out = {"eta": eta, "eta_star": eta_star, "gap": abs(eta / eta_star - 1),
           "off_identity": np.linalg.norm(BA - eta * np.eye(d)) / np.linalg.norm(eta * np.eye(d)),
           "test_loss": objective(params, slice(n, 2 * n)), "gd_loss": theory.gd_loss(T, d)}
    print("trained eta = tr(B A)/d {eta:.5f}, R1 eta* {eta_star:.5f}, relative gap {gap:.2%}, "
          "||B A - eta I||/||eta I|| {off_identity:.3f}\nlast-position loss on fresh sequences "
          "{test_loss:.4f}, R1 L* {gd_loss:.4f}".format(**out))
    return out


if __name__ == "__main__":
    main()
