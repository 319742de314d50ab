"""Built-in plugin: every torchvision classification model as a tk backbone.

Registration lists ``torchvision.models.list_models(module=torchvision.models)`` and reads
the weights metadata (parameter count, default weights) without building any model.

The factory ``(pretrained, **options)`` builds the torchvision model, keeps every pretrained
layer and replaces only the final classifier layer (the last ``Linear`` producing the class
scores) by ``Identity``, so the module outputs the features that layer consumed: alexnet and
vgg keep fc6/fc7 (4096 features), mobilenet_v3 and maxvit keep their pre-logits layers.
SqueezeNet, whose classifier is a convolution, ends in global average pooling of its last
Fire features instead (512). GoogLeNet / Inception v3 are built without auxiliary
classifiers and with ``transform_input=True`` (what their pretrained weights expect; the
same for random weights, so rebuilding a saved model never depends on where its weights
came from).

Weights: ``pretrained=False`` random; a path: that file (``.safetensors`` or ``.pth`` read
with ``weights_only=True``); ``True``: the default weights entry (or option
``weights_tag``, e.g. ``IMAGENET1K_V2``), looked up first in ``$TORCH_HOME/hub/checkpoints``
under the file name torchvision uses, then downloaded from the weights entry's URL into
that file (torch.hub, checked against the hash prefix in the name, read without pickle);
neither -> :class:`toolkit.errors.WeightsNotFoundError`. The sha256 of the file used is
recorded. Other options go to the torchvision model constructor (``dropout``,
``stochastic_depth_prob``, ``image_size``... where the architecture accepts them).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from toolkit.errors import TkError
from toolkit.plugin.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    from torch import nn

    from toolkit.model.backbone import Backbone, DataConfig

OWNER = "torchvision"
# set by tk itself, never by options
_RESERVED = {"num_classes", "weights", "progress", "aux_logits", "init_weights"}


NAMES_FORMAT = 1  # bump when the registered info changes shape


@hookimpl
def tk_register_backbones(register: Register) -> None:
    """Every torchvision classifier, from a list computed once per torchvision version
    (:mod:`toolkit.plugin.namecache`): registering imports nothing heavy."""
    from toolkit.plugin.namecache import cached_entries

    for name, info in cached_entries(OWNER, "torchvision", NAMES_FORMAT, _entries):
        register(name, functools.partial(build, name), **info)


def _entries() -> list[tuple[str, dict[str, Any]]]:
    import torchvision.models as tvm

    return [(name, _describe(name)) for name in tvm.list_models(module=tvm)]


def _describe(name: str) -> dict[str, Any]:
    import torchvision.models as tvm

    family = tvm.get_model_builder(name).__module__.rpartition(".")[2]
    info: dict[str, Any] = {"family": family}
    try:
        enum = tvm.get_model_weights(name)
    except Exception:
        enum = None
    if enum is None or not list(enum):
        info["description"] = f"torchvision {family} (no pretrained weights)"
        info["weights"] = []
        return info
    default = enum.DEFAULT
    info["weights"] = [w.name for w in enum]
    info["default_weights"] = default.name
    parts = [f"torchvision {family}"]
    num_params = default.meta.get("num_params")
    if num_params:
        info["num_params"] = int(num_params)
        parts.append(f"{num_params / 1e6:.1f}M params")
    acc = default.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1")
    weights = f"weights {default.name}" + (f" ({acc:.1f}% ImageNet top-1)" if acc else "")
    if len(info["weights"]) > 1:
        weights += f", +{len(info['weights']) - 1} more (option weights_tag)"
    parts.append(weights)
    info["description"] = ", ".join(parts)
    return info


# -- the factory ------------------------------------------------------------------------

def build(name: str, pretrained: Any = False, **options: Any) -> Backbone:
    """Build torchvision model ``name`` as a backbone (see the module docstring)."""
    import torchvision.models as tvm

    from toolkit.model.backbone import Backbone, WeightsInfo
    from toolkit.model.layer_groups import check_layer_groups

    options = dict(options)
    tag = options.pop("weights_tag", None)
    weights = _pick_weights(name, tag)
    builder = tvm.get_model_builder(name)
    kwargs = _constructor_kwargs(name, builder, weights, options, bool(pretrained))
    try:
        model = builder(weights=None, **kwargs)
    except TypeError as exc:
        raise TkError(f"backbone '{name}': bad option ({exc})") from None
    except (ValueError, AssertionError) as exc:
        raise TkError(f"backbone '{name}': cannot build with options {options} ({exc})"
                      ) from None

    num_features, dropped, head_parent = _drop_classifier(model)
    ignore_prefixes = [dropped, "aux1.", "aux2.", "AuxLogits."]

    info = WeightsInfo("random")
    if pretrained is True:
        state_dict, info = _pretrained_weights(name, weights)
    elif pretrained in (False, None):
        state_dict = None
    elif isinstance(pretrained, (str, os.PathLike)):
        from toolkit.model.weights import read_state_dict, sha256_file

        path = os.fspath(pretrained)
        state_dict = read_state_dict(path)
        info = WeightsInfo("file", sha256=sha256_file(path), file=os.path.abspath(path),
                           tag=weights.name if weights is not None and tag else None)
    else:
        raise TkError(f"backbone '{name}': pretrained must be True, False or a file path, "
                      f"not {pretrained!r}")

    if state_dict is not None:
        from toolkit.model.weights import load_into

        state_dict = _legacy_keys(state_dict)
        what = f"for {OWNER}:{name}" + (f" from {info.file}" if info.file else "")
        load_into(model, state_dict, ignore_prefixes=ignore_prefixes, what=what)

    groups = layer_groups(model, head_parent)
    check_layer_groups(model, groups)
    return Backbone(module=model, num_features=num_features, data_config=data_config(weights),
                    layer_groups=groups, weights=info, name=f"{OWNER}:{name}")


def _pick_weights(name: str, tag: str | None) -> Any:
    """The weights enum entry: ``tag`` if given, else the default (None: no weights)."""
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(name)
    except Exception:
        enum = None
    entries = list(enum) if enum is not None else []
    if tag is None:
        return enum.DEFAULT if entries else None
    for w in entries:
        if w.name == str(tag) or f"{enum.__name__}.{w.name}" == str(tag):
            return w
    known = ", ".join(w.name for w in entries) or "none"
    raise TkError(f"backbone '{name}': unknown weights_tag '{tag}' (known: {known})")


def _model_class(builder: Any) -> type | None:
    import typing

    try:
        cls = typing.get_type_hints(builder).get("return")
    except Exception:
        return None
    return cls if isinstance(cls, type) else None


def _constructor_kwargs(name: str, builder: Any, weights: Any, options: dict[str, Any],
                        pretrained: bool) -> dict[str, Any]:
    import inspect

    reserved = sorted(_RESERVED & set(options))
    if reserved:
        raise TkError(f"backbone '{name}': option {reserved[0]} is set by tk, not an option")
    cls = _model_class(builder)
    params = dict(inspect.signature(cls.__init__).parameters) if cls is not None else {}
    accepted = {p for p, v in params.items() if p != "self"
                and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)} - _RESERVED
    unknown = sorted(set(options) - accepted)
    if unknown and cls is not None:
        raise TkError(f"backbone '{name}': unknown option '{unknown[0]}' (accepted: "
                      f"{', '.join(sorted(accepted | {'weights_tag'}))})")
    kwargs = dict(options)
    if "aux_logits" in params:  # googlenet, inception_v3
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = not pretrained
        kwargs.setdefault("transform_input", True)
    if weights is not None:
        min_size = weights.meta.get("min_size")
        if min_size and "image_size" in accepted and "image_size" not in kwargs:  # vit
            kwargs["image_size"] = int(min_size[0])
        if min_size and "input_size" in accepted and "input_size" not in kwargs:  # maxvit
            kwargs["input_size"] = tuple(int(s) for s in min_size)
    return kwargs


def _drop_classifier(model: nn.Module) -> tuple[int, str, str]:
    """Replace the final classifier layer; -> (num_features, dropped key prefix, name of the
    container that held it ("" for the model itself))."""
    from torch import nn

    last_linear = None
    for qname, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last_linear = (qname, m)
    if last_linear is not None and last_linear[1].out_features == 1000:
        qname, layer = last_linear
        parent, _, child = qname.rpartition(".")
        model.get_submodule(parent).add_module(child, nn.Identity())
        return layer.in_features, f"{qname}.", parent
    # a convolutional classifier (squeezenet): replace its whole container by pooling
    last_conv = None
    for qname, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last_conv = (qname, m)
    if last_conv is not None and last_conv[1].out_channels == 1000 and "." in last_conv[0]:
        container = last_conv[0].rpartition(".")[0]
        parent, _, child = container.rpartition(".")
        model.get_submodule(parent).add_module(child, nn.AdaptiveAvgPool2d(1))
        return last_conv[1].in_channels, f"{container}.", ""
    raise TkError(f"cannot find the classifier layer of {type(model).__name__}")


def _legacy_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Old densenet checkpoints name layers ``norm.1`` where the model says ``norm1``."""
    import re

    legacy = re.compile(r"^(.*\.denselayer\d+\.(?:norm|relu|conv))\.([12]\.[a-z_]+)$")
    if not any(legacy.match(k) for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        m = legacy.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def _pretrained_weights(name: str, weights: Any) -> tuple[dict[str, Any], Any]:
    """The weights file of ``weights``: the torch hub cache, then a download into it
    (checked against the hash prefix in the file name), through tk's one resolver."""
    import re
    from pathlib import Path
    from urllib.parse import urlparse

    import torch

    from toolkit.model.weights import download, local_file, read_state_dict, resolve_pretrained

    if weights is None:
        raise TkError(f"torchvision has no pretrained weights for '{name}'; "
                      "use --no-pretrained for random weights or --weights FILE")
    filename = os.path.basename(urlparse(weights.url).path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    match = re.search(r"-([a-f0-9]+)\.", filename)
    path, info = resolve_pretrained(name, [
        local_file("cache", cached, f"the torch hub cache {cached}"),
        download(weights.url, cached, hash_prefix=match.group(1) if match else None),
    ], filename=filename, url=weights.url, tag=weights.name)
    return read_state_dict(path), info


def data_config(weights: Any) -> DataConfig:
    """The preprocessing of a weights entry's eval transforms (ImageNet 224 defaults when
    the model has none)."""
    from toolkit.model.backbone import DataConfig

    if weights is None:
        return DataConfig()
    t = weights.transforms()
    crop = int(_first(getattr(t, "crop_size", 224)))
    resize = int(_first(getattr(t, "resize_size", crop)))
    interp = getattr(getattr(t, "interpolation", None), "value", "bilinear")
    return DataConfig(
        input_size=(3, crop, crop),
        mean=tuple(float(x) for x in getattr(t, "mean", DataConfig.mean)),  # type: ignore[arg-type]
        std=tuple(float(x) for x in getattr(t, "std", DataConfig.std)),  # type: ignore[arg-type]
        interpolation=str(interp),
        crop_pct=round(crop / resize, 4) if resize else 1.0,
    )


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


# -- layer groups -----------------------------------------------------------------------

def layer_groups(model: nn.Module, head_parent: str) -> list[nn.Module]:
    """Ordered groups: feature stages split where the resolution drops, then the kept
    classifier layers (one group per fully-connected layer: alexnet/vgg fc6, fc7; the
    pre-logits layers of mobilenet_v3, convnext, maxvit). ViTs: patch embedding with class
    token and position embedding, the encoder blocks in four chunks, the final norm."""
    from toolkit.model.layer_groups import (
        groups_from_units,
        has_params,
        sequential_units,
        split_at_downsampling,
    )

    if _is_vit(model):
        return _vit_groups(model)
    units = list(sequential_units(model))
    if head_parent:
        in_head = [q == head_parent or q.startswith(head_parent + ".") for q, _ in units]
        head = [u for u, h in zip(units, in_head, strict=True) if h]
        body = [u for u, h in zip(units, in_head, strict=True) if not h]
    else:
        head, body = [], units
    stages = split_at_downsampling(body)
    if sum(1 for s in stages if has_params(s)) < 2:  # nothing strided: top-level children
        stages = [[(q, m)] for q, m in model.named_children() if q != head_parent]
    head_stages: list[list[tuple[str, Any]]] = [[]]
    for q, m in head:
        if has_params([(q, m)]) and has_params(head_stages[-1]):
            head_stages.append([])
        head_stages[-1].append((q, m))
    return list(groups_from_units(model, stages + head_stages))


def _is_vit(model: nn.Module) -> bool:
    encoder = getattr(model, "encoder", None)
    return hasattr(model, "conv_proj") and hasattr(encoder, "layers") and hasattr(encoder, "ln")


def _vit_groups(model: Any, chunks: int = 4) -> list[nn.Module]:
    from toolkit.model.layer_groups import groups_from_param_names

    names = [n for n, _ in model.named_parameters()]
    layers = [q for q, _ in model.encoder.layers.named_children()]
    size = max(1, -(-len(layers) // chunks))
    groups = [[n for n in names if n.startswith("conv_proj.") or "." not in n
               or n == "encoder.pos_embedding"]]
    for i in range(0, len(layers), size):
        block_names = tuple(f"encoder.layers.{q}." for q in layers[i:i + size])
        groups.append([n for n in names if n.startswith(block_names)])
    assigned = {n for g in groups for n in g}
    groups.append([n for n in names if n not in assigned])  # encoder.ln (heads is Identity)
    return list(groups_from_param_names(model, groups))
