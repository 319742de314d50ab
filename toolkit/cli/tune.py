"""`tk tune`: the options of `tk finetune` as fixed values, a search space, and Optuna's
study settings; :func:`toolkit.train.tune.tune` runs the search."""

from __future__ import annotations

import json
from typing import Any

import click

from toolkit.cli import cli, get_state
from toolkit.cli.finetune import finetune_command


@cli.command("tune")
@click.option("--space", type=click.Path(),
              help="TOML search space [lr, weight decay, freeze, head dropout, label "
                   "smoothing, backbone-lr-scale].")
@click.option("--trials", type=int, default=20, show_default=True,
              help="Trials this process runs.")
@click.option("--timeout", type=float, help="Start no new trial after this many seconds.")
@click.option("--metric", default="val_acc", show_default=True,
              help="What to optimise: val_acc (maximised) or val_loss (minimised).")
@click.option("--study", help="Study name; the same name continues it [the model name].")
@click.option("--storage", help="Optuna storage URL [sqlite:///$TK_HOME/tune/optuna.db].")
@click.option("--pruner", type=click.Choice(["median", "hyperband", "none"]),
              default="median", show_default=True, help="Stops hopeless trials early.")
@click.option("--keep-trials", is_flag=True, help="Keep every trial's model (NAME-trialN).")
@click.option("--sampler-seed", type=int,
              help="Seed the sampler (one process; parallel ones must differ) [random].")
def tune_command(space: str | None, trials: int, timeout: float | None, metric: str,
                 study: str | None, storage: str | None, pruner: str, keep_trials: bool,
                 sampler_seed: int | None, config_file: str | None, opts: tuple[str, ...],
                 as_json: bool, **given: Any) -> None:
    """Search hyperparameters of `tk finetune` with Optuna: the best trial's model is saved
    under --name; the other finetune options below are fixed for every trial."""
    from toolkit.train.tune import TuneArgs, format_params, format_trials, tune

    given["log"] = list(given["log"]) or None
    result = tune(TuneArgs(given=given, opts=opts, config=config_file, space=space,
                           trials=trials, timeout=timeout, metric=metric, study=study,
                           storage=storage, pruner=pruner, keep_trials=keep_trials,
                           sampler_seed=sampler_seed), get_state().plugins)
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    elif result.trials:
        click.echo(format_trials(result))
    if result.best_trial is not None:
        params = format_params(result.best_params)
        where = f"model '{result.name}'" if result.saved else "another store"
        click.echo(f"best: trial {result.best_trial}, {result.metric} "
                   f"{result.best_value:.4f} ({params}); {where}", err=True)
    for kind, path in result.plots.items():
        click.echo(f"{kind} plot: {path}", err=True)
    if result.interrupted:
        raise KeyboardInterrupt
    if result.stopped:
        from toolkit.errors import TkError

        raise TkError(f"the study stopped: {result.stopped}")


# every finetune option is a fixed value of the trials (--resume makes no sense here)
tune_command.params.extend(p for p in finetune_command.params if p.name != "resume")
