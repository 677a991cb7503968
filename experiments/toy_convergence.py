"""Are Toy Study 2's failures local minima, or unfinished runs? The same trials trained for more steps.

    branchspec toy sweep --toy toy2 --branches 2-10 --trials 1000 --steps S --out runs/evidence/toy2_S   # S = 10k, 100k, 1M
    .venv/bin/python experiments/toy_convergence.py runs/evidence/toy2_10k runs/evidence/toy2_100k runs/evidence/toy2_1m

Every sweep starts from the same initial weights (``default_rng([seed, M])``), so trial t of one run is trial t of
the others: the script follows each trial's squared error Σ_j (f(x_j) − y_j)² over the runs. A trial that fails
(error ≥ δ = 1e-4) in the longest run is *stuck* when its error changed by less than 1% over the last tenfold of
steps, and *still falling* otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import yaml

from branchspec.train.toy import SUCCESS_THRESHOLD, responses


def squared_errors(run: Path) -> tuple[int, dict[int, np.ndarray]]:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    x, y = np.asarray(cfg["data"]["x"]), np.asarray(cfg["data"]["y"])
    slope = cfg["training"]["slope"]
    weights = np.load(run / "checkpoints" / "weights.npz")
    out = {}
    for key in weights.files:
        if key.startswith("w_"):
            m = int(key[2:])
            f = responses(weights[key], weights[f"b_{m}"], x, slope).sum(1)
            out[m] = ((f - y) ** 2).sum(-1)
    return int(cfg["training"]["steps"]), out


def main(runs: list[str]) -> None:
    measured = sorted(squared_errors(Path(r)) for r in runs)
    (last_steps, last), (prev_steps, prev) = measured[-1], measured[-2]
    table = {}
    for m in sorted(set(last).intersection(*(errors for _, errors in measured))):
        failed = last[m] >= SUCCESS_THRESHOLD
        stuck = failed & (np.abs(prev[m] - last[m]) <= 0.01 * last[m])
        table[m] = {f"success_at_{steps}": float((errors[m] < SUCCESS_THRESHOLD).mean()) for steps, errors in measured}
        table[m].update(failed=int(failed.sum()), stuck=int(stuck.sum()), still_falling=int((failed & ~stuck).sum()),
                        median_failed_error=float(np.median(last[m][failed])) if failed.any() else None)
    print(json.dumps({"steps": [s for s, _ in measured], "per_m": table}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
