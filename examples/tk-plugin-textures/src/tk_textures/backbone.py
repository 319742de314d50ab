"""``texture-cnn``: a small convolutional backbone built from scratch.

Three groups (stem, stage1, stage2) then global average pooling: ``[N,3,H,W] ->
[N,4*width]``. Weights pretrained on the ``textures`` dataset ship inside the package
(``weights/texture_cnn_w16.safetensors``, made by ``python -m tk_textures.pretrain``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from torch import nn

from toolkit.errors import TkError
from toolkit.model.backbone import Backbone, DataConfig, WeightsInfo
from toolkit.model.weights import local_file, resolve_pretrained

NAME = "texture-cnn"
PRETRAINED_WIDTH = 16
PRETRAINED_TAG = "textures6-v1"
WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "texture_cnn_w16.safetensors"

# What the shipped weights were trained with (see pretrain.py): 32 px inputs, every
# channel scaled from [0, 1] to about [-2, 2], bilinear resizing, no centre crop.
DATA_CONFIG = DataConfig(
    input_size=(3, 32, 32),
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    interpolation="bilinear",
    crop_pct=1.0,
)


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class TextureCNN(nn.Module):
    def __init__(self, width: int = PRETRAINED_WIDTH):
        super().__init__()
        w = int(width)
        self.stem = nn.Sequential(*_conv(3, w))
        self.stage1 = nn.Sequential(*_conv(w, 2 * w, stride=2), *_conv(2 * w, 2 * w))
        self.stage2 = nn.Sequential(*_conv(2 * w, 4 * w, stride=2), *_conv(4 * w, 4 * w))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 4 * w

    def forward(self, x: Any) -> Any:
        return self.pool(self.stage2(self.stage1(self.stem(x))))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, Any]:
    """A state dict from ``.safetensors`` or ``.pth`` (never unpickled arbitrarily)."""
    import torch

    if not path.is_file():
        raise TkError(f"backbone '{NAME}': weight file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TkError(f"backbone '{NAME}': cannot read weights {path}: {exc}") from None
    if not isinstance(state, dict):
        raise TkError(f"backbone '{NAME}': {path} does not hold a state dict")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    # accept a whole tk classifier too: keep its backbone part
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def texture_cnn(pretrained: Any = False, width: int = PRETRAINED_WIDTH) -> Backbone:
    """The ``texture-cnn`` factory.

    ``pretrained``: ``False`` random weights; ``True`` the weights shipped with the
    package (only for ``width=16``); a path: that ``.safetensors`` / ``.pth`` file.
    """
    if int(width) < 1:
        raise TkError(f"backbone '{NAME}': width must be positive, got {width}")
    module = TextureCNN(int(width))
    weights = WeightsInfo("random")
    path = None
    if pretrained is True:
        if int(width) != PRETRAINED_WIDTH:
            raise TkError(f"backbone '{NAME}': pretrained weights exist for width="
                          f"{PRETRAINED_WIDTH} only; pass --no-pretrained for width={width}")
        # tk's one resolver: it tries the sources in order and, when none has the file,
        # raises WeightsNotFoundError saying exactly what it tried (here: no download)
        path, weights = resolve_pretrained(f"textures:{NAME}", [
            local_file("package", WEIGHTS_FILE, f"the weights shipped with tk-plugin-textures "
                                                f"{WEIGHTS_FILE}")],
            filename=WEIGHTS_FILE.name, tag=PRETRAINED_TAG)
    elif pretrained:
        path = Path(pretrained)
    if path is not None:
        state = read_state_dict(path)
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise TkError(f"backbone '{NAME}': {path} does not fit width={width} ({first})"
                          ) from None
        if pretrained is not True:  # the user's file: record which one, by its sha256
            weights = WeightsInfo("file", sha256=sha256_of(path), file=str(path))
    return Backbone(
        module=module,
        num_features=module.num_features,
        data_config=DATA_CONFIG,
        layer_groups=[module.stem, module.stage1, module.stage2],
        weights=weights,
    )
