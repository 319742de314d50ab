"""Built-in plugin: every timm model as a tk backbone.

Registers each architecture of ``timm.list_models()`` (``resnet50``: its default weights)
and each pretrained tag of ``timm.list_models(pretrained=True)`` (``resnet50.a1_in1k``),
without building a model.

Name rule: every timm name is registered as a *fallback*. A bare name that another plugin
also registers (``resnet18``, ``vgg16``, ``efficientnet_b0``... which torchvision has) resolves
to that plugin; ``timm:resnet18`` always picks timm. Bare names only timm has
(``resnet50.a1_in1k``, ``convnext_atto``...) resolve to timm directly.

The factory ``(pretrained, **options)`` calls ``timm.create_model(name, num_classes=0,
**options)``, so the module returns pooled pre-logits features ``[N, F]`` (F is the model's
``head_hidden_size`` where it has a pre-logits layer, else ``num_features``). The data config
comes from timm's resolved pretrained config, the layer groups from the model's coarse
``group_matcher`` (fallback: stages split where the resolution drops).

Weights: ``pretrained=False`` random; a path: that file (read without pickle, classifier
keys ignored, timm's checkpoint conversion applied when the keys need it); ``True``: offline
first, the Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``)
and ``$TORCH_HOME/hub/checkpoints`` for URL-hosted weights, then a download (unless
``HF_HUB_OFFLINE=1``); neither -> :class:`toolkit.errors.WeightsNotFoundError` naming the
file and its URL. The sha256 of the file used is recorded.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from toolkit.errors import TkError
from toolkit.plugin.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    from torch import nn

    from toolkit.model.backbone import Backbone, DataConfig, WeightsInfo

OWNER = "timm"
# set by tk (num_classes=0 gives the pooled features); not user options
_RESERVED = {"num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
             "checkpoint_path", "features_only", "cache_dir", "global_pool"}
HF_FILES = ("model.safetensors", "pytorch_model.bin")


NAMES_FORMAT = 1  # bump when the registered info changes shape


@hookimpl
def tk_register_backbones(register: Register) -> None:
    """Every timm model and pretrained tag, from a list computed once per timm version
    (:mod:`toolkit.plugin.namecache`): registering does not import timm."""
    from toolkit.plugin.namecache import cached_entries

    for name, info in cached_entries(OWNER, "timm", NAMES_FORMAT, _entries):
        register(name, functools.partial(build, name), **info)


def _entries() -> list[tuple[str, dict[str, Any]]]:
    import timm
    from timm.models import get_pretrained_cfg

    archs = set(timm.list_models())
    tagged = set(timm.list_models(pretrained=True))
    out = []
    for name in sorted(archs | tagged):
        arch, _, tag = name.partition(".")
        if tag:
            desc = f"timm {arch}, weights {tag}"
        else:
            cfg = get_pretrained_cfg(name)
            desc = (f"timm {arch}, default weights {cfg.tag}" if _has_weights(cfg)
                    else f"timm {arch} (no pretrained weights)")
        out.append((name, {"fallback": True, "description": desc}))
    return out


def _has_weights(cfg: Any) -> bool:
    return cfg is not None and bool(cfg.hf_hub_id or cfg.url or cfg.file)


def _pretrained_cfg(name: str) -> Any:
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(name)
    except Exception:
        return None


# -- the factory ------------------------------------------------------------------------

def build(name: str, pretrained: Any = False, **options: Any) -> Backbone:
    """Build timm model ``name`` as a backbone (see the module docstring)."""
    import timm

    from toolkit.model.backbone import Backbone, WeightsInfo
    from toolkit.model.layer_groups import check_layer_groups
    from toolkit.model.weights import sha256_file

    reserved = sorted(_RESERVED & set(options))
    if reserved:
        raise TkError(f"backbone 'timm:{name}': option {reserved[0]} is set by tk, "
                      "not an option")
    cfg = _pretrained_cfg(name)
    path: str | None = None
    info = WeightsInfo("random")
    if pretrained is True:
        path, info = locate_weights(name, cfg)  # before building: fail fast
    elif isinstance(pretrained, (str, os.PathLike)) and not isinstance(pretrained, bool):
        path = os.fspath(pretrained)
        if not os.path.isfile(path):
            raise TkError(f"weights file {path} not found")
        info = WeightsInfo("file", sha256=sha256_file(path), file=os.path.abspath(path))
    elif pretrained not in (False, None):
        raise TkError(f"backbone 'timm:{name}': pretrained must be True, False or a file "
                      f"path, not {pretrained!r}")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **options)
    except TypeError as exc:
        raise TkError(f"backbone 'timm:{name}': bad option ({exc})") from None
    except (ValueError, AssertionError) as exc:
        raise TkError(f"backbone 'timm:{name}': cannot build with options {options} ({exc})"
                      ) from None
    if path is not None:
        load_weights(model, name, path, cfg)
    num_features = int(getattr(model, "head_hidden_size", None) or model.num_features)
    groups = layer_groups(model)
    check_layer_groups(model, groups)
    return Backbone(module=model, num_features=num_features, data_config=data_config(model),
                    layer_groups=groups, weights=info, name=f"{OWNER}:{name}")


def load_weights(model: nn.Module, name: str, path: str, cfg: Any) -> None:
    """Load a weight file into ``model`` (built with ``num_classes=0``), ignoring classifier
    keys; if its keys do not fit as they are, try the architecture's own checkpoint
    conversion (``checkpoint_filter_fn`` of its timm module) before giving up."""
    import sys

    from toolkit.model.weights import load_into, read_state_dict

    state_dict = read_state_dict(path)
    classifiers = getattr(cfg, "classifier", None) or ()
    if isinstance(classifiers, str):
        classifiers = (classifiers,)
    prefixes = [f"{c}." for c in classifiers]
    what = f"for timm:{name} from {path}"
    try:
        load_into(model, state_dict, ignore_prefixes=prefixes, what=what)
        return
    except TkError as first:
        convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if convert is None:
            raise
        try:
            converted = convert(dict(state_dict), model)
            load_into(model, converted, ignore_prefixes=prefixes, what=what)
        except Exception:
            raise first from None


def _hf_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment now (not at import time)."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return os.path.expanduser(env[key])
    if env.get("HF_HOME"):
        return os.path.join(os.path.expanduser(env["HF_HOME"]), "hub")
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def _offline() -> bool:
    from toolkit import env

    return env.flag_quietly("HF_HUB_OFFLINE")


def locate_weights(name: str, cfg: Any) -> tuple[str, WeightsInfo]:
    """The local file of ``name``'s pretrained weights, through tk's one resolver: timm's
    configured file, the Hugging Face cache, the torch hub cache (URL-hosted weights),
    then a download from the hub or the URL."""
    from pathlib import Path
    from urllib.parse import urlparse

    import torch

    from toolkit.model.weights import (
        WeightsSource,
        download,
        local_file,
        resolve_pretrained,
    )

    if not _has_weights(cfg):
        raise TkError(f"timm has no pretrained weights for '{name}'; use --no-pretrained for "
                      "random weights or --weights FILE")
    hf_cache = _hf_cache_dir()
    repo, _, revision = (cfg.hf_hub_id or "").partition("@")
    hf_files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_FILES
    url_file = (Path(torch.hub.get_dir()) / "checkpoints"
                / os.path.basename(urlparse(cfg.url).path)) if cfg.url else None
    sources = []
    if cfg.file:
        sources.append(local_file("file", cfg.file, f"timm's configured file {cfg.file}"))
    hub_url = None
    if repo:
        from huggingface_hub import hf_hub_url

        hub_url = hf_hub_url(repo, hf_files[0], revision=revision or None)
        sources += [WeightsSource(
            "cache", f"the Hugging Face cache {hf_cache} ({repo}/{fn})",
            functools.partial(_hf_cached, repo, fn, revision, hf_cache),
            hf_hub_url(repo, fn, revision=revision or None)) for fn in hf_files]
    if url_file is not None:
        sources.append(local_file("cache", url_file, f"the torch hub cache {url_file}"))
    if repo:
        sources.append(WeightsSource(
            "download", f"a download from the Hugging Face hub ({repo})",
            functools.partial(_hf_download, repo, hf_files, revision, hf_cache), hub_url))
    if url_file is not None:
        fetch = download(cfg.url, url_file)
        if repo and _offline():  # the hub copy is the primary one: offline means offline
            fetch = WeightsSource("download", fetch.where, _skip_offline, cfg.url)
        sources.append(fetch)
    if repo:
        filename, url = f"{repo}/{hf_files[0]}", hub_url
    else:
        filename, url = url_file.name if url_file else name, cfg.url

    path, info = resolve_pretrained(f"timm:{name}", sources, filename=filename, url=url,
                                    tag=cfg.tag or None)
    return str(path), info


def _skip_offline() -> None:
    from toolkit.model.weights import SourceSkipped

    raise SourceSkipped("HF_HUB_OFFLINE=1")


def _hf_cached(repo: str, filename: str, revision: str, cache_dir: str) -> str | None:
    """The cached hub file, or None (never a network request)."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, revision=revision or None, cache_dir=cache_dir,
                               local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache
        return None


