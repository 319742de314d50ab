"""Does `--class-weights auto` / `--sampler balanced` help the minority class?

A controlled imbalanced image folder: three classes of 32 px images whose colour (the red
level, with noise) is drawn from overlapping normal distributions (means 90, 130, 170,
sd 22), so the best boundary between two classes depends on how common each is. The middle
class is the minority (MINOR images against MAJOR of each other class). The same small CNN
is trained three times (plain, --class-weights auto, --sampler balanced; same seed and
epochs; a balanced --val-data folder picks the best epoch) and evaluated with `tk eval` on
a balanced held-out folder drawn the same way, printing per-class recall. Every step goes
through the real `tk` command.

    python benchmarks/recipes_imbalance.py [--major 200] [--minor 10] [--epochs 4]

Accuracy, not speed: the numbers do not depend on the machine being busy (CPU, fixed seed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "tests" / "plugins_for_tests" / "tiny.py")
KINDS = ("low", "middle", "high")


MEANS = {"low": 90, "middle": 130, "high": 170}
SD = 22


def render(folder: Path, counts: dict[str, int], seed: int, size: int = 32) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for kind, n in counts.items():
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            red = rng.normal(MEANS[kind], SD)
            pixels = rng.normal(0, 6, (size, size, 3)) + [red, 110, 110]
            Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(
                folder / kind / f"{i:05d}.png")


def tk(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "toolkit", "--plugin", TINY, *args], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"tk {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--major", type=int, default=200)
    ap.add_argument("--minor", type=int, default=10)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--val", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=4)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        render(t / "train", {"low": a.major, "middle": a.minor, "high": a.major}, 0)
        render(t / "val", dict.fromkeys(KINDS, a.val), 2)
        render(t / "test", dict.fromkeys(KINDS, a.test), 1)
        env = dict(os.environ, TK_HOME=str(t / "store"), OMP_NUM_THREADS="1")
        runs = {"plain": [], "class-weights auto": ["--class-weights", "auto"],
                "sampler balanced": ["--sampler", "balanced"]}
        print(f"train: low {a.major}, middle {a.minor}, high {a.major}; validation: {a.val} "
              f"of each; test: {a.test} of each; tiny-cnn from scratch, {a.epochs} epochs, "
              "lr 0.01, seed 0")
        print(f"{'run':<20} {'acc':>6} " + " ".join(f"{k + ' recall':>16}" for k in KINDS))
        for name, extra in runs.items():
            model = name.replace(" ", "-")
            tk("finetune", "--backbone", "tiny-cnn", "--data", str(t / "train"),
               "--val-data", str(t / "val"), "--epochs",
               str(a.epochs), "--lr", "0.01", "--batch-size", "32", "--no-pretrained",
               "--device", "cpu", "--seed", "0", "--name", model, "-q", *extra, env=env)
            report = json.loads(tk("eval", "--model", model, "--data", str(t / "test"),
                                   "--json", "-q", env=env))
            recall = {m["name"]: m["recall"] for m in report["per_class"]}
            print(f"{name:<20} {report['accuracy']:6.3f} "
                  + " ".join(f"{recall[k]:16.3f}" for k in KINDS), flush=True)


if __name__ == "__main__":
    main()
