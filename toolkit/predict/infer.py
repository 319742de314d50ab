"""`tk infer` as a function: check the arguments and the output target, pick the model,
discover the files, predict and write the rows, summarise on stderr.

Before any work: the format and ``--resume`` options, the size limits of the environment,
that standard output is open (without ``-o``), and that ``-o`` can be written and is
neither one of the inputs nor anything inside the model store, even through a link
(compared by resolved path and by inode). A closed pipe (``tk infer ... | head -1``)
ends the run quietly with status 141, like other Unix tools.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from toolkit.data.listing import PathList, discover, warn_stderr
from toolkit.errors import TkError, describe_os_error
from toolkit.predict.writers import (
    FORMATS,
    WRITERS,
    OutputError,
    done_indices,
    format_for_path,
    open_output,
    read_output,
    stdout_stream,
    truncate_output,
)

if TYPE_CHECKING:
    from model_store import ModelStore
    from toolkit.predict.runner import Runner
    from toolkit.progress import Progress


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
    channels_last: bool | None = None  # None: auto (convolutional models on CPU/CUDA)
    workers: int | None = None
    decode: str = "auto"
    quiet: bool = False
    csv_raw: bool = False
    runtime: str = "auto"  # auto: onnx for an exported file, torch for a stored model
    tta: bool = False  # mean of the probabilities of the image and its mirror image
    min_score: float | None = None  # below it a row's label is null ("unknown")
    calibrated: bool = True  # False: the raw softmax (--no-calibration)


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
    from toolkit.predict.session import newest_model

    return name or newest_model(store, log)


# -- the output target ----------------------------------------------------------------------

def check_output_target(output: str) -> None:
    """``-o FILE`` can be created or replaced: not a folder, its folder exists and is
    writable."""
    if os.path.isdir(output):
        raise TkError(f"-o {output}: is a directory")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise TkError(f"-o {output}: {parent} is not a directory")
    if not os.access(parent, os.W_OK) and not os.access(output, os.W_OK):
        raise TkError(f"-o {output}: {parent} is not writable")


def check_output_is_not_an_input(output: str, paths: Sequence[str], store: ModelStore,
                                 model_file: str | None = None) -> None:
    """Refuse (one line, before any work) an ``-o`` that is one of the inputs, a file of
    the model store, or reaches one of them through a link (resolved path and inode)."""
    if store.owns(output):
        raise TkError(f"-o {output}: is inside the model store {store.root}; writing there "
                      "would damage it (choose a file elsewhere)")
    try:
        st = os.stat(output)
    except OSError:
        return  # nothing there (yet): it cannot be an input
    if not stat.S_ISREG(st.st_mode):
        return  # /dev/null, a FIFO, a terminal: not an input file
    target = (st.st_dev, st.st_ino)
    if model_file is not None:
        try:
            mst = os.stat(model_file)
            if (mst.st_dev, mst.st_ino) == target:
                raise TkError(f"-o {output}: is the model file {model_file}")
        except OSError:
            pass
    for p in paths:
        try:
            pst = os.stat(p)
        except OSError:
            continue
        if (pst.st_dev, pst.st_ino) == target:
            same = "" if os.path.abspath(p) == os.path.abspath(output) else \
                " (through a link)"
            raise TkError(f"-o {output}: is the input file {p}{same}; writing there would "
                          "destroy it (choose another output file)")


# -- the command --------------------------------------------------------------------------

def run_infer(args: InferArgs, plugins: Any) -> InferSummary:
    """`tk infer`: discover, predict, write rows as they come; a summary on stderr.
    Under torchrun every rank predicts a shard and rank 0 writes the merged output.
    Usage errors are found before torch is imported; an exported ``.onnx`` model
    (:mod:`toolkit.predict.session`) never imports it (except under torchrun, whose
    process group is torch's)."""
    from model_store import ModelStore
    from toolkit.data.decode import check_limits
    from toolkit.predict.scoring import check_min_score
    from toolkit.predict.session import resolve_model

    fmt = args.format or format_for_path(args.output)
    if fmt not in FORMATS:
        raise TkError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if args.resume and not args.output:
        raise TkError("--resume needs -o FILE (the output of the interrupted run)")
    if args.resume and fmt not in ("jsonl", "csv"):
        raise TkError(f"--resume works with --format jsonl or csv, not {fmt}")
    if args.output:
        check_output_target(args.output)
    check_min_score(args.min_score)
    check_limits()

    is_main = os.environ.get("RANK", "0") in ("", "0")
    log = _logger(is_main)
    stdout = stdout_stream() if is_main and not args.output else None
    store = ModelStore(args.store)
    ref = resolve_model(args.model, store=store, runtime=args.runtime, log=log)
    name = ref.name
    warn = warn_stderr if is_main else (lambda _m: None)
    paths = discover(args.inputs, warn=warn)
    if not len(paths):
        raise TkError(f"no image files found in {' '.join(args.inputs)} "
                      "(extensions: jpg jpeg png bmp gif webp tif tiff)")
    if args.output:
        check_output_is_not_an_input(args.output, paths, store, os.fspath(ref.path))
    summary = InferSummary(model=name, output=args.output)
    keep = 0
    if args.resume:
        state = read_output(args.output, fmt, min(args.topk, len(ref.classes)),  # type: ignore[arg-type]
                            csv_raw=args.csv_raw)
        keep = state.keep
        done = done_indices(paths, state.paths, args.output)  # type: ignore[arg-type]
        if done:
            todo = PathList(p for i, p in enumerate(paths) if i not in done)
            summary.skipped = len(paths) - len(todo)
            paths = todo
        log(f"--resume: {summary.skipped} file(s) already in {args.output}, "
            f"{len(paths)} to go")

    with _session(args, ref, store, plugins, warn) as (runner, dist):
        summary.distributed = dist.enabled
        if args.resume:
            dist.barrier()  # every rank has read the file before rank 0 changes it
        start = time.perf_counter()
        if dist.is_main:
            _write_all(runner, paths, args, fmt, keep, stdout, summary)
        else:
            for _ in runner.predict_paths(paths):
                pass
        summary.seconds = time.perf_counter() - start
    done_n = summary.predicted + summary.failed
    rate = done_n / summary.seconds if summary.seconds > 0 else 0.0
    where = f" to {args.output}" if args.output else ""
    extra = f", {summary.skipped} already done" if summary.skipped else ""
    log(f"{summary.predicted} predicted, {summary.failed} failed{extra} "
        f"({rate:.1f} files/s, model '{name}'){where}")
    return summary


class _Dist:
    """The torchrun process group as the writing loop sees it (none: one process)."""

    def __init__(self, info: Any = None):
        self.info = info
        self.enabled = bool(info is not None and info.enabled)
        self.is_main = bool(info is None or info.is_main)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def _under_torchrun() -> bool:
    """Whether torchrun started this process as one of several (read before importing
    torch, which :mod:`toolkit.distributed` does, so the one-process ONNX path stays
    torch-free)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or "1") > 1
    except ValueError:
        return True  # toolkit.distributed.from_env says what is wrong


@contextlib.contextmanager
def _session(args: InferArgs, ref: Any, store: Any, plugins: Any, warn: Any
             ) -> Iterator[tuple[Runner, _Dist]]:
    """The runner for ``args`` on the model ``ref`` names
    (:func:`toolkit.predict.session.open_predictor`: torch for a stored model, ONNX Runtime
    for an exported file), inside the torch process group under torchrun (each rank on its
    own GPU when the device is CUDA; gloo on the CPU)."""
    from toolkit.predict.session import open_predictor

    device: Any = args.device
    info = None
    if _under_torchrun():
        import torch

        from toolkit import distributed as D
        from toolkit.devices import resolve_device

        info = D.from_env()
        if ref.kind == "onnx":
            if str(device).lower() in ("auto", "cuda"):  # one GPU per rank, if any
                try:
                    import onnxruntime as ort
                except ImportError:  # said in one line when the model is opened
                    ort = None
                if ort is not None and "CUDAExecutionProvider" in ort.get_available_providers():
                    device = f"cuda:{info.local_rank}"
            D.init(info, torch.device("cpu"))  # rows are gathered on the CPU
        else:
            device = resolve_device(args.device)
            if device.type == "cuda":
                device = torch.device("cuda", info.local_rank)
                torch.cuda.set_device(device)
            D.init(info, device)
    try:
        with open_predictor(ref, store=store, device=device, precision=args.precision,
                            channels_last=args.channels_last, decode=args.decode,
                            tta=args.tta, plugins=plugins) as opened:
            runner = opened.runner(batch_size=args.batch_size, topk=args.topk,
                                   workers=args.workers, decode=args.decode, warn=warn,
                                   calibrated=args.calibrated, min_score=args.min_score)
            yield runner, _Dist(info)
    finally:
        if info is not None:
            from toolkit import distributed as D

            D.shutdown()


def _write_all(runner: Runner, paths: PathList, args: InferArgs, fmt: str, keep: int,
               stdout: IO[str] | None, summary: InferSummary) -> None:
    from toolkit.progress import Progress

    append = False
    if args.output:
        if args.resume:
            truncate_output(args.output, keep)
            append = keep > 0
        stream = open_output(args.output, append=append)
        name = args.output
    else:
        assert stdout is not None
        stream, name = stdout, "standard output"
    writer = WRITERS[fmt](stream, runner.classes, runner.topk, csv_raw=args.csv_raw,
                          name=name, multi_label=runner.thresholds is not None)
    progress = Progress(len(paths), "infer", enabled=not args.quiet)
    runner.warn = _warning_through(progress)
    rows = runner.predict_paths(paths)
    failing = False
    try:
        writer.begin(append=append)
        for row in rows:
            with progress.outside(stream):
                writer.write(row)
            if row.error is None:
                summary.predicted += 1
            else:
                summary.failed += 1
                progress.write(f"tk: warning: {_shown(row.path)}: {row.error}")
            progress.update(1)
        writer.end()
    except BrokenPipeError:
        failing = True
        _silence_stdout()
        raise
    except BaseException:
        failing = True
        raise
    finally:
        progress.close()
        rows.close()  # stop the decoding workers now (a closed pipe, an error)
        if stream is not stdout:
            try:
                stream.close()
            except OSError as exc:  # the last flush can fail too (a full disk)
                if not failing:  # else the first error is the one to say
                    raise OutputError(f"cannot write to {name}: {describe_os_error(exc)}"
                                      ) from None


def _warning_through(progress: Progress) -> Callable[[str], None]:
    def warn(message: str) -> None:
        progress.write(f"tk: warning: {message}")
    return warn


def _shown(path: str | None) -> str:
    from toolkit.predict.writers import escape_control, escape_path

    return escape_control(escape_path(path or ""))


def _silence_stdout() -> None:
    """After a closed pipe: point standard output at /dev/null so that Python's final
    flush at exit does not print a second BrokenPipeError."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
