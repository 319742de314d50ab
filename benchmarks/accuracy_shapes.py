"""Validation accuracy of the README demo on the embedded ``shapes`` dataset, per backbone.

Runs, each in a fresh subprocess with a temporary store,

    tk finetune --backbone B --classes 5 --no-pretrained --epochs 5 --lr LR --json

on the embedded default data (1200 generated images, 64 px, 20 % validation), from random
initialisation (no weights can be downloaded offline), and prints a markdown table: backbone,
lr, best val accuracy (the epoch tk saves), the val accuracy of every epoch, chance level
(1 / classes) and the wall time of the whole command.

    python benchmarks/accuracy_shapes.py                      # ~5-10 min on 2 CPU cores
    python benchmarks/accuracy_shapes.py --runs alexnet=1e-4 --epochs 10
    python benchmarks/accuracy_shapes.py --device cuda
    python benchmarks/accuracy_shapes.py --runs alexnet=auto,alexnet=1e-3   # --lr auto

The learning rates are the ones each network needs from scratch here (alexnet, without
normalisation layers, diverges or stalls at 1e-3; the residual networks like 1e-3).
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DEFAULT_RUNS = "alexnet=1e-4,resnet18=1e-3,timm:resnet10t=1e-3"


def parse_runs(text: str) -> list[tuple[str, float | str]]:
    runs = []
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, lr = item.strip().rpartition("=")
        if not sep or not name:
            raise SystemExit(f"--runs: expected BACKBONE=LR, got {item!r}")
        runs.append((name, "auto" if lr.strip() == "auto" else float(lr)))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS,
                        help=f"comma list of BACKBONE=LR [{DEFAULT_RUNS}]")
    parser.add_argument("--classes", type=int, default=5, help="[5]")
    parser.add_argument("--epochs", type=int, default=5, help="[5, as the README demo]")
    parser.add_argument("--seed", type=int, default=0, help="[0]")
    parser.add_argument("--device", default="cpu", help="[cpu]")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for every run [torch default]")
    parser.add_argument("--extra", default="",
                        help="more tk finetune arguments for every run, e.g. '--workers 2'")
    parser.add_argument("--json-out", help="write the raw histories to this file")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="tk-accuracy-") as tmp:
        env = dict(os.environ)
        for var in ("TK_HOME", "TORCH_HOME", "HF_HOME"):
            env[var] = str(Path(tmp) / var.lower())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        if args.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        for backbone, lr in parse_runs(args.runs):
            cmd = [sys.executable, "-m", "toolkit", "finetune", "--backbone", backbone,
                   "--classes", str(args.classes), "--no-pretrained", "--epochs",
                   str(args.epochs), "--lr", str(lr), "--seed", str(args.seed), "--device",
                   args.device, "--name", f"acc-{len(rows)}", "--json", "-q",
                   *args.extra.split()]
            print(f"{backbone} (lr {lr}) ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(f"  failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                rows.append({"backbone": backbone, "lr": lr, "error": proc.stderr[-2000:],
                             "wall": wall})
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            chosen = None
            if lr == "auto":  # the range test's choice, from the model's metadata
                show = subprocess.run([sys.executable, "-m", "toolkit", "store", "show",
                                       f"acc-{len(rows)}", "--json"], capture_output=True,
                                      text=True, env=env)
                meta = json.loads(show.stdout)
                chosen = meta.get("metadata", meta)["training"]["lr"]
            accs = [h["val_acc"] for h in result["history"]]
            rows.append({"backbone": backbone, "lr": lr, "chosen_lr": chosen,
                         "best": result["metrics"]["val_acc"],
                         "best_epoch": result["best_epoch"], "val_accs": accs,
                         "val_samples": int(result["metrics"].get("val_samples", 0)),
                         "wall": wall, "history": result["history"]})
            said = f", lr auto: {chosen:.3g}" if chosen is not None else ""
            print(f"  best val acc {rows[-1]['best']:.3f} (epoch {result['best_epoch']}), "
                  f"{wall:.0f}s{said}", file=sys.stderr, flush=True)

    import torch

    chance = 1 / args.classes
    print(f"\n### Val accuracy on the embedded shapes data ({args.classes} classes, "
          f"{args.epochs} epochs, random init)\n")
    print(f"`tk finetune --backbone B --classes {args.classes} --no-pretrained --epochs "
          f"{args.epochs} --lr LR`; device {args.device}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, seed {args.seed}.\n")
    print("| backbone | lr | best val acc (epoch) | val acc per epoch | chance | wall time |")
    print("|---|---:|---:|---|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['backbone']} | {r['lr']} | failed | | {chance:.2f} | "
                  f"{r['wall']:.0f} s |")
            continue
        per_epoch = " ".join(f"{a:.2f}" for a in r["val_accs"])
        shown = (f"auto: {r['chosen_lr']:.3g}" if r["lr"] == "auto" else f"{r['lr']:g}")
        print(f"| {r['backbone']} | {shown} | {r['best']:.3f} ({r['best_epoch']}) | "
              f"{per_epoch} | {chance:.2f} | {r['wall']:.0f} s |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows},
                                                  indent=1))


if __name__ == "__main__":
    main()
