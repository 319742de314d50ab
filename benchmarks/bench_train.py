"""Epoch time of `tk finetune` against a plain PyTorch training loop, measured in one run.

The baseline is the loop the tutorials write: ``torchvision.datasets.ImageFolder`` +
``transforms.Compose`` + ``DataLoader`` + ``torchvision.models.resnet18`` with a new ``fc``
+ ``optimizer.zero_grad(); loss.backward(); optimizer.step()`` + a validation pass under
``torch.no_grad()``. Both sides get the same things:

- data: the embedded ``shapes`` dataset exported once to an on-disk image folder
  (``train/`` and ``val/``, PNG, 64 px), read from disk by both;
- model: torchvision resnet18, random initialisation, a new linear layer for N classes;
- input: 64 px (``tk --image-size 64``); training augmentation random-resized-crop (scale
  0.5-1) + horizontal flip + colour jitter 0.2, evaluation resize to 73 + centre crop 64,
  ImageNet normalisation (what tk builds from resnet18's data config);
- batch size, AdamW with the same lr and weight decay, the same number of epochs, the same
  thread settings (``--threads`` sets OMP_NUM_THREADS and torch's thread count for both;
  default: torch's default for both);
- each run in a fresh Python subprocess.

tk runs with its defaults for everything that is about speed (``--tk-defaults``, the
default): precision, channels-last and DataLoader workers are what tk picks for the machine
(printed in the table); the baseline is the plain fp32 loop with ``--workers`` DataLoader
workers (default: as many as tk picks, min(4, cores)). ``--no-tk-defaults`` gives tk the
baseline's settings instead (``--precision 32 --no-channels-last --workers N``), the
like-for-like comparison of the two loops.

Epoch time = one training pass + one validation pass, timed inside the process (tk: the
``epoch_time`` of ``tk finetune --json``'s history; baseline: the same span around its
loop). The first epoch is warm-up (dropped); the figure is the median of the later epochs
over all repeats. Cases:

- ``--freeze none``: everything trains;
- ``--freeze all``: backbone frozen (baseline: ``requires_grad=False`` and the backbone in
  eval mode, only ``fc`` in the optimizer);
- ``--freeze all --no-augment`` with tk's feature cache (on by default then) against the
  baseline frozen loop without augmentation: tk's first epoch includes computing the
  features (reported separately, with the later/first ratio).

    python benchmarks/bench_train.py               # 600 images, 3 epochs: ~2-4 min on 2 cores
    python benchmarks/bench_train.py --threads 1      # steadier on a busy machine
    python benchmarks/bench_train.py --device cuda --workers 6 --samples 2400 --epochs 5 --repeat 3

Nothing is asserted; prints markdown tables (and ``--json-out FILE`` writes the raw
figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_PCT = 0.875  # torchvision resnet18: resize 256, crop 224

CASES = {
    # name: (freeze, augment)
    "none": ("none", True),
    "all": ("all", True),
    "cache": ("all", False),
}


# -- the baseline (runs in its own subprocess) ------------------------------------------


def baseline(cfg: dict[str, Any]) -> dict[str, Any]:
    """A training loop as the PyTorch tutorials write it. Returns per-epoch figures."""
    import torch
    from torch import nn
    from torchvision import datasets, models, transforms

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    size = cfg["image_size"]
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    val_tf = transforms.Compose([
        transforms.Resize(int(size / CROP_PCT)),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        normalize,
    ])
    if cfg["augment"]:
        train_tf = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(0.5, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            transforms.ToTensor(),
            normalize,
        ])
    else:
        train_tf = val_tf
    root = Path(cfg["data"])
    train_set = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    val_set = datasets.ImageFolder(str(root / "val"), transform=val_tf)
    pin = bool(cfg.get("pin_memory"))  # pytorch/examples' imagenet style: pinned + async
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg["batch_size"],
                                               shuffle=True, num_workers=cfg["workers"],
                                               pin_memory=pin)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg["batch_size"],
                                             shuffle=False, num_workers=cfg["workers"],
                                             pin_memory=pin)

    device = torch.device(cfg["device"])
    model = models.resnet18(weights=None)
    frozen = cfg["freeze"] == "all"
    if frozen:
        for p in model.parameters():
            p.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, len(train_set.classes))
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"])

    history = []
    for epoch in range(cfg["epochs"]):
        t0 = time.perf_counter()
        if frozen:
            model.eval()  # frozen backbone: BatchNorm keeps its running statistics
            model.fc.train()
        else:
            model.train()
        running_loss, correct, seen = 0.0, 0, 0
        for inputs, labels in train_loader:
            inputs = inputs.to(device, non_blocking=pin)
            labels = labels.to(device, non_blocking=pin)
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item() * inputs.size(0)
            correct += (outputs.argmax(1) == labels).sum().item()
            seen += inputs.size(0)
        scheduler.step()

        model.eval()
        val_loss, val_correct, val_seen = 0.0, 0, 0
        with torch.no_grad():
            for inputs, labels in val_loader:
                inputs = inputs.to(device, non_blocking=pin)
                labels = labels.to(device, non_blocking=pin)
                outputs = model(inputs)
                val_loss += criterion(outputs, labels).item() * inputs.size(0)
                val_correct += (outputs.argmax(1) == labels).sum().item()
                val_seen += inputs.size(0)
        history.append({"epoch": epoch + 1, "epoch_time": time.perf_counter() - t0,
                        "train_loss": running_loss / seen, "train_acc": correct / seen,
                        "val_loss": val_loss / val_seen, "val_acc": val_correct / val_seen})
    return {"history": history, "threads": torch.get_num_threads()}


# -- running both sides ------------------------------------------------------------------


def export_data(root: Path, classes: int, samples: int, val_split: float, seed: int) -> None:
    """The shapes dataset as ``root/train/<class>/*.png`` and ``root/val/<class>/*.png``."""
    sys.path.insert(0, str(REPO / "examples"))
    from export_dataset import export  # examples/export_dataset.py

    n_val = max(classes, round(samples * val_split))
    n_train = samples - n_val
    opts = {"samples": samples}
    export("shapes", root / "train", classes=classes, per_class=n_train // classes,
           split="train", val_split=val_split, seed=seed, options=dict(opts))
    export("shapes", root / "val", classes=classes, per_class=n_val // classes,
           split="val", val_split=val_split, seed=seed, options=dict(opts))


def _env(work: Path, threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("TK_HOME", "TORCH_HOME", "HF_HOME"):
        env[var] = str(work / var.lower())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    else:
        env.pop("OMP_NUM_THREADS", None)
        env.pop("MKL_NUM_THREADS", None)
    return env


def run_baseline(cfg: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--run-baseline", json.dumps(cfg)],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"baseline failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall"] = wall
    return out


def run_tk(cfg: dict[str, Any], env: dict[str, str], store: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "toolkit", "finetune", "--backbone", "resnet18",
           "--classes", str(cfg["classes"]), "--data", cfg["data"], "--no-pretrained",
           "--epochs", str(cfg["epochs"]), "--batch-size", str(cfg["batch_size"]),
           "--lr", str(cfg["lr"]), "--weight-decay", str(cfg["weight_decay"]),
           "--image-size", str(cfg["image_size"]),
           "--freeze", cfg["freeze"], "--seed", str(cfg["seed"]), "--device", cfg["device"],
           "--store", str(store), "--name", "bench", "--overwrite", "--json"]
    if not cfg["augment"]:
        cmd.append("--no-augment")
    if not cfg["tk_defaults"]:
        cmd += ["--precision", "32", "--no-channels-last", "--workers", str(cfg["workers"])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"tk finetune failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    m = re.search(r"feature cache: computed \d+ feature vectors in ([0-9.]+)s", proc.stderr)
    chosen = re.search(r"precision (\S+)(?: \(auto\))?, channels-last (\S+)(?: \(auto\))?, "
                       r"(\d+) workers", proc.stderr)
    return {"history": result["history"], "wall": wall,
            "settings": (f"{chosen.group(1)}, channels-last {chosen.group(2)}, "
                         f"{chosen.group(3)} workers") if chosen else "?",
            "features_s": float(m.group(1)) if m else None,
            "cache_used": "feature cache:" in proc.stderr}


def _later(runs: list[dict[str, Any]]) -> float:
    """Median epoch time over every run's epochs after the first."""
    times = [h["epoch_time"] for r in runs for h in r["history"][1:]]
    return statistics.median(times)


def _first(runs: list[dict[str, Any]], with_features: bool = False) -> float:
    return statistics.median(
        r["history"][0]["epoch_time"] + ((r["features_s"] or 0.0) if with_features else 0.0)
        for r in runs)


def _s(seconds: float) -> str:
    return f"{seconds:.2f}" if seconds >= 1 else f"{seconds:.3f}"


def _acc(runs: list[dict[str, Any]]) -> float:
    return statistics.median(r["history"][-1]["val_acc"] for r in runs)


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{device} ({platform.processor() or platform.machine()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=600,
                        help="images in all (train + val) [600]")
    parser.add_argument("--classes", type=int, default=5, help="shape kinds [5]")
    parser.add_argument("--val-split", type=float, default=0.2, help="[0.2]")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per run; the first is warm-up [3]")
    parser.add_argument("--batch-size", type=int, default=32, help="[32]")
    parser.add_argument("--workers", type=int, default=None,
                        help="the baseline's DataLoader workers [min(4, cores), tk's rule]")
    parser.add_argument("--tk-defaults", action=argparse.BooleanOptionalAction, default=True,
                        help="tk picks precision, channels-last and workers itself [on]; "
                             "--no-tk-defaults: tk gets the baseline's fp32, contiguous, "
                             "--workers")
    parser.add_argument("--image-size", type=int, default=64, help="[64]")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW lr [1e-3]")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="[0.05]")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS and torch threads for both [torch default]")
    parser.add_argument("--device", default="cpu",
                        help="cpu | cuda: both sides train there [cpu]")
    parser.add_argument("--pin-memory", action="store_true",
                        help="baseline: pinned DataLoader memory and non_blocking copies (as "
                             "pytorch/examples' imagenet; tk does this on GPU) [off]")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side [1]")
    parser.add_argument("--cases", default="none,all,cache",
                        help="comma list of: none, all, cache [all three]")
    parser.add_argument("--data-dir", help="reuse / keep the exported images here")
    parser.add_argument("--json-out", help="write the raw figures to this file")
    parser.add_argument("--run-baseline", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_baseline:
        print(json.dumps(baseline(json.loads(args.run_baseline))))
        return

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad or not cases:
        parser.error(f"--cases: unknown {', '.join(bad) or '(none)'} (use none, all, cache)")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first one is warm-up)")
    if args.workers is None:
        args.workers = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                           else os.cpu_count() or 1)

    with tempfile.TemporaryDirectory(prefix="tk-bench-train-") as tmp:
        work = Path(tmp)
        data = Path(args.data_dir) if args.data_dir else work / "data"
        if not (data / "train").is_dir():
            t0 = time.perf_counter()
            export_data(data, args.classes, args.samples, args.val_split, seed=0)
            print(f"exported {args.samples} shapes images to {data} "
                  f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr)
        env = _env(work, args.threads)
        base_cfg = {"data": str(data), "classes": args.classes, "epochs": args.epochs,
                    "batch_size": args.batch_size, "workers": args.workers,
                    "image_size": args.image_size, "lr": args.lr,
                    "weight_decay": args.weight_decay, "seed": 0, "threads": args.threads,
                    "device": args.device, "pin_memory": args.pin_memory,
                    "tk_defaults": args.tk_defaults}
        results: dict[str, dict[str, list[dict[str, Any]]]] = {
            c: {"baseline": [], "tk": []} for c in cases}
        for r in range(args.repeat):
            for case in cases:
                freeze, augment = CASES[case]
                cfg = dict(base_cfg, freeze=freeze, augment=augment)
                order = ("baseline", "tk") if r % 2 == 0 else ("tk", "baseline")
                for side in order:
                    print(f"[{r + 1}/{args.repeat}] {case}: {side} ...", file=sys.stderr,
                          flush=True)
                    if side == "baseline":
                        out = run_baseline(cfg, env)
                    else:  # a fresh store: the feature cache is computed anew
                        out = run_tk(cfg, env, work / f"store-{case}-{r}")
                    results[case][side].append(out)
                    print(f"    epochs {[round(h['epoch_time'], 2) for h in out['history']]}"
                          f" s, process {out['wall']:.1f}s", file=sys.stderr, flush=True)

    import torch

    n_val = max(args.classes, round(args.samples * args.val_split))
    print("\n### `tk finetune` vs a plain PyTorch loop: seconds per epoch (train + val)\n")
    print(f"resnet18 (random init), {args.samples - n_val} train + {n_val} val images of "
          f"{args.image_size} px read from PNG files, batch {args.batch_size}, "
          f"baseline fp32 with {args.workers} DataLoader workers, tk "
          f"{'with its defaults' if args.tk_defaults else 'with the same settings'}, "
          f"AdamW lr {args.lr}, {args.epochs} epochs "
          f"(first dropped as warm-up), median over {args.repeat} run(s) of each side; "
          f"device {_device_name(args.device)}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, threads {args.threads or 'torch default'}.\n")
    labels = {"none": "`--freeze none`", "all": "`--freeze all`",
              "cache": "`--freeze all --no-augment` (tk: feature cache)"}
    print("| case | baseline s/epoch | tk s/epoch | tk / baseline | val acc baseline / tk "
          "| tk's settings |")
    print("|---|---:|---:|---:|---|---|")
    for case in cases:
        b, t = results[case]["baseline"], results[case]["tk"]
        bl, tl = _later(b), _later(t)
        print(f"| {labels[case]} | {_s(bl)} | {_s(tl)} | {tl / bl:.2f} | "
              f"{_acc(b):.2f} / {_acc(t):.2f} | {t[0]['settings']} |")
    if "cache" in cases:
        t = results["cache"]["tk"]
        b = results["cache"]["baseline"]
        feats = statistics.median(r["features_s"] or 0.0 for r in t)
        first, later = _first(t, with_features=True), _later(t)
        print("\n### Feature cache (tk `--freeze all --no-augment`)\n")
        print("| | seconds |")
        print("|---|---:|")
        print(f"| computing the features (train + val, once) | {feats:.2f} |")
        print(f"| first epoch incl. features | {_s(first)} |")
        print(f"| later epochs (median) | {_s(later)} |")
        print(f"| later / first | {later / first:.3f} |")
        print(f"| baseline frozen loop, later epochs | {_s(_later(b))} |")
    print("\n### Whole process (start-up, model build, training, saving), seconds\n")
    print("| case | baseline | tk |")
    print("|---|---:|---:|")
    for case in cases:
        b, t = results[case]["baseline"], results[case]["tk"]
        print(f"| {labels[case]} | {statistics.median(r['wall'] for r in b):.1f} | "
              f"{statistics.median(r['wall'] for r in t):.1f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results},
                                                  indent=1))


if __name__ == "__main__":
    main()
