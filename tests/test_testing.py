"""toolkit.testing: the helpers plugin authors use in their own tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from toolkit.errors import PluginError
from toolkit.plugin.hookspecs import hookimpl
from toolkit.testing import fresh_plugins, isolated_env, make_image_folder, run_tk, tiny_finetune

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "plugins_for_tests" / "tiny.py"


class HeadPlugin:
    @hookimpl
    def tk_register_heads(self, register):
        register("identity-ish", lambda num_features, num_classes: (num_features, num_classes))


def test_fresh_plugins_holds_builtins_and_the_given_plugins_only(tmp_path: Path,
                                                                 monkeypatch) -> None:
    site = tmp_path / "site"
    (site / "tk_installed_elsewhere-1.0.dist-info").mkdir(parents=True)
    (site / "tk_installed_elsewhere-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tk-installed-elsewhere\nVersion: 1.0\n")
    (site / "tk_installed_elsewhere-1.0.dist-info" / "entry_points.txt").write_text(
        "[tk]\nelsewhere = json\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("TK_PLUGINS", "json")

    plugins = fresh_plugins(("mine", HeadPlugin()), str(TINY))
    third_party = [name for name, r in plugins.records.items() if not r.builtin]
    assert third_party == ["mine", "tiny"]
    heads = plugins.registry("heads")
    assert heads.build("mine:identity-ish", 7, 3) == (7, 3)
    assert heads.resolve("linear").owner == "heads"  # built-ins are there
    assert plugins.registry("backbones").resolve("tiny-cnn").owner == "tiny"

    alone = fresh_plugins(HeadPlugin(), builtins=False)
    assert list(alone.records) == ["HeadPlugin"]
    assert [c.qualified_name for c in alone.registry("heads").list()] == [
        "HeadPlugin:identity-ish"]


def test_fresh_plugins_is_strict_by_default(tmp_path: Path) -> None:
    broken = tmp_path / "broken_on_import.py"
    broken.write_text("raise ImportError('needs libfoo')\n")
    with pytest.raises(PluginError, match="plugin 'broken_on_import' failed to import: "
                                          "ImportError: needs libfoo"):
        fresh_plugins(str(broken), builtins=False)
    lenient = fresh_plugins(str(broken), builtins=False, strict=False)
    assert lenient.records["broken_on_import"].error == "import: ImportError: needs libfoo"

    late = tmp_path / "fails_in_hook.py"
    late.write_text(textwrap.dedent("""
        from toolkit.plugin.hookspecs import hookimpl

        @hookimpl
        def tk_register_losses(register):
            raise RuntimeError("bad table")
        """))
    with pytest.raises(PluginError, match="plugin 'fails_in_hook': tk_register_losses raised "
                                          "RuntimeError: bad table"):
        fresh_plugins(str(late), builtins=False).registry("losses")

    unmarked = tmp_path / "forgot_hookimpl.py"
    unmarked.write_text("def tk_register_heads(register):\n    register('h', print)\n")
    with pytest.raises(PluginError, match="tk_register_heads is named like a hook but not "
                                          "marked with @hookimpl"):
        fresh_plugins(str(unmarked), builtins=False)


@pytest.mark.parametrize(("fmt", "expected"), [("png", {"PNG"}), ("jpeg", {"JPEG"}),
                                               ("mixed", {"PNG", "JPEG"})])
def test_make_image_folder_writes_real_images(tmp_path: Path, fmt: str, expected: set[str]
                                              ) -> None:
    from PIL import Image

    root = make_image_folder(tmp_path / "data", ["cat", "dog", "eel"], per_class=4, size=24,
                             format=fmt)
    assert root == tmp_path / "data"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(files) == 12
    assert sorted({p.parent.name for p in files}) == ["cat", "dog", "eel"]
    formats = set()
    for path in files:
        with Image.open(path) as img:
            img.load()
            assert img.size == (24, 24) and img.mode == "RGB"
            formats.add(img.format)
    assert formats == expected


def test_make_image_folder_is_deterministic_and_classes_differ(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    a = make_image_folder(tmp_path / "a", 2, per_class=2, size=16, seed=3)
    b = make_image_folder(tmp_path / "b", 2, per_class=2, size=16, seed=3)
    names = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert [str(n) for n in names] == ["class0/class0_000.png", "class0/class0_001.png",
                                       "class1/class1_000.png", "class1/class1_001.png"]
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    means = [np.asarray(Image.open(a / n), dtype=float).mean(axis=(0, 1)) for n in names]
    assert np.abs(means[0] - means[2]).max() > 30  # the two classes look different
    with pytest.raises(ValueError, match="distinct class names"):
        make_image_folder(tmp_path / "c", ["x", "x"])
    with pytest.raises(ValueError, match="format must be"):
        make_image_folder(tmp_path / "c", 2, format="gif")


def test_isolated_env_moves_store_and_caches_under_home(tmp_path: Path) -> None:
    env = isolated_env(tmp_path, {"EXTRA": "1", "TORCH_HOME": "/elsewhere"})
    assert env["TK_HOME"] == str(tmp_path / "tk")
    assert env["HF_HOME"] == str(tmp_path / "hf")
    assert env["XDG_DATA_HOME"] == str(tmp_path / "data")
    assert env["EXTRA"] == "1" and env["TORCH_HOME"] == "/elsewhere"  # extras win
    assert "PATH" in env


def test_run_tk_runs_the_cli_with_plugins(tmp_path: Path) -> None:
    proc = run_tk("list", "backbones", "tiny*", "--json", home=tmp_path, plugins=[str(TINY)],
                  env={"TK_DISABLE_PLUGINS": "timm,torchvision"})
    assert proc.returncode == 0, proc.stderr
    assert '"plugin": "tiny"' in proc.stdout and '"name": "tiny-cnn"' in proc.stdout


def test_run_tk_stops_a_hung_run_with_its_children_and_their_stacks(tmp_path: Path) -> None:
    import os
    import sys
    import time

    # an "interpreter" that starts a child and hangs in Python: what a stuck torchrun is
    pid_file = tmp_path / "child.pid"
    fake = tmp_path / "hang.sh"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        sleep 300 &
        echo $! > {pid_file}
        exec {sys.executable} -c "import time; time.sleep(300)"
        """))
    fake.chmod(0o755)
    start = time.monotonic()
    proc = run_tk("infer", "x", home=tmp_path / "home", python=str(fake), timeout=3)
    assert time.monotonic() - start < 30
    assert proc.returncode < 0
    assert "timed out after 3 s" in proc.stderr
    assert "time.sleep" in proc.stderr or "File " in proc.stderr  # the fault handler's stack
    child = int(pid_file.read_text())
    for _ in range(50):  # the background child went with the group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the hung run's child is still alive")


def test_tiny_finetune_trains_and_reads_the_metadata(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", ["red", "blue"], per_class=5, size=32)
    run = tiny_finetune("tiny-cnn", data=data, plugins=[str(TINY)], home=tmp_path / "home",
                        name="tiny-run")
    assert run.ok and run.store == tmp_path / "home" / "tk"
    assert (run.store / "models" / "tiny-run.safetensors").is_file()
    assert run.metadata is not None
    assert run.metadata["classes"] == ["blue", "red"]
    assert run.metadata["spec"]["backbone"]["name"] == "tiny:tiny-cnn"
    assert "--no-pretrained" in run.args


def test_tiny_finetune_reports_a_failed_run(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="unknown backbone 'no-such-net'"):
        tiny_finetune("no-such-net", home=tmp_path, env={"TK_DISABLE_PLUGINS": "timm"})
    run = tiny_finetune("no-such-net", home=tmp_path, check=False,
                        env={"TK_DISABLE_PLUGINS": "timm"})
    assert run.returncode == 2 and run.metadata is None
    assert run.stderr.strip().startswith("tk: error: unknown backbone 'no-such-net'")
