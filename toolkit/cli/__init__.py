"""The `tk` command line. Thin: parse options, call the core, print.

Every command module here adds itself to :data:`cli`; plugins add theirs through
``tk_register_commands``. Nothing at import time touches torch, so ``tk --help`` is fast.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from toolkit import __version__, env
from toolkit.errors import TkError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class State:
    """Per-invocation state shared by commands: the loaded plugins."""

    def __init__(self, plugin_modules: tuple[str, ...] = ()):
        self.plugin_modules = plugin_modules
        self._plugins: Any = None

    @property
    def plugins(self) -> Any:
        if self._plugins is None:
            from toolkit.plugin.manager import load_plugins

            self._plugins = load_plugins(self.plugin_modules)
        return self._plugins


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="tk")
@click.option(
    "--plugin",
    "plugin_modules",
    multiple=True,
    metavar="MODULE",
    help="Load a plugin module (dotted name or .py path); repeatable. Also TK_PLUGINS=a,b.",
)
@click.pass_context
def cli(ctx: click.Context, plugin_modules: tuple[str, ...]) -> None:
    """tk: fine-tune pretrained image backbones and run batch inference.

    \b
    Quick start:
      tk finetune --backbone alexnet --classes 5     # embedded shapes dataset
      tk infer images/                               # newest model in the store
    """
    state = _PRELOADED.get("state")
    if state is None or state.plugin_modules != plugin_modules:
        state = State(plugin_modules)
    ctx.obj = state


def get_state(ctx: click.Context | None = None) -> State:
    ctx = ctx or click.get_current_context()
    return ctx.find_root().obj


_PRELOADED: dict[str, State] = {}


def _plugin_args(argv: list[str]) -> tuple[str, ...]:
    """``--plugin`` values given before the command name (click parses them later)."""
    mods: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--plugin" and i + 1 < len(argv):
            mods.append(argv[i + 1])
            i += 2
            continue
        if a.startswith("--plugin="):
            mods.append(a.split("=", 1)[1])
        elif not a.startswith("-"):
            break
        i += 1
    return tuple(mods)


def _wants_plugin_commands(argv: list[str]) -> bool:
    """Plugin commands are only needed to run or list commands: `tk --version` and
    `tk <built-in command>` skip importing plugins."""
    names = [a for a in argv if not a.startswith("-")]
    mods = set(_plugin_args(argv))
    names = [a for a in names if a not in mods]
    if not names:
        return "--version" not in argv
    return names[0] not in cli.commands


def main(argv: list[str] | None = None) -> None:
    from toolkit.cli import commands  # noqa: F401  (registers the built-in commands)

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = env.flag_quietly("TK_DEBUG")
    try:
        if _wants_plugin_commands(argv):
            state = State(_plugin_args(argv))
            _PRELOADED["state"] = state
            state.plugins.add_commands(cli)
        rv = cli.main(args=argv, prog_name="tk", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except _NO_ARGS_IS_HELP as exc:  # `tk` or `tk store` alone: the help text
        exc.show()
        code = exc.exit_code
    except click.UsageError as exc:  # one line, not click's usage block
        where = exc.ctx.command_path if exc.ctx is not None else "tk"
        click.echo(f"tk: error: {_one_line_text(exc.format_message())} "
                   f"(see `{where} --help`)", err=True)
        code = exc.exit_code
    except click.ClickException as exc:
        click.echo(f"tk: error: {_one_line_text(exc.format_message())}", err=True)
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("tk: aborted", err=True)
        code = 130
    except KeyboardInterrupt:
        click.echo("tk: interrupted", err=True)
        code = 130
    except TkError as exc:
        if debug:
            raise
        click.echo(f"tk: error: {_one_line(exc)}", err=True)
        code = exc.exit_code
    except BrokenPipeError:
        code = 141
    except Exception as exc:  # a bug, not a user error
        if debug:
            raise
        click.echo(
            f"tk: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(run with TK_DEBUG=1 for the traceback)",
            err=True,
        )
        code = 1
    sys.exit(code)


def _one_line(exc: BaseException) -> str:
    return _one_line_text(str(exc)) or type(exc).__name__


def _one_line_text(text: str) -> str:
    return " ".join(text.split())


# click >= 8.2 raises this (a UsageError) for a group called without a command
_NO_ARGS_IS_HELP: type[BaseException] | tuple[()] = getattr(
    click.exceptions, "NoArgsIsHelpError", ())
