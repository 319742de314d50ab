"""Weight files: find pretrained ones, hash them, read them without pickle, load them into a
module with clear errors.

Knows no concrete model. Backbone plugins use these so that every damaged, foreign or
mismatched weight file ends in one :class:`~toolkit.errors.TkError` line instead of a
pickle or torch traceback, and so that "where do the pretrained weights come from" is
answered in one place: :func:`resolve_pretrained` tries a plugin's ordered
:class:`WeightsSource` list (files it ships, framework caches, downloads) and says exactly
what it tried when none works.
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_store.fileformat import sha256_file
from toolkit.errors import StoreError, TkError, WeightsNotFoundError, one_line
from toolkit.model.backbone import WeightsInfo

if TYPE_CHECKING:
    import torch
    from torch import nn

DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation: an offline machine fails fast


class SourceSkipped(Exception):  # noqa: N818 - a reason, not an error
    """Raised by a :class:`WeightsSource` that does not apply now (``HF_HUB_OFFLINE=1``,
    no network): the message says why, :func:`resolve_pretrained` goes on."""


@dataclass(frozen=True)
class WeightsSource:
    """One place pretrained weights may come from, tried in order by
    :func:`resolve_pretrained`.

    ``source``: the :class:`~toolkit.model.backbone.WeightsInfo` word recorded when the
    weights come from here (``"package"``, ``"cache"``, ``"download"``, ``"file"``...).
    ``where``: how messages name the place (``"the torch hub cache /x/resnet18-….pth"``).
    ``find``: returns the local file, or None when it is not there; raises
    :class:`SourceSkipped` when the source does not apply, anything else when it failed
    (a download that broke off). ``url``: recorded as ``WeightsInfo.url``.
    """

    source: str
    where: str
    find: Callable[[], str | os.PathLike[str] | None]
    url: str | None = None


def local_file(source: str, path: str | os.PathLike[str], where: str = "") -> WeightsSource:
    """A file that is either there or not: weights shipped in a package (``"package"``), a
    framework cache (``"cache"``)."""
    p = Path(path)
    return WeightsSource(source, where or str(p), lambda: p if p.is_file() else None)


def download(url: str, into: str | os.PathLike[str], *, hash_prefix: str | None = None,
             where: str = "") -> WeightsSource:
    """A download of ``url`` into the file ``into`` (torch.hub's downloader: a temporary
    file renamed when complete, checked against ``hash_prefix``), with a short socket
    timeout."""
    target = Path(into)

    def fetch() -> Path:
        import torch

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(target), hash_prefix=hash_prefix,
                                           progress=False)
        finally:
            socket.setdefaulttimeout(previous)
        return target

    return WeightsSource("download", where or f"a download from {url}", fetch, url)


def resolve_pretrained(backbone: str, sources: Sequence[WeightsSource], *,
                       filename: str | None = None, url: str | None = None,
                       tag: str | None = None) -> tuple[Path, WeightsInfo]:
    """The first of ``sources`` that yields a file: its path and a
    :class:`~toolkit.model.backbone.WeightsInfo` (source word, the file's sha256, path,
    URL, ``tag``). None does: :class:`~toolkit.errors.WeightsNotFoundError` listing what
    was tried and how each ended; ``filename`` / ``url`` tell the user what to fetch by
    hand (no ``url``: nothing to download, the message claims none)."""
    tried = []
    for src in sources:
        try:
            found = src.find()
        except SourceSkipped as exc:
            tried.append(f"{src.where}: skipped ({one_line(exc)})")
            continue
        except Exception as exc:  # noqa: BLE001 - every failure is reported, in one line
            tried.append(f"{src.where}: failed ({one_line(exc, 160)})")
            continue
        if found is None or not Path(found).is_file():
            tried.append(f"{src.where}: not there")
            continue
        path = Path(found)
        return path, WeightsInfo(src.source, sha256=sha256_file(path), file=str(path),
                                 url=src.url or url, tag=tag)
    raise WeightsNotFoundError(backbone, filename, url, tried=tried)

# keys under which training scripts commonly nest the actual state dict
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")
_SHOW = 3  # how many offending keys an error names


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then JSON."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= 100_000_000


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a weight file, never unpickling arbitrary objects.

    ``.safetensors`` (or any file that is one) is read with safetensors, anything else with
    ``torch.load(map_location="cpu", weights_only=True)``. Common wrappers
    (``{"state_dict": ...}``, ``{"model": ...}``...) and a DataParallel ``module.`` prefix
    are unwrapped. A missing, damaged or non-weights file raises :class:`TkError`.
    """
    import torch

    p = Path(path)
    if not p.exists():
        raise TkError(f"weights file {p} not found")
    if not p.is_file():
        raise TkError(f"weights file {p} is not a file")
    if p.suffix.lower() == ".safetensors" or _looks_like_safetensors(p):
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p), device="cpu")
        except Exception as exc:
            raise TkError(f"cannot read weights file {p}: not a valid safetensors file "
                          f"({one_line(exc, 200)})") from None
    else:
        try:
            with warnings.catch_warnings():  # torch's notes about pickle protocols
                warnings.simplefilter("ignore")
                obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:
            msg = str(exc)
            found = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"global ([\w.]+)", msg)
            if "Weights only load failed" in msg and found:
                raise PickledObjectError(p, found.group(1) if found else None) from None
            raise TkError(f"cannot read weights file {p}: not a PyTorch or safetensors "
                          f"weights file, or it is damaged ({one_line(exc, 120)})") from None
    return _unwrap(obj, p)


