"""One full CIFAR-10 training epoch end to end (data on the device, augmentation, Lightning, the paper's loss, the
test pass), today's defaults against yesterday's, measured in one run on one machine.

    .venv/bin/python benchmarks/classify_epoch.py --data data/cifar10-jpg.tar.gz          # M = 16, batch 512

Each variant is one ``branchspec classify train --epochs 1`` in a fresh process and a fresh run directory; the
rate is the training images over ``fit_seconds`` (the wall-clock of Lightning's ``fit``: set-up, the epoch and
its test pass; reading and decoding the images before it is not counted). Variants:

- ``before``: the defaults before the lanes execution: ``--execution fused`` (grouped convolutions,
  channels-last) with glibc's allocator as it is (``BRANCHSPEC_RAW_ALLOCATOR=1``);
- ``default``: today's defaults (``--execution auto``: lanes on a CPU; freed memory kept for reuse);
- ``compile``: the default plus ``--compile`` (its compilation is inside fit_seconds);
- ``bf16``: the default plus ``--precision bf16-mixed``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "before": (["--execution", "fused"], {"BRANCHSPEC_RAW_ALLOCATOR": "1"}),
    "default": ([], {}),
    "compile": (["--compile"], {}),
    "bf16": (["--precision", "bf16-mixed"], {}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="CIFAR-10 (a .tar.gz image tree or a cifar-10-batches-py folder)")
    p.add_argument("--branches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--limit-per-class", type=int, default=None, help="a shorter epoch (default: all 5,000)")
    p.add_argument("--variants", default="before,default,compile,bf16")
    args = p.parse_args()
    exe = Path(sys.executable).with_name("branchspec")
    rates = {}
    for name in args.variants.split(","):
        extra, env = VARIANTS[name]
        with tempfile.TemporaryDirectory() as out:
            cmd = [str(exe), "classify", "train", "--data", args.data, "--branches", str(args.branches), "--epochs", "1",
                   "--batch-size", str(args.batch_size), "--device", "cpu", "--out", out, *extra]
            if args.limit_per_class:
                cmd += ["--limit-per-class", str(args.limit_per_class)]
            subprocess.run(cmd, check=True, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
            m = json.loads((Path(out) / "metrics.json").read_text())
            cfg = (Path(out) / "config.yaml").read_text()
        images = m["fit_steps"] * args.batch_size
        rates[name] = images / m["fit_seconds"]
        execution = next(line.split(":")[1].strip() for line in cfg.splitlines() if line.startswith("execution:"))
        print(f"  {name:8s} {rates[name]:8.1f} img/s  ({images} images in {m['fit_seconds']:.1f} s, execution "
              f"{execution}, test accuracy {m['test_accuracy']:.3f})", flush=True)
    if "before" in rates:
        print("against before: " + ", ".join(f"{k} {v / rates['before']:.2f}×" for k, v in rates.items()))


if __name__ == "__main__":
    main()
