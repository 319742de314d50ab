"""Security: nothing unpickles, model metadata is data, hostile weight files do not run.

- A source scan (AST) of toolkit/, plugins/ and model_store/: no unpickling API, every
  ``torch.load`` with ``weights_only=True``, no ``eval`` / ``exec`` / ``__import__``, no
  weight loader that unpickles behind the scenes, module imports by name only in the plugin
  loader (``toolkit/plugin/importing.py``, for modules the user names on the command line or
  in ``TK_PLUGINS``).
- Stored models whose metadata names ``os:system``, ``builtins:eval`` or carries
  ``__import__(...)`` strings: `tk infer` / `tk eval` fail cleanly with an unknown-name
  error, `tk store show` prints the strings as data, nothing runs.
- A hand-edited spec that would build a huge network is refused before any memory is
  allocated (the architecture is first built on torch's meta device).
- A ``.pth`` with a malicious pickle (its payload would create a marker) is refused by
  `tk store import-weights` and `tk finetune --weights`, and the payload never runs.
- csv manifest paths that leave their root: ``tests/test_datasets.py::test_csv_bad_rows``
  (``..``, absolute, symlink), ``test_csv_outside_root_when_allowed`` (the opt-in) and the
  ``manifest-escapes-root`` row of ``tests/test_user_errors.py`` (through `tk finetune`).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import TINY_PLUGIN, save_colour_model, write_image

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("toolkit", "plugins", "model_store")

# -- the source scan ------------------------------------------------------------------------

UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve",
                      "marshal", "joblib", "jsonpickle", "pickletools"}
# harmless names of the pickle module: exception classes (to catch them), nothing that loads
PICKLE_HARMLESS = {"UnpicklingError", "PicklingError", "PickleError"}
FORBIDDEN_BUILTINS = {"eval", "exec", "__import__"}
IMPORT_BY_NAME_ALLOWED = {"toolkit/plugin/importing.py"}  # plugin modules the user names


def _sources() -> list[Path]:
    return sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_true(call: ast.Call, keyword: str) -> bool:
    return any(k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def _is_false(call: ast.Call, keyword: str) -> bool:
    return any(k.arg == keyword and isinstance(k.value, ast.Constant) and k.value.value is False
               for k in call.keywords)


def scan(path: Path) -> list[str]:
    """Every forbidden construct in one file, as ``file:line: what``."""
    rel = path.relative_to(REPO).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    problems: list[str] = []
    pickle_aliases: set[str] = set()

    def bad(node: ast.AST, what: str) -> None:
        problems.append(f"{rel}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in UNPICKLING_MODULES:
                    if root in ("pickle", "_pickle"):
                        pickle_aliases.add(alias.asname or alias.name)
                    else:
                        bad(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            root = (node.module or "").split(".")[0]
            if root in UNPICKLING_MODULES:
                for alias in node.names:
                    if root not in ("pickle", "_pickle") or alias.name not in PICKLE_HARMLESS:
                        bad(node, f"imports {alias.name} from {node.module}")
            if node.module in ("importlib",) and any(a.name == "import_module"
                                                     for a in node.names):
                if rel not in IMPORT_BY_NAME_ALLOWED:
                    bad(node, "imports importlib.import_module")
        elif isinstance(node, ast.Attribute):
            base = _dotted(node.value)
            if base in pickle_aliases and node.attr not in PICKLE_HARMLESS:
                bad(node, f"uses {base}.{node.attr}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if isinstance(node.func, ast.Name) and name in FORBIDDEN_BUILTINS:
                bad(node, f"calls {name}()")
            if name.endswith("torch.load") or name == "load" and "torch" in rel:
                if not _is_true(node, "weights_only"):
                    bad(node, f"calls {name}() without weights_only=True")
            if last in ("load_state_dict_from_url", "load_url") and not _is_true(
                    node, "weights_only"):
                bad(node, f"calls {name}() (unpickles) without weights_only=True")
            if last == "get_state_dict":  # torchvision WeightsEnum: torch.load behind it
                bad(node, f"calls {name}() (torchvision's own loader)")
            if last == "create_model" and not _is_false(node, "pretrained"):
                bad(node, f"calls {name}() without pretrained=False (timm's own loader)")
            if last == "load" and name.split(".")[0] in ("np", "numpy") and _is_true(
                    node, "allow_pickle"):
                bad(node, f"calls {name}(allow_pickle=True)")
            if name == "importlib.import_module" and rel not in IMPORT_BY_NAME_ALLOWED:
                bad(node, "imports a module by name")
    return problems


def test_scan_finds_what_it_forbids(tmp_path: Path) -> None:
    """The scanner itself: each forbidden construct in a sample file is reported."""
    sample = REPO / "toolkit" / "_scan_sample_for_test.py"
    sample.write_text(textwrap.dedent("""
        import pickle
        import dill
        import torch
        from pickle import loads
        from pickle import UnpicklingError
        x = pickle.loads(b"")
        y = torch.load("f")
        z = torch.load("f", weights_only=False)
        ok = torch.load("f", weights_only=True)
        eval("1")
        __import__("os")
        torch.hub.load_state_dict_from_url("u")
        timm.create_model("resnet18", pretrained=True)
        caught = pickle.UnpicklingError
    """))
    try:
        found = scan(sample)
    finally:
        sample.unlink()
    text = "\n".join(found)
    for what in ("imports dill", "imports loads from pickle", "uses pickle.loads",
                 "torch.load() without weights_only=True", "calls eval()",
                 "calls __import__()", "load_state_dict_from_url", "create_model"):
        assert what in text, (what, text)
    assert len([f for f in found if "torch.load()" in f]) == 2  # not the weights_only=True one
    assert "UnpicklingError" not in text


def test_nothing_unpickles_or_evaluates_in_tk_sources() -> None:
    problems = [p for path in _sources() for p in scan(path)]
    assert not problems, "\n".join(problems)
    assert len(_sources()) > 20  # the scan did look at the code


# -- metadata is data ---------------------------------------------------------------------

HOSTILE_SPECS = {
    "os-system": ({"backbone": {"name": "os:system", "options": {}}},
                  "unknown plugin 'os' in backbone 'os:system'"),
    "builtins-eval": ({"head": {"name": "builtins:eval", "options": {}}},
                      "unknown plugin 'builtins' in head 'builtins:eval'"),
    "import-string": ({"backbone": {"name": "__import__('os').system('mkdir pwned')",
                                    "options": {}}},
                      "unknown backbone '__import__('os').system('mkdir pwned')'"),
    "payload-option": ({"backbone": {"name": "tiny:tiny-cnn",
                                     "options": {"width": "__import__('os').system('mkdir "
                                                          "pwned')"}}},
                       "bad option width="),
}


def _reseal(store_dir: Path, name: str, edit) -> None:
    """Edit the tk metadata of a stored model and write it back with a valid checksum."""
    from safetensors import safe_open

    from model_store.fileformat import seal, serialize

    path = store_dir / "models" / f"{name}.safetensors"
    with safe_open(str(path), "pt") as fh:
        file_meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    meta = json.loads(file_meta["tk"])
    edit(meta)
    file_meta["tk"] = json.dumps(meta)
    file_meta.pop("tk_digest")
    chunks, _ = seal(serialize(tensors, file_meta))
    path.write_bytes(b"".join(bytes(c) for c in chunks))


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TK_DEBUG", "TK_PLUGINS")}
    env.update(TK_HOME=str(tmp_path / "home"), TORCH_HOME=str(tmp_path / "torch"),
               HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TK_DISABLE_PLUGINS="timm,torchvision", PYTHONPATH=str(REPO))
    return env


def tk(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One stored model per entry of HOSTILE_SPECS, plus 'shell-classes' (class names
    that are shell payloads: a model that works, the names only ever printed)."""
    root = tmp_path_factory.mktemp("hostile")
    store = root / "store"
    for name, (spec_edit, _) in HOSTILE_SPECS.items():
        save_colour_model(store, name)

        def edit(meta, spec_edit=spec_edit):
            for part, value in spec_edit.items():
                meta["spec"][part] = value

        _reseal(store, name, edit)
    save_colour_model(store, "shell-classes")
    _reseal(store, "shell-classes", lambda m: m.update(
        classes=["$(mkdir pwned)", "`mkdir pwned`", "__import__('os').system('mkdir pwned')"]))
    write_image(root / "img" / "red.png", (32, 32), (230, 10, 10))
    return root


