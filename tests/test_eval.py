"""`tk eval`: metrics of a stored model on a labelled folder, through the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_PLUGIN, write_image

from toolkit.errors import DataError
from toolkit.predict.evaluate import labelled_files, metrics
from toolkit.testing import isolated_env

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 20, 20), "green": (10, 200, 30), "blue": (20, 30, 210)}


def tk(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "toolkit", *args],
                          env=isolated_env(home, {"TK_PLUGINS": TINY_PLUGIN}),
                          capture_output=True, text=True, timeout=600, cwd=REPO)


def labelled(root: Path) -> Path:
    """red: 2 red; green: 2 green + 1 blue (a labelling mistake); blue: 1 blue + 1 broken."""
    for i in range(2):
        write_image(root / "red" / f"r{i}.png", (32, 32), COLOURS["red"])
        write_image(root / "green" / f"g{i}.jpg", (32, 32), COLOURS["green"])
    write_image(root / "green" / "mislabelled.png", (32, 32), COLOURS["blue"])
    write_image(root / "blue" / "b0.bmp", (32, 32), COLOURS["blue"])
    (root / "blue" / "broken.jpg").write_bytes(b"")
    return root


def test_eval_text_json_and_png(tmp_path, colour_model):
    store_dir, name = colour_model
    data = labelled(tmp_path / "data")
    png = tmp_path / "cm.png"
    r = tk("eval", "--model", name, "--data", str(data), "--store", str(store_dir),
           "--png", str(png), "-q", home=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "accuracy: 0.8333 (5/6)" in out
    assert "1 unreadable" in out and "broken.jpg" in r.stderr
    lines = out.splitlines()
    green = next(line for line in lines if line.startswith("green "))
    assert green.split() == ["green", "1.0000", "0.6667", "0.8000", "3"]
    cm_start = lines.index("confusion matrix (rows: true class, columns: predicted class)")
    assert lines[cm_start + 1].split() == ["red", "green", "blue"]
    assert [row.split() for row in lines[cm_start + 2:cm_start + 5]] == [
        ["red", "2", "0", "0"], ["green", "0", "2", "1"], ["blue", "0", "0", "1"]]
    assert png.read_bytes().startswith(b"\x89PNG")

    r = tk("eval", "--data", str(data), "--store", str(store_dir), "--json", "-q",
           home=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # stdout is the JSON alone
    assert f"using model '{name}'" in r.stderr  # newest model by default
    assert report["confusion"] == [[2, 0, 0], [0, 2, 1], [0, 0, 1]]
    assert report["total"] == 6 and report["correct"] == 5
    assert report["failed"] == [{"path": str(data / "blue" / "broken.jpg"),
                                 "error": "empty file (0 bytes)"}]
    blue = report["per_class"][2]
    assert blue == {"name": "blue", "precision": 0.5, "recall": 1.0,
                    "f1": pytest.approx(2 / 3), "support": 1}


def test_eval_class_folders_must_be_model_classes(tmp_path, colour_model):
    store_dir, name = colour_model
    data = labelled(tmp_path / "data")
    shutil.copytree(data / "red", data / "purple")
    r = tk("eval", "--model", name, "--data", str(data), "--store", str(store_dir),
           home=tmp_path)
    assert r.returncode == 2
    assert "class folder(s) purple are not classes of the model" in r.stderr
    assert "red, green, blue" in r.stderr and "Traceback" not in r.stderr
    r = tk("eval", "--model", name, "--data", str(tmp_path / "nowhere"), "--store",
           str(store_dir), home=tmp_path)
    assert r.returncode == 2 and "no such folder" in r.stderr


def test_labelled_files_subset_of_classes(tmp_path):
    data = tmp_path / "d"
    write_image(data / "b" / "x.png")
    write_image(data / "b" / "deep" / "y.PNG")
    write_image(data / "a" / "z.png")
    (data / ".hidden").mkdir()
    paths, labels = labelled_files(data, ["c", "b", "a"])
    assert [Path(p).relative_to(data).as_posix() for p in paths] == [
        "a/z.png", "b/deep/y.PNG", "b/x.png"]
    assert labels == [2, 1, 1]
    (data / "empty").mkdir()
    with pytest.raises(DataError, match="empty are not classes of the model"):
        labelled_files(data, ["a", "b"])


def test_metrics_from_a_confusion_matrix():
    per, mp, mr, mf = metrics([[3, 1, 0], [0, 0, 0], [1, 0, 4]], ["a", "b", "c"])
    a, b, c = per
    assert (a.precision, a.recall, a.support) == (0.75, 0.75, 4)
    assert (b.precision, b.recall, b.f1, b.support) == (0.0, 0.0, 0.0, 0)
    assert c.precision == 1.0 and c.recall == 0.8 and c.f1 == pytest.approx(8 / 9)
    # b has predictions (a true 'a' predicted as 'b'), so it counts in the macro average
    assert mp == pytest.approx((0.75 + 0 + 1.0) / 3)
    assert mr == pytest.approx((0.75 + 0 + 0.8) / 3)
    assert mf == pytest.approx((0.75 + 0 + 8 / 9) / 3)
