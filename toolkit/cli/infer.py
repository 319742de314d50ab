"""`tk infer` (batch prediction) and `tk eval` (metrics on a labelled folder)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import click

from toolkit.cli import cli, get_state
from toolkit.cli.store import store_option
from toolkit.data.batches import DECODERS as _DECODERS
from toolkit.predict.writers import FORMATS as _FORMATS

_PRECISIONS = ("32", "bf16-mixed", "16-mixed")


def _runtime_options(func: Any, *, exported: bool = False) -> Any:
    """Options shared by `tk infer` and `tk eval` (``exported``: --model also takes an
    exported .onnx file)."""
    model_help = "Stored model [the newest one, named on stderr]."
    if exported:
        model_help = ("Stored model name, or an exported FILE.onnx (`tk export`; runs on ONNX "
                      "Runtime) [the newest stored model, named on stderr].")
    options = [
        click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Images per forward pass."),
        click.option("--device", default="auto", show_default=True,
                     help="auto | cpu | cuda | cuda:N | mps."),
        click.option("--precision", type=click.Choice(_PRECISIONS), default="32",
                     show_default=True, help="Autocast precision of the forward pass."),
        click.option("--channels-last/--no-channels-last", default=None,
                     help="channels_last memory format [auto: on for convolutional models "
                     "on CPU and CUDA]."),
        click.option("--workers", type=click.IntRange(min=0), default=None,
                     help="Decoding worker processes [min(4, CPU cores)]."),
        click.option("--decode", type=click.Choice(_DECODERS), default="auto",
                     show_default=True,
                     help="auto: reduced-size decoding only of JPEGs at least twice the size "
                     "the model needs, still at least twice that size; pil: exact eval "
                     "transform; draft: reduced-size decoding of large "
                     "JPEGs (faster, pixels differ slightly); torchvision: JPEGs decoded on "
                     "the model's device (nvJPEG on CUDA)."),
        click.option("--tta", is_flag=True,
                     help="Test-time augmentation: average the probabilities of each image "
                     "and its mirror image (twice the model time)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
        store_option,
        click.option("--model", metavar="NAME|FILE.onnx" if exported else "NAME",
                     help=model_help),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@cli.command("infer")
@click.argument("inputs", nargs=-1, metavar="PATH...")
@partial(_runtime_options, exported=True)
@click.option("--topk", type=click.IntRange(min=1), default=1, show_default=True,
              help="Classes per row (capped at the model's class count).")
@click.option("--format", "fmt", type=click.Choice(_FORMATS),
              help="Output format [from the -o extension (.jsonl .csv .json), else table].")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write rows to FILE instead of stdout.")
@click.option("--resume", is_flag=True,
              help="With -o FILE (jsonl or csv): skip files already in FILE and append.")
@click.option("--csv-raw", is_flag=True,
              help="csv: write cells as they are (by default a cell starting with = + - @ "
              "tab or CR gets a leading ' so spreadsheets do not run it as a formula).")
@click.option("--runtime", type=click.Choice(("auto", "torch", "onnx")), default="auto",
              show_default=True,
              help="auto: ONNX Runtime for an exported file (--model FILE.onnx, no torch "
              "import), torch for a stored model. onnx needs the file: `tk export NAME`.")
@click.option("--min-score", type=click.FloatRange(0, 1), default=None, metavar="S",
              help="Rows whose top score is below S get no label (null in json/jsonl, "
              "'unknown' in table/csv); score and topk are kept.")
@click.option("--calibration/--no-calibration", default=True, show_default=True,
              help="Scores with the model's calibration temperature (fitted by tk finetune) "
              "or the raw softmax.")
def infer_command(inputs: tuple[str, ...], model: str | None, store_dir: Path | None,
                  batch_size: int, topk: int, fmt: str | None, output: Path | None,
                  resume: bool, csv_raw: bool, runtime: str, device: str, precision: str,
                  channels_last: bool | None, workers: int | None, decode: str, quiet: bool,
                  tta: bool, min_score: float | None, calibration: bool) -> None:
    """Predict a class for every image under PATH... (files, folders, glob patterns).

    \b
    Folders are searched recursively for .jpg .jpeg .png .bmp .gif .webp .tif .tiff
    files (any case; hidden files skipped), in sorted order; files named explicitly are
    always read. One row per file: data on stdout (or -o), progress and summary on stderr.
    jsonl rows: {"path", "label", "score", "topk": [{"label", "score"}], "error"};
    a multi-label model's rows add "labels" and "label_scores" (the classes whose score
    reaches their threshold; csv: ';'-joined columns).
    Scores use the model's calibration temperature when it has one (--no-calibration:
    the raw softmax); with --min-score S a row whose top score is below S has label
    null ("unknown" in table and csv).
    A file that cannot be read gets a row with "error" set; the run goes on.
    Paths are valid UTF-8: a byte of a file name that is not UTF-8 is written \\xNN and
    a backslash is doubled. -o may not be an input file or a file of the model store.
    Under `torchrun --nproc_per_node N -m toolkit infer ...` each process predicts a
    share of the files and rank 0 writes one merged output, in input order.

    \b
    Exit status: 0 every file predicted; 1 some files could not be read (their rows
    carry the error); 2 usage error (missing path, unknown model, bad option, output
    that cannot be written); 141 the reader of stdout went away (`| head`).
    Under torchrun a completed run exits 0 (torchrun treats any other status as a
    crash): count the rows with an error instead.

    \b
    --model FILE.onnx runs a file written by `tk export` on ONNX Runtime (CPU, or CUDA
    when onnxruntime has it) without importing torch: same rows, formats, -o, --resume
    and exit codes; its class names and preprocessing come from the file. --precision
    and --channels-last do not apply to it (int8 is chosen at export: --int8).
    """
    from toolkit.predict.infer import InferArgs, run_infer

    args = InferArgs(inputs=list(inputs), model=model,
                     store=str(store_dir) if store_dir else None, batch_size=batch_size,
                     topk=topk, format=fmt, output=str(output) if output else None,
                     resume=resume, device=device, precision=precision,
                     channels_last=channels_last, workers=workers, decode=decode, quiet=quiet,
                     csv_raw=csv_raw, runtime=runtime, tta=tta,
                     min_score=min_score, calibrated=calibration)
    state = get_state()
    try:  # plugins are loaded only for a stored model (an exported file needs none)
        summary = run_infer(args, lambda: state.plugins)
    except BrokenPipeError:  # `tk infer ... | head`: the quiet exit of other Unix tools
        raise click.exceptions.Exit(141) from None
    if summary.exit_code:
        click.get_current_context().exit(summary.exit_code)


@cli.command("eval")
@_runtime_options
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Image folder with one sub-folder per class (named like the model's); "
                   "for a multi-label model a .csv manifest with a 'labels' column.")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON on stdout.")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the confusion matrix into this PNG file.")
def eval_command(model: str | None, store_dir: Path | None, data: Path, as_json: bool,
                 png: Path | None, batch_size: int, device: str, precision: str,
                 channels_last: bool | None, workers: int | None, decode: str, quiet: bool,
                 tta: bool) -> None:
    """Accuracy, per-class precision / recall / F1 and confusion matrix of a stored model
    on a labelled image folder.

    \b
    Unreadable images are reported on stderr and left out of the metrics.
    Exit status: 0 report written; 2 usage error (unknown model, class folders that
    are not the model's classes, missing folder).
    """
    from toolkit.predict.evaluate import EvalArgs, format_report, run_eval

    args = EvalArgs(data=str(data), model=model, store=str(store_dir) if store_dir else None,
                    png=str(png) if png else None, batch_size=batch_size, device=device,
                    precision=precision, channels_last=channels_last, workers=workers,
                    decode=decode, quiet=quiet, tta=tta)
    report = run_eval(args, get_state().plugins,
                      log=lambda message: click.echo(f"tk: {message}", err=True))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_report(report))
