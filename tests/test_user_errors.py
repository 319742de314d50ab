"""User mistakes through the real `tk` command: one clear line on stderr, exit status 2
(a user error), never a traceback; `TK_DEBUG=1` shows the traceback for bug reports.

Every row of :data:`ROWS` runs ``python -m toolkit ...`` in its own process (all rows of
the table run concurrently, once per module, then each row is checked by its own test).
The tiny test backbone (``--plugin tests/plugins_for_tests/tiny.py`` -> ``tiny-cnn``) and
the small embedded shapes data keep every row cheap; the torchvision / timm built-ins are
switched off (``TK_DISABLE_PLUGINS``) because no row needs them.

Exit status exceptions (documented in docs/hardening.md): a bug (an exception that is not
a :class:`toolkit.errors.TkError`) prints one ``tk: internal error: ...`` line and exits 1;
``tk infer`` exits 1 when some files could not be read (each gets a row with its error).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import TINY_PLUGIN, save_colour_model, write_image

REPO = Path(__file__).resolve().parents[1]
TINY = TINY_PLUGIN
SMALL = ["--opt", "dataset.samples=60", "--opt", "dataset.image_size=32"]
FT_DATA = ["--plugin", TINY, "finetune", "--backbone", "tiny-cnn", "--no-pretrained",
           "--epochs", "1", "-q"]  # with --data
FT = [*FT_DATA, *SMALL]  # the embedded shapes dataset, small
try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False

BUGGY_PLUGIN = '''
from toolkit.plugin.hookspecs import hookimpl


def broken(pretrained=False):
    return 1 / 0  # a bug in a plugin, not a user error


@hookimpl
def tk_register_backbones(register):
    register("buggy-net", broken)
'''


@dataclass
class Row:
    """One user mistake: the arguments (``{name}`` placeholders filled from the world
    fixture), a text the one stderr line must contain, the exit status."""

    id: str
    args: list[str]
    expect: str
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)
    skip: str | None = None
    xfail: str | None = None


ROWS = [
    # -- unknown names: did-you-mean from the registry --------------------------------------
    Row("unknown-backbone", [*FT, "--backbone", "tiny-cmm", "--classes", "3"],
        "unknown backbone 'tiny-cmm'; did you mean 'tiny-cnn'?"),
    Row("unknown-head", [*FT, "--classes", "3", "--head", "lineer"],
        "unknown head 'lineer'; did you mean 'linear'?"),
    Row("unknown-loss", [*FT, "--classes", "3", "--loss", "crossentropy"],
        "unknown loss 'crossentropy'; did you mean 'cross-entropy'?"),
    Row("unknown-optimizer", [*FT, "--classes", "3", "--optimizer", "adamm"],
        "unknown optimizer 'adamm'; did you mean 'adam'"),
    Row("unknown-dataset", [*FT, "--classes", "3", "--dataset", "shape"],
        "unknown dataset 'shape'; did you mean 'shapes'?"),
    Row("unknown-plugin-prefix", [*FT, "--classes", "3", "--backbone", "tinny:tiny-cnn"],
        "unknown plugin 'tinny'"),
    Row("missing-backbone", ["--plugin", TINY, "finetune", "--classes", "3"],
        "--backbone is required"),
    # -- data that does not fit ------------------------------------------------------------
    Row("classes-mismatch", [*FT_DATA, "--data", "{data}", "--classes", "3"],
        "--classes 3 but {data} has 2 classes (a, b)"),
    Row("empty-data-dir", [*FT_DATA, "--data", "{empty}", "--classes", "2"],
        "has no class sub-folders"),
    Row("missing-data-dir", [*FT_DATA, "--data", "{missing}", "--classes", "2"],
        "--data {missing}: no such file or directory"),
    Row("data-is-a-file", [*FT_DATA, "--data", "{afile}", "--classes", "2"],
        "--data {afile}: no loaded plugin reads a 'afile' file"),
    Row("data-with-datasets-plugin-disabled", [*FT_DATA, "--data", "{data}"],
        "--data {data}: no loaded plugin reads a folder",
        env={"TK_DISABLE_PLUGINS": "timm,torchvision,datasets"}),
    Row("no-default-dataset-when-disabled", [*FT_DATA],
        "no default dataset: no loaded plugin registers one",
        env={"TK_DISABLE_PLUGINS": "timm,torchvision,datasets"}),
    Row("class-without-images", [*FT_DATA, "--data", "{no_images}", "--classes", "2"],
        "class 'b' ({no_images}/b) has no image files"),
    Row("class-too-small-to-split", [*FT_DATA, "--data", "{few}", "--classes", "3"],
        "class 'c' has only 1 image; at least 2 are needed"),
    Row("manifest-escapes-root", [*FT_DATA, "--data", "{escape_csv}", "--classes", "2"],
        "path '../outside.png' is outside the root"),
    Row("generated-dataset-given-a-path", [*FT_DATA, "--data", "{data}", "--dataset", "shapes"],
        "dataset 'shapes' is generated and takes no --data path"),
    # -- numbers ---------------------------------------------------------------------------
    Row("epochs-not-a-number", [*FT, "--classes", "3", "--epochs", "x"],
        "Invalid value for '--epochs': 'x' is not a valid integer. (see `tk finetune --help`)"),
    Row("epochs-negative", [*FT, "--classes", "3", "--epochs", "-1"],
        "--epochs must be positive, got -1"),
    Row("lr-negative", [*FT, "--classes", "3", "--lr", "-1"], "--lr must be positive, got -1.0"),
    Row("lr-nan", [*FT, "--classes", "3", "--lr", "nan"], "--lr must be a finite number"),
    Row("weight-decay-inf", [*FT, "--classes", "3", "--weight-decay", "inf"],
        "--weight-decay must be a finite number"),
    Row("batch-size-zero", [*FT, "--classes", "3", "--batch-size", "0"],
        "--batch-size must be positive, got 0"),
    Row("val-split-above-one", [*FT, "--classes", "3", "--val-split", "1.5"],
        "--val-split must be between 0 and 1, got 1.5"),
    Row("workers-negative", [*FT, "--classes", "3", "--workers", "-2"],
        "--workers must not be negative"),
    Row("classes-zero", [*FT, "--classes", "0"], "--classes must be positive, got 0"),
    Row("shapes-too-many-classes", [*FT, "--classes", "11"],
        "--classes must be between 2 and"),
    Row("freeze-word", [*FT, "--classes", "3", "--freeze", "some"],
        "Invalid value for '--freeze'"),
    Row("freeze-too-many-groups", [*FT, "--classes", "3", "--freeze", "9"],
        "only 2 layer groups"),
    Row("bad-name", [*FT, "--classes", "3", "--name", "../up"],
        "--name '../up': use letters, digits"),
    # -- --opt -----------------------------------------------------------------------------
    Row("opt-unknown-key", [*FT, "--classes", "3", "--opt", "optimizer.betas=0.9"],
        "optimizer 'adamw' has no option 'betas'; did you mean"),
    Row("opt-unknown-component", [*FT, "--classes", "3", "--opt", "model.depth=3"],
        "unknown component 'model'"),
    Row("opt-malformed", [*FT, "--classes", "3", "--opt", "head.dropout"],
        "expected COMPONENT.KEY=VALUE"),
    Row("opt-bad-value", [*FT, "--classes", "3", "--opt", "head.dropout=abc"],
        "bad option dropout='abc'"),
    Row("opt-bad-optimizer-value", [*FT, "--classes", "3", "--opt", "optimizer.beta1=2"],
        "optimizer 'adamw': bad option beta1=2"),
    Row("opt-bad-dataset-value", [*FT, "--classes", "3", "--opt", "dataset.samples=-5"],
        "samples must be at least"),
    # -- --config --------------------------------------------------------------------------
    Row("config-invalid-toml", [*FT, "--classes", "3", "--config", "{toml_invalid}"],
        "not valid TOML"),
    Row("config-unknown-key", [*FT, "--classes", "3", "--config", "{toml_unknown}"],
        "unknown option(s) epoks"),
    Row("config-wrong-type", [*FT, "--classes", "3", "--config", "{toml_type}"],
        "epochs = 'many'"),
    Row("config-missing", [*FT, "--classes", "3", "--config", "{missing}.toml"],
        "no such file"),
    # -- store, weights, devices -----------------------------------------------------------
    Row("store-under-a-file", [*FT, "--classes", "3", "--store", "{afile}/store"],
        "cannot create model store at {afile}/store"),
    Row("weights-missing-file", ["--plugin", TINY, "finetune", "--backbone", "tiny-cnn",
                                 "--classes", "3", "--weights", "{missing}.pth"],
        "--weights {missing}.pth: no such file"),
    Row("device-cuda-without-gpu", [*FT, "--classes", "3", "--device", "cuda"],
        "--device cuda: no CUDA GPU is available", skip="a CUDA GPU is present" if HAS_CUDA
        else None),
    Row("device-unknown", [*FT, "--classes", "3", "--device", "tpu"],
        "--device tpu: expected auto, cpu, cuda, cuda:N or mps"),
    Row("fp16-on-cpu", [*FT, "--classes", "3", "--device", "cpu", "--precision", "16-mixed"],
        "--precision 16-mixed needs a GPU"),
    Row("precision-unknown", [*FT, "--classes", "3", "--precision", "64"],
        "Invalid value for '--precision'"),
    # -- the other commands ----------------------------------------------------------------
    Row("unknown-command", ["finetun"], "No such command 'finetun'. Did you mean 'finetune'?"),
    Row("unknown-option", ["--plugin", TINY, "finetune", "--epoch", "3"],
        "No such option '--epoch'. (Did you mean one of: '--epochs'"),
    Row("list-unknown-kind", ["list", "foo"], "Invalid value for 'KIND': 'foo' is not one of"),
    Row("store-show-unknown", ["store", "show", "colour", "--store", "{store}"],
        "no model 'colour' in {store}; did you mean 'colours'?"),
    Row("store-show-empty-store", ["store", "show", "nope", "--store", "{empty_store}"],
        "(the store is empty)"),
    Row("store-verify-unknown", ["store", "verify", "nope", "--store", "{store}"],
        "no model 'nope'"),
    Row("store-rm-path", ["store", "rm", "../x", "--store", "{store}"], "invalid model name"),
    Row("store-is-a-file", ["store", "list", "--store", "{afile}"],
        "Invalid value for '--store'"),
    Row("import-weights-missing", ["--plugin", TINY, "store", "import-weights", "tiny-cnn",
                                   "{missing}.pth", "--store", "{empty_store}"],
        "not found"),
    Row("import-weights-unknown-backbone", ["store", "import-weights", "tiny-cmm",
                                            "{missing}.pth", "--store", "{empty_store}"],
        "unknown backbone 'tiny-cmm'"),
    Row("infer-unknown-model", ["--plugin", TINY, "infer", "{data}", "--model", "colour",
                                "--store", "{store}"],
        "no model 'colour' in {store}; did you mean 'colours'?"),
    Row("infer-empty-store", ["--plugin", TINY, "infer", "{data}", "--store", "{empty_store}"],
        "no model in the store"),
    Row("infer-missing-input", ["--plugin", TINY, "infer", "{missing}", "--model", "colours",
                                "--store", "{store}"],
        "{missing}: no such file or directory"),
    Row("infer-output-under-a-file", ["--plugin", TINY, "infer", "{data}", "--model",
                                      "colours", "--store", "{store}", "-o",
                                      "{afile}/out.jsonl"],
        "is not a directory"),
    Row("infer-output-is-a-dir", ["--plugin", TINY, "infer", "{data}", "--model", "colours",
                                  "--store", "{store}", "-o", "{data}"], "is a directory"),
    Row("infer-batch-size-zero", ["--plugin", TINY, "infer", "{data}", "--batch-size", "0"],
        "Invalid value for '--batch-size'"),
    Row("infer-cuda-without-gpu", ["--plugin", TINY, "infer", "{data}", "--model", "colours",
                                   "--store", "{store}", "--device", "cuda"],
        "no CUDA GPU is available", skip="a CUDA GPU is present" if HAS_CUDA else None),
    Row("infer-fp16-on-cpu", ["--plugin", TINY, "infer", "{data}", "--model", "colours",
                              "--store", "{store}", "--device", "cpu", "--precision",
                              "16-mixed"], "--precision 16-mixed needs a GPU"),
    Row("eval-unknown-model", ["--plugin", TINY, "eval", "--model", "nope", "--data", "{data}",
                               "--store", "{store}"], "no model 'nope'"),
    Row("eval-without-data", ["--plugin", TINY, "eval", "--model", "colours",
                              "--store", "{store}"], "Missing option '--data'"),
    # -- a bug (not a user error): one line too, exit 1 ------------------------------------
    Row("plugin-bug", ["--plugin", "{buggy}", "finetune", "--backbone", "buggy-net",
                       "--classes", "3", "--no-pretrained", "-q", *SMALL],
        "tk: plugin error: plugin 'buggy' (--plugin {buggy}) raised ZeroDivisionError: "
        "division by zero in broken (buggy.py:6) (a bug in the plugin, not in your input: "
        "report it to its authors; TK_DEBUG=1 shows the traceback)", code=1),
]


def _world(root: Path) -> dict[str, str]:
    """The files the rows point at."""
    colours = ((200, 30, 30), (30, 30, 200), (30, 200, 30))
    for name, n, colour in (("a", 3, colours[0]), ("b", 3, colours[1])):
        for i in range(n):
            write_image(root / "data" / name / f"{i}.png", (32, 32), colour)
    for name, n, colour in (("a", 3, colours[0]), ("b", 3, colours[1]), ("c", 1, colours[2])):
        for i in range(n):
            write_image(root / "few" / name / f"{i}.png", (32, 32), colour)
    write_image(root / "no_images" / "a" / "0.png")
    (root / "no_images" / "b").mkdir(parents=True)
    (root / "no_images" / "b" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    (root / "afile").write_text("a regular file, not a folder")
    (root / "toml_invalid.toml").write_text("epochs = \n")
    (root / "toml_unknown.toml").write_text("epoks = 3\n")
    (root / "toml_type.toml").write_text('epochs = "many"\n')
    base = root / "manifest"
    write_image(base / "a.png")
    write_image(root / "outside.png")
    (base / "m.csv").write_text("path,label\na.png,a\n../outside.png,b\n")
    (root / "buggy.py").write_text(BUGGY_PLUGIN)
    save_colour_model(root / "store")
    (root / "empty_store").mkdir()
    return {"data": str(root / "data"), "few": str(root / "few"),
            "no_images": str(root / "no_images"), "empty": str(root / "empty"),
            "missing": str(root / "missing"), "afile": str(root / "afile"),
            "toml_invalid": str(root / "toml_invalid.toml"),
            "toml_unknown": str(root / "toml_unknown.toml"),
            "toml_type": str(root / "toml_type.toml"), "escape_csv": str(base / "m.csv"),
            "buggy": str(root / "buggy.py"), "store": str(root / "store"),
            "empty_store": str(root / "empty_store")}


def tk_env(root: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("TK_DEBUG", "TK_PLUGINS", "TK_LOAD_PLUGINS", "TK_STRICT_PLUGINS",
                "TK_MAX_IMAGE_PIXELS"):
        env.pop(key, None)
    env.update(TK_HOME=str(root / "home"), TORCH_HOME=str(root / "torch"),
               HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TK_DISABLE_PLUGINS="timm,torchvision", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def run_tk(args: list[str], env: dict[str, str], timeout: int = 180
           ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("user-errors")
    return root, _world(root)


@pytest.fixture(scope="module")
def results(world) -> dict[str, subprocess.CompletedProcess]:
    """Run every row once, concurrently (most rows fail before torch is imported)."""
    root, names = world
    todo = [r for r in ROWS if not r.skip]

    def one(row: Row) -> tuple[str, subprocess.CompletedProcess]:
        args = [a.format(**names) for a in row.args]
        return row.id, run_tk(args, tk_env(root, **row.env))

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(one, todo))


def _params() -> list:
    out = []
    for row in ROWS:
        marks = []
        if row.skip:
            marks.append(pytest.mark.skip(reason=row.skip))
        if row.xfail:
            marks.append(pytest.mark.xfail(strict=False, reason=row.xfail))
        out.append(pytest.param(row, id=row.id, marks=marks))
    return out


def test_row_ids_are_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("row", _params())
def test_user_error_is_one_line(row: Row, results, world):
    _, names = world
    proc = results[row.id]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == row.code, proc.stderr
    assert len(lines) == 1, proc.stderr
    prefix = "tk: plugin error: " if row.id == "plugin-bug" else "tk: error: "
    assert lines[0].startswith(prefix), lines[0]
    assert row.expect.format(**names) in lines[0]


def test_tk_debug_shows_the_traceback(world):
    root, names = world
    args = [*FT, "--backbone", "tiny-cmm", "--classes", "3"]
    quiet = run_tk(args, tk_env(root))
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    for off in ("0", "false", "No", " off ", ""):  # the one env-flag reader: all mean off
        still_quiet = run_tk(args, tk_env(root, TK_DEBUG=off))
        assert still_quiet.returncode == 2 and "Traceback" not in still_quiet.stderr, off
    loud = run_tk(args, tk_env(root, TK_DEBUG="1"))
    assert loud.returncode != 0
    assert "Traceback (most recent call last)" in loud.stderr
    assert "UnknownNameError: unknown backbone 'tiny-cmm'" in loud.stderr
    bug = run_tk(["--plugin", names["buggy"], "finetune", "--backbone", "buggy-net",
                  "--classes", "3", "--no-pretrained", *SMALL], tk_env(root, TK_DEBUG="1"))
    assert bug.returncode == 1
    assert "Traceback (most recent call last)" in bug.stderr
    assert "ZeroDivisionError" in bug.stderr and "in broken" in bug.stderr


def test_tk_alone_prints_the_help_not_an_error(world):
    root, _ = world
    proc = run_tk([], tk_env(root))
    assert proc.returncode == 2  # click's convention for a group without a command
    assert "Usage: tk [OPTIONS] COMMAND" in proc.stderr and "tk: error" not in proc.stderr
