"""The `tk` command line. Thin: parse options, call the core, print.

Every command module here adds itself to :data:`cli`; plugins add theirs through
``tk_register_commands``. Nothing at import time touches torch, so ``tk --help`` is fast.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from toolkit import env
from toolkit.errors import TkError, format_error
from toolkit.version import __version__

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class State:
    """Per-invocation state shared by commands: the ``--plugin`` modules and the plugins,
    loaded on first use (built-in commands that need none never import a plugin).
    :func:`main` makes one and hands it to click as the root context's ``obj``."""

    def __init__(self, plugin_modules: tuple[str, ...] = ()):
        self.plugin_modules = plugin_modules
        self.loaded: Any = None  # the toolkit.plugin.manager.Plugins, once loaded

    @property
    def plugins(self) -> Any:
        if self.loaded is None:
            from toolkit.plugin.manager import load_plugins

            self.loaded = load_plugins(self.plugin_modules)
        return self.loaded


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
    if not isinstance(ctx.obj, State) or ctx.obj.plugin_modules != plugin_modules:
        ctx.obj = State(plugin_modules)  # called without main() (click's test runner)


def get_state(ctx: click.Context | None = None) -> State:
    ctx = ctx or click.get_current_context()
    return ctx.find_root().obj


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
    state = State(_plugin_args(argv))
    try:
        if _wants_plugin_commands(argv):
            state.plugins.add_commands(cli)
        rv = cli.main(args=argv, prog_name="tk", standalone_mode=False, obj=state)
        code = rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except _NO_ARGS_IS_HELP as exc:  # `tk` or `tk store` alone: the help text
        exc.show()
        code = exc.exit_code
    except click.ClickException as exc:  # one line, not click's usage block
        where = ((exc.ctx.command_path if exc.ctx else "tk")
                 if isinstance(exc, click.UsageError) else "")
        error = TkError(exc.format_message() + (f" (see `{where} --help`)" if where else ""))
        error.exit_code = exc.exit_code
        code = _report(error, state)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        # click turns a Ctrl-C inside a command into Abort too; "aborted" is for a prompt
        # left without an answer
        ctrl_c = isinstance(exc, KeyboardInterrupt) or isinstance(exc.__context__,
                                                                  KeyboardInterrupt)
        click.echo("tk: interrupted" if ctrl_c else "tk: aborted", err=True)
        code = 130
    except BrokenPipeError:
        code = 141
    except Exception as exc:  # a user error, a plugin's bug or tk's own
        code = _report(exc, state)
    sys.exit(code)


def _report(exc: Exception, state: State) -> int:
    """Print ``exc`` as one line (:func:`toolkit.errors.format_error`), blaming the plugin
    whose code raised it when it is not a TkError; ``TK_DEBUG=1`` re-raises instead."""
    if not isinstance(exc, TkError) and state.loaded is not None:
        exc = state.loaded.blame(exc) or exc
    if env.flag_quietly("TK_DEBUG"):
        raise exc  # a PluginBugError carries the plugin's exception as its __cause__
    line, code = format_error(exc)
    click.echo(line, err=True)
    return code


# click >= 8.2 raises this (a UsageError) for a group called without a command
_NO_ARGS_IS_HELP: type[BaseException] | tuple[()] = getattr(
    click.exceptions, "NoArgsIsHelpError", ())
