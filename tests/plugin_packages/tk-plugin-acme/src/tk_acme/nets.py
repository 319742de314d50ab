"""acme's backbones (torch imported here, when tk builds one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from toolkit.model.backbone import Backbone, DataConfig, WeightsInfo
from toolkit.model.weights import load_into, local_file, read_state_dict, resolve_pretrained

SHIPPED = Path(__file__).parent / "weights" / "acme-tinycnn.safetensors"  # not in this fixture


def tinycnn(pretrained: Any = False, width: int = 4) -> Backbone:
    stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU())
    body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    module = nn.Sequential(stem, body)
    weights = WeightsInfo("random")
    if pretrained is True:
        path, weights = resolve_pretrained("acme:acme-tinycnn", [
            local_file("package", SHIPPED, f"the weights shipped with tk-plugin-acme {SHIPPED}")],
            filename=SHIPPED.name)
        load_into(module, read_state_dict(path))
    elif pretrained:
        load_into(module, read_state_dict(pretrained))
        weights = WeightsInfo("file", file=str(pretrained))
    return Backbone(module, 2 * width, DataConfig(input_size=(3, 32, 32), crop_pct=1.0),
                    [stem, body], weights)


def boom_net(pretrained: Any = False) -> Backbone:
    raise ValueError("intentional bug in boom_net")
