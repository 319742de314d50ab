"""The built-in datasets (imagefolder, csv, shapes) through a fresh plugin registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from toolkit.data.datasets import DatasetSource
from toolkit.data.transforms import eval_transform, train_transform
from toolkit.errors import DataError
from toolkit.model.backbone import DataConfig
from toolkit.plugin.manager import load_plugins

CFG = DataConfig(input_size=(3, 32, 32), crop_pct=1.0)
EVAL = eval_transform(CFG)


@pytest.fixture(scope="module")
def datasets():
    return load_plugins(env={}).registry("datasets")


def build(datasets, name: str, **options):
    source = datasets.resolve(name).factory(**options)
    assert isinstance(source, DatasetSource)
    return source


def test_registered(datasets) -> None:
    names = {c.name for c in datasets.list()}
    assert {"imagefolder", "csv", "shapes"} <= names
    assert datasets.resolve("shapes").owner == "datasets"


# -- imagefolder -------------------------------------------------------------------------


def test_imagefolder_classes_files_and_split(datasets, make_image_dir) -> None:
    root = make_image_dir({"b_dog": 5, "a_cat": 4, "c_eel": 3})
    # nested, upper-case extensions, hidden and non-image files
    (root / "a_cat" / "sub").mkdir()
    os.replace(root / "a_cat" / "a_cat_000.png", root / "a_cat" / "sub" / "DEEP.PNG")
    (root / "a_cat" / "notes.txt").write_text("not an image")
    (root / "a_cat" / ".hidden.png").write_bytes(b"")
    (root / ".git").mkdir()
    (root / "b_dog" / ".cache").mkdir()
    (root / "b_dog" / ".cache" / "x.png").write_bytes(b"")

    src = build(datasets, "imagefolder", path=str(root), num_classes=3)
    assert src.classes == ["a_cat", "b_dog", "c_eel"]
    files = [Path(p).name for p, _ in src.samples]
    assert len(src.samples) == 12 and "DEEP.PNG" in files and "notes.txt" not in files
    assert ".hidden.png" not in files and "x.png" not in files
    assert src.samples == build(datasets, "imagefolder", path=str(root)).samples  # stable

    train, val = src.splits(train_transform(CFG), EVAL, val_split=0.25, seed=0)
    assert len(train) + len(val) == 12
    assert sorted({y for _, y in val.samples}) == [0, 1, 2]
    x, y = val[0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}


def test_imagefolder_class_count_mismatch(datasets, make_image_dir) -> None:
    root = make_image_dir({"a": 2, "b": 2, "c": 2})
    with pytest.raises(DataError) as info:
        build(datasets, "imagefolder", path=str(root), num_classes=5)
    assert str(info.value) == f"--classes 5 but {root} has 3 classes (a, b, c)"


def test_imagefolder_bad_folders(datasets, make_image_dir, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build(datasets, "imagefolder", path=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        build(datasets, "imagefolder", path=str(tmp_path / "empty"))
    root = make_image_dir({"a": 2, "b": 2})
    (root / "c").mkdir()
    with pytest.raises(DataError, match="class 'c' .* has no image files"):
        build(datasets, "imagefolder", path=str(root))
    one = make_image_dir({"only": 3}, root=tmp_path / "one")
    with pytest.raises(DataError, match="at least 2"):
        build(datasets, "imagefolder", path=str(one))
    with pytest.raises(DataError, match="needs a folder"):
        build(datasets, "imagefolder")


def test_imagefolder_lists_through_the_one_walker(datasets, make_image_dir, capsys,
                                                 monkeypatch) -> None:
    """The same walker as `tk infer`: special files and hidden entries skipped and said, a
    loop skipped, a broken link kept (training then names it), an unreadable folder fatal."""
    root = make_image_dir({"a": 2, "b": 2})
    os.mkfifo(root / "a" / "pipe.png")
    (root / "a" / ".hidden").mkdir()
    (root / "a" / ".hidden" / "x.png").write_bytes(b"")
    (root / "b" / "loop").symlink_to(root / "b", target_is_directory=True)
    (root / "b" / "gone.png").symlink_to(root / "missing.png")
    src = build(datasets, "imagefolder", path=str(root))
    names = [Path(p).relative_to(root).as_posix() for p, _ in src.samples]
    assert names == ["a/a_000.png", "a/a_001.png", "b/b_000.png", "b/b_001.png", "b/gone.png"]
    err = capsys.readouterr().err
    assert "skipped 1 entry that is not a regular file (FIFO)" in err and "pipe.png" in err
    assert "skipped 1 hidden entry" in err and "symlink loop" in err
    train, val = src.splits(EVAL, EVAL, val_split=0.5, seed=0)
    with pytest.raises(DataError, match="gone.png"):
        [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]

    real_scandir = os.scandir

    def scandir(path):  # root may read anything: simulate the permission error
        if str(path).endswith("b"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match="cannot read folder .*b: Permission denied"):
        build(datasets, "imagefolder", path=str(root))


def test_imagefolder_class_too_small_to_split(datasets, make_image_dir) -> None:
    root = make_image_dir({"big": 4, "tiny": 1})
    src = build(datasets, "imagefolder", path=str(root))
    with pytest.raises(DataError, match="class 'tiny' has only 1 image"):
        src.splits(EVAL, EVAL, val_split=0.2, seed=0)


def test_imagefolder_train_val_layout_and_val_path(datasets, make_image_dir,
                                                   tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_image_dir({"a": 3, "b": 2}, root=root / "train")
    make_image_dir({"a": 1, "b": 1}, root=root / "val")
    src = build(datasets, "imagefolder", path=str(root), num_classes=2)
    assert src.classes == ["a", "b"]
    train, val = src.splits(EVAL, EVAL, val_split=0.5, seed=0)
    assert (len(train), len(val)) == (5, 2)
    assert all("/val/" in p for p, _ in val.samples)

    src = build(datasets, "imagefolder", path=str(root / "train"), val_path=str(root / "val"))
    train, val = src.splits(EVAL, EVAL, val_split=0.5, seed=0)
    assert (len(train), len(val)) == (5, 2)

    make_image_dir({"zebra": 1}, root=root / "val")
    with pytest.raises(DataError, match="zebra"):
        build(datasets, "imagefolder", path=str(root))


def test_imagefolder_bad_image_fails_training_with_its_name(datasets, make_image_dir) -> None:
    root = make_image_dir({"a": 2, "b": 2})
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    src = build(datasets, "imagefolder", path=str(root))
    train, val = src.splits(EVAL, EVAL, val_split=0.3, seed=0)
    everything = list(train.samples) + list(val.samples)
    part = train if any("broken" in p for p, _ in train.samples) else val
    index = [i for i, (p, _) in enumerate(part.samples) if "broken" in p][0]
    assert len(everything) == 5
    with pytest.raises(DataError, match="broken.jpg"):
        part[index]


# -- csv manifest ------------------------------------------------------------------------


def _manifest(tmp_path: Path, make_image_dir, rows: list[str], name: str = "m.csv") -> Path:
    make_image_dir({"cat": 3, "dog": 3}, root=tmp_path / "imgs")
    path = tmp_path / name
    path.write_text("\n".join(["path,label", *rows]) + "\n")
    return path


def test_csv_manifest(datasets, make_image_dir, tmp_path: Path) -> None:
    rows = [f"imgs/{c}/{c}_{i:03d}.png,{c}" for c in ("dog", "cat") for i in range(3)]
    m = _manifest(tmp_path, make_image_dir, rows)
    src = build(datasets, "csv", path=str(m), num_classes=2)
    assert src.classes == ["cat", "dog"]
    assert [label for _, label in src.samples] == [1, 1, 1, 0, 0, 0]
    train, val = src.splits(EVAL, EVAL, val_split=0.34, seed=1)
    assert (len(train), len(val)) == (4, 2)
    assert val[0][0].shape == (3, 32, 32)
    # a .csv given to imagefolder (what --data FILE.csv does) reads the manifest too
    assert build(datasets, "imagefolder", path=str(m)).samples == src.samples
    with pytest.raises(DataError, match=r"--classes 3 but manifest .*m.csv has 2 classes "
                                        r"\(cat, dog\)"):
        build(datasets, "csv", path=str(m), num_classes=3)


def test_csv_split_column(datasets, make_image_dir, tmp_path: Path) -> None:
    rows = [f"imgs/{c}/{c}_{i:03d}.png,{c},{'val' if i == 0 else 'train'}"
            for c in ("cat", "dog") for i in range(3)]
    m = _manifest(tmp_path, make_image_dir, rows)
    m.write_text(m.read_text().replace("path,label", "path,label,split", 1))
    train, val = build(datasets, "csv", path=str(m)).splits(EVAL, EVAL, val_split=0.5, seed=0)
    assert (len(train), len(val)) == (4, 2)
    assert all(p.endswith("_000.png") for p, _ in val.samples)


@pytest.mark.parametrize("bad_row, message", [
    ("imgs/cat/missing.png,cat", r"line 3: no such image file: imgs/cat/missing.png"),
    ("../outside.png,cat", r"line 3: path '../outside.png' is outside the root"),
    ("imgs/../../outside.png,cat", r"line 3: path .* is outside the root"),
    ("{outside},cat", r"line 3: path .* is outside the root"),
    ("imgs/link.png,cat", r"line 3: path 'imgs/link.png' is outside the root"),
    (",cat", r"line 3: empty path"),
    ("imgs/cat/cat_000.png,", r"line 3: empty label"),
])
def test_csv_bad_rows(datasets, make_image_dir, tmp_path: Path, bad_row: str,
                      message: str) -> None:
    base = tmp_path / "base"
    base.mkdir()
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    rows = ["imgs/dog/dog_000.png,dog", bad_row.format(outside=outside)]
    m = _manifest(base, make_image_dir, rows)
    (base / "imgs" / "link.png").symlink_to(outside)
    with pytest.raises(DataError, match=message):
        build(datasets, "csv", path=str(m))


def test_csv_outside_root_when_allowed(datasets, make_image_dir, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    make_image_dir({"cat": 1, "dog": 1}, root=tmp_path / "elsewhere")
    rows = ["../elsewhere/cat/cat_000.png,cat", f"{tmp_path}/elsewhere/dog/dog_000.png,dog"]
    m = _manifest(base, make_image_dir, rows)
    src = build(datasets, "csv", path=str(m), allow_outside_root="true")
    assert len(src.samples) == 2
    with pytest.raises(DataError, match="line 2: path '../elsewhere/cat/cat_000.png' is "
                                        "outside the root"):
        build(datasets, "csv", path=str(m))


def test_csv_root_option(datasets, make_image_dir, tmp_path: Path) -> None:
    elsewhere = make_image_dir({"cat": 1, "dog": 1}, root=tmp_path / "elsewhere")
    m = tmp_path / "m.csv"
    m.write_text("label,path\ncat,cat/cat_000.png\ndog,dog/dog_000.png\n")
    src = build(datasets, "csv", path=str(m), root=str(elsewhere))
    assert [Path(p).parent.parent for p, _ in src.samples] == [elsewhere, elsewhere]
    with pytest.raises(DataError, match="line 2: no such image file: cat/cat_000.png"):
        build(datasets, "csv", path=str(m))


def test_csv_bad_header_and_file(datasets, tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match="'path' and 'label' columns"):
        build(datasets, "csv", path=str(tmp_path / "h.csv"))
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        build(datasets, "csv", path=str(tmp_path / "e.csv"))
    with pytest.raises(DataError, match="does not exist"):
        build(datasets, "csv", path=str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match="allow_outside_root must be true or false"):
        build(datasets, "csv", path=str(tmp_path / "h.csv"), allow_outside_root="maybe")


# -- shapes ------------------------------------------------------------------------------


def _tensors(ds, n: int = 6) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(n)])


def test_shapes_default_classes_and_balance(datasets) -> None:
    src = build(datasets, "shapes", num_classes=5, samples=100)
    assert src.classes == ["circle", "triangle", "square", "ring", "cross"]
    assert src.image_size == 64
    train, val = src.splits(EVAL, EVAL, val_split=0.2, seed=0)
    assert (len(train), len(val)) == (80, 20)
    assert set(train.indices).isdisjoint(val.indices)
    for part in (train, val):
        counts = torch.bincount(torch.tensor([part[i][1] for i in range(len(part))]))
        assert counts.tolist() == [len(part) // 5] * 5
    assert len(build(datasets, "shapes", num_classes=10).classes) == 10


def test_shapes_deterministic_by_seed(datasets) -> None:
    def tensors(seed: int) -> torch.Tensor:
        train, _ = build(datasets, "shapes", seed=seed, samples=40).splits(
            EVAL, EVAL, val_split=0.25, seed=99)
        return _tensors(train)

    assert torch.equal(tensors(3), tensors(3))
    assert not torch.equal(tensors(3), tensors(4))
    # without its own seed the dataset follows the split seed
    a = build(datasets, "shapes", samples=40).splits(EVAL, EVAL, val_split=0.25, seed=7)[0]
    assert torch.equal(_tensors(a), tensors(7))


def test_shapes_image_size_and_raw_images(datasets) -> None:
    src = build(datasets, "shapes", image_size=40, samples=20, num_classes=2)
    train, _ = src.splits(None, None, val_split=0.5, seed=0)
    img, label = train[0]
    assert img.size == (40, 40) and img.mode == "RGB" and label == 0


@pytest.mark.parametrize("options, message", [
    ({"num_classes": 1}, "between 2 and 10"),
    ({"num_classes": 11}, "between 2 and 10"),
    ({"num_classes": "five"}, "whole number"),
    ({"samples": 3}, "samples must be at least 10"),
    ({"path": "x"}, "takes no --data"),
])
def test_shapes_bad_options(datasets, options, message) -> None:
    with pytest.raises(DataError, match=message):
        build(datasets, "shapes", **options)


def test_shapes_bad_val_split(datasets) -> None:
    src = build(datasets, "shapes", samples=20)
    with pytest.raises(DataError, match="val-split"):
        src.splits(EVAL, EVAL, val_split=1.0, seed=0)
