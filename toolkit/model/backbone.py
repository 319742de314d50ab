"""What a backbone plugin returns: the feature extractor and what its weights expect."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # keep torch out of import time
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


@dataclass(frozen=True)
class DataConfig:
    """The preprocessing a backbone's weights expect (the timm notion of data config).

    Eval transform: resize the short side to ``input_size / crop_pct``, centre-crop
    ``input_size``, normalise with ``mean``/``std``.
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            object.__setattr__(self, "interpolation", "bilinear")

    def with_image_size(self, size: int) -> DataConfig:
        return DataConfig((self.input_size[0], size, size), self.mean, self.std,
                          self.interpolation, self.crop_pct)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        return cls(
            input_size=tuple(int(x) for x in d["input_size"]),  # type: ignore[arg-type]
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bilinear")),
            crop_pct=float(d.get("crop_pct", 0.875)),
        )


@dataclass
class WeightsInfo:
    """Where a backbone's weights came from."""

    source: str  # "random", "file", "store", "cache", "download"
    sha256: str | None = None
    file: str | None = None
    url: str | None = None
    tag: str | None = None  # e.g. torchvision "IMAGENET1K_V1", timm "a1_in1k"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Backbone:
    """A pretrained (or random) feature extractor.

    ``module`` maps images ``[N,3,H,W]`` to features ``[N,num_features]``. ``layer_groups``
    lists sub-modules of ``module`` ordered from input to output; every parameter of
    ``module`` belongs to exactly one group (``--freeze N`` freezes the first N).
    """

    module: nn.Module
    num_features: int
    data_config: DataConfig
    layer_groups: list[nn.Module]
    weights: WeightsInfo = field(default_factory=lambda: WeightsInfo("random"))
    name: str = ""
