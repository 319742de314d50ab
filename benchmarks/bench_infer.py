"""Images/s of `tk infer` against the raw forward limit and a tutorial inference loop.

All figures come from one run, on the same folder of real-sized JPEGs, the same model, the
same batch size and the same number of decoding workers:

- raw forward: the model on tensors already decoded, resized and normalised in memory
  (the ceiling: no file reading, no decoding);
- tutorial loop: ``torchvision.datasets.ImageFolder`` + PIL + ``transforms.Compose([Resize,
  CenterCrop, ToTensor, Normalize])`` + ``DataLoader`` + ``model(x).argmax(1)`` under
  ``torch.no_grad()``, as the tutorials write it;
- tk, Python API: ``toolkit.predict.runner.predict`` with its defaults (``--decode auto``:
  reduced-size JPEG decoding only of files at least twice the size the model needs;
  channels-last auto), with the settings before issue 15 (``--decode pil`` exact decoding,
  contiguous layout), and with ``decode="draft"`` (reduced-size decoding down to the size
  needed); each on its own copy of the model (channels-last converts a model in place);
- tk, CLI: ``python -m toolkit infer DIR --format jsonl -o FILE`` in a subprocess, end to
  end (its wall time includes starting Python, importing torch and loading the model);
- tk's decoding workers alone (:func:`toolkit.data.batches.iter_batches`: decode, resize,
  crop to ``uint8`` batches, no model): the rate the data side can feed any runtime;
- tk on ONNX Runtime: the same model exported by ``tk export`` (fp32, and ``--int8``
  calibrated on the benchmark's own images, ``--force`` since random weights may disagree
  with fp32 on more than 2 %) and run through
  :func:`toolkit.predict.session.open_predictor` (the path of ``tk infer --model
  FILE.onnx``: same decoding workers, no torch), and through the CLI end to end.

The folder holds photo-like images (gradients, shapes and noise, JPEG quality 90) made on
the first run, ``--photos``: crops of real photographs (benchmarks/photos.py, needs
scikit-learn), or ``--images-dir`` (any folder of JPEGs; its images are used as they are).
The model is a randomly initialised torchvision resnet18 (10 classes) saved to a temporary
store, or ``--model NAME`` from ``--store``.

    python benchmarks/bench_infer.py                     # 200 images 1024x768, ~2-3 min
    python benchmarks/bench_infer.py --images 64 --size 640x480 --batch-size 16
    python benchmarks/bench_infer.py --image-size 64      # a 64 px model: decoding-bound
    python benchmarks/bench_infer.py --images 1050 --size 500x375 \
        --only raw,tutorial,tk,onnx,int8                  # the issue-14 comparison

Timings cover the whole pass (loader start-up included, after one warm-up forward); each
pipeline runs ``--repeat`` times in rotating order and its best pass counts (the machine
may be shared). Nothing is asserted. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toolkit.model.loading import load_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """``n`` photo-like JPEGs: smooth colour gradients, a few filled shapes, sensor noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx / w + np.sin(angle) * yy / h + 1) / 2
        arr = c0 * (1 - t[..., None]) + c1 * t[..., None]
        arr += rng.normal(0, 8, (h, w, 3))
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, w), rng.integers(0, h)
            r = int(rng.integers(w // 20, w // 5))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=fill)
            else:
                draw.rectangle([x0 - r, y0 - r, x0 + r, y0 + r], fill=fill)
        img.save(folder / f"img_{i:05d}.jpg", quality=90)


def save_random_resnet18(store_dir: Path, image_size: int | None = None) -> str:
    import torch

    from model_store import ModelStore
    from toolkit.model.assemble import ModelSpec, build_classifier
    from toolkit.plugin.manager import load_plugins

    plugins = load_plugins()
    qualified = plugins.registry("backbones").resolve("resnet18").qualified_name
    torch.manual_seed(0)
    spec = ModelSpec(qualified, 10)
    model, backbone = build_classifier(plugins, spec, pretrained=False)
    data_config = backbone.data_config
    if image_size:
        data_config = data_config.with_image_size(image_size)
    meta = {"spec": spec.to_dict(), "classes": [f"class{i}" for i in range(10)],
            "data_config": data_config.to_dict(),
            "training": {"note": "random weights for benchmarks/bench_infer.py"},
            "metrics": {}, "weights": backbone.weights.to_dict()}
    ModelStore(store_dir).save("bench-resnet18", model, meta, overwrite=True)
    return "bench-resnet18"


def make_folder(folder: Path, n: int, size: tuple[int, int], photos: bool) -> None:
    """Generated photo-like JPEGs, or (``photos``) crops of real photographs."""
    if photos:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from photos import photo_jpegs

        photo_jpegs(folder, n, size)
    else:
        make_images(folder, n, size)


KEYS = ("raw", "tutorial", "tk", "auto", "draft", "cli", "onnx", "int8", "cli-onnx", "decode")


def export_onnx(name: str, store_dir: Path, out: Path, calibrate: Path, int8: bool) -> Path:
    """``tk export`` of the benchmark model (the library function the command calls)."""
    from toolkit.plugin.manager import load_plugins
    from toolkit.predict.export.run import ExportArgs, export_model

    args = ExportArgs(name, output=str(out), int8=int8, calibrate=str(calibrate), force=True,
                      store=str(store_dir))
    result = export_model(args, load_plugins(), log=lambda m: print(f"  export: {m}",
                                                                     file=sys.stderr))
    return result.path


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def tk_model_copies(loaded):
    """A copy of ``loaded`` per tk pipeline (decode, channels_last): channels-last converts
    a model in place, and the raw-forward and tutorial baselines keep the original."""
    import copy

    return {key: copy.deepcopy(loaded)
            for key in (("pil", False), ("auto", None), ("draft", None))}


def main() -> None:
    from toolkit.predict.runner import default_workers

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=200, help="images to generate [200]")
    ap.add_argument("--size", default="1024x768", help="generated image size WxH")
    ap.add_argument("--images-dir", type=Path, help="use this folder of JPEGs instead")
    ap.add_argument("--photos", action="store_true",
                    help="make the images from real photographs (benchmarks/photos.py)")
    ap.add_argument("--model", help="stored model (default: random resnet18, temp store)")
    ap.add_argument("--image-size", type=int,
                    help="input size of the random resnet18 (default: its 224)")
    ap.add_argument("--store", type=Path, help="store of --model")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-cli", action="store_true", help="no subprocess measurement")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--repeat", type=int, default=2,
                    help="rounds (order rotated); the best pass of each pipeline counts [2]")
    ap.add_argument("--only", help="comma-separated pipelines to run, of: " + ",".join(KEYS)
                    + " [all]")
    opts = ap.parse_args()
    wanted = set(opts.only.split(",")) if opts.only else set(KEYS)
    if wanted - set(KEYS) or not {"raw", "tutorial"} <= wanted:
        raise SystemExit(f"--only: pick from {','.join(KEYS)} (raw and tutorial always)")

    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    from toolkit.data.decode import load_image
    from toolkit.data.transforms import eval_transform
    from toolkit.devices import resolve_device
    from toolkit.plugin.manager import load_plugins
    from toolkit.predict.runner import predict

    tmp = Path(tempfile.mkdtemp(prefix="tk-bench-infer-"))
    if opts.images_dir:
        root = opts.images_dir
    else:
        w, h = (int(v) for v in opts.size.lower().split("x"))
        root = tmp / "images"
        print(f"making {opts.images} JPEGs of {w}x{h} in {root} ...", file=sys.stderr)
        make_folder(root / "photos", opts.images, (w, h), opts.photos)  # ImageFolder: a class
    if opts.model:
        store_dir, name = opts.store, opts.model
    else:
        store_dir = tmp / "store"
        name = save_random_resnet18(store_dir, opts.image_size)
    plugins = load_plugins()
    device = resolve_device(opts.device)
    loaded = load_model(name, store_dir, plugins=plugins, device=device)
    copies = tk_model_copies(loaded)
    model = loaded.model.eval()
    dc = loaded.data_config
    files = sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in (".jpg",
                                                                               ".jpeg"))
    n = len(files)
    bs, workers = opts.batch_size, opts.workers
    print(f"{n} images, model {name} ({dc.input_size[1]}x{dc.input_size[2]}), batch {bs}, "
          f"{workers} workers, device {device}, torch threads {torch.get_num_threads()}",
          file=sys.stderr)

    # (a) raw forward on tensors already in memory
    transform = eval_transform(dc)
    tensors = torch.stack([transform(load_image(f)) for f in files])
    with torch.inference_mode():
        model(tensors[:bs].to(device))  # warm-up

    def raw() -> None:
        with torch.inference_mode():
            for i in range(0, n, bs):
                model(tensors[i:i + bs].to(device)).argmax(1).tolist()

    # (b) the tutorial loop
    size = dc.input_size[1]
    tutorial_tf = T.Compose([T.Resize(int(size / dc.crop_pct)), T.CenterCrop(size),
                             T.ToTensor(), T.Normalize(dc.mean, dc.std)])

    def tutorial() -> list[int]:
        ds = datasets.ImageFolder(str(root), transform=tutorial_tf)
        loader = DataLoader(ds, batch_size=bs, shuffle=False, num_workers=workers)
        preds: list[int] = []
        with torch.no_grad():
            for x, _ in loader:
                preds += model(x.to(device)).argmax(1).tolist()
        return preds

    # (c) tk
    def tk_api(decode: str, channels_last: bool | None = None) -> list[str]:
        return [r.label for r in predict(copies[decode, channels_last], [root], batch_size=bs,
                                         workers=workers, device=str(device), decode=decode,
                                         channels_last=channels_last)]

    out = tmp / "out.jsonl"
    env = dict(os.environ)
    env.setdefault("TK_HOME", str(tmp / "home"))
    cmd = [sys.executable, "-m", "toolkit", "infer", str(root), "--store", str(store_dir),
           "--model", name, "-o", str(out), "-q", "--batch-size", str(bs),
           "--workers", str(workers), "--device", str(opts.device)]
    cli_own: list[float] = []

    def cli() -> None:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"tk infer failed:\n{proc.stderr}")
        assert len(out.read_text().splitlines()) == n
        own = re.search(r"\(([0-9.]+) files/s", proc.stderr)
        if own:  # the CLI's own figure: from its first batch to its last row
            cli_own.append(n / float(own.group(1)))

    def decoding_only() -> None:
        """tk's decoding workers alone (decode, resize, crop to uint8 batches; no model)."""
        from toolkit.data.batches import Preparer, iter_batches

        paths = sorted(files)
        for _ in iter_batches(paths, range(n), Preparer(transform, "pil"), batch_size=bs,
                              workers=workers):
            pass

    exports: dict[str, Path] = {}
    for key, int8 in (("onnx", False), ("int8", True)):
        if key in wanted or (key == "onnx" and "cli-onnx" in wanted):
            print(f"exporting {name} to ONNX{' int8' if int8 else ''} ...", file=sys.stderr)
            exports[key] = export_onnx(name, store_dir, tmp / f"{key}.onnx", root, int8)

    def tk_onnx(key: str) -> list[str]:
        from toolkit.data.listing import discover
        from toolkit.predict.session import open_predictor

        with open_predictor(exports[key], device=str(device)) as opened:
            runner = opened.runner(batch_size=bs, workers=workers)
            return [r.label for r in runner.predict_paths(discover([str(root)]))]

    out_onnx = tmp / "out-onnx.jsonl"

    def cli_onnx() -> None:
        proc = subprocess.run([*cmd[:cmd.index("--store")], "--model", str(exports["onnx"]),
                               "-o", str(out_onnx), "-q", "--batch-size", str(bs),
                               "--workers", str(workers)], cwd=REPO, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"tk infer --model FILE.onnx failed:\n{proc.stderr}")
        assert len(out_onnx.read_text().splitlines()) == n

    candidates = {
        "raw": ("raw forward (tensors in memory)", raw),
        "tutorial": ("tutorial loop (ImageFolder + PIL + DataLoader)", tutorial),
        "tk": ("tk infer, torch runtime, Python API (before: --decode pil "
               "--no-channels-last)", lambda: tk_api("pil", False)),
        "auto": ("tk infer, torch runtime, Python API (defaults: --decode auto, "
                 "channels-last auto)", lambda: tk_api("auto")),
        "draft": ("tk infer, torch runtime, Python API (--decode draft, channels-last auto)",
                  lambda: tk_api("draft")),
        "cli": ("tk infer, torch runtime, CLI end to end (process start included)", cli),
        "onnx": ("tk infer --model FILE.onnx, ONNX Runtime fp32, Python API",
                 lambda: tk_onnx("onnx")),
        "int8": ("tk infer --model FILE.onnx, ONNX Runtime int8, Python API",
                 lambda: tk_onnx("int8")),
        "cli-onnx": ("tk infer --model FILE.onnx, fp32, CLI end to end (process start "
                     "included)", cli_onnx),
        "decode": ("tk decoding workers alone (no model; not a pipeline)", decoding_only),
    }
    if opts.skip_cli:
        wanted -= {"cli", "cli-onnx"}
    pipelines = {label: fn for key, (label, fn) in candidates.items() if key in wanted}
    key_of = {label: key for key, (label, _) in candidates.items()}
    best: dict[str, float] = {}
    outputs: dict[str, object] = {}
    labels = list(pipelines)
    for r in range(opts.repeat):  # rotate the order; keep each pipeline's best pass
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            t, outputs[label] = timed(pipelines[label])
            best[label] = min(t, best.get(label, float("inf")))
            print(f"  round {r + 1}: {label}: {n / t:.1f} images/s", file=sys.stderr)
    results = [(label, best[label]) for label in labels]
    if cli_own:
        results.append(("tk infer, CLI as it reports itself (start-up excluded)",
                        min(cli_own)))
    by_key = {key_of[label]: out for label, out in outputs.items()}
    classes = loaded.classes
    tut = [classes[i] for i in by_key["tutorial"]]  # type: ignore[union-attr]

    def agreement(a: str, b: str) -> str:
        if a not in by_key or b not in by_key:
            return ""
        x = tut if a == "tutorial" else by_key[a]
        same = sum(p == q for p, q in zip(x, by_key[b], strict=True))  # type: ignore
        return f"{b} vs {a} {same / n:.1%}"

    raw_rate = n / results[0][1]
    tut_rate = n / results[1][1]
    print(f"\n{n} JPEGs ({opts.size if not opts.images_dir else root}), {name}, batch {bs}, "
          f"{workers} workers, {device}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| pipeline | images/s | / raw forward | / tutorial loop |")
    print("|---|---:|---:|---:|")
    for label, t in results:
        rate = n / t
        print(f"| {label} | {rate:.1f} | {rate / raw_rate:.2f} | {rate / tut_rate:.2f} |")
    pairs = [agreement("tutorial", "tk"), agreement("tk", "auto"), agreement("tk", "draft"),
             agreement("tk", "onnx"), agreement("onnx", "int8"), agreement("tutorial", "onnx")]
    print("\ntop-1 agreement: " + "; ".join(p for p in pairs if p))
    if opts.keep:
        print(f"kept {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
