"""Cold start of `tk infer one.png` against the floor of any torch program.

Runs, alternately and ``--runs`` times each (default 5), in fresh processes:

- baseline: ``python -c "import torch, torchvision"`` (what any PyTorch inference script pays);
- tk: ``python -m toolkit infer one.png --model M`` with a stored torchvision model
  (resnet18, trained one epoch from random weights on the embedded shapes data at 64 px);
- optionally ``--onnx FILE``: ``tk infer one.png --model FILE.onnx`` (no torch at all).

Prints the median wall time of each and tk's overhead over the baseline (median minus
median). Run on an idle machine: start-up figures move with the page cache and the load.

    python benchmarks/bench_startup.py [--runs 5] [--home DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _time(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--home", type=Path, default=None,
                        help="work folder (default: a temporary one)")
    parser.add_argument("--onnx", type=Path, default=None, help="also time an exported model")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="tk-bench-startup-"))
    env = dict(os.environ, TK_HOME=str(home / "tk"), XDG_CACHE_HOME=str(home / "cache"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    py = sys.executable
    if not (home / "tk" / "models" / "bench.safetensors").exists():
        _time([py, "-m", "toolkit", "finetune", "--backbone", "resnet18", "--classes", "3",
               "--no-pretrained", "--epochs", "1", "--name", "bench", "-q",
               "--opt", "dataset.samples=60"], env)
    image = home / "one.png"
    if not image.exists():
        from PIL import Image

        Image.new("RGB", (500, 375), (30, 140, 200)).save(image)
    commands = {
        "python -c 'import torch, torchvision'": [py, "-c", "import torch, torchvision"],
        "tk infer one.png --model bench": [py, "-m", "toolkit", "infer", str(image),
                                           "--model", "bench", "-q"],
    }
    if args.onnx:
        commands["tk infer one.png --model FILE.onnx"] = [
            py, "-m", "toolkit", "infer", str(image), "--model", str(args.onnx), "-q"]
    for cmd in commands.values():  # warm the page cache and the name cache
        _time(cmd, env)
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(args.runs):
        for label, cmd in commands.items():
            times[label].append(_time(cmd, env))
    medians = {k: statistics.median(v) for k, v in times.items()}
    for label, values in times.items():
        print(f"{label:<40} median {medians[label]:.2f} s  "
              f"(min {min(values):.2f}, max {max(values):.2f}, {len(values)} runs)")
    base = medians["python -c 'import torch, torchvision'"]
    print(f"tk infer overhead over importing torch+torchvision: "
          f"{medians['tk infer one.png --model bench'] - base:+.2f} s")


if __name__ == "__main__":
    main()