def _hf_download(repo: str, filenames: tuple[str, ...], revision: str, cache_dir: str) -> str:
    """Download the first of ``filenames`` the hub repo has (short socket timeout; one
    quick reachability check first, since huggingface_hub retries unreachable hosts for
    about half a minute per file)."""
    import socket

    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from toolkit.model.weights import DOWNLOAD_TIMEOUT_S, SourceSkipped

    if _offline():
        raise SourceSkipped("HF_HUB_OFFLINE=1")
    first = hf_hub_url(repo, filenames[0], revision=revision or None)
    if not _reachable(first):
        raise ConnectionError(f"{first.split('/')[2]} does not answer")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        for fn in filenames:
            try:
                return hf_hub_download(repo, fn, revision=revision or None,
                                       cache_dir=cache_dir)
            except EntryNotFoundError as exc:
                if isinstance(exc, LocalEntryNotFoundError):  # no connection after all
                    raise
                continue  # the repo has the other file name
    finally:
        socket.setdefaulttimeout(previous)
    raise FileNotFoundError(f"the repo has none of {', '.join(filenames)}")


def _reachable(url: str) -> bool:
    """One quick request (proxies from the environment apply): does the host answer at all?
    huggingface_hub retries unreachable hosts with back-off for about half a minute per
    file; offline machines should fail at once instead."""
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None  # a redirect is an answer: no need to follow it

    try:
        opener = urllib.request.build_opener(NoRedirect)
        opener.open(urllib.request.Request(url, method="HEAD"), timeout=10).close()
    except urllib.error.HTTPError:
        return True  # an answer (404, 401...) means the network works
    except Exception:
        return False
    return True


