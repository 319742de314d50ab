"""The example third-party plugin, installed the way a user installs it.

Once per session: build wheels of tk and of examples/tk-plugin-textures, create a fresh
virtual environment, install both wheels into it with pip. Then everything goes through
that environment's own ``tk`` console script, so the plugin is found through its real
entry point (group ``tk``) and tk's code is the installed wheel's, not this checkout's.

The environment is created without pip and without its own copy of torch: a ``.pth`` file
puts the test interpreter's site-packages *after* its own, so the heavy third-party
libraries (torch, torchvision, timm, ...) are shared, while ``toolkit``, ``plugins``,
``model_store`` and ``tk_textures`` come from the wheels (checked below).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from toolkit.plugin import hookspecs
from toolkit.testing import isolated_env

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tk-plugin-textures"
HOOKS = sorted(name for name, f in vars(hookspecs).items() if hasattr(f, "tk_spec"))
COMPONENTS = {"backbones": ["texture-cnn"], "heads": ["cosine"], "losses": ["poly1"],
              "optimizers": ["lion"], "datasets": ["json-manifest", "textures"],
              "loggers": ["journal"]}
IGNORE = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


@dataclass
class Venv:
    root: Path
    python: Path
    tk: Path
    site: Path

    def run(self, *args: str, home: Path, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """``<venv>/bin/tk ARGS`` with tk's store and caches under ``home``."""
        full = isolated_env(home, env)
        full.pop("PYTHONPATH", None)
        full["PATH"] = f"{self.tk.parent}{os.pathsep}{full.get('PATH', '')}"
        return subprocess.run([str(self.tk), *args], env=full, cwd=home, capture_output=True,
                              text=True, timeout=timeout)


def _copy_tk_sources(dest: Path) -> Path:
    """The files that make tk's distribution (what a fresh clone has)."""
    dest.mkdir(parents=True)
    shutil.copy2(ROOT / "pyproject.toml", dest)
    for package in ("toolkit", "plugins", "model_store"):
        shutil.copytree(ROOT / package, dest / package, ignore=IGNORE)
    for extra in ("README.md", "LICENSE"):
        if (ROOT / extra).is_file():
            shutil.copy2(ROOT / extra, dest)
    if not (dest / "README.md").is_file():  # while the README is being written
        (dest / "README.md").write_text("# tk\n", encoding="utf-8")
    return dest


@pytest.fixture(scope="session")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Venv:
    base = tmp_path_factory.mktemp("example-plugin")
    tk_src = _copy_tk_sources(base / "src" / "tk")
    plugin_src = base / "src" / EXAMPLE.name
    shutil.copytree(EXAMPLE, plugin_src, ignore=IGNORE)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(base / "dist"), str(tk_src), str(plugin_src)],
                   check=True, capture_output=True)
    wheels = sorted((base / "dist").glob("*.whl"))
    assert [w.name.split("-")[0] for w in wheels] == ["tk_microtoolkit", "tk_plugin_textures"]

    root = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    bindir = root / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / ("python.exe" if os.name == "nt" else "python")
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    (site / "_shared_libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index",
                    *map(str, wheels)], check=True, capture_output=True)
    return Venv(root, python, bindir / ("tk.exe" if os.name == "nt" else "tk"), site)


