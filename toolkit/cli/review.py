"""`tk review`: the HTML report of a model on a labelled image set."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.cli import cli, get_state
from toolkit.cli.store import store_option


@cli.command("review")
@click.argument("model")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Labelled images: a folder with one sub-folder per class, or a csv with "
              "path and label columns (such as the -labels.csv this command writes).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="The HTML report [MODEL-review.html]; the label csv goes beside it "
              "(REPORT-labels.csv).")
@click.option("--top-losses", type=click.IntRange(min=0), default=24, show_default=True,
              metavar="K", help="Images in the top-losses gallery.")
@click.option("--train-duplicates/--no-train-duplicates", default=True, show_default=True,
              help="Compare with the training images recorded in the model's metadata.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True,
              help="auto | cpu | cuda | cuda:N | mps.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decoding worker processes [min(4, CPU cores)].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@store_option
def review_command(model: str, data: Path, output: Path | None, top_losses: int,
                   train_duplicates: bool, batch_size: int, device: str, workers: int | None,
                   quiet: bool, store_dir: Path | None) -> None:
    """Write one self-contained HTML page on how MODEL does on labelled images: summary,
    per-class metrics, confusion matrix, most-confused pairs, top losses, likely label
    errors (and a csv to fix them), near-duplicates (leakage from the training images),
    calibration and training curves. No network, no script: open it in any browser.

    \b
    Images are read like `tk infer` reads them; unreadable ones are listed and left out.
    Exit status: 0 report written; 2 usage error (unknown model, class folders or labels
    that are not the model's classes, output that cannot be written).
    """
    from toolkit.predict.review import ReviewArgs, run_review

    args = ReviewArgs(model=model, data=str(data), output=str(output) if output else None,
                      top_losses=top_losses, store=str(store_dir) if store_dir else None,
                      batch_size=batch_size, device=device, workers=workers,
                      train_duplicates=train_duplicates, quiet=quiet)
    result = run_review(args, get_state().plugins,
                        log=lambda message: click.echo(f"tk: {message}", err=True))
    r = result.review
    top5 = f", top-5 {r.top5:.4f}" if r.top5 is not None else ""
    click.echo(f"tk: {r.images} image(s) ({len(r.failed)} unreadable): accuracy "
               f"{r.accuracy:.4f}, macro F1 {r.macro_f1:.4f}{top5}; "
               f"{len(r.label_issues)} likely label error(s), "
               f"{r.duplicates_total + r.train_duplicates_total} near-duplicate pair(s); "
               f"ECE {r.calibration['ece_raw']:.4f} raw, "
               f"{r.calibration['ece_calibrated']:.4f} calibrated", err=True)
    click.echo(f"tk: report written to {result.report}; label csv {result.labels_csv}",
               err=True)