@pytest.fixture(scope="module")
def hostile_runs(hostile_store: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Path, dict[tuple[str, str], subprocess.CompletedProcess]]:
    """`tk infer`, `tk eval` and `tk store show` on every hostile model, run concurrently
    from an empty working folder (where a payload that ran would leave 'pwned')."""
    work = tmp_path_factory.mktemp("cwd")
    env = _env(tmp_path_factory.mktemp("env"))
    store = str(hostile_store / "store")
    images = str(hostile_store / "img")
    jobs: dict[tuple[str, str], list[str]] = {}
    for name in HOSTILE_SPECS:
        jobs[(name, "infer")] = ["--plugin", TINY_PLUGIN, "infer", images, "--model", name,
                                 "--store", store]
        jobs[(name, "eval")] = ["--plugin", TINY_PLUGIN, "eval", "--model", name, "--data",
                                images, "--store", store]
        jobs[(name, "show")] = ["store", "show", name, "--json", "--store", store]
    jobs[("shell-classes", "infer")] = ["--plugin", TINY_PLUGIN, "infer", images, "--model",
                                        "shell-classes", "--store", store, "--format", "jsonl"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(zip(jobs, pool.map(lambda a: tk(a, env, work), jobs.values()),
                        strict=True))
    return work, done


@pytest.mark.parametrize("name", sorted(HOSTILE_SPECS))
def test_metadata_names_are_resolved_as_data_never_run(hostile_runs, hostile_store: Path,
                                                       name: str) -> None:
    work, runs = hostile_runs
    expected = HOSTILE_SPECS[name][1]
    for command in ("infer", "eval"):
        proc = runs[(name, command)]
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith(f"tk: error: cannot rebuild model '{name}'"), lines[0]
        assert expected in lines[0], lines[0]
    shown = runs[(name, "show")]
    assert shown.returncode == 0, shown.stderr
    spec = json.loads(shown.stdout)["spec"]  # printed back verbatim, as data
    for part, value in HOSTILE_SPECS[name][0].items():
        assert spec[part] == value
    assert not (work / "pwned").exists() and not (hostile_store / "pwned").exists()


def test_class_names_are_only_printed(hostile_runs) -> None:
    work, runs = hostile_runs
    proc = runs[("shell-classes", "infer")]
    assert proc.returncode == 0, proc.stderr
    [row] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert row["label"] == "$(mkdir pwned)" and row["error"] is None  # red: class 0
    assert not (work / "pwned").exists()


HUGE_WIDTH_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from model_store import ModelStore
    from toolkit.errors import StoreError
    from toolkit.model.loading import load_model
    from toolkit.plugin.manager import load_plugins
    plugins = load_plugins(modules=[sys.argv[2]], env={})
    store = ModelStore(sys.argv[1])
    load_model("colours", store, plugins=plugins)  # warm up: allocator, lazy imports
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_model("huge", store, plugins=plugins)
        error = None
    except StoreError as exc:
        error = str(exc)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"error": error, "grew_kb": after - before}))