def test_tk_and_the_plugin_are_installed_in_the_fresh_venv(venv: Venv, tmp_path: Path) -> None:
    where = subprocess.run(  # located, not imported (importing torch takes seconds)
        [str(venv.python), "-c", "from importlib.util import find_spec\n"
         "for m in ('toolkit', 'plugins', 'model_store', 'tk_textures', 'torch'):\n"
         "    print(find_spec(m).origin)"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}).stdout.split()
    assert all(Path(p).is_relative_to(venv.site) for p in where[:4]), where
    assert not Path(where[4]).is_relative_to(venv.root)  # torch is shared, not reinstalled
    assert venv.tk.is_file()
    version = venv.run("--version", home=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("tk, version ")


def test_tk_plugins_lists_it_with_its_version_and_every_hook(venv: Venv, tmp_path: Path
                                                             ) -> None:
    text = venv.run("plugins", home=tmp_path)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == (
        "textures 0.3.0  (tk-plugin-textures: tk_textures.plugin)")
    records = json.loads(venv.run("plugins", "--json", home=tmp_path).stdout)
    assert [(r["name"], r["distribution"], r["version"], r["source"], r["error"])
            for r in records] == [
        ("textures", "tk-plugin-textures", "0.3.0", "entry point", None)]
    assert records[0]["hooks"] == HOOKS  # the example implements every hook there is
    everything = json.loads(venv.run("plugins", "--all", "--json", home=tmp_path).stdout)
    builtins = [r for r in everything if r["builtin"]]
    assert builtins and all(r["distribution"] == "tk-microtoolkit" for r in builtins)
    assert [r["error"] for r in everything if r["error"]] == []


@pytest.mark.parametrize("kind", sorted(COMPONENTS))
def test_tk_list_shows_its_components(venv: Venv, tmp_path: Path, kind: str) -> None:
    # the built-in torchvision/timm backbones stay out of the way (listing thousands of
    # names is slow); every other kind is listed with all built-ins next to the plugin's
    env = {"TK_DISABLE_PLUGINS": "timm,torchvision"} if kind == "backbones" else None
    listing = venv.run("list", kind, env=env, home=tmp_path)
    assert listing.returncode == 0, listing.stderr
    rows = {tuple(line.split()[:2]) for line in listing.stdout.splitlines()}
    assert {(name, "textures") for name in COMPONENTS[kind]} <= rows
    if kind != "backbones":
        assert len(rows) > 1  # the built-ins are there too
    as_json = json.loads(venv.run("list", kind, "textures:*", "--json", env=env,
                                  home=tmp_path).stdout)
    assert [(c["name"], c["plugin"]) for c in as_json] == [
        (name, "textures") for name in COMPONENTS[kind]]
    assert all(c["description"] for c in as_json)


def test_its_command_runs(venv: Venv, tmp_path: Path) -> None:
    help_ = venv.run("--help", home=tmp_path)
    assert "textures-preview" in help_.stdout
    out = tmp_path / "preview"
    proc = venv.run("textures-preview", str(out), "--classes", "3", "--per-class", "2",
                    "--size", "24", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == f"wrote 6 images of 3 classes to {out}"
    from PIL import Image

    files = sorted(out.rglob("*.png"))
    assert [f.relative_to(out).as_posix() for f in files] == [
        "checker/checker-0000.png", "checker/checker-0001.png",
        "stripes-h/stripes-h-0000.png", "stripes-h/stripes-h-0001.png",
        "stripes-v/stripes-v-0000.png", "stripes-v/stripes-v-0001.png"]
    with Image.open(files[0]) as img:
        assert (img.format, img.size, img.mode) == ("PNG", (24, 24), "RGB")
    bad = venv.run("textures-preview", str(out), "--classes", "9", home=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_data_json_reaches_its_manifest_dataset(venv: Venv, tmp_path: Path) -> None:
    """The plugin claims ``.json`` through ``tk_dataset_for_path``: ``--data FILE.json``
    goes to its ``json-manifest`` dataset (whose classes show in the mismatch message),
    a folder still goes to the built-in ``imagefolder``."""
    out = tmp_path / "samples"
    made = venv.run("textures-preview", str(out), "--classes", "3", "--per-class", "2",
                    "--manifest", home=tmp_path)
    assert made.returncode == 0, made.stderr
    assert made.stderr.strip().endswith(f"and {out / 'manifest.json'}")
    common = ["finetune", "--backbone", "texture-cnn", "--classes", "5", "--device", "cpu"]
    proc = venv.run(*common, "--data", str(out / "manifest.json"), home=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (  # the manifest's order of classes
        "tk: error: --classes 5 but the data has 3 classes (stripes-h, stripes-v, checker)")
    folder = venv.run(*common, "--data", str(out), home=tmp_path)
    assert folder.returncode == 2, folder.stderr
    assert folder.stderr.strip().splitlines()[-1].endswith(  # imagefolder's sorted order
        "has 3 classes (checker, stripes-h, stripes-v)")


def test_help_stays_free_of_torch_with_the_plugin_installed(venv: Venv, tmp_path: Path
                                                            ) -> None:
    script = ("import sys\nfrom toolkit.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "print('HEAVY=' + ','.join(m for m in ('torch', 'torchvision', 'timm')"
              " if m in sys.modules), file=sys.stderr)\n")
    for args in (["--help"], ["plugins"]):
        proc = subprocess.run([str(venv.python), "-c", script, *args], capture_output=True,
                              text=True, cwd=tmp_path, env=isolated_env(tmp_path))
        assert proc.stderr.strip().splitlines()[-1] == "HEAVY=", (args, proc.stderr)


def test_tk_finetune_trains_with_all_its_components_together(venv: Venv, tmp_path: Path
                                                             ) -> None:
    journal = tmp_path / "journal.jsonl"
    store = tmp_path / "store"
    proc = venv.run(
        "finetune", "--backbone", "texture-cnn", "--dataset", "textures", "--head", "cosine",
        "--loss", "poly1", "--optimizer", "textures:lion", "--classes", "4", "--epochs", "2",
        "--batch-size", "16", "--opt", "dataset.per_class=12",
        "--opt", "loss.epsilon=0.5", "--device", "cpu", "--workers", "0",
        "--store", str(store), "--name", "textured", "--log", "journal",
        home=tmp_path, env={"TK_TEXTURES_JOURNAL": str(journal)})
    assert proc.returncode == 0, proc.stderr
    shown = venv.run("store", "show", "textured", "--json", "--store", str(store),
                     home=tmp_path)
    assert shown.returncode == 0, shown.stderr
    meta = json.loads(shown.stdout)
    assert meta["spec"]["backbone"]["name"] == "textures:texture-cnn"
    assert meta["spec"]["head"]["name"] == "textures:cosine"
    assert meta["classes"] == ["stripes-h", "stripes-v", "checker", "dots"]
    assert meta["data_config"]["input_size"] == [3, 32, 32]
    assert meta["data_config"]["std"] == [0.25, 0.25, 0.25]
    training = meta["training"]
    assert training["dataset"] == "textures:textures"
    assert training["dataset_options"]["per_class"] == 12
    assert training["loss"] == "textures:poly1"  # recorded qualified, like the spec
    assert training["optimizer"] == "textures:lion"
    assert training["lr"] == 1e-4  # no --lr: the default_lr lion registers
    assert len(meta["metrics"]["history"]) == 2
    # pretrained is the default: the weights that ship inside the wheel were used
    shipped = venv.site / "tk_textures" / "weights" / "texture_cnn_w16.safetensors"
    assert meta["weights"]["source"] == "package"
    assert meta["weights"]["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()

    events = [json.loads(line) for line in journal.read_text().splitlines()]
    assert [e["event"] for e in events] == ["train_start", "epoch_end", "epoch_end",
                                           "model_saved", "train_end"]
    assert events[0]["config"]["options"]["loss"] == {"epsilon": 0.5}
    assert [e["epoch"] for e in events[1:3]] == [1, 2]
    assert {"train_loss", "val_loss", "val_acc"} <= set(events[2]["metrics"])
    assert events[3]["name"] == "textured"
    assert events[3]["artifacts"] == ["confusion", "curves"]
    assert events[4] == {**events[4], "name": "textured", "status": "finished"}
    # --log journal: the plugin's logger wrote the same events into the run's log folder
    logged = store / "runs" / "textured" / "logs" / "journal.jsonl"
    lines = [json.loads(line) for line in logged.read_text().splitlines()]
    assert [line["event"] for line in lines] == [e["event"] for e in events]
    assert lines[-1] == {"event": "train_end", "run": "textured", "status": "finished"}
    assert Path(events[3]["path"]).resolve() == (store / "models" / "textured.safetensors"
                                                 ).resolve()


def test_the_plugin_own_test_suite_passes_in_the_venv(venv: Venv, tmp_path: Path) -> None:
    """The plugin's tests use toolkit.testing the way docs/plugins.md tells authors to.
    Its own tiny fine-tune is left out here: the test above trains with the plugin already
    (and tests/test_testing.py covers ``tiny_finetune``), and it would add ten seconds."""
    tests = tmp_path / "tests"
    shutil.copytree(EXAMPLE / "tests", tests, ignore=IGNORE)
    env = isolated_env(tmp_path)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(venv.python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-k", "not tiny_finetune", str(tests)], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "17 passed, 1 deselected" in proc.stdout
