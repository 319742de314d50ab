"""`tk finetune`: click collects the options, :func:`toolkit.train.config.finetune_args`
merges them with ``--config`` and ``--opt``, :func:`toolkit.train.finetune.finetune` runs."""

from __future__ import annotations

import json
from typing import Any

import click

from toolkit.cli import cli, get_state


def _freeze_value(value: str) -> str:
    v = value.strip().lower()
    if v in ("all", "none") or v.isdigit():
        return v
    raise click.BadParameter("expected all, none or a number of layer groups")


def _lr_value(value: str) -> float | str:
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number or 'auto'") from None


@cli.command("finetune")
@click.option("--backbone", help="Backbone name (tk list backbones); plugin:name picks one.")
@click.option("--classes", type=int, help="Number of classes (checked against the data).")
@click.option("--data", type=click.Path(), help="Image folder (class per sub-folder) or .csv.")
@click.option("--val-data", type=click.Path(), help="Explicit validation folder.")
@click.option("--dataset", help="Dataset plugin name (default: the embedded 'shapes').")
@click.option("--head", help="Head name [linear].")
@click.option("--loss", help="Loss name [cross-entropy].")
@click.option("--optimizer", help="Optimizer name [adamw].")
@click.option("--epochs", type=int, help="Epochs [5].")
@click.option("--batch-size", type=int, help="Batch size per process [32].")
@click.option("--lr", callback=lambda c, p, v: v and _lr_value(v),
              help="Peak learning rate of the head, or 'auto' (an LR range test picks it) "
              "[the optimizer's default_lr, else 1e-3].")
@click.option("--lr-find-steps", type=int, help="Steps of the --lr auto range test [100].")
@click.option("--weight-decay", type=float, help="Weight decay (not on norms/biases) [0.05].")
@click.option("--freeze", callback=lambda c, p, v: v and _freeze_value(v),
              help="all | none | N first layer groups frozen [none].")
@click.option("--unfreeze-at", type=int, help="From this epoch, unfreeze one group per epoch.")
@click.option("--backbone-lr-scale", type=float,
              help="Backbone LR = lr x this [0.1 pretrained, 1.0 from scratch].")
@click.option("--pretrained/--no-pretrained", default=None,
              help="Start from pretrained weights (default) or random ones.")
@click.option("--weights", type=click.Path(), help="Load pretrained weights from this file.")
@click.option("--device", help="auto | cpu | cuda | cuda:N | mps [auto].")
@click.option("--precision", type=click.Choice(["auto", "32", "bf16-mixed", "16-mixed"]),
              help="Training precision [auto: bf16-mixed where the device computes bf16 "
                   "natively, else 32].")
@click.option("--channels-last/--no-channels-last", default=None,
              help="channels_last memory format [auto: on for convolutional backbones on "
                   "CPU and CUDA].")
@click.option("--compile", is_flag=True, default=None, help="torch.compile the model.")
@click.option("--image-size", type=int, help="Input size (default: the data's or the weights').")
@click.option("--val-split", type=float, help="Validation fraction, stratified [0.2].")
@click.option("--workers", type=int,
              help="DataLoader worker processes [auto: the usable cores, at most 4].")
@click.option("--seed", type=int, help="Random seed, 0 .. 2**32-1 [0].")
@click.option("--patience", type=int, help="Early stopping after N epochs without gain.")
@click.option("--warmup-epochs", type=float, help="LR warm-up epochs before cosine decay [1].")
@click.option("--augment/--no-augment", default=None, help="Train-time augmentation [on].")
@click.option("--cache-features/--no-cache-features", default=None,
              help="Cache frozen-backbone features [auto: --freeze all and --no-augment].")
@click.option("--multi-label", is_flag=True, default=None,
              help="The dataset plugin's targets are multi-hot (a csv with a 'labels' column "
                   "is multi-label by itself).")
