"""toolkit.data.datasets: transforms, the stratified split, datasets and seeded loaders."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from toolkit.data.datasets import ImageListDataset, IndexedDataset, TrainingImageError
from toolkit.data.loader import make_loader
from toolkit.data.splits import stratified_split
from toolkit.data.transforms import EvalTransform, TrainTransform, eval_transform, train_transform
from toolkit.errors import DataError
from toolkit.model.backbone import DataConfig

CFG = DataConfig(input_size=(3, 32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                 interpolation="bicubic", crop_pct=0.8)


# -- transforms --------------------------------------------------------------------------


def test_eval_transform_resizes_crops_and_normalises() -> None:
    t = eval_transform(CFG)
    assert isinstance(t, EvalTransform)
    assert t.resize_size == 40 and t.crop_size == (32, 32) and t.draft_size == 40
    img = Image.new("RGB", (100, 50), (255, 102, 0))
    out = t(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = torch.tensor([(1.0 - 0.5) / 0.2, (0.4 - 0.4) / 0.25, (0.0 - 0.3) / 0.3])
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.equal(out, t(img))  # deterministic


def test_eval_transform_keeps_the_centre() -> None:
    # a wide image: after the short side goes to 32 and the centre crop, only the middle
    # (blue) part remains; the red borders are cut off
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (80, 0, 220, 100))
    out = eval_transform(DataConfig((3, 32, 32), (0, 0, 0), (1, 1, 1), "bilinear", 1.0))(img)
    assert out[2].min() > 0.99 and out[0].max() < 0.01


def test_eval_transform_non_square() -> None:
    t = eval_transform(DataConfig(input_size=(3, 24, 40), crop_pct=0.8))
    assert t.resize_size == (30, 50)
    assert t(Image.new("RGB", (64, 64))).shape == (3, 24, 40)


def test_transforms_pickle_for_workers() -> None:
    for t in (eval_transform(CFG), train_transform(CFG)):
        clone = pickle.loads(pickle.dumps(t))
        img = Image.new("RGB", (48, 40), (10, 200, 30))
        torch.manual_seed(3)
        a = t(img)
        torch.manual_seed(3)
        assert torch.equal(a, clone(img))


def _photo(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A photo-like file (smooth gradients, shapes, noise) written to ``path``."""
    import numpy as np
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1)
    arr = (arr + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.ellipse([x0, y0, x0 + w // 4, y0 + h // 4],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img.save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
    return path


REAL_SIZES = [(500, 375), (375, 500), (640, 480), (224, 224), (90, 60), (31, 333)]
CONFIGS = [
    DataConfig((3, 224, 224)),                                  # resize 256, crop 224
    DataConfig((3, 64, 64), crop_pct=1.0),                      # resize = crop
    DataConfig((3, 32, 48), crop_pct=0.8),                      # non-square: (40, 60)
    DataConfig((3, 96, 96), crop_pct=1.25),                     # resize < crop: padding
]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest", "lanczos",
                                           "box", "hamming"])
def test_eval_transform_is_bit_identical_to_torchvision(tmp_path: Path,
                                                        interpolation: str) -> None:
    """The two halves (Pillow + numpy crop, then the device normalisation) give exactly
    what torchvision's Resize + CenterCrop + ToTensor + Normalize gave validation, on
    real decoded files of several sizes and shapes."""
    from dataclasses import replace

    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    from toolkit.data.decode import load_image

    mode = InterpolationMode(interpolation)
    for i, size in enumerate(REAL_SIZES):
        path = _photo(tmp_path / f"p{i}.{'jpg' if i % 2 else 'png'}", size, i)
        img = load_image(path)
        for cfg in CONFIGS:
            t = EvalTransform(replace(cfg, interpolation=interpolation))
            rs = t.resize_size
            resized = F.resize(img, [rs] if isinstance(rs, int) else list(rs),
                               interpolation=mode, antialias=True)
            reference = F.normalize(F.to_tensor(F.center_crop(resized, list(t.crop_size))),
                                    t.mean, t.std)
            crop = t.crop(img)
            assert crop.dtype.name == "uint8" and crop.shape == (*t.crop_size, 3)
            assert crop.flags.c_contiguous and crop.flags.writeable
            both = t(img)
            assert torch.equal(both, reference), (size, cfg, interpolation)
            # the device half on a channels-last batch view (what the runner hands it)
            batch = torch.from_numpy(np.stack([crop, crop])).permute(0, 3, 1, 2)
            assert torch.equal(t.normalize(batch)[1], reference)


def test_host_half_and_decoding_workers_never_import_torch(tmp_path: Path) -> None:
    """The ONNX Runtime path of issue 14 needs the decode + crop workers without torch."""
    import subprocess
    import sys

    for i in range(5):
        _photo(tmp_path / f"p{i}.jpg", (120 + i, 90), i)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff nothing")
    code = f"""
import sys
from toolkit.data.batches import Preparer, iter_batches
from toolkit.data.listing import discover
from toolkit.data.transforms import EvalTransform
from toolkit.model.backbone import DataConfig
paths = discover([{str(tmp_path)!r}])
prep = Preparer(EvalTransform(DataConfig((3, 32, 32))), "draft")
batches = list(iter_batches(paths, range(len(paths)), prep, batch_size=2, workers=2))
assert [i for b in batches for i in b.indices] == list(range(6))
assert sum(len(b.crop_pos) for b in batches) == 5
assert batches[0].errors[0] and batches[0].crops.shape == (1, 32, 32, 3)
assert "torch" not in sys.modules and "torchvision" not in sys.modules, "torch imported"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_train_transform_augments_and_repeats_with_seed() -> None:
    t = train_transform(CFG)
    assert isinstance(t, TrainTransform)
    img = Image.effect_noise((64, 48), 60).convert("RGB")
    torch.manual_seed(0)
    first = [t(img) for _ in range(4)]
    torch.manual_seed(0)
    again = [t(img) for _ in range(4)]
    assert all(a.shape == (3, 32, 32) for a in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])  # it does augment


def test_train_transform_without_augmentation_is_eval() -> None:
    t = train_transform(CFG, augment=False)
    assert isinstance(t, EvalTransform)


# -- stratified split ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(2, 30), min_size=1, max_size=6),
    frac=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_split_properties(counts, frac, seed, data) -> None:
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    labels = data.draw(st.permutations(labels))
    train, val = stratified_split(labels, frac, seed)
    assert sorted(train + val) == list(range(len(labels)))
    assert not set(train) & set(val)
    for c, n in enumerate(counts):
        n_val = sum(1 for i in val if labels[i] == c)
        assert 1 <= n_val <= n - 1
        assert abs(n_val - n * frac) <= 1 or n_val in (1, n - 1)
    assert (train, val) == stratified_split(labels, frac, seed)  # deterministic


def test_split_depends_on_seed() -> None:
    labels = [i % 3 for i in range(300)]
    assert stratified_split(labels, 0.2, 1) != stratified_split(labels, 0.2, 2)
    assert len(stratified_split(labels, 0.2, 1)[1]) == 60


def test_split_too_few_images_names_the_class() -> None:
    with pytest.raises(DataError, match="class 'dog' has only 1 image"):
        stratified_split([0, 0, 1, 0], 0.25, 0, class_names=["cat", "dog"])


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, float("nan"), "x"])
def test_split_fraction_must_be_inside_0_1(bad) -> None:
    with pytest.raises(DataError, match="val-split"):
        stratified_split([0, 0, 1, 1], bad, 0)


# -- datasets ----------------------------------------------------------------------------


def test_image_list_dataset_decodes_and_names_bad_files(tmp_path: Path) -> None:
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    ds = ImageListDataset([(tmp_path / "ok.png", 1), (tmp_path / "bad.jpg", 0)],
                          eval_transform(CFG))
    assert len(ds) == 2 and ds.targets == [1, 0]
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 1
    with pytest.raises(TrainingImageError, match="bad.jpg") as info:
        ds[1]
    assert "training data must be readable" in str(info.value)


def test_bad_image_in_a_worker_is_still_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"")
    ds = ImageListDataset([(tmp_path / "bad.png", 0)], eval_transform(CFG))
    loader = make_loader(ds, 1, shuffle=False, workers=1, seed=0)
    with pytest.raises(TrainingImageError) as info:
        next(iter(loader))
    message = str(info.value)
    assert "\n" not in message and "bad.png" in message and "empty file" in message


def test_resize_that_would_be_huge_stops_training_naming_the_file(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """Within the aspect limit (raised here) but not within what the resize may produce:
    the eval transform refuses, and training names the file."""
    Image.new("RGB", (3000, 2), (0, 200, 0)).save(tmp_path / "strip.png")
    monkeypatch.setenv("TK_MAX_ASPECT_RATIO", "10000")
    monkeypatch.setenv("TK_MAX_IMAGE_PIXELS", "100000")
    ds = ImageListDataset([(tmp_path / "strip.png", 0)], eval_transform(CFG))
    with pytest.raises(TrainingImageError, match=r"strip\.png: .*resized for this model"):
        ds[0]


def _make(i: int):
    return Image.new("RGB", (8, 8), (i % 256, 0, 0)), i % 2


def test_indexed_dataset_and_seeded_loader() -> None:
    ds = IndexedDataset(_make, range(10, 30), lambda img: torch.tensor(img.getpixel((0, 0))[0]))
    assert len(ds) == 20 and ds[0] == (torch.tensor(10), 0)

    def order(seed: int, workers: int = 0) -> list[int]:
        loader = make_loader(ds, 4, shuffle=True, workers=workers, seed=seed)
        return [int(v) for x, _ in loader for v in x]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(10, 30))
    assert order(5, workers=2) == order(5, workers=0)
    plain = make_loader(ds, 4, shuffle=False, workers=0, seed=0)
    assert [int(v) for x, _ in plain for v in x] == list(range(10, 30))


def test_loader_rejects_nonsense() -> None:
    ds = IndexedDataset(_make, range(4))
    with pytest.raises(DataError, match="batch-size"):
        make_loader(ds, 0, shuffle=False)
    with pytest.raises(DataError, match="workers"):
        make_loader(ds, 2, shuffle=False, workers=-1)
