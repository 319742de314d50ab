"""`tk export`: a stored model as an ONNX (fp32 or int8), .pt2 or TorchScript file."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.cli import cli, get_state
from toolkit.cli.store import store_option

_FORMATS = ("onnx", "pt2", "torchscript")


@cli.command("export")
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(_FORMATS), default="onnx", show_default=True,
              help="onnx: ONNX Runtime and any ONNX tool; pt2: torch.export program "
              "(torch.export.load); torchscript: torch.jit.load.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output file [./MODEL.onnx, ./MODEL.int8.onnx, ./MODEL.pt2, "
              "./MODEL.torchscript.pt].")
@click.option("--int8", is_flag=True,
              help="Quantize (ONNX Runtime static QDQ, per-channel int8 weights), calibrated "
              "on the training images or --calibrate DIR.")
@click.option("--calibrate", type=click.Path(path_type=Path), metavar="DIR",
              help="Images to calibrate --int8 on, and to check the export on when the "
              "model's own data is not reachable (sub-folders named like the classes "
              "give accuracies too).")
@click.option("--force", is_flag=True,
              help="Write the int8 file even when its top-1 agrees with fp32 on fewer than "
              "98% of the check images.")
@store_option
def export_command(model: str, fmt: str, output: Path | None, int8: bool,
                   calibrate: Path | None, force: bool, store_dir: Path | None) -> None:
    """Export stored model MODEL to one file that carries its class names and
    preprocessing.

    \b
    The file takes uint8 RGB pixels [N,3,H,W] (batch size free), already resized and
    centre-cropped as its metadata says (tk.preprocess: resize, crop, interpolation);
    the /255 and mean/std normalisation are inside it. It returns logits [N,classes];
    the class names are in tk.classes (ONNX metadata_props, or extra/tk.json in the
    .pt2 / TorchScript archives).

    \b
    Before writing, the file (loaded back from its bytes) and the eager model run on
    the same images: up to 256 of the model's validation images when its training data
    is still reachable, else --calibrate DIR, else 32 synthetic images. The export is
    refused (exit 1, nothing written) if the top-1 class differs on any image or a
    logit differs by more than 0.001 x max(1, largest |logit|). The figures are
    stored in the file (tk.parity) and printed.

    \b
    Writes atomically; never into the model store, never over a file that is not an
    earlier tk export. ONNX needs `pip install 'tk-microtoolkit[onnx]'`.
    Exit status: 0 written; 1 export failed or did not match; 2 usage error.
    """
    from toolkit.predict.export.run import ExportArgs, export_model

    args = ExportArgs(model=model, format=fmt, output=str(output) if output else None,
                      int8=int8, calibrate=str(calibrate) if calibrate else None,
                      force=force, store=str(store_dir) if store_dir else None)
    result = export_model(args, get_state().plugins)
    for line in result.summary():
        click.echo(f"tk: {line}", err=True)
    click.echo(str(result.path))