@click.option("--threshold", type=float,
              help="Multi-label: one decision threshold for all classes [chosen per class "
                   "on the validation split to maximise F1].")
@click.option("--class-weights", type=click.Choice(["auto", "effective"]),
              help="Weigh the loss by class: auto = inverse frequency (multi-label: "
                   "pos_weight), effective = effective number of samples.")
@click.option("--sampler", type=click.Choice(["balanced"]),
              help="balanced: draw training images with class-balanced weights (seeded).")
@click.option("--accumulate", type=int,
              help="Micro-batches per optimizer step (gradient accumulation) [1].")
@click.option("--ema", type=float, metavar="DECAY",
              help="Keep an exponential moving average of the weights (e.g. 0.999); "
                   "validated each epoch, saved when better.")
@click.option("--mixup", type=float, metavar="ALPHA", help="MixUp with this alpha [off].")
@click.option("--cutmix", type=float, metavar="ALPHA", help="CutMix with this alpha [off].")
@click.option("--name", help="Model name in the store [backbone-dataset-time].")
@click.option("--store", type=click.Path(), help="Model store directory [$TK_HOME].")
@click.option("--config", "config_file", type=click.Path(),
              help="TOML file of these options (the command line wins).")
@click.option("--log", "log", multiple=True, metavar="NAME",
              help="Log the run: tensorboard, mlflow, csv (tk list loggers); repeatable.")
@click.option("--log-dir", type=click.Path(),
              help="Loggers write under DIR/NAME [$TK_HOME/runs/NAME/logs; mlflow: "
                   "$MLFLOW_TRACKING_URI, else ./mlruns].")
@click.option("--resume", is_flag=True, default=None, help="Continue an interrupted run.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a model of that name.")
@click.option("--opt", "opts", multiple=True, metavar="COMPONENT.KEY=VALUE",
              help="Component option, e.g. head.hidden=512 (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, default=None, help="No progress bar or epoch lines.")
def finetune_command(config_file: str | None, opts: tuple[str, ...], as_json: bool,
                     **given: Any) -> None:
    """Fine-tune a pretrained backbone with a new head and save it to the model store."""
    from toolkit.train.config import finetune_args
    from toolkit.train.finetune import finetune

    given["log"] = list(given["log"]) or None  # not given: the config file's, if any
    args = finetune_args(given, opts=opts, config=config_file)
    result = finetune(args, get_state().plugins)
    if result is not None and as_json:
        click.echo(json.dumps({"name": result.name, "path": str(result.model_path),
                               "best_epoch": result.best_epoch, "metrics": result.metrics,
                               "history": result.history, "artifacts": result.artifacts}))


def _lr_find_callback(config_file: str | None, opts: tuple[str, ...], as_json: bool,
                      **given: Any) -> None:
    from toolkit.train.config import finetune_args
    from toolkit.train.finetune import lr_find

    args = finetune_args(given, opts=opts, config=config_file)
    result = lr_find(args, get_state().plugins)
    if result is None:
        return
    if as_json:
        click.echo(json.dumps(dict(result.record, plot=result.plot)))
    else:
        click.echo(f"{result.suggestion:.3g}")
        if result.plot:
            click.echo(f"tk: plot written to {result.plot}", err=True)


# the same options as finetune (but nothing to resume or overwrite: nothing is saved)
cli.add_command(click.Command(
    "lr-find", callback=_lr_find_callback,
    params=[p for p in finetune_command.params if p.name not in ("resume", "overwrite")],
    help="LR range test with finetune's options: the model takes --lr-find-steps steps with "
    "an exponentially growing learning rate (1e-7 .. 10) on the training data, and the "
    "minimum/2 rule suggests one: half the LR of the lowest smoothed loss (printed on "
    "stdout; the loss curve goes to $TK_HOME/artifacts/NAME/lr_find.png). Nothing is "
    "trained or saved; `tk finetune --lr auto` runs the same test first."))
