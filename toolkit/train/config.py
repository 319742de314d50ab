"""Component options from the command line (``--opt head.hidden=512``) and TOML configs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from toolkit.errors import TkError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMPONENTS = ("backbone", "head", "loss", "optimizer", "dataset")


def parse_value(text: str) -> Any:
    """A TOML literal when it is one (``512``, ``0.1``, ``true``, ``[1, 2]``, ``"x"``),
    else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_opts(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``["head.hidden=512", "loss.gamma=1"]`` -> ``{"head": {"hidden": 512}, ...}``."""
    out: dict[str, dict[str, Any]] = {c: {} for c in COMPONENTS}
    for item in items:
        key, sep, value = item.partition("=")
        component, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise TkError(f"--opt {item!r}: expected COMPONENT.KEY=VALUE, e.g. head.hidden=512")
        if component not in COMPONENTS:
            raise TkError(f"--opt {item!r}: unknown component '{component}' "
                          f"(one of: {', '.join(COMPONENTS)})")
        out[component][name.strip()] = parse_value(value.strip())
    return out


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML config: top-level keys are finetune options (``epochs = 5``,
    ``batch_size = 32``, dashes or underscores), tables ``[backbone]``, ``[head]``,
    ``[loss]``, ``[optimizer]``, ``[dataset]`` hold component options (a ``name`` key in
    such a table picks the component)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TkError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TkError(f"--config {path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise TkError(f"--config {path}: not valid TOML ({exc})") from None
    out: dict[str, Any] = {"options": {c: {} for c in COMPONENTS}}
    for key, value in data.items():
        if key in COMPONENTS and isinstance(value, dict):
            value = dict(value)
            if "name" in value:
                out[key] = value.pop("name")
            out["options"][key] = value
        else:
            out[key.replace("-", "_")] = value
    return out
