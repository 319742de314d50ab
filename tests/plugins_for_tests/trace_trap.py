"""A test plugin: backbone ``trace-trap``, a tiny CNN whose output depends on Python
control flow over the data (``if float(x.mean()) > 0``): eager PyTorch takes the branch the
batch asks for, ``torch.jit.trace`` records the branch of its example input, and
``torch.export`` / the ONNX exporter refuse the data-dependent branch. `tk export` must catch
both (the parity check, the exporter's error) and write nothing."""

from __future__ import annotations

from typing import Any

from toolkit.plugin.hookspecs import hookimpl


def trace_trap(pretrained: Any = False) -> Any:
    import torch
    from torch import nn

    from toolkit.model.backbone import Backbone, DataConfig

    class Trap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            feats = self.pool(torch.relu(self.conv(x)))
            if float(x.mean()) > 0:  # a data-dependent Python branch
                return feats
            return -feats

    module = Trap()
    return Backbone(module=module, num_features=8,
                    data_config=DataConfig(input_size=(3, 32, 32), crop_pct=1.0),
                    layer_groups=[module])


@hookimpl
def tk_register_backbones(register: Any) -> None:
    register("trace-trap", trace_trap, description="data-dependent branch (export tests)")
