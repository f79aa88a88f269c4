"""Train a small M4 (one layer of linear attention on augmented tokens (0, s_t, s_{t-1}), Haar W:
paper.md Fig. 5) with train.py's pieces and a visible Adam loop; score it per position against
evaluate.baselines: one GD step with the best step per position (gd1), least squares, zero."""
import os
import sys

import numpy as np
from autograd import grad

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the library, from examples/
import evaluate  # noqa: E402
import icar  # noqa: E402
import train  # noqa: E402


def main(seed=0):
    # the quick preset, smaller; random s_1, as a fixed one lets a model skip the context (paper.md sec. 6)
    cfg = train.config("augmented", seed=seed, T=10, s1="random", n_train=1024, n_test=512,
                       steps=300, batch=64, lr=2e-2)
    s_train, s_test, W_test = train.datasets(cfg)                     # [n, T+1, d], W_test [n_test, d, d]
    predict = train.predictor("augmented", cfg)                       # s [n, T, d] -> f [n, T, d]
    rng = np.random.default_rng(seed)
    params = train.init_model("augmented", cfg, rng)

    def objective(params, s):  # every position: predict s_{t+1} from s_1..s_t
        return icar.mse(predict(params, s[:, :-1]), s[:, 1:])

    state = train.adam_init(params)
    for _ in range(cfg["steps"]):
        batch = s_train[rng.choice(cfg["n_train"], cfg["batch"], replace=False)]  # [batch, T+1, d]
        params, state = train.adam_update(params, grad(objective)(params, batch), state, cfg["lr"])
    base = evaluate.baselines(s_test, W_test, gd_steps=1)             # name -> [T]
    out = {"model": evaluate.position_loss(predict(params, s_test[:, :-1]), s_test[:, 1:]),
           "gd1": base["gd1"], "least_squares": base["least_squares"], "zero": base["zero"]}
    print("test loss per position (position r has seen r transitions)")
    for name, values in out.items():
        print(f"{name:>14s} " + " ".join(f"{v:5.3f}" for v in values))
    return out


if __name__ == "__main__":
    main()
