"""Forward-pass images/s of a tk model in PyTorch against its `tk export` ONNX files.

One run, the same uint8 crops for every runtime, batch ``--batch-size`` (32), at each of
``--sizes`` (224 and 64 px):

- torch eager: ``model(normalised float batch)`` under ``torch.inference_mode``, the
  forward ``tk infer`` runs today (and again in channels-last layout);
- ONNX Runtime fp32: the graph ``tk export`` writes (``torch.onnx.export(dynamo=True)``,
  uint8 input, normalisation inside), CPU execution provider, default threads;
- ONNX Runtime int8: that graph after ``tk export --int8``'s quantization (static QDQ,
  per-channel int8 weights), calibrated on 64 of the same kind of images.

The model is a randomly initialised torchvision resnet18 with a 10-class linear head (built
the way ``tk finetune`` builds it), or ``--model NAME`` from ``--store``. The images are the
photo-like JPEGs of ``bench_infer.py`` (gradients, shapes, noise), resized and cropped by the
model's eval transform. Also printed: the largest |logit| difference of fp32 ONNX against
eager and int8's top-1 agreement with fp32 on the timed crops (random weights: agreement on
a trained model is what ``tk export --int8`` reports on real validation images).

    python benchmarks/bench_export.py                      # ~2-3 min on 2 cores
    python benchmarks/bench_export.py --sizes 64 --seconds 3

Each runtime runs ``--repeat`` rounds of at least ``--seconds`` each (after a warm-up
batch), in rotating order; the best round counts. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def rate(fn: Callable[[], object], n: int, seconds: float) -> float:
    """Images/s of ``fn`` (one batch of ``n``) over at least ``seconds``."""
    fn()  # warm-up
    done, start = 0, time.perf_counter()
    while True:
        fn()
        done += n
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def forward(model: Any, x: Any) -> Callable[[], object]:
    import torch

    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="224,64", help="input sizes in px [224,64]")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=6.0, help="per round [6]")
    ap.add_argument("--repeat", type=int, default=2, help="rounds; the best counts [2]")
    ap.add_argument("--model", help="stored model (default: random resnet18)")
    ap.add_argument("--store", type=Path, help="store of --model")
    opts = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch
    from bench_infer import make_images

    from toolkit.data.decode import load_image
    from toolkit.data.transforms import eval_transform
    from toolkit.model.assemble import ModelSpec, build_classifier
    from toolkit.model.loading import load_model
    from toolkit.plugin.manager import load_plugins
    from toolkit.predict.export import formats as F
    from toolkit.predict.export.images import crop_function

    plugins = load_plugins()
    if opts.model:
        loaded = load_model(opts.model, opts.store, plugins=plugins)
        model, base_config, label = loaded.model, loaded.data_config, opts.model
    else:
        torch.manual_seed(0)
        spec = ModelSpec(plugins.registry("backbones").resolve("resnet18").qualified_name, 10)
        model, backbone = build_classifier(plugins, spec, pretrained=False)
        model.eval()
        base_config, label = backbone.data_config, "resnet18 (random init, 10 classes)"

    tmp = Path(tempfile.mkdtemp(prefix="tk-bench-export-"))
    n = opts.batch_size
    make_images(tmp, n + 64, (500, 375))
    files = sorted(tmp.glob("*.jpg"))
    print(f"{label}, batch {n}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, {platform.processor()}",
          file=sys.stderr)

    results: dict[int, dict[str, float]] = {}
    extra: dict[int, str] = {}
    for size in (int(s) for s in opts.sizes.split(",")):
        config = base_config.with_image_size(size)
        crop = crop_function(eval_transform(config))
        crops = np.stack([crop(load_image(f)) for f in files])
        batch, calib = crops[:n], crops[n:]
        module = F.uint8_module(model, config.mean, config.std)
        x = torch.from_numpy(batch)
        floats = ((x.float() / 255) - module.mean) / module.std
        floats_cl = floats.contiguous(memory_format=torch.channels_last)
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        print(f"{size}px: exporting ...", file=sys.stderr)
        fp32 = F.onnx_bytes(F.onnx_proto(module, size, size), {})
        int8 = F.onnx_bytes(F.quantize_int8(fp32, [calib[i:i + 16] for i in range(0, 64, 16)]),
                            {})
        s32 = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"])
        s8 = ort.InferenceSession(int8, providers=["CPUExecutionProvider"])

        runs = {
            "torch eager": forward(model, floats),
            "torch eager, channels_last": forward(model_cl, floats_cl),
            "ONNX Runtime fp32": functools.partial(s32.run, None, {F.INPUT_NAME: batch}),
            "ONNX Runtime int8": functools.partial(s8.run, None, {F.INPUT_NAME: batch}),
        }
        best = dict.fromkeys(runs, 0.0)
        names = list(runs)
        for r in range(opts.repeat):
            for name in names[r % len(names):] + names[:r % len(names)]:
                got = rate(runs[name], n, opts.seconds)
                best[name] = max(best[name], got)
                print(f"  {size}px {name}: {got:.0f} img/s", file=sys.stderr)
        results[size] = best
        with torch.inference_mode():
            ref = model(floats).numpy()
        o32 = s32.run(None, {F.INPUT_NAME: batch})[0]
        o8 = s8.run(None, {F.INPUT_NAME: batch})[0]
        extra[size] = (f"{size}px: fp32 ONNX max |logit diff| vs eager "
                       f"{np.abs(o32 - ref).max():.1e}; int8 top-1 agreement with fp32 "
                       f"{(o8.argmax(1) == o32.argmax(1)).mean():.0%} on the {n} timed crops; "
                       f"file sizes fp32 {len(fp32) / 1e6:.1f} MB, int8 {len(int8) / 1e6:.1f} MB")

    sizes = list(results)
    print(f"| forward pass, batch {n} | {' | '.join(f'{s} px img/s' for s in sizes)} |")
    print("|---|" + "---:|" * len(sizes))
    for name in results[sizes[0]]:
        cells = []
        for s in sizes:
            v, base = results[s][name], results[s]["torch eager"]
            cells.append(f"{v:.0f} ({v / base:.2f}x)")
        print(f"| {name} | {' | '.join(cells)} |")
    print()
    for s in sizes:
        print(extra[s])


if __name__ == "__main__":
    main()
