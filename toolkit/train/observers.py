"""The observers of one run: the loggers ``--log NAME`` selects, and the lifecycle
notifications around the run.

A logger is a component of kind ``loggers`` (``tk_register_loggers``): its factory builds,
once per run, an object whose ``@hookimpl`` methods observe that run. Such an object is
attached to the plugin manager under ``OWNER:NAME`` for the run, so it is an observer on
the same hooks as any plugin's (``tk_train_start``, ``tk_epoch_end``, ``tk_model_saved``,
``tk_train_end``), and detached when the run ends, whatever the ending. A logger that
fails is reported once and switched off for the rest of the run
(:meth:`toolkit.plugin.manager.Plugins.notify`); training goes on.

Where logs go: ``--log-dir DIR`` gives each run ``DIR/NAME``; by default a run logs into
its folder in the store, ``$TK_HOME/runs/NAME/logs``. Nothing here imports torch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from toolkit.errors import TkError


class RunObservers:
    """``--log`` names resolved at once (an unknown one is one line with a "did you
    mean"), the loggers built and attached by :meth:`attach`, and the notifications of
    the run: :meth:`start` (``tk_train_start``), :meth:`epoch_callback`
    (``tk_epoch_end``), ``tk_train_end`` when :meth:`observing` ends."""

    def __init__(self, plugins: Any, names: list[str] | tuple[str, ...] = (),
                 log_dir: str | None = None):
        self.plugins = plugins
        wanted = list(dict.fromkeys(names))  # --log csv --log csv: one csv logger
        registry = plugins.registry("loggers") if wanted else None
        self.loggers = [registry.resolve(name) for name in wanted] if registry else []
        self.log_root = Path(log_dir).absolute() if log_dir else None
        self.name = ""
        self.attached: list[str] = []
        self.started = False
        self.stopped = False  # the caller's epoch callback ended the run

    def log_dir(self, run_name: str, run_dir: Path) -> Path:
        """The folder a run's loggers write to."""
        return self.log_root / run_name if self.log_root else Path(run_dir) / "logs"

    def attach(self, run_name: str, run_dir: Path) -> None:
        """Build every selected logger for run ``run_name`` (its store folder ``run_dir``)
        and attach it. A factory's TkError (a missing extra, an unwritable folder) stops
        the run before training, with the loggers built so far detached again."""
        self.name = run_name
        log_dir = self.log_dir(run_name, run_dir)
        try:
            for component in self.loggers:
                accepted = component.accepted_options(2)
                extra = ({"log_root": str(self.log_root) if self.log_root else None}
                         if accepted is None or "log_root" in accepted else {})
                obj = component.factory(str(log_dir), run_name, **extra)
                if obj is None:
                    raise TkError(f"logger plugin '{component.owner}' returned nothing for "
                                  f"'{component.name}'")
                attached = f"{component.owner}:{component.name}"
                self.plugins.attach(obj, attached, component.owner)
                self.attached.append(attached)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for name in self.attached:
            self.plugins.detach(name)
        self.attached.clear()

    def start(self, config: dict[str, Any]) -> None:
        """``tk_train_start``: from now on the run's end is announced too."""
        self.started = True
        self.plugins.notify("tk_train_start", config=config)

    def epoch_callback(self, then: Callable[[int, dict[str, Any]], None] | None = None
                       ) -> Callable[[int, dict[str, Any]], None]:
        """What the trainer calls after each epoch: ``tk_epoch_end``, then ``then`` (the
        caller's callback); an exception from ``then`` marks the run ``stopped``."""
        def on_epoch_end(epoch: int, metrics: dict[str, Any]) -> None:
            self.plugins.notify("tk_epoch_end", epoch=epoch, metrics=metrics)
            if then is not None:
                try:
                    then(epoch, metrics)
                except BaseException:
                    self.stopped = True
                    raise

        return on_epoch_end

    @contextlib.contextmanager
    def observing(self) -> Iterator[RunObservers]:
        """Around the whole run: at the end ``tk_train_end(name, status)`` (only when
        ``tk_train_start`` was sent) and the loggers detached."""
        status = "failed"
        try:
            yield self
            status = "finished"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except BaseException:
            status = "stopped" if self.stopped else "failed"
            raise
        finally:
            try:
                if self.started:
                    self.plugins.notify("tk_train_end", name=self.name, status=status)
            finally:
                self.detach()
