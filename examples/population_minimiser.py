"""M2's population loss and its minimiser (paper.md R2, R3 [derived]): with H diagonal heads,
the loss per prefix is at least (d - H)_+ on the unitary family (R2) and (d - 2H)_+ on the
commuting orthogonal one (R3), and theory.minimiser attains it at every prefix length. Gradient
descent on (A, B, P) (the paper's Fig. 3 route) reaches that minimum on the unitary family;
on the orthogonal family it often stops above it (spurious minima, see theory.train_population)."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the library, from examples/
import theory  # noqa: E402


def main(seed=0):
    d, T = 10, 20                                                      # Fig. 3's sizes
    out = {}
    for family, H in (("unitary", 6), ("unitary", 10), ("orthogonal", 3), ("orthogonal", 5)):
        params = theory.minimiser(d, H, family, T=T)                   # A, B [H, d], P [T, T]
        C = params["B"].T @ params["A"]                                # [d, H] @ [H, d] -> [d, d]
        per_prefix = theory.population_loss_per_prefix(C, params["P"], family)  # [T-1], summed: population_loss
        out[family, H] = {"at_minimiser": per_prefix, "min_loss": theory.min_loss(d, H, family)}
        print(f"{family:10s} d={d} H={H:2d}: loss per prefix at theory.minimiser in "
              f"[{per_prefix.min():.12f}, {per_prefix.max():.12f}], min_loss {theory.min_loss(d, H, family)}")
    H, steps = 6, 300
    _, losses = theory.train_population(H, d, T, "unitary", 1e-2, steps, np.random.default_rng(seed))
    out["trained"] = {"per_prefix": losses / (T - 1), "min_loss": theory.min_loss(d, H, "unitary")}
    print(f"GD on (A, B, P), unitary H={H}, mean loss per prefix at steps 0, 50, 100, {steps}: "
          + ", ".join(f"{x:.6f}" for x in out["trained"]["per_prefix"][[0, 50, 100, steps]])
          + f"; min_loss {out['trained']['min_loss']}")
    return out


if __name__ == "__main__":
    main()