""")


def test_hand_edited_huge_architecture_is_refused_before_allocating(tmp_path: Path) -> None:
    """width 3000 would allocate a 650 MB convolution (and initialise it) just to find
    that the file's tensors do not fit; the meta-device check refuses it first."""
    store = tmp_path / "store"
    save_colour_model(store, "colours")
    save_colour_model(store, "huge")
    _reseal(store, "huge", lambda m: m["spec"]["backbone"]["options"].update(width=3000))
    proc = subprocess.run([sys.executable, "-c", HUGE_WIDTH_CHILD, str(store), TINY_PLUGIN],
                          env=_env(tmp_path), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["error"] and "does not fit its architecture" in result["error"]
    assert "wrong shape" in result["error"]
    assert result["grew_kb"] < 200_000, result  # not the 650 MB the real build would take


# -- malicious pickles --------------------------------------------------------------------

EVIL_WRITER = textwrap.dedent("""
    import os, sys, builtins, torch

    class MkdirPayload:
        def __reduce__(self):
            return (os.mkdir, (sys.argv[2],))

    class ExecPayload:
        def __reduce__(self):
            return (builtins.exec, (f"open({sys.argv[2]!r} + '-exec', 'w').close()",))

    state = {"0.0.weight": torch.zeros(8, 3, 3, 3)}
    out = sys.argv[1]
    torch.save({**state, "evil": MkdirPayload()}, out + "/mkdir.pth")
    torch.save({"state_dict": state, "meta": {"x": ExecPayload()}}, out + "/nested-exec.pth")
    torch.save([MkdirPayload()], out + "/list.bin")
""")


@pytest.fixture(scope="module")
def evil_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evil")
    marker = root / "pwned"
    subprocess.run([sys.executable, "-c", EVIL_WRITER, str(root), str(marker)], check=True,
                   timeout=120)
    assert not marker.exists()
    return root, marker


def _assert_not_run(marker: Path) -> None:
    assert not marker.exists(), "the pickle's payload ran"
    assert not Path(str(marker) + "-exec").exists(), "the pickle's payload ran"


@pytest.mark.parametrize("file", ["mkdir.pth", "nested-exec.pth", "list.bin"])
def test_import_weights_refuses_malicious_pickles(evil_files, file: str, tmp_path: Path):
    root, marker = evil_files
    proc = tk(["--plugin", TINY_PLUGIN, "store", "import-weights", "tiny-cnn",
               str(root / file), "--store", str(tmp_path / "store")], _env(tmp_path), tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith(("tk: error: refusing to read", "tk: error: refused to import",
                                "tk: error: cannot read")), lines[0]
    _assert_not_run(marker)
    assert not (tmp_path / "store" / "weights").exists() or not any(
        (tmp_path / "store" / "weights").rglob("*.safetensors"))


def test_finetune_weights_option_refuses_a_malicious_pickle(evil_files, tmp_path: Path):
    """Through a built-in backbone (torchvision's resnet18: its weights reader is the one
    every built-in uses), before any training."""
    root, marker = evil_files
    env = _env(tmp_path)
    env["TK_DISABLE_PLUGINS"] = "timm"
    proc = tk(["finetune", "--backbone", "resnet18", "--classes", "2", "--weights",
               str(root / "mkdir.pth"), "--opt", "dataset.samples=20", "--epochs", "1"],
              env, tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines[-1].startswith("tk: error: refusing to read weights file"), proc.stderr
    assert "pickled Python object" in lines[-1] and "Traceback" not in proc.stderr
    _assert_not_run(marker)
    assert not any((tmp_path / "home").rglob("*.safetensors"))
