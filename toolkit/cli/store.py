"""`tk store ...`: list, show, remove and verify stored models; import pretrained weights.

Other commands that touch the store reuse :func:`store_option` (adds ``--store DIR``, passed
as ``store_dir``) and :func:`open_store` (the :class:`~model_store.ModelStore` there).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from toolkit.cli import cli, get_state
from toolkit.model.weights import import_weights
from toolkit.plugin.provenance import summary_lines

if TYPE_CHECKING:
    from model_store import ModelStore

F = TypeVar("F", bound=Callable[..., Any])


def store_option(func: F) -> F:
    """Add ``--store DIR`` (passed as ``store_dir: Path | None``) to a command."""
    return click.option(
        "--store",
        "store_dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        metavar="DIR",
        help="Model store directory (default: $TK_HOME, else $XDG_DATA_HOME/tk, "
        "i.e. ~/.local/share/tk).",
    )(func)


def open_store(path: str | Path | None) -> ModelStore:
    """The store at ``path`` (None: the default location)."""
    from model_store import ModelStore

    return ModelStore(path)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


def _metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))


@cli.group("store")
def store_group() -> None:
    """Trained models and imported pretrained weights (list, show, rm, verify,
    import-weights)."""


@store_group.command("list")
@store_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--weights", "with_weights", is_flag=True,
              help="List imported pretrained weights instead of models.")
def list_command(store_dir: Path | None, as_json: bool, with_weights: bool) -> None:
    """List stored models, newest first."""
    store = open_store(store_dir)
    if with_weights:
        weights = store.list_weights()
        if as_json:
            click.echo(json.dumps(weights, indent=2))
        elif not weights:
            click.echo(f"no imported weights in {store.root}", err=True)
        for w in [] if as_json else weights:
            click.echo(f"{w['backbone']}  {_size(w['size_bytes'])}  {w['path']}"
                   f"{'  (format 1)' if w['blob'] is None else ''}")
        return
    infos = store.list()
    for bad in store.damaged():
        click.echo(f"tk: warning: {bad.problem}", err=True)
    if as_json:
        click.echo(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    if not infos:
        click.echo(f"no models in {store.root}", err=True)
        return
    rows = [("NAME", "CREATED", "BACKBONE", "CLASSES", "SIZE", "METRICS")]
    for i in infos:
        size = _size(i.size_bytes)
        if i.blobs:
            size += f" (+{_size(i.shared_bytes)} shared)"
        rows.append((i.name, i.created[:19].replace("T", " "), i.backbone,
                     str(len(i.classes)), size, _metrics(i.metrics)))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    for r in rows:
        cells = [v.ljust(w) for v, w in zip(r[:-1], widths, strict=True)]
        click.echo("  ".join([*cells, r[-1]]).rstrip())
    use = store.usage()
    click.echo(f"{len(infos)} model(s); on disk {_size(use['total'])}: model files "
               f"{_size(use['models'])}, shared blobs {_size(use['blobs'])}, imported-weights "
               f"pointers {_size(use['weights'])}, other {_size(use['other'])}", err=True)


@store_group.command("show")
@click.argument("name")
@store_option
@click.option("--json", "as_json", is_flag=True, help="The full metadata as JSON.")
def show_command(name: str, store_dir: Path | None, as_json: bool) -> None:
    """Everything stored about model NAME."""
    data = open_store(store_dir).show(name)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    spec = data["spec"]
    f = data["file"]
    lines = [
        ("name", name),
        ("created", data["created"]),
        ("tk version", str(data.get("tk_version", "?"))),
        ("backbone", f"{spec['backbone']['name']} {_opts(spec['backbone'].get('options'))}"),
        ("head", f"{spec['head']['name']} {_opts(spec['head'].get('options'))}"),
        ("classes", f"{len(data['classes'])}: {', '.join(data['classes'])}"),
        ("input", "x".join(str(x) for x in data["data_config"]["input_size"])),
        ("metrics", _metrics({k: v for k, v in data["metrics"].items()
                              if isinstance(v, (int, float))}) or "-"),
        *summary_lines(data),  # the plugin distribution and version of each component
        ("weights", _opts(data["weights"]) or "-"),
        ("training", _opts(data["training"]) or "-"),
        ("file", f"{f['path']} ({_size(f['size_bytes'])}, sha256 {f['sha256']})"
                 + (f", a link to {f['link_to']}" if f.get("link_to") else "")),
    ]
    for blob in f["blobs"]:
        present = "" if blob["present"] else " MISSING"
        lines.append(("shared", f"{_size(blob['used_bytes'])} in {blob['tensors']} tensor(s) "
                      f"of {blob['path']} ({_size(blob['size_bytes'])}){present}"))
    for key, value in lines:
        click.echo(f"{key + ':':<13}{value.rstrip()}")


def _opts(d: Any) -> str:
    if not isinstance(d, dict) or not d:
        return ""
    return " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                    for k, v in d.items() if v is not None)


@store_group.command("rm")
@click.argument("name")
@store_option
def rm_command(name: str, store_dir: Path | None) -> None:
    """Remove model NAME (and shared weights nothing else uses)."""
    done = open_store(store_dir).remove(name)
    kept = f"; {done.kept}" if done.kept else ""
    click.echo(f"removed {name} ({_size(done.freed_bytes)} freed{kept})", err=True)


@store_group.command("verify")
@click.argument("name", required=False)
@store_option
@click.pass_context
def verify_command(ctx: click.Context, name: str | None, store_dir: Path | None) -> None:
    """Check the checksums of model NAME (default: every file in the store).
    Exit status 1 when anything is damaged."""
    store = open_store(store_dir)
    results = store.verify(name)
    bad = [r for r in results if not r.ok]
    for r in results:
        if r.ok:
            click.echo(f"ok       {r.name}")
        else:
            click.echo(f"DAMAGED  {r.name}: {r.problem}")
    if not results:
        click.echo(f"nothing to verify in {store.root}", err=True)
    elif bad:
        click.echo(f"tk: {len(bad)} of {len(results)} file(s) damaged", err=True)
        ctx.exit(1)
    else:
        click.echo(f"all {len(results)} file(s) ok", err=True)


@store_group.command("import-weights")
@click.argument("backbone")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@store_option
def import_weights_command(backbone: str, file: Path, store_dir: Path | None) -> None:
    """Store pretrained weights FILE (.safetensors, or .pth read without pickle) for
    BACKBONE, so that `tk finetune` finds them offline."""
    qualified = get_state().plugins.registry("backbones").resolve(backbone).qualified_name
    store = open_store(store_dir)
    path = import_weights(store, qualified, file)
    click.echo(str(path))
    info = store.weights_info(qualified) or {}
    click.echo(f"imported weights for {qualified} ({info.get('tensors', '?')} tensors, "
               f"{_size(path.stat().st_size)})", err=True)
