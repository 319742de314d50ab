"""Multi-label end to end on real photographs: `tk finetune` / `tk eval` / `tk infer`.

Four kinds of real region (the ``photo_regions`` classes of ``photos.py``: quarters of the
two photographs scikit-learn ships, china.jpg and flower.jpg) are cut into 32x32 JPEG-like
crops; each image of the set is a 64x64 2x2 grid holding 1-3 crops of different kinds in
random cells, the other cells plain grey. Its labels are the kinds it contains (a
``path,labels`` manifest, ';'-separated). Train, validation and test manifests are drawn
with different seeds, so every crop differs (same regions, different positions, scales and
flips). A resnet18 is trained from scratch through the real `tk` command, `tk eval --json`
scores the held-out test manifest (mAP, micro / macro F1, exact match), and the same
metrics (``toolkit.metrics.scores``, scikit-learn) are computed for constant predictors
that never look at the image. `tk infer` then prints a few rows with their ``labels``.

    python benchmarks/multilabel_photos.py [--train 600] [--test 200] [--epochs 8]

Accuracy, not speed: the figures do not depend on the machine being busy (CPU, seed 0).
Needs scikit-learn (the ``review`` / ``multilabel`` extras).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import _crop, quarters  # noqa: E402

# quarters of the two photographs (photo_regions names): top-left / bottom-right of each
KINDS = ("china_tl", "china_br", "flower_tl", "flower_br")
TILE, SIZE = 32, 64
GREY = (128, 128, 128)


def _regions() -> dict[str, tuple]:
    """Each kind: (the photograph, the box of its quarter)."""
    out = {name: (img, box) for name, img, box in quarters()}
    return {k: out[k] for k in KINDS}


def build(folder: Path, n: int, seed: int) -> Path:
    """``n`` composite JPEGs in ``folder`` and their manifest ``folder.csv``."""
    from PIL import Image

    rng = random.Random(seed)
    regions = _regions()
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    for i in range(n):
        kinds = rng.sample(KINDS, rng.randint(1, 3))
        cells = rng.sample(range(4), len(kinds))
        canvas = Image.new("RGB", (SIZE, SIZE), GREY)
        for kind, cell in zip(kinds, cells, strict=True):
            img, box = regions[kind]
            canvas.paste(_crop(img, rng, TILE, TILE, box=box),
                         ((cell % 2) * TILE, (cell // 2) * TILE))
        path = folder / f"{i:05d}.jpg"
        canvas.save(path, quality=rng.randint(75, 95))
        rows.append(f"{path.name},{';'.join(sorted(kinds))}")
    manifest = folder.with_suffix(".csv")
    # paths relative to the manifest's folder
    manifest.write_text("\n".join(r if r == rows[0] else f"{folder.name}/{r}" for r in rows)
                        + "\n")
    return manifest


def read_manifest(path: Path) -> list[set[str]]:
    import csv

    with path.open(newline="") as f:
        return [set(filter(None, r["labels"].split(";"))) for r in csv.DictReader(f)]


def tk(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "toolkit", *args], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"tk {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def constant_rows(train: list[set[str]], test: list[set[str]], classes: list[str]) -> dict:
    """Metrics of predictors that ignore the image, from the training labels only."""
    import numpy as np

    from toolkit.metrics import scores

    def hot(sets: list[set[str]]) -> np.ndarray:
        return np.array([[c in s for c in classes] for s in sets], dtype=np.int64)

    y_train, y_test = hot(train), hot(test)
    prevalence = y_train.mean(axis=0)
    n = len(test)
    probs = np.tile(prevalence, (n, 1))
    mode = Counter(frozenset(s) for s in train).most_common(1)[0][0]
    out = {
        "prevalence scores, threshold 0.5": scores(probs, y_test, 0.5),
        "every class (best constant F1)": scores(probs, y_test, 0.0),
        f"most frequent label set ({';'.join(sorted(mode))})":
            scores(np.tile(hot([set(mode)])[0].astype(float), (n, 1)), y_test, 0.5),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--show", type=int, default=5, help="test images given to `tk infer`")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        train = build(t / "train", a.train, 0)
        val = build(t / "val", a.val, 1)
        test = build(t / "test", a.test, 2)
        store = str(t / "store")
        env = dict(os.environ)
        print(f"{len(KINDS)} kinds ({', '.join(KINDS)}); {SIZE}x{SIZE} composites of 1-3 "
              f"real {TILE}x{TILE} crops; train {a.train}, val {a.val}, test {a.test}; "
              f"resnet18 from scratch, {a.epochs} epochs, seed 0", flush=True)
        tk("finetune", "--backbone", "resnet18", "--no-pretrained", "--data", str(train),
           "--val-data", str(val), "--epochs", str(a.epochs), "--image-size", str(SIZE),
           "--device", "cpu", "--seed", "0", "--name", "mlphotos", "--store", store, "-q",
           env=env)
        report = json.loads(tk("eval", "--model", "mlphotos", "--data", str(test), "--json",
                               "-q", "--store", store, env=env))
        classes = report["classes"]
        base = constant_rows(read_manifest(train), read_manifest(test), classes)
        print(f"\n{'predictor':<48} {'mAP':>6} {'F1 micro':>9} {'F1 macro':>9} {'exact':>6}")
        print(f"{'tk resnet18 (tk eval --json)':<48} {report['map']:6.3f} "
              f"{report['f1_micro']:9.3f} {report['f1_macro']:9.3f} "
              f"{report['exact_match']:6.3f}")
        for name, s in base.items():
            print(f"{'constant: ' + name:<48} {s.map:6.3f} {s.f1_micro:9.3f} "
                  f"{s.f1_macro:9.3f} {s.exact_match:6.3f}")
        print("\nper class (tk eval): " + ", ".join(
            f"{m['name']} AP {m['ap']:.3f} F1 {m['f1']:.3f} (threshold {m['threshold']:.2f})"
            for m in report["per_class"]))
        truth = read_manifest(test)
        files = [str(t / "test" / f"{i:05d}.jpg") for i in range(a.show)]
        rows = tk("infer", *files, "--model", "mlphotos", "--store", store, "--format",
                  "jsonl", "-q", env=env)
        print("\ntk infer --format jsonl (labels / truth):")
        for i, line in enumerate(rows.splitlines()):
            row = json.loads(line)
            print(f"  {Path(row['path']).name}: labels {row['labels']}  truth "
                  f"{sorted(truth[i])}  scores {row['label_scores']}")


if __name__ == "__main__":
    main()
