"""`tk export`: real models trained by the real `tk finetune`, exported by the real CLI, the
files checked by onnx / ONNX Runtime / torch as a user would load them; the README's plain
onnxruntime snippet run from the README itself; the refusals and the bad files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import COLOUR_CLASSES, TINY_PLUGIN, write_image

from toolkit.testing import isolated_env, make_image_folder, run_tk, tiny_finetune

ROOT = Path(__file__).resolve().parent.parent
TRAP_PLUGIN = str(ROOT / "tests" / "plugins_for_tests" / "trace_trap.py")
CLASSES = ["cat", "dog", "owl"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tk: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def write_photos(folder: Path, n: int = 6, seed: int = 3) -> list[Path]:
    """Photo-like RGB files of several sizes and shapes (PNG and JPEG, landscape,
    portrait, square, smaller and larger than the model input)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [(100, 75), (75, 100), (64, 64), (200, 57), (81, 90), (301, 300)]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 256, 3)
        arr = (base + 60 * np.sin(xx[..., None] / (5 + i)) + 40 * np.cos(yy[..., None] / 7)
               + rng.normal(0, 15, (h, w, 3)))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        path = folder / f"photo{i}.{'jpg' if i % 2 else 'png'}"
        img.save(path, **({"quality": 92} if i % 2 else {}))
        out.append(path)
    return out


def shared_dir(factory: pytest.TempPathFactory, name: str, build) -> Path:
    """A folder made once per test session, whichever pytest-xdist worker asks first (the
    others wait for it): the trained model and its export are not built twice."""
    from filelock import FileLock

    root = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of one run
    path = root / name
    with FileLock(str(path) + ".lock"):
        if not (path / ".done").is_file():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            (path / ".done").touch()
    return path


def _train_r18(home: Path) -> None:
    data = make_image_folder(home / "data", CLASSES, per_class=6, size=64, format="mixed")
    tiny_finetune("resnet18", classes=3, data=data, image_size=64, home=home, name="r18")
    (home / "exports").mkdir()
    proc = run_tk("export", "r18", "-o", home / "exports" / "r18.onnx", home=home)
    assert proc.returncode == 0, proc.stderr
    (home / "exports" / "export.log").write_text(proc.stdout + "\n" + proc.stderr)


