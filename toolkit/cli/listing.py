"""`tk plugins` and `tk list`: what is installed and what it provides."""

from __future__ import annotations

import json

import click

from toolkit.cli import cli, get_state
from toolkit.plugin.registry import KINDS


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--all", "show_all", is_flag=True, help="Include the built-in plugins.")
def plugins_command(as_json: bool, show_all: bool) -> None:
    """List installed plugins: name, version, hooks, load error and problems (hooks left
    out, functions named like hooks without @hookimpl)."""
    plugins = get_state().plugins
    plugins.check(cli)  # run the plugins' registration hooks so their errors show too
    records = [r for r in plugins.records.values() if show_all or not r.builtin]
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in records], indent=2))
        return
    if not records:
        click.echo("no third-party plugins installed (tk plugins --all shows the built-ins)",
                   err=True)
    for r in records:
        version = f" {r.version}" if r.version else ""
        origin = r.distribution or r.source
        click.echo(f"{r.name}{version}  ({origin}: {r.module})")
        if r.hooks:
            click.echo(f"    hooks: {', '.join(r.hooks)}")
        if r.error:
            click.echo(f"    error: {r.error}")
        for problem in r.problems:
            click.echo(f"    problem: {problem}")


@cli.command("list")
@click.argument("kind", type=click.Choice(KINDS), metavar="KIND")
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_command(kind: str, pattern: str | None, as_json: bool) -> None:
    """List registered components of KIND, optionally filtered by an fnmatch PATTERN
    (e.g. 'resnet*' or 'timm:*')."""
    plugins = get_state().plugins
    registry = plugins.registry(kind)
    for name, owners in registry.conflicts().items():
        click.echo(
            f"tk: warning: {registry.singular} '{name}' is registered by "
            f"{' and '.join(repr(o) for o in owners)}; use "
            + " or ".join(f"'{o}:{name}'" for o in owners),
            err=True,
        )
    for record in plugins.records.values():
        if record.error:
            click.echo(f"tk: warning: plugin '{record.name}' not loaded: {record.error}",
                       err=True)
        for problem in record.problems:
            click.echo(f"tk: warning: plugin '{record.name}': {problem}", err=True)
    components = registry.list(pattern)
    if as_json:
        click.echo(json.dumps([c.describe() for c in components], indent=2, default=str))
        return
    if not components:
        click.echo(f"no {kind} match {pattern!r}" if pattern else f"no {kind} registered",
                   err=True)
        return
    width = max(len(c.name) for c in components)
    for c in components:
        desc = c.info.get("description", "")
        if c.default_lr is not None:
            desc = f"{desc} [default lr {c.default_lr:g}]".strip()
        if c.info.get("default"):
            desc = f"{desc} [default]".strip()
        click.echo(f"{c.name:<{width}}  {c.owner:<12} {desc}".rstrip())
