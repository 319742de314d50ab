"""`tk infer` as a function: check the arguments, pick the model, discover the files,
predict and write the rows, summarise on stderr."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from toolkit.data.listing import PathList, discover, warn_stderr
from toolkit.errors import TkError
from toolkit.model.loading import load_model
from toolkit.predict.runner import Predictor
from toolkit.predict.writers import (
    FORMATS,
    WRITERS,
    _key,
    done_paths,
    format_for_path,
    repair_tail,
)

if TYPE_CHECKING:

    pass


@dataclass
class InferArgs:
    """`tk infer` options (see ``tk infer --help``)."""

    inputs: list[str]
    model: str | None = None
    store: str | None = None
    batch_size: int = 32
    topk: int = 1
    format: str | None = None  # None: from the -o extension, else table
    output: str | None = None
    resume: bool = False
    device: str = "auto"
    precision: str = "32"
    channels_last: bool = False
    workers: int | None = None
    decode: str = "pil"
    quiet: bool = False


@dataclass
class InferSummary:
    predicted: int = 0
    failed: int = 0
    skipped: int = 0  # already in the output (--resume)
    seconds: float = 0.0
    model: str = ""
    output: str | None = None
    distributed: bool = False

    @property
    def exit_code(self) -> int:
        """0: every file predicted; 1: some files could not be read. Under torchrun always
        0 once the run is complete: torchrun reports any non-zero status as a crashed
        process (and stops the other ranks), so failures are counted from the output."""
        return 1 if self.failed and not self.distributed else 0


def _logger(enabled: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if enabled:
            print(f"tk: {message}", file=sys.stderr, flush=True)
    return log


def choose_model(store: Any, name: str | None, log: Callable[[str], None]) -> str:
    """``name``, or the newest model in ``store`` (said through ``log``)."""
    if name:
        return name
    newest = store.newest()
    if newest is None:
        raise TkError(f"no model in the store {store.root}; train one with `tk finetune` "
                      "or pass --store DIR")
    log(f"using model '{newest.name}' (the newest in {store.root}; --model NAME picks one)")
    return newest.name


def run_infer(args: InferArgs, plugins: Any) -> InferSummary:
    """`tk infer`: discover, predict, write rows as they come; a summary on stderr.
    Under torchrun every rank predicts a shard and rank 0 writes the merged output.
    Usage errors are found before torch is imported."""
    from model_store import ModelStore

    fmt = args.format or format_for_path(args.output)
    if fmt not in FORMATS:
        raise TkError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if args.resume and not args.output:
        raise TkError("--resume needs -o FILE (the output of the interrupted run)")
    if args.resume and fmt not in ("jsonl", "csv"):
        raise TkError(f"--resume works with --format jsonl or csv, not {fmt}")
    if args.output and os.path.isdir(args.output):
        raise TkError(f"-o {args.output}: is a directory")
    if args.output:
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            raise TkError(f"-o {args.output}: {parent} is not a directory")
        if not os.access(parent, os.W_OK):
            raise TkError(f"-o {args.output}: {parent} is not writable")

    is_main = os.environ.get("RANK", "0") in ("", "0")
    log = _logger(is_main)
    warn = warn_stderr if is_main else (lambda _m: None)
    store = ModelStore(args.store)
    name = choose_model(store, args.model, log)
    info = store.info(name)  # a missing model fails here, cheaply
    paths = discover(args.inputs, warn=warn)
    if not len(paths):
        raise TkError(f"no image files found in {' '.join(args.inputs)} "
                      "(extensions: jpg jpeg png bmp gif webp tif tiff)")
    summary = InferSummary(model=name, output=args.output)
    if args.resume:
        topk = min(args.topk, len(info.classes))
        done = done_paths(args.output, fmt, topk)  # type: ignore[arg-type]
        if done:
            todo = PathList(p for p in paths if _key(p) not in done)
            summary.skipped = len(paths) - len(todo)
            paths = todo
            log(f"--resume: {summary.skipped} file(s) already in {args.output}, "
                f"{len(paths)} to go")

    import torch

    from toolkit import distributed as D
    from toolkit.devices import resolve_device

    dist = D.from_env()
    summary.distributed = dist.enabled
    device = resolve_device(args.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    D.init(dist, device)
    try:
        loaded = load_model(name, store, plugins=plugins, device="cpu")
        predictor = Predictor(loaded, batch_size=args.batch_size, topk=args.topk,
                              device=device, precision=args.precision,
                              channels_last=args.channels_last, workers=args.workers,
                              decode=args.decode, warn=warn)
        append = False
        if args.resume:
            D.barrier()  # every rank has read the file before rank 0 appends to it
            if dist.is_main:
                append = repair_tail(args.output)  # type: ignore[arg-type]
        start = time.perf_counter()
        if dist.is_main:
            _write_all(predictor, paths, args, fmt, append, summary)
        else:
            for _ in predictor.predict_paths(paths):
                pass
        summary.seconds = time.perf_counter() - start
        done_n = summary.predicted + summary.failed
        rate = done_n / summary.seconds if summary.seconds > 0 else 0.0
        where = f" to {args.output}" if args.output else ""
        extra = f", {summary.skipped} already done" if summary.skipped else ""
        log(f"{summary.predicted} predicted, {summary.failed} failed{extra} "
            f"({rate:.1f} files/s, model '{name}'){where}")
        return summary
    finally:
        D.shutdown()


def _write_all(predictor: Predictor, paths: PathList, args: InferArgs, fmt: str,
               append: bool, summary: InferSummary) -> None:
    from tqdm import tqdm

    if args.output:
        try:
            stream: IO[str] = open(args.output, "a" if append else "w",  # noqa: SIM115
                                   encoding="utf-8", newline="")
        except OSError as exc:
            raise TkError(f"-o {args.output}: cannot write ({exc.strerror})") from None
    else:
        stream = sys.stdout
    writer = WRITERS[fmt](stream, predictor.classes, predictor.topk)
    bar = tqdm(total=len(paths), unit="file", file=sys.stderr, disable=args.quiet,
               dynamic_ncols=True, smoothing=0.1, desc="infer")
    try:
        writer.begin(append=append)
        for row in predictor.predict_paths(paths):
            writer.write(row)
            if row.error is None:
                summary.predicted += 1
            else:
                summary.failed += 1
                bar.write(f"tk: warning: {row.path}: {row.error}", file=sys.stderr)
            bar.update(1)
        writer.end()
    finally:
        bar.close()
        if stream is not sys.stdout:
            stream.close()