@pytest.fixture(scope="module")
def r18(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(home, data)``: torchvision resnet18 (random init) fine-tuned 1 epoch at 64 px by
    the real `tk finetune` on a small class-per-folder dataset, stored as ``r18``, and
    exported by `tk export r18 -o home/exports/r18.onnx` (its stdout + stderr in
    ``export.log``)."""
    home = shared_dir(tmp_path_factory, "tk-export-r18", _train_r18)
    return home, home / "data"


@pytest.fixture(scope="module")
def r18_onnx(r18: tuple[Path, Path]) -> tuple[Path, str]:
    """``(path, output)``: the ONNX export of ``r18`` and what `tk export` printed."""
    home, _ = r18
    return home / "exports" / "r18.onnx", (home / "exports" / "export.log").read_text()


def test_onnx_export_of_a_trained_resnet18(r18: tuple[Path, Path],
                                           r18_onnx: tuple[Path, str]) -> None:
    import onnx
    import torch

    from toolkit.data.decode import load_image
    from toolkit.data.transforms import eval_transform
    from toolkit.model.loading import load_model
    from toolkit.predict.export.artifact import open_onnx_session, read_export
    from toolkit.predict.export.images import crop_function

    home, data = r18
    out, printed = r18_onnx
    assert printed.splitlines()[0] == str(out)
    assert "parity with the eager model on 3 validation images of imagefolder" in printed
    assert "top-1 agreement 3/3" in printed

    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["tk.classes"]) == CLASSES
    pre = json.loads(props["tk.preprocess"])
    assert pre == {"input_name": "images", "output_name": "logits", "layout": "NCHW",
                   "dtype": "uint8", "channels": "RGB", "input_size": [3, 64, 64],
                   "resize": 73, "crop": [64, 64], "crop_pct": 0.875,
                   "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                   "std": [0.229, 0.224, 0.225], "normalize": "in-graph"}
    source = json.loads(props["tk.source"])
    store_file = home / "tk" / "models" / "r18.safetensors"
    assert source["name"] == "r18" and source["sha256"] == sha256(store_file)
    assert source["backbone"] == "torchvision:resnet18"
    parity = json.loads(props["tk.parity"])
    assert parity["images"] == 3 and parity["top1_agreement"] == 1.0
    assert parity["max_abs_logit_diff"] <= parity["tolerance"] <= 1e-3 * 1e3
    assert props["tk.tk_version"] and props["tk.precision"] == "fp32"

    # the reader of the ONNX runtime agrees, and ONNX Runtime matches eager PyTorch on
    # real files at batch sizes other than the exporter's example
    info = read_export(out)
    assert info.classes == CLASSES and info.crop_size == (64, 64)
    session, _ = open_onnx_session(out)
    loaded = load_model("r18", home / "tk")
    transform = eval_transform(loaded.data_config)
    files = sorted((data / "dog").iterdir()) + sorted((data / "owl").iterdir())[:1]
    images = [load_image(f) for f in files]
    crops = np.stack([crop_function(transform)(i) for i in images])
    with torch.inference_mode():
        eager = loaded.model(torch.stack([transform(i) for i in images])).numpy()
    for batch in (crops[:1], crops):
        got = session.run(None, {"images": batch})[0]
        np.testing.assert_allclose(got, eager[:len(batch)], atol=1e-4, rtol=1e-4)


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Deploy", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Deploy section has no python block"
    return match.group(1)


def test_readme_snippet_gives_tk_infer_predictions(
        r18: tuple[Path, Path], r18_onnx: tuple[Path, str], tmp_path: Path) -> None:
    home, data = r18
    out, _ = r18_onnx
    script = tmp_path / "predict.py"
    script.write_text(readme_snippet(), encoding="utf-8")
    files = write_photos(tmp_path / "photos") + sorted((data / "cat").iterdir())[:2]
    proc = subprocess.run([sys.executable, "-X", "importtime", str(script), str(out),
                           *map(str, files)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={k: v for k, v in os.environ.items()
                                             if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {ln.split("|")[-1].strip() for ln in proc.stderr.splitlines()
                if ln.startswith("import time:")}
    assert "onnxruntime" in imported and "PIL.Image" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "toolkit", "torchvision")}

    rows = run_tk("infer", *files, "--model", "r18", "--format", "jsonl", "-q",
                  "--workers", "0", "--decode", "pil", home=home)
    assert rows.returncode == 0, rows.stderr
    expected = {r["path"]: r for r in map(json.loads, rows.stdout.splitlines())}
    got = [ln.split(" ") for ln in proc.stdout.splitlines()]
    assert len(got) == len(files)
    for path, label, score in got:
        assert label == expected[path]["label"], path
        assert abs(float(score) - expected[path]["score"]) < 1e-4, path


def test_int8_export_reports_agreement_and_accuracies(r18: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    import onnx

    home, _ = r18
    out = tmp_path / "r18.int8.onnx"
    proc = run_tk("export", "r18", "--int8", "-o", out, home=home)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"int8 \(calibrated on 15 training images of imagefolder .*\): top-1 "
                     r"agreement with fp32 \d+\.\d% \(\d/3; required 98%\), accuracy fp32 "
                     r"\d+\.\d%, int8 \d+\.\d%", proc.stderr), proc.stderr
    model = onnx.load(out)
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    props = {p.key: p.value for p in model.metadata_props}
    assert props["tk.precision"] == "int8"
    q = json.loads(props["tk.parity"])["int8"]
    assert q["top1_agreement"] >= 0.98 and q["calibration_images"] == 15
    assert {"accuracy_fp32", "accuracy_int8"} <= set(q)


def test_pt2_and_torchscript_exports(r18: tuple[Path, Path], tmp_path: Path) -> None:
    import torch

    from toolkit.predict.export.artifact import read_export

    home, data = r18
    crops = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    outputs = {}
    for fmt, name in (("pt2", "r18.pt2"), ("torchscript", "r18.torchscript.pt")):
        proc = run_tk("export", "r18", "--format", fmt, home=home, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        path = tmp_path / name  # the default output: ./MODEL + the format's suffix
        assert proc.stdout.strip() == str(path)
        info = read_export(path)
        assert (info.format, info.precision, info.classes) == (fmt, "fp32", CLASSES)
        assert info.parity["top1_agreement"] == 1.0
        extra = {"tk.json": ""}
        if fmt == "pt2":
            module = torch.export.load(str(path), extra_files=extra).module()
        else:
            module = torch.jit.load(str(path), _extra_files=extra)
        assert json.loads(json.loads(extra["tk.json"])["tk.classes"]) == CLASSES
        with torch.inference_mode():
            outputs[fmt] = module(torch.from_numpy(crops)).numpy()
    np.testing.assert_allclose(outputs["pt2"], outputs["torchscript"], atol=1e-5)


@pytest.mark.slow
def test_timm_backbone_exports_to_each_format(tmp_path: Path) -> None:
    import onnx

    from toolkit.plugin.manager import load_plugins
    from toolkit.predict.export.artifact import read_export
    from toolkit.predict.export.run import ExportArgs, export_model

    data = make_image_folder(tmp_path / "data", ["a", "b"], per_class=5, size=48)
    run = tiny_finetune("timm:resnet10t", classes=2, data=data, image_size=48,
                        home=tmp_path, name="t10")
    plugins = load_plugins(env={})
    for fmt in ("onnx", "pt2", "torchscript"):
        out = tmp_path / f"t10.{fmt}"
        result = export_model(ExportArgs("t10", format=fmt, output=str(out),
                                         store=str(run.store)), plugins, log=lambda _m: None)
        assert result.parity["top1_agreement"] == 1.0
        assert result.parity["source"].startswith("validation images of imagefolder")
        info = read_export(out)
        assert info.source["backbone"] == "timm:resnet10t" and info.classes == ["a", "b"]
    onnx.checker.check_model(onnx.load(tmp_path / "t10.onnx"), full_check=True)


def test_exported_files_read_without_torch_and_bad_files_are_one_line(
        r18_onnx: tuple[Path, str], tmp_path: Path) -> None:
    import onnx

    good, _ = r18_onnx
    raw = good.read_bytes()
    cases = {
        "good.onnx": raw,
        "truncated.onnx": raw[: len(raw) // 2],
        "header-only.onnx": raw[:40],
        "text.onnx": b"this is not a model\n",
        "empty.onnx": b"",
        "photo.onnx": _png_bytes(),
    }
    plain = onnx.load(good)
    del plain.metadata_props[:]
    cases["plain.onnx"] = plain.SerializeToString()
    # the graph's bytes damaged, the top-level structure intact
    damaged = bytearray(raw)
    start = raw.index(plain.graph.SerializeToString()[:4096])  # the graph's first nodes
    damaged[start + 4:start + 68] = b"\xff" * 64
    cases["damaged.onnx"] = bytes(damaged)
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    code = (
        "import sys\n"
        "from toolkit.errors import TkError\n"
        "from toolkit.predict.export.artifact import open_onnx_session\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        session, info = open_onnx_session(path)\n"
        "        print(path, 'OK', info.classes)\n"
        "    except TkError as exc:\n"
        "        print(path, 'ERROR', exc)\n")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code,
                           *(str(tmp_path / n) for n in cases)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {ln.split("|")[-1].strip() for ln in proc.stderr.splitlines()
                if ln.startswith("import time:")}
    assert "onnxruntime" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "torchvision", "timm")}
    lines = dict(ln.split(" ", 1) for ln in proc.stdout.splitlines())
    assert len(lines) == len(cases)

    def said(name: str) -> str:
        return lines[str(tmp_path / name)]

    assert said("good.onnx") == f"OK {CLASSES}"
    assert said("truncated.onnx").startswith("ERROR ") and "truncated ONNX file" in said(
        "truncated.onnx")
    assert "truncated ONNX file" in said("header-only.onnx")
    assert "not an ONNX model" in said("text.onnx")
    assert "not an ONNX model (the file is empty)" in said("empty.onnx")
    assert "not an ONNX model (a PNG image)" in said("photo.onnx")
    assert "no tk metadata" in said("plain.onnx") and "tk export" in said("plain.onnx")
    assert "damaged ONNX model" in said("damaged.onnx")
    for name in cases:
        assert "\n" not in said(name) and len(said(name)) < 500


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


# -- refusals and fallbacks, on small hand-made models -----------------------------------------
def save_model(store_dir: Path, name: str, backbone: str, plugin: str, classes: list[str],
               extra_meta: dict | None = None) -> None:
    import torch

    from model_store import ModelStore
    from toolkit.model.assemble import ModelSpec, build_classifier
    from toolkit.plugin.manager import load_plugins

    plugins = load_plugins(modules=[plugin], env={})
    spec = ModelSpec(backbone, len(classes))
    torch.manual_seed(0)
    model, bb = build_classifier(plugins, spec, pretrained=False)
    meta = {"spec": spec.to_dict(), "classes": classes,
            "data_config": bb.data_config.to_dict(), "training": {"note": "test"},
            "metrics": {}, "weights": bb.weights.to_dict(), **(extra_meta or {})}
    ModelStore(store_dir).save(name, model, meta)


def test_an_export_that_differs_from_eager_is_refused_and_nothing_written(
        tmp_path: Path) -> None:
    """A data-dependent Python branch: the ONNX exporter fails on it, and a TorchScript trace
    silently keeps the example's branch: the parity check on dark images catches it."""
    save_model(tmp_path / "tk", "trap", "trace-trap", TRAP_PLUGIN, ["a", "b", "c"])
    dark = tmp_path / "dark"
    for i in range(4):
        write_image(dark / f"d{i}.png", (40, 40), (10 + i, 5, 20))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for fmt, why in (("torchscript", "does not match the eager model on 4 images of "
                                     "--calibrate"),
                     ("onnx", "torch.onnx.export failed (GuardOnDataDependentSymNode")):
        proc = run_tk("export", "trap", "--format", fmt, "--calibrate", dark, "-o",
                      out_dir / f"trap.{fmt}", home=tmp_path, plugins=[TRAP_PLUGIN])
        assert proc.returncode == 1, proc.stderr
        line = [ln for ln in proc.stderr.splitlines() if ln.startswith("tk: error")]
        assert len(line) == 1 and why in line[0], proc.stderr
        assert line[0].endswith("; nothing written")
        assert "Traceback" not in proc.stderr and "def forward" not in proc.stderr
    assert list(out_dir.iterdir()) == []  # no file, no temp file


def test_synthetic_fallback_calibrate_labels_and_temperature(colour_model, tmp_path: Path
                                                             ) -> None:
    from toolkit.predict.export.artifact import read_export

    store_dir, name = colour_model
    env = {"TK_HOME": str(store_dir)}

    def export(*args: object) -> subprocess.CompletedProcess[str]:
        return run_tk("export", *map(str, args), home=tmp_path, env=env,
                      plugins=[TINY_PLUGIN])

    # no training data reachable: synthetic images, said; a calibration temperature in the
    # stored metadata travels with the export
    save_model(store_dir, "warm", "tiny-cnn", TINY_PLUGIN, ["x", "y"],
               {"calibration": {"method": "temperature", "temperature": 1.7}})
    proc = export("warm", "--format", "pt2", "-o", tmp_path / "w.pt2")
    assert proc.returncode == 0, proc.stderr
    assert "training data of 'warm' is not reachable" in proc.stderr
    assert "32 synthetic images" in proc.stderr
    info = read_export(tmp_path / "w.pt2")
    assert info.temperature == 1.7 and info.parity["source"].startswith("synthetic")

    # --int8 needs real images: none reachable and no --calibrate is one line
    proc = export(name, "--int8", "-o", tmp_path / "q.onnx")
    assert proc.returncode == 2 and "--calibrate DIR" in one_error_line(proc)

    # --calibrate with sub-folders named like the classes: parity, calibration, accuracies
    colours = tmp_path / "colours"
    for c, rgb in zip(COLOUR_CLASSES, ((220, 20, 30), (20, 220, 30), (20, 30, 220)),
                      strict=True):
        for i in range(4):
            write_image(colours / c / f"{c}_{i:03d}.png", (40, 30),
                        tuple(min(255, v + 5 * i) for v in rgb))
    proc = export(name, "--int8", "--calibrate", colours, "-o", tmp_path / "q.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "12 images of --calibrate" in proc.stderr
    assert "accuracy fp32 100.0%, int8 100.0%" in proc.stderr
    q = read_export(tmp_path / "q.onnx")
    assert q.precision == "int8" and q.parity["accuracy_eager"] == 1.0


def test_output_rules_and_usage_errors(colour_model, r18_onnx: tuple[Path, str],
                                       tmp_path: Path) -> None:
    from toolkit.errors import TkError
    from toolkit.predict.export.run import ExportArgs, check_output, export_model

    store_dir, name = colour_model
    env = {"TK_HOME": str(store_dir)}

    def export(*args: object) -> subprocess.CompletedProcess[str]:
        return run_tk("export", *map(str, args), home=tmp_path, env=env,
                      plugins=[TINY_PLUGIN])

    def refused(**kwargs: object) -> str:  # the same checks, in-process
        with pytest.raises(TkError) as exc:
            export_model(ExportArgs(name, store=str(store_dir), **kwargs), None)
        return str(exc.value)

    model_file = store_dir / "models" / f"{name}.safetensors"
    before = sha256(model_file)
    line = one_error_line(export(name, "-o", model_file))
    assert "inside the model store" in line
    assert "inside the model store" in refused(output=str(store_dir / "x.onnx"))
    photo = tmp_path / "photo.onnx"
    photo.write_bytes(_png_bytes())
    line = one_error_line(export(name, "-o", photo))
    assert "exists and is not a tk export" in line
    assert photo.read_bytes() == _png_bytes() and sha256(model_file) == before
    assert "--format onnx" in one_error_line(export(name, "--int8", "--format", "pt2"))
    assert "no such folder" in refused(calibrate=str(tmp_path / "nope"))
    assert "no model 'nope'" in one_error_line(export("nope"))
    (tmp_path / "dir.onnx").mkdir()
    assert "is a directory" in refused(output=str(tmp_path / "dir.onnx"))
    assert "not a directory" in refused(output=str(tmp_path / "no" / "x.onnx"))

    # an earlier export may be replaced (said), anything else may not
    earlier = tmp_path / "earlier.onnx"
    shutil.copy(r18_onnx[0], earlier)
    said: list[str] = []
    assert check_output(earlier, store_dir, [], said.append) is True
    assert said == [f"replacing the earlier export {earlier}"]
    assert check_output(tmp_path / "new.onnx", store_dir, [], said.append) is False
    (tmp_path / "in").mkdir()
    with pytest.raises(TkError, match="inside .*an input of this export"):
        check_output(tmp_path / "in" / "x.onnx", store_dir, [tmp_path / "in"], said.append)


def test_missing_onnx_extra_is_one_line_naming_it(colour_model, tmp_path: Path) -> None:
    store_dir, name = colour_model
    fake = tmp_path / "no-onnx"
    (fake / "onnxscript").mkdir(parents=True)
    (fake / "onnxscript" / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = isolated_env(tmp_path, {"TK_HOME": str(store_dir), "PYTHONPATH": str(fake)})
    proc = subprocess.run([sys.executable, "-m", "toolkit", "--plugin", TINY_PLUGIN, "export",
                           name, "-o", str(tmp_path / "c.onnx")], capture_output=True,
                          text=True, env=env, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "pip install 'tk-microtoolkit[onnx]'" in one_error_line(proc)


# -- the refusal rules themselves (numpy only) -------------------------------------------------
def test_parity_and_int8_rules() -> None:
    from toolkit.predict.export.formats import ExportError
    from toolkit.predict.export.images import ImageSet
    from toolkit.predict.export.run import compare, int8_agreement

    rng = np.random.default_rng(0)
    eager = rng.normal(0, 5, (50, 4)).astype(np.float32)
    eager[:, 0] += 20  # class 0 wins everywhere by a clear margin; largest |logit| ~ 35
    images = ImageSet(np.zeros((50, 3, 8, 8), np.uint8), [0] * 40 + [1] * 10, eager, "imgs")
    ok = compare(eager + 1e-5, images, "onnx")
    assert ok["top1_agree"] == 50 and ok["accuracy_eager"] == 0.8
    assert ok["tolerance"] == pytest.approx(1e-3 * float(np.abs(eager).max()))
    with pytest.raises(ExportError, match="max .logit diff. .* > tolerance"):
        compare(eager + 2 * ok["tolerance"], images, "onnx")
    flipped = eager.copy()
    flipped[7] = flipped[7, ::-1]
    with pytest.raises(ExportError, match="top-1 differs on 1 of 50 images"):
        compare(flipped, images, "pt2")
    with pytest.raises(ExportError, match="non-finite"):
        compare(np.full_like(eager, np.nan), images, "onnx")

    int8 = eager.copy()
    int8[:1] = int8[:1, ::-1]  # 49/50 = 98 %: accepted
    assert int8_agreement(eager, int8, images, images, force=False)["top1_agreement"] == 0.98
    int8[:2] = eager[:2, ::-1]  # 48/50 = 96 %: refused, unless forced
    with pytest.raises(ExportError, match=r"48/50 .*96\.0% < 98%.*--force"):
        int8_agreement(eager, int8, images, images, force=False)
    forced = int8_agreement(eager, int8, images, images, force=True)
    assert forced["forced"] is True and forced["accuracy_int8"] == pytest.approx(0.76)
