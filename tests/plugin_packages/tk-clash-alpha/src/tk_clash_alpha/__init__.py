"""Registers backbone 'twin-net', like its twin package: the bare name is ambiguous,
'alpha:twin-net' picks this one (8 features)."""

from typing import Any

from toolkit.plugin.hookspecs import hookimpl

NUM_FEATURES = 8


def twin_net(pretrained: Any = False) -> Any:
    from torch import nn

    from toolkit.model.backbone import Backbone, DataConfig

    if pretrained:
        from toolkit.errors import TkError

        raise TkError("backbone 'twin-net' (alpha) has no pretrained weights")
    conv = nn.Sequential(nn.Conv2d(3, NUM_FEATURES, 3, stride=2), nn.ReLU())
    module = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone(module, NUM_FEATURES, DataConfig(input_size=(3, 32, 32), crop_pct=1.0),
                    [conv])


@hookimpl
def tk_register_backbones(register: Any) -> None:
    register("twin-net", twin_net, description="alpha's twin-net, 8 features")