class PickledObjectError(TkError):
    """A ``.pth`` that holds pickled Python objects (code could run if unpickled): refused."""

    def __init__(self, path: Path, global_name: str | None):
        self.path, self.global_name = path, global_name
        what = f" ({global_name})" if global_name else ""
        super().__init__(f"refusing to read weights file {path}: it holds a pickled Python "
                         f"object{what}, not only tensors (tk reads .pth files with "
                         "torch.load(weights_only=True); re-save it as a plain state dict or "
                         ".safetensors)")


def _is_tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):  # {"model": {"state_dict": {...}}} at worst
        if _is_tensor_dict(obj):
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not _is_tensor_dict(obj):
        found = type(obj).__name__
        if isinstance(obj, Mapping):
            found = "a dict without tensors" if not obj else (
                f"a dict with keys {', '.join(map(str, list(obj)[:_SHOW]))}")
        raise TkError(f"weights file {path} holds no state dict (expected tensor names mapped "
                      f"to tensors, found {found})")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _names(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_SHOW])
    return shown + (f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else "")


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    ignore_prefixes: Iterable[str] = (),
    what: str = "",
) -> None:
    """Copy ``state_dict`` into ``module`` strictly, or raise :class:`TkError` naming a few
    missing, unexpected and shape-mismatched keys. Keys starting with one of
    ``ignore_prefixes`` (e.g. a dropped classifier ``"fc."``) are skipped when present;
    ``what`` names the weights in messages (e.g. ``"resnet18 from file x.pth"``)."""
    prefixes = tuple(ignore_prefixes)
    sd = {k: v for k, v in state_dict.items() if not (prefixes and k.startswith(prefixes))}
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        problems = []
        if mismatched:
            k = mismatched[0]
            problems.append(f"{len(mismatched)} with another shape ({_names(mismatched)}; "
                            f"{k} is {list(sd[k].shape)} in the file, {list(own[k].shape)} "
                            "in the model)")
        if missing:
            problems.append(f"{len(missing)} missing ({_names(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
        label = f" {what}" if what else ""
        raise TkError(f"weights{label} do not fit the model: {len(sd)} tensors, "
                      + "; ".join(problems))
    try:
        module.load_state_dict(sd, strict=True)
    except Exception as exc:  # dtype conversions that cannot happen, etc.
        label = f" {what}" if what else ""
        raise TkError(f"cannot load weights{label}: {one_line(exc, 200)}") from None


PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def import_weights(store: Any, backbone: str, file: str | os.PathLike[str]) -> Path:
    """`tk store import-weights`: read a weight file without pickle (``.safetensors``, or
    ``.pth``/``.pt``/``.bin``/``.ckpt`` through ``torch.load(weights_only=True)``, common
    wrappers unwrapped) and keep its tensors in ``store`` for the backbone ``plugin:name``,
    with the source file's name, path and sha256. Returns the stored file's path."""
    from toolkit.version import __version__

    store.weights_path(backbone)  # a name that is not plugin:name fails first
    source = Path(file).expanduser()
    if not source.is_file():
        raise StoreError(f"weight file {source} not found")
    suffix = source.suffix.lower()
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise StoreError(f"cannot import {source.name}: expected a .safetensors or .pth file")
    try:
        tensors = read_state_dict(source)
    except PickledObjectError as exc:
        what = f" ({exc.global_name})" if exc.global_name else ""
        raise StoreError(f"refused to import {source}: it holds a pickled Python object{what}, "
                         "not only tensors (tk reads .pth files with "
                         "torch.load(weights_only=True); re-save it as a plain state dict or "
                         ".safetensors)") from None
    except TkError as exc:
        raise StoreError(str(exc)) from None
    source_meta: dict[str, str] = {}
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as fh:
            source_meta = dict(fh.metadata() or {})
    provenance = {"source_name": source.name, "source_path": str(source.resolve()),
                  "source_sha256": sha256_file(source), "tk_version": __version__}
    return store.import_weights(backbone, tensors, provenance, source_meta)
