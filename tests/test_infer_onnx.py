"""`tk infer --model FILE.onnx`: the exported file of a really trained model (the ``r18``
fixture of test_export.py: `tk finetune` then `tk export`), run by the real CLI on ONNX
Runtime against the torch path on the same real files; the rows, formats, -o, --resume,
exit codes, torchrun sharding; the bad model files and wrong options, each one line; and
that this path imports neither torch nor torchvision nor timm."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_export import CLASSES, _train_r18, one_error_line, shared_dir, write_photos

from toolkit.testing import isolated_env, run_tk

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "timm")


@pytest.fixture(scope="module")
def r18(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """``(home, data, model.onnx)``: test_export.py's trained and exported resnet18 (made
    once per test session, shared with that module): stored as ``r18`` in ``home``."""
    home = shared_dir(tmp_path_factory, "tk-export-r18", _train_r18)
    return home, home / "data", home / "exports" / "r18.onnx"


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def photo_set(folder: Path, data: Path) -> list[Path]:
    """Real image files in ``folder`` (photo-like ones of several formats and shapes, three
    training images), a broken one among them."""
    files = write_photos(folder)
    for src in sorted((data / "dog").iterdir())[:3]:
        files.append(folder / src.name)
        files[-1].write_bytes(src.read_bytes())
    broken = folder / "broken.jpg"
    broken.write_bytes(files[1].read_bytes()[:200])  # a JPEG cut short
    files.insert(3, broken)
    return files


def imported_modules(stderr: str) -> set[str]:
    return {ln.split("|")[-1].strip() for ln in stderr.splitlines()
            if ln.startswith("import time:")}


def test_onnx_rows_match_the_torch_runtime_on_real_files(
        r18: tuple[Path, Path, Path], tmp_path: Path) -> None:
    home, data, model = r18
    files = photo_set(tmp_path / "photos", data)
    args = ("infer", *files, "--format", "jsonl", "--topk", "2", "-q", "--batch-size", "4")
    torch_run = run_tk(*args, "--model", "r18", home=home)
    onnx_run = run_tk(*args, "--model", model, home=home)
    assert torch_run.returncode == onnx_run.returncode == 1, onnx_run.stderr
    expected, got = jsonl(torch_run.stdout), jsonl(onnx_run.stdout)
    assert [r["path"] for r in got] == [str(f) for f in files]
    for want, row in zip(expected, got, strict=True):
        assert row["label"] == want["label"] and row["error"] == want["error"], row["path"]
        if row["error"] is None:
            assert [t["label"] for t in row["topk"]] == [t["label"] for t in want["topk"]]
            assert abs(row["score"] - want["score"]) < 1e-4
    assert got[3]["error"] and got[3]["label"] is None  # the broken file, at its place
    assert sum(r["error"] is not None for r in got) == 1
    lines = [ln for ln in onnx_run.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"tk: {len(files) - 1} predicted, 1 failed")
    assert f"model '{model}'" in lines[-1]

    # --runtime onnx says the same; --runtime torch refuses the file
    same = run_tk(*args, "--model", model, "--runtime", "onnx", home=home)
    assert jsonl(same.stdout) == got


def test_onnx_output_files_resume_and_csv(r18: tuple[Path, Path, Path], tmp_path: Path) -> None:
    home, data, model = r18
    photos = tmp_path / "photos"
    files = photo_set(photos, data)
    out = tmp_path / "rows.jsonl"
    base = ("infer", photos, "--model", model, "--batch-size", "3", "-q")
    first = run_tk(*base, "-o", out, home=home)
    assert first.returncode == 1 and first.stdout == "", first.stderr
    full = out.read_text()
    rows = jsonl(full)
    assert len(rows) == len(files) and sorted(r["path"] for r in rows) == sorted(map(str, files))
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:15])  # a run killed mid-row
    again = run_tk(*base, "-o", out, "--resume", home=home)
    assert again.returncode == 0, again.stderr  # the broken file's row was kept (sorted first)
    assert out.read_text() == full
    assert f"{len(files) - 4} predicted" in again.stderr

    out_csv = tmp_path / "rows.csv"
    proc = run_tk(*base, "--topk", "3", "-o", out_csv, home=home)
    assert proc.returncode == 1, proc.stderr
    table = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    by_path = {r["path"]: r for r in rows}
    assert [t["path"] for t in table] == [r["path"] for r in rows]
    for t in table:
        assert (t["label"] or None) == by_path[t["path"]]["label"]
    shown = run_tk(*base, files[0], home=home)  # the default table on stdout
    assert shown.stdout.splitlines()[0].split() == ["LABEL", "SCORE", "PATH"]


def test_onnx_path_imports_no_torch(r18: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, model = r18
    photo = write_photos(tmp_path / "p", n=2)
    env = isolated_env(tmp_path)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "toolkit", "infer",
                           *map(str, photo), "--model", str(model), "--format", "jsonl",
                           "-o", str(tmp_path / "o.jsonl")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = imported_modules(proc.stderr)
    assert {"onnxruntime", "toolkit.predict.onnx_runtime", "PIL.Image"} <= imported
    assert not {m for m in imported if m.split(".")[0] in HEAVY}
    assert "toolkit.plugin.manager" not in imported  # no plugin is loaded either
    assert len(jsonl((tmp_path / "o.jsonl").read_text())) == 2


def test_bad_model_files_and_options_are_one_line(
        r18: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import onnx

    home, _, good = r18
    photo = write_photos(tmp_path / "p", n=1)[0]
    raw = good.read_bytes()
    plain = onnx.load(good)
    del plain.metadata_props[:]
    files = {
        "cut.onnx": raw[: len(raw) // 3],
        "photo.onnx": photo.read_bytes(),
        "notes.onnx": b"just some text\n",
        "plain.onnx": plain.SerializeToString(),
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    model_file = home / "tk" / "models" / "r18.safetensors"
    cases = [
        (("--model", tmp_path / "cut.onnx"), "truncated ONNX file"),
        (("--model", tmp_path / "photo.onnx"), "not an ONNX model (a PNG image)"),
        (("--model", tmp_path / "notes.onnx"), "not an ONNX model"),
        (("--model", tmp_path / "plain.onnx"), "no tk metadata"),
        (("--model", tmp_path / "missing.onnx"), "no such file"),
        (("--model", model_file), "a safetensors file"),
        (("--model", good, "--runtime", "torch"), "--runtime torch runs a stored model"),
        (("--model", "r18", "--runtime", "onnx"), "`tk export r18 -o r18.onnx`"),
        (("--model", good, "--precision", "bf16-mixed"), "precision it was exported with"),
        (("--model", good, "--channels-last"), "--channels-last applies to the torch"),
        (("--model", good, "--decode", "torchvision"), "--decode torchvision needs the torch"),
        (("--model", good, "--device", "cuda"), "no CUDA execution provider"),
        (("--model", good, "--device", "mps"), "runs on cpu or cuda"),
    ]
    for args, message in cases:
        proc = run_tk("infer", photo, *args, home=home)
        assert proc.returncode == 2, (args, proc.stderr)
        line = one_error_line(proc)
        assert message in line, (args, line)
        assert proc.stdout == ""
    # the model file cannot be the output either
    proc = run_tk("infer", photo, "--model", good, "-o", good, "--format", "jsonl", home=home)
    assert proc.returncode == 2 and "is the model file" in one_error_line(proc)
    assert good.read_bytes() == raw


def test_missing_onnx_extra_is_one_line_naming_it(r18: tuple[Path, Path, Path],
                                                  tmp_path: Path) -> None:
    _, _, model = r18
    fake = tmp_path / "no-onnx"
    (fake / "onnxruntime").mkdir(parents=True)
    (fake / "onnxruntime" / "__init__.py").write_text("raise ImportError('not installed')\n")
    photo = write_photos(tmp_path / "p", n=1)[0]
    env = isolated_env(tmp_path, {"PYTHONPATH": str(fake)})
    proc = subprocess.run([sys.executable, "-m", "toolkit", "infer", str(photo), "--model",
                           str(model)], capture_output=True, text=True, env=env, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    line = one_error_line(proc)
    assert "pip install 'tk-microtoolkit[onnx]'" in line and "--model FILE.onnx" in line


@pytest.mark.xdist_group("torchrun")  # one torchrun job at a time: 2 cores
@pytest.mark.flaky(reruns=1)  # a rare rendezvous hang of torchrun on a loaded machine
@pytest.mark.slow
def test_torchrun_shards_an_onnx_model(r18: tuple[Path, Path, Path], tmp_path: Path) -> None:
    home, data, model = r18
    photos = tmp_path / "photos"
    files = photo_set(photos, data)
    args = ("infer", str(photos), "--model", str(model), "--format", "jsonl",
            "--batch-size", "2", "--workers", "0", "-q")
    single = run_tk(*args, home=home)
    out = tmp_path / "merged.jsonl"
    proc = run_tk(*args, "-o", str(out), home=home, nproc=2, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = jsonl(out.read_text())
    assert len(merged) == len(files)
    assert merged == jsonl(single.stdout)
    assert proc.stderr.count("predicted,") == 1


# -- in-process: the session opener and the provider choice (no subprocess) ----------------
def test_open_predictor_on_an_export(r18: tuple[Path, Path, Path], tmp_path: Path) -> None:
    import numpy as np

    from toolkit.data.decode import load_image
    from toolkit.predict.session import ModelRef, open_predictor, resolve_model

    _, _, model = r18
    ref = resolve_model(str(model), store=tmp_path / "empty-store")
    assert (ref.kind, ref.runtime, ref.classes) == ("onnx", "onnx", CLASSES)
    assert isinstance(ref, ModelRef)
    photo = write_photos(tmp_path / "p", n=1)[0]
    with open_predictor(model, store=tmp_path / "empty-store", device="cpu") as opened:
        assert opened.runtime.name == "onnx" and not opened.runtime.accepts_jpeg
        assert opened.classes == CLASSES and opened.device == "cpu"
        assert opened.meta["export"]["precision"] == "fp32"
        assert opened.meta["source"]["name"] == "r18" and opened.task == "single-label"
        # the stored model's calibration travels with the export and scores its rows
        from toolkit.predict.export.artifact import read_export

        assert opened.temperature == (read_export(model).temperature or 1.0) > 0
        assert opened.loaded is None
        crop = opened.transform.crop(load_image(photo))
        assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
        logits, errors = opened.runtime.finish(opened.runtime.start(crop[None]))
        assert logits.shape == (1, 3) and errors == []
        rows = list(opened.runner(workers=0, topk=3).predict_paths([str(photo)]))
        assert rows[0].label == CLASSES[int(logits.argmax())]


def test_providers_follow_the_device_option() -> None:
    from toolkit.errors import TkError
    from toolkit.predict.onnx_runtime import CPU, CUDA, providers_for

    assert providers_for("auto", [CPU]) == ([CPU], "cpu")
    assert providers_for("auto", [CUDA, CPU]) == ([(CUDA, {"device_id": 0}), CPU], "cuda:0")
    assert providers_for("cuda:1", [CUDA, CPU])[1] == "cuda:1"
    assert providers_for("CPU", [CUDA, CPU]) == ([CPU], "cpu")
    for bad in ("cuda:x", "mps", "tpu"):
        with pytest.raises(TkError):
            providers_for(bad, [CUDA, CPU])
