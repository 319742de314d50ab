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

``--before-after`` runs every backbone twice in the same session: with the speed settings
tk had before issue 15 (``--precision 32 --no-channels-last --workers 0``) and with
today's defaults (precision, channels-last and workers chosen for the machine), and prints
both accuracies side by side. ``--photos N`` adds a real-image set: the two photographs
scikit-learn ships, each cut in 2x2 regions (8 classes), N JPEG crops of 160x120 per region
(benchmarks/photos.py), trained at 64 px with the same backbones.

    python benchmarks/accuracy_shapes.py --before-after --photos 60

Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DEFAULT_RUNS = "alexnet=1e-4,resnet18=1e-3,timm:resnet10t=1e-3"
BEFORE = ["--precision", "32", "--no-channels-last", "--workers", "0"]  # pre-issue-15 defaults


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
    parser.add_argument("--before-after", action="store_true",
                        help="each run with the old speed settings and with the defaults")
    parser.add_argument("--photos", type=int, default=0, metavar="N",
                        help="also train on the real-photo regions set, N images per class")
    parser.add_argument("--only-photos", action="store_true", help="skip the shapes runs")
    parser.add_argument("--shapes-samples", type=int, default=None,
                        help="shapes images in all [the dataset's 1200]")
    args = parser.parse_args()
    if args.before_after or args.photos:
        before_after(args)
        return

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


def _finetune(args: argparse.Namespace, env: dict[str, str], backbone: str, lr: float,
              name: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "toolkit", "finetune", "--backbone", backbone,
           "--no-pretrained", "--epochs", str(args.epochs), "--lr", str(lr), "--seed",
           str(args.seed), "--device", args.device, "--name", name, "--json",
           *args.extra.split(), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"  failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return {"error": proc.stderr[-2000:], "wall": wall}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    chosen = re.search(r"device \S+, (precision .*?workers[^,]*)", proc.stderr)
    return {"best": result["metrics"]["val_acc"], "best_epoch": result["best_epoch"],
            "val_accs": [h["val_acc"] for h in result["history"]], "wall": wall,
            "settings": chosen.group(1) if chosen else "?",
            "epoch_time": [h["epoch_time"] for h in result["history"]]}


def before_after(args: argparse.Namespace) -> None:
    """Each backbone on shapes (and the real photos) with the old and the new defaults."""
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="tk-accuracy-") as tmp:
        env = dict(os.environ)
        for var in ("TK_HOME", "TORCH_HOME", "HF_HOME"):
            env[var] = str(Path(tmp) / var.lower())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        if args.threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        datasets: list[tuple[str, list[str]]] = []
        if not args.only_photos:
            more = ["--opt", f"dataset.samples={args.shapes_samples}"] if args.shapes_samples \
                else []
            datasets.append((f"shapes ({args.classes} classes"
                             f"{f', {args.shapes_samples} images' if more else ''})",
                             ["--classes", str(args.classes), *more]))
        if args.photos:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from photos import photo_regions

            root = Path(tmp) / "photos"
            classes = photo_regions(root, args.photos)
            datasets.append((f"real photos ({len(classes)} regions, {args.photos}/class)",
                             ["--data", str(root), "--classes", str(len(classes)),
                              "--image-size", "64"]))
        for data_label, data_args in datasets:
            for backbone, lr in parse_runs(args.runs):
                row: dict = {"data": data_label, "backbone": backbone, "lr": lr}
                for side, extra in (("before", BEFORE), ("after", [])):
                    print(f"{data_label}: {backbone} (lr {lr}), {side} ...", file=sys.stderr,
                          flush=True)
                    row[side] = _finetune(args, env, backbone, lr, f"acc-{len(rows)}-{side}",
                                          [*data_args, *extra])
                    if "best" in row[side]:
                        print(f"  best val acc {row[side]['best']:.3f}, "
                              f"{row[side]['wall']:.0f}s, {row[side]['settings']}",
                              file=sys.stderr, flush=True)
                rows.append(row)

    print(f"\n### Val accuracy before / after the speed defaults ({args.epochs} epochs, "
          f"random init, seed {args.seed})\n")
    print(f"device {args.device}, torch {torch.__version__}, {os.cpu_count()} CPUs; before: "
          f"`{' '.join(BEFORE)}`; after: tk's defaults ({rows[0]['after'].get('settings', '?')}"
          f" for the first run).\n")
    print("| data | backbone | lr | best val acc before | after | after - before | "
          "median epoch s before / after |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        b, a = r["before"], r["after"]
        if "best" not in b or "best" not in a:
            print(f"| {r['data']} | {r['backbone']} | {r['lr']:g} | failed | | | |")
            continue
        eb, ea = (sorted(x["epoch_time"])[len(x["epoch_time"]) // 2] for x in (b, a))
        print(f"| {r['data']} | {r['backbone']} | {r['lr']:g} | {b['best']:.3f} | "
              f"{a['best']:.3f} | {a['best'] - b['best']:+.3f} | {eb:.1f} / {ea:.1f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows},
                                                  indent=1))


if __name__ == "__main__":
    main()
