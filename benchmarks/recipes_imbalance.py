"""Does `--class-weights auto` / `--sampler balanced` help the minority class?

Builds a controlled imbalanced image folder from the embedded shapes renderer (circle and
triangle: MAJOR images each, square: MINOR), trains the same small CNN three times (plain,
--class-weights auto, --sampler balanced; same seed, same epochs) and evaluates each on a
balanced held-out folder (rendered from other indices) with `tk eval`, printing per-class
recall. Every step goes through the real `tk` command.

    python benchmarks/recipes_imbalance.py [--major 240] [--minor 12] [--epochs 6]

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
KINDS = ("circle", "triangle", "square")


def render(folder: Path, counts: dict[str, int], offset: int, size: int = 32) -> None:
    from plugins.shapes import render as draw

    for kind, n in counts.items():
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            draw(kind, 7, offset + i, size).save(folder / kind / f"{offset + i:05d}.png")


def tk(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "toolkit", "--plugin", TINY, *args], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"tk {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--major", type=int, default=240)
    ap.add_argument("--minor", type=int, default=12)
    ap.add_argument("--test", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=6)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        render(t / "train", {"circle": a.major, "triangle": a.major, "square": a.minor}, 0)
        render(t / "test", dict.fromkeys(KINDS, a.test), 100_000)
        env = dict(os.environ, TK_HOME=str(t / "store"), OMP_NUM_THREADS="1")
        runs = {"plain": [], "class-weights auto": ["--class-weights", "auto"],
                "sampler balanced": ["--sampler", "balanced"]}
        print(f"train: circle {a.major}, triangle {a.major}, square {a.minor}; test: "
              f"{a.test} of each; tiny-cnn from scratch, {a.epochs} epochs, lr 0.01, seed 0")
        print(f"{'run':<20} {'acc':>6} " + " ".join(f"{k + ' recall':>16}" for k in KINDS))
        for name, extra in runs.items():
            model = name.replace(" ", "-")
            tk("finetune", "--backbone", "tiny-cnn", "--data", str(t / "train"), "--epochs",
               str(a.epochs), "--lr", "0.01", "--batch-size", "32", "--no-pretrained",
               "--device", "cpu", "--seed", "0", "--name", model, "-q", *extra, env=env)
            report = json.loads(tk("eval", "--model", model, "--data", str(t / "test"),
                                   "--json", "-q", env=env))
            recall = {m["name"]: m["recall"] for m in report["per_class"]}
            print(f"{name:<20} {report['accuracy']:6.3f} "
                  + " ".join(f"{recall[k]:16.3f}" for k in KINDS), flush=True)


if __name__ == "__main__":
    main()