def data_config(model: nn.Module) -> DataConfig:
    """timm's resolved data config of ``model`` as a :class:`toolkit.model.backbone.DataConfig`."""
    from timm.data import resolve_data_config

    from toolkit.model.backbone import DataConfig

    dc = resolve_data_config({}, model=model)
    size = tuple(int(x) for x in dc.get("input_size", (3, 224, 224)))
    return DataConfig(
        input_size=size,  # type: ignore[arg-type]
        mean=tuple(float(x) for x in dc.get("mean", DataConfig.mean)),  # type: ignore[arg-type]
        std=tuple(float(x) for x in dc.get("std", DataConfig.std)),  # type: ignore[arg-type]
        interpolation=str(dc.get("interpolation", "bilinear")),
        crop_pct=float(dc.get("crop_pct", 0.875)),
    )


def layer_groups(model: nn.Module) -> list[nn.Module]:
    """The model's coarse timm parameter groups (stem, stages/blocks, final norm), each as a
    :class:`toolkit.model.layer_groups.LayerGroup`; models without a group matcher: stages split
    where the resolution drops."""
    from toolkit.model.layer_groups import (
        groups_from_param_names,
        groups_from_units,
        has_params,
        sequential_units,
        split_at_downsampling,
    )

    try:
        from timm.models import group_parameters

        grouped = group_parameters(model, model.group_matcher(coarse=True))
        groups = groups_from_param_names(model, [grouped[k] for k in sorted(grouped)])
        if len(groups) > 1:
            return list(groups)
    except Exception:
        pass
    stages = split_at_downsampling(list(sequential_units(model)))
    if sum(1 for s in stages if has_params(s)) < 2:
        stages = [[(q, m)] for q, m in model.named_children()]
    return list(groups_from_units(model, stages))
