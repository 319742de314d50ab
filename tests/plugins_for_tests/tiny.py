"""A test plugin: backbone ``tiny-cnn``, a two-block conv net small enough for any test.

Load it with ``load_plugins(modules=["tests/plugins_for_tests/tiny.py"])`` or
``tk --plugin tests/plugins_for_tests/tiny.py ...``. Options: ``width`` (channels of the
first block; features = 2 * width). ``pretrained`` may be a path to a ``.safetensors`` or
``.pth`` state dict of the backbone module; ``True`` raises WeightsNotFoundError (there is
nothing to download).
"""

from __future__ import annotations

from typing import Any

from toolkit.plugin.hookspecs import hookimpl


def tiny_cnn(pretrained: Any = False, width: int = 8) -> Any:
    from pathlib import Path

    from torch import nn

    from toolkit.errors import WeightsNotFoundError
    from toolkit.model.backbone import Backbone, DataConfig, WeightsInfo

    width = int(width)
    stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
    body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                         nn.BatchNorm2d(2 * width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    module = nn.Sequential(stem, body)
    weights = WeightsInfo("random")
    if pretrained is True:
        raise WeightsNotFoundError("tiny-cnn", "tiny-cnn.safetensors", None, [])
    if pretrained:
        import hashlib

        import torch
        from safetensors.torch import load_file

        path = Path(pretrained)
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        weights = WeightsInfo("file", hashlib.sha256(path.read_bytes()).hexdigest(), str(path))
    return Backbone(module=module, num_features=2 * width,
                    data_config=DataConfig(input_size=(3, 32, 32), crop_pct=1.0),
                    layer_groups=[stem, body], weights=weights)


@hookimpl
def tk_register_backbones(register: Any) -> None:
    register("tiny-cnn", tiny_cnn, description="tiny 2-block CNN for tests")
