"""Requests/s and latency of `tk serve`, dynamic batching on against off, in one run.

Two real servers (`python -m toolkit serve` in subprocesses, loopback, a free port) serve
the same model: **batching on** (``--max-batch 32 --max-wait-ms 5``, the defaults) and
**batching off** (``--max-batch 1``). For 1, 4 and 16 concurrent clients (asyncio + httpx,
one image per request, each client sends its next request when the previous one is
answered), each server answers ``--requests`` requests per client, both settings back to
back, ``--repeat`` rounds (the best round counts). The table gives requests/s, the p50 /
p95 / p99 latency, the mean batch the server ran (from ``/v1/stats``) and the ratio of
batching on to off. For scale, the last line is `tk infer` (Python API, same model, the
same images repeated to 256 files, batch 32) in images/s.

The model is a randomly initialised torchvision resnet18 (10 classes) at ``--image-size``
(default 64 px: a small model where per-call overhead matters; 224 for the full size),
saved to a temporary store; the images are photo-like 320x240 JPEGs.

    python benchmarks/bench_serve.py                       # ~3 min on 2 busy CPU cores
    python benchmarks/bench_serve.py --image-size 224 --requests 10

Nothing is asserted. The client runs on the same machine as the server, so on a few cores
it takes CPU from the server; figures are for comparing the two settings in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_infer import make_images, save_random_resnet18  # noqa: E402


def start_server(store: Path, name: str, *args: str) -> tuple[subprocess.Popen, str, Path]:
    log = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "toolkit", "serve", "--model", name, "--store", str(store),
             "--port", "0", "--device", "cpu", *args],
            stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.search(r" on (http://\S+) ", log.read_text())
        if found:
            return proc, found.group(1), log
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"tk serve did not start:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def load(url: str, images: list[bytes], clients: int, per_client: int
               ) -> tuple[float, list[float], int]:
    """``(seconds, latencies, errors)`` of ``clients`` x ``per_client`` requests."""
    import httpx

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        async def one(k: int) -> None:
            nonlocal errors
            for j in range(per_client):
                data = images[(k * per_client + j) % len(images)]
                t0 = time.perf_counter()
                r = await client.post(f"{url}/v1/predict",
                                      files=[("file", ("img.jpg", data, "image/jpeg"))])
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1

        await one(0)  # warm-up (first forward, connection)
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(one(k) for k in range(clients)))
        return time.perf_counter() - start, latencies, errors


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=24, help="requests per client [24]")
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients [1,4,16]")
    ap.add_argument("--image-size", type=int, default=64, help="model input size [64]")
    ap.add_argument("--images", type=int, default=32, help="distinct images [32]")
    ap.add_argument("--repeat", type=int, default=2,
                    help="rounds; the best round of each setting counts [2]")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    import httpx

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    store = tmp / "store"
    name = save_random_resnet18(store, args.image_size)
    make_images(tmp / "images", args.images, (320, 240))
    paths = sorted((tmp / "images").glob("*.jpg"))
    images = [p.read_bytes() for p in paths]

    settings = {"batching on (--max-batch 32 --max-wait-ms 5)": ("--max-batch", "32",
                                                                   "--max-wait-ms", "5"),
                "batching off (--max-batch 1)": ("--max-batch", "1")}
    results: dict[tuple[str, int], tuple[float, float, float, float, int, dict]] = {}
    servers = {label: start_server(store, name, *flags) for label, flags in settings.items()}
    try:
        for _round in range(args.repeat):
            for c in clients:  # both settings back to back: the same machine load
                for label, (_proc, url, _log) in servers.items():
                    before = httpx.get(f"{url}/v1/stats").json()
                    seconds, lat, errors = asyncio.run(load(url, images, c, args.requests))
                    after = httpx.get(f"{url}/v1/stats").json()
                    n = c * args.requests
                    batches = after["batches"] - before["batches"]
                    mean_batch = (after["images"] - before["images"]) / max(1, batches)
                    print(f"{label}, {c} clients: {n / seconds:.1f} req/s "
                          f"(mean batch {mean_batch:.1f}, {errors} errors)", file=sys.stderr)
                    best = results.get((label, c))
                    if best is None or n / seconds > best[0]:
                        results[(label, c)] = (n / seconds, pct(lat, 50) * 1000,
                                               pct(lat, 95) * 1000, pct(lat, 99) * 1000,
                                               errors, {"mean_batch": mean_batch})
    finally:
        for proc, _url, _log in servers.values():
            stop_server(proc)

    # tk infer on the same images, for scale
    from toolkit.data.listing import PathList
    from toolkit.model.loading import load_model
    from toolkit.predict.runner import predict

    loaded = load_model(name, store, device="cpu")
    list(predict(loaded, [str(p) for p in paths[:4]], batch_size=32, workers=0))  # warm-up
    many = PathList([str(p) for p in paths] * max(1, 256 // len(paths)))
    t0 = time.perf_counter()
    rows = list(predict(loaded, many, batch_size=32))
    infer_rate = len(rows) / (time.perf_counter() - t0)

    import torch

    print(f"\nresnet18 at {args.image_size} px, 320x240 JPEG uploads, {args.requests} requests "
          f"per client; {platform.processor() or platform.machine()}, {os.cpu_count()} CPU "
          f"cores, torch {torch.__version__}\n")
    print("| clients | setting | req/s | p50 ms | p95 ms | p99 ms | mean batch | errors |"
          " on / off |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    on, off = list(settings)
    for c in clients:
        for label in settings:
            rate, p50, p95, p99, errors, extra = results[(label, c)]
            ratio = f"{rate / results[(off, c)][0]:.2f}x" if label == on else ""
            print(f"| {c} | {label} | {rate:.1f} | {p50:.0f} | {p95:.0f} | {p99:.0f} | "
                  f"{extra['mean_batch']:.1f} | {errors} | {ratio} |")
    print(f"\n`tk infer` (Python API, batch 32, same images): {infer_rate:.1f} images/s")


if __name__ == "__main__":
    main()
