"""`tk tune` on real photographs (issue 17's "must show", on real images).

A small labelled real-image set (``photos.photo_regions``: crops of scikit-learn's two
shipped photographs, one class per quarter of a photograph; the first ``--classes`` classes
kept, ``--per-class`` JPEGs each) is tuned the way a user would: ``tk tune`` in a
subprocess with a fresh store (TK_HOME), a small randomly initialised resnet18
(``--no-pretrained``, ``--image-size``), ``--no-augment`` so trials that draw
``freeze = all`` share the feature cache, and a search space whose ``lr`` reaches 10 so
some trials are hopeless. Then a second ``tk tune --trials 2`` on the same study. The study
is read back with Optuna's own API (trial count, states, best value and params), the best
model is loaded with ``toolkit.load_model`` and ``tk infer`` labels a few images.

    python benchmarks/tune_photos.py [--classes 4] [--per-class 30] [--trials 6] [--more 2]

Needs scikit-learn (the photographs) and optuna (the ``tune`` extra). CPU, fixed sampler
seed; the trials' values still vary a little with thread scheduling.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from photos import photo_regions  # noqa: E402

SPACE = 'lr = {low = 1e-4, high = 10.0, log = true}\nfreeze = ["none", "all"]\n'
STUDY = "photos"


def tk(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "toolkit", *args]
    print("$ tk " + " ".join(args), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    print(f"  exit {proc.returncode}, {time.perf_counter() - start:.1f} s", flush=True)
    if proc.returncode:
        raise SystemExit(f"tk {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=4, help="classes kept (of 8)")
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--more", type=int, default=2, help="trials of the second tk tune")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--keep", type=Path, help="work here and keep it (default: a temp dir)")
    args = ap.parse_args()

    import optuna

    from toolkit.testing import isolated_env

    work = args.keep or Path(tempfile.mkdtemp(prefix="tune-photos-"))
    try:
        data = work / "data"
        classes = photo_regions(data, per_class=args.per_class)
        for name in classes[args.classes:]:
            shutil.rmtree(data / name)
        classes = classes[:args.classes]
        print(f"data: {len(classes)} classes x {args.per_class} real-photo JPEGs "
              f"({', '.join(classes)})")
        space = work / "space.toml"
        space.write_text(SPACE)
        env = isolated_env(work / "home")
        store = Path(env["TK_HOME"])
        fixed = ["--backbone", "resnet18", "--no-pretrained", "--image-size",
                 str(args.image_size), "--no-augment", "--epochs", str(args.epochs),
                 "--batch-size", "16", "--data", str(data), "--space", str(space),
                 "--store", str(store), "-q"]

        first = tk("tune", *fixed, "--trials", str(args.trials), "--study", STUDY,
                   "--name", STUDY, "--sampler-seed", "0", "--json", env=env)
        result = json.loads(first.stdout)
        cached = first.stderr.count("feature cache: using")
        print(f"  first run: {len(result['trials'])} trials, best trial "
              f"{result['best_trial']}, feature cache reused {cached} time(s)")
        tk("tune", *fixed, "--trials", str(args.more), "--study", STUDY, "--name", STUDY,
           "--sampler-seed", "1", env=env)

        storage = f"sqlite:///{store / 'tune' / 'optuna.db'}"
        study = optuna.load_study(study_name=STUDY, storage=storage)
        trials = study.get_trials(deepcopy=False)
        print(f"\nstudy {STUDY!r} ({storage}), read back with optuna.load_study: "
              f"{len(trials)} trials")
        print(f"{'trial':>5}  {'state':<8}  {'epochs':>6}  {'val_acc':>7}  params")
        for t in trials:
            value = t.value if t.value is not None else (
                list(t.intermediate_values.values())[-1] if t.intermediate_values else None)
            shown = f"{value:.3f}" if value is not None else "-"
            params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in t.params.items())
            print(f"{t.number:>5}  {t.state.name:<8}  {len(t.intermediate_values):>6}  "
                  f"{shown:>7}  {params}")
        states = [t.state.name for t in trials]
        counts = {s: states.count(s) for s in sorted(set(states))}
        print(f"states: {counts}")
        best = study.best_trial
        print(f"best: trial {best.number}, val_acc {best.value:.3f}, params {best.params}")

        import toolkit

        loaded = toolkit.load_model(STUDY, store=store)
        tune = loaded.meta["tune"]
        print(f"\ntoolkit.load_model({STUDY!r}): classes {loaded.classes}, "
              f"tune trial {tune['trial']} (value {tune['value']:.3f})")
        images = [sorted((data / c).glob("*.jpg"))[0] for c in classes]
        out = tk("infer", *map(str, images), "--model", STUDY, "--store", str(store),
                 "--format", "jsonl", env=env)
        right = 0
        for line in out.stdout.splitlines():
            row = json.loads(line)
            truth = Path(row["path"]).parent.name
            right += row["label"] == truth
            print(f"  {truth}/{Path(row['path']).name} -> {row['label']} ({row['score']:.3f})")
        print(f"tk infer: {right}/{len(images)} right "
              "(images of the tuned set, train or validation split: a smoke check)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
