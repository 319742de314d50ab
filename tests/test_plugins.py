"""The plugin manager and the registry: where plugins come from, what the env switches do,
what happens when a plugin breaks, name clashes, did-you-mean and listing.

Most tests build a fresh manager in-process (``load_plugins(modules, env=...)``) with plugin
modules and *installed distributions* written into ``tmp_path`` (a ``.dist-info`` with an
``entry_points.txt`` on ``sys.path`` is exactly what pip leaves behind, so
``importlib.metadata`` finds real entry points). The end-to-end tests at the bottom build
real wheels of the packages in ``tests/plugin_packages/`` and run the ``tk`` CLI.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import click
import pytest

from toolkit.errors import AmbiguousNameError, PluginBugError, PluginError, UnknownNameError
from toolkit.plugin import hookspecs
from toolkit.plugin.manager import load_plugins
from toolkit.plugin.registry import KINDS, Registry
from toolkit.testing import fresh_plugins, isolated_env, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "tests" / "plugin_packages"
HOOKS = sorted(name for name, f in vars(hookspecs).items() if hasattr(f, "tk_spec"))
HEAVY = ("torch", "torchvision", "timm")
_ids = itertools.count()

# no switches set, except that the built-in backbone plugins (thousands of names, slow to
# list) stay out of tests that do not need them
NO_ENV: dict[str, str] = {"TK_DISABLE_PLUGINS": "timm,torchvision"}
LIGHT = {"TK_LOAD_PLUGINS": "", **NO_ENV}


def unique(prefix: str) -> str:
    """A module name no other test uses (sys.modules is shared by the whole session)."""
    return f"{prefix}_{next(_ids)}_{id(object()) % 10_000}"


def backbone_plugin(name: str = "twin-net", *, extra: str = "", fallback: bool = False) -> str:
    """Source of a plugin module registering backbone ``name``."""
    return textwrap.dedent(f"""
        from toolkit.plugin.hookspecs import hookimpl

        def factory(pretrained=False):
            return "built by " + __name__

        @hookimpl
        def tk_register_backbones(register):
            register({name!r}, factory, description="from " + __name__, fallback={fallback})
        """) + textwrap.dedent(extra)


def write_module(folder: Path, module: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}.py"
    path.write_text(source, encoding="utf-8")
    return path


def install_dist(site: Path, dist: str, version: str, entry_points: dict[str, str],
                 modules: dict[str, str]) -> None:
    """What ``pip install`` leaves in site-packages: the modules and a dist-info with
    METADATA and entry_points.txt (group ``tk``)."""
    for module, source in modules.items():
        write_module(site, module, source)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
    eps = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[tk]\n{eps}", encoding="utf-8")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on sys.path standing in for site-packages."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    return path


def third_party(plugins: Any) -> dict[str, Any]:
    return {k: r for k, r in plugins.records.items() if not r.builtin}


# -- where plugins come from -------------------------------------------------------------------
def test_entry_point_plugin_loads_with_distribution_and_version(site: Path) -> None:
    mod = unique("ep_plugin")
    install_dist(site, "tk-ep-demo", "1.2.3", {"demo": mod}, {mod: backbone_plugin("demo-net")})
    plugins = load_plugins(env=NO_ENV)
    record = plugins.records["demo"]
    assert (record.distribution, record.version, record.source) == (
        "tk-ep-demo", "1.2.3", "entry point")
    assert record.hooks == ["tk_register_backbones"] and record.error is None
    component = plugins.registry("backbones").resolve("demo-net")
    assert component.owner == "demo" and component.qualified_name == "demo:demo-net"
    assert component.factory() == f"built by {mod}"


def test_builtins_are_entry_points_of_tk_itself() -> None:
    plugins = load_plugins(env={"TK_LOAD_PLUGINS": ""})
    builtins = [r for r in plugins.records.values() if r.builtin]
    assert {r.name for r in builtins} >= {"heads", "losses", "optimizers"}
    assert all(r.distribution == "tk-microtoolkit" and r.source == "entry point"
               for r in builtins)
    assert plugins.registry("heads").resolve("linear").owner == "heads"


def test_plugin_option_takes_a_module_name_or_a_py_path(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    mod = unique("dotted")
    write_module(tmp_path / "pkgroot", mod, backbone_plugin("dotted-net"))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgroot"))
    path = write_module(tmp_path / "loose", "loose_plugin", backbone_plugin("loose-net"))
    plugins = load_plugins([mod, str(path)], env=NO_ENV)
    reg = plugins.registry("backbones")
    assert reg.resolve("dotted-net").owner == mod
    assert reg.resolve("loose-net").owner == "loose_plugin"
    assert plugins.records[mod].source == plugins.records["loose_plugin"].source == "--plugin"


def test_tk_plugins_env_loads_modules_after_entry_points_and_before_plugin_option(
        site: Path) -> None:
    a, b, c, d = (unique(x) for x in "abcd")
    install_dist(site, "tk-ordered", "0.1", {"from-ep": a}, {a: backbone_plugin("net-a")})
    for mod in (b, c, d):
        write_module(site, mod, backbone_plugin(f"net-{mod}"))
    plugins = load_plugins([d], env={"TK_PLUGINS": f"{b}, {c}"})
    order = list(third_party(plugins))
    assert order == ["from-ep", b, c, d]
    assert [plugins.records[m].source for m in (b, c, d)] == ["TK_PLUGINS", "TK_PLUGINS",
                                                             "--plugin"]


def test_tk_load_plugins_selects_distributions_and_keeps_builtins(site: Path) -> None:
    one, two = unique("one"), unique("two")
    install_dist(site, "tk-first-dist", "1.0", {"first": one}, {one: backbone_plugin("n1")})
    install_dist(site, "tk-second-dist", "1.0", {"second": two}, {two: backbone_plugin("n2")})
    by_entry_point = load_plugins(env={"TK_LOAD_PLUGINS": "first"})
    assert list(third_party(by_entry_point)) == ["first"]
    by_distribution = load_plugins(env={"TK_LOAD_PLUGINS": "tk_second_dist"})  # normalised
    assert list(third_party(by_distribution)) == ["second"]
    builtins_only = load_plugins(env={"TK_LOAD_PLUGINS": ""})
    assert third_party(builtins_only) == {}
    assert "linear" in builtins_only.registry("heads")
    everything = load_plugins(env=NO_ENV)
    assert {"first", "second"} <= set(third_party(everything))


def test_tk_disable_plugins_skips_before_import(site: Path, tmp_path: Path) -> None:
    marker = tmp_path / "imported.txt"
    noisy = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    ep_mod, dist_mod, opt_mod = unique("by_ep"), unique("by_dist"), unique("by_opt")
    install_dist(site, "tk-noisy-a", "1.0", {"noisy-a": ep_mod},
                 {ep_mod: backbone_plugin("na") + noisy})
    install_dist(site, "tk-noisy-b", "1.0", {"noisy-b": dist_mod},
                 {dist_mod: backbone_plugin("nb") + noisy})
    write_module(site, opt_mod, backbone_plugin("nc") + noisy)
    plugins = load_plugins([opt_mod], env={"TK_DISABLE_PLUGINS": f"noisy-a,tk-noisy-b,{opt_mod}"
                                                                  ",timm,torchvision"})
    assert third_party(plugins) == {}
    assert not marker.exists()  # none of the three modules was even imported
    assert not {ep_mod, dist_mod, opt_mod} & set(sys.modules)
    assert load_plugins([opt_mod], env=NO_ENV).registry("backbones").resolve("nc")
    assert marker.read_text().split() == [ep_mod, dist_mod, opt_mod]


def test_disabling_a_builtin_removes_its_components() -> None:
    plugins = load_plugins(env={"TK_DISABLE_PLUGINS": "heads"})
    assert "heads" not in plugins.records
    with pytest.raises(UnknownNameError):
        plugins.registry("heads").resolve("linear")


# -- a broken plugin does not break tk -----------------------------------------------------
def test_plugin_raising_on_import_is_recorded_and_the_rest_works(site: Path) -> None:
    bad, good = unique("bad"), unique("good")
    install_dist(site, "tk-bad", "0.1", {"bad": bad},
                 {bad: "raise RuntimeError('cannot start: missing licence key')\n"})
    install_dist(site, "tk-good", "0.1", {"good": good}, {good: backbone_plugin("good-net")})
    plugins = load_plugins(env=NO_ENV)
    assert plugins.records["bad"].error == (
        "import: RuntimeError: cannot start: missing licence key")
    assert [r.name for r in plugins.errors() if not r.builtin] == ["bad"]
    assert plugins.registry("backbones").resolve("good-net").owner == "good"
    assert plugins.registry("heads").resolve("linear")


def test_plugin_calling_sys_exit_on_import_is_recorded(tmp_path: Path) -> None:
    path = write_module(tmp_path, "exits", "import sys\nsys.exit(3)\n")
    plugins = load_plugins([str(path)], env=NO_ENV)
    assert plugins.records["exits"].error == "import: SystemExit: 3"


def test_plugin_raising_in_registration_loses_that_hook_only(site: Path) -> None:
    mod = unique("halfway")
    source = backbone_plugin("early-net", extra="""
        @hookimpl
        def tk_register_heads(register):
            register("half-head", factory)
            raise ValueError("head table is corrupt")
        """)
    install_dist(site, "tk-halfway", "0.1", {"halfway": mod}, {mod: source})
    plugins = load_plugins(env=NO_ENV)
    heads = plugins.registry("heads")
    record = plugins.records["halfway"]
    assert record.error is None
    assert record.problems == ["tk_register_heads raised ValueError: head table is corrupt"]
    assert heads.resolve("linear").owner == "heads"
    assert "half-head" not in heads  # what the failing hook registered before raising
    assert plugins.registry("backbones").resolve("early-net").owner == "halfway"


def test_plugin_with_a_misspelt_hook_argument_gets_did_you_mean(tmp_path: Path) -> None:
    path = write_module(tmp_path, "typo", textwrap.dedent("""
        from toolkit.plugin.hookspecs import hookimpl

        @hookimpl
        def tk_register_backbones(registr):
            registr("x", print)

        @hookimpl
        def tk_register_heads(register):
            register("typo-head", print)
        """))
    plugins = load_plugins([str(path)], env=NO_ENV)
    record = plugins.records["typo"]
    assert record.error is None and record.hooks == ["tk_register_heads"]
    assert record.problems == ["tk_register_backbones has no parameter 'registr' (did you "
                               "mean 'register'?) (it takes register)"]
    assert plugins.registry("heads").resolve("typo-head").owner == "typo"


def test_plugin_with_a_misspelt_hook_name_is_reported_not_ignored(tmp_path: Path) -> None:
    path = write_module(tmp_path, "misspelt", textwrap.dedent("""
        from toolkit.plugin.hookspecs import hookimpl

        @hookimpl
        def tk_register_backbone(register):
            register("never-seen", print)

        @hookimpl
        def tk_register_heads(register):
            register("seen-head", print)
        """))
    plugins = load_plugins([str(path)], env=LIGHT)
    assert plugins.records["misspelt"].problems == [
        "tk_register_backbone is not a tk hook (did you mean tk_register_backbones?)"]
    assert plugins.registry("heads").resolve("seen-head").owner == "misspelt"  # kept
    with pytest.raises(UnknownNameError) as err:
        plugins.registry("backbones").resolve("never-seen")
    assert str(err.value).endswith(
        "; note: plugin 'misspelt' (--plugin " + str(path) + ") has a problem: "
        "tk_register_backbone is not a tk hook (did you mean tk_register_backbones?) "
        "(see `tk plugins`)")
    with pytest.raises(PluginError, match=r"^plugin 'misspelt': tk_register_backbone is not"):
        load_plugins([str(path)], env={**LIGHT, "TK_STRICT_PLUGINS": "1"})


def test_a_function_named_like_a_hook_without_hookimpl_is_a_problem(tmp_path: Path) -> None:
    path = write_module(tmp_path, "unmarked", textwrap.dedent("""
        from toolkit.plugin.hookspecs import hookimpl

        def tk_register_heads(register):
            register("never-registered", print)

        def tk_helper_for_tests():  # not named like a hook: fine
            pass

        @hookimpl
        def tk_register_losses(register):
            register("marked-loss", print)
        """))
    plugins = load_plugins([str(path)], env=LIGHT)
    record = plugins.records["unmarked"]
    assert record.hooks == ["tk_register_losses"] and record.error is None
    assert record.problems == ["tk_register_heads is named like a hook but not marked with "
                               "@hookimpl, so it would never be called"]
    with pytest.raises(PluginError, match="not marked with @hookimpl"):
        load_plugins([str(path)], env={**LIGHT, "TK_STRICT_PLUGINS": "yes"})


def test_strict_makes_an_import_failure_fatal_naming_the_plugin(site: Path) -> None:
    mod = unique("fatal")
    install_dist(site, "tk-fatal", "0.1", {"fatal": mod}, {mod: "import no_such_module_xyz\n"})
    with pytest.raises(PluginError, match=r"^plugin 'fatal' failed to import: "
                                          r"ModuleNotFoundError: .*no_such_module_xyz"):
        load_plugins(env={"TK_STRICT_PLUGINS": "1"})
    assert load_plugins(env={"TK_STRICT_PLUGINS": "0"}).records["fatal"].error


def test_strict_makes_a_registration_failure_fatal_naming_the_plugin(tmp_path: Path) -> None:
    path = write_module(tmp_path, "fails_late", textwrap.dedent("""
        from toolkit.plugin.hookspecs import hookimpl

        @hookimpl
        def tk_register_losses(register):
            raise KeyError("oops")
        """))
    plugins = load_plugins([str(path)], env={"TK_STRICT_PLUGINS": "true"})
    with pytest.raises(PluginError, match="^plugin 'fails_late': tk_register_losses raised "
                                          "KeyError: 'oops'"):
        plugins.registry("losses")


def test_two_plugins_with_the_same_name_keep_the_first_and_report_the_second(
        site: Path) -> None:
    first, second = unique("first"), unique("second")
    install_dist(site, "tk-a-same", "1.0", {"same": first}, {first: backbone_plugin("s1")})
    install_dist(site, "tk-b-same", "1.0", {"same": second}, {second: backbone_plugin("s2")})
    plugins = load_plugins(env=NO_ENV)
    same = [r for r in plugins.records.values() if r.name == "same"]
    assert [r.module for r in same] == [first, second]
    assert same[0].error is None
    assert "two plugins are named 'same'" in same[1].error
    assert first in same[1].error and second in same[1].error
    assert plugins.registry("backbones").resolve("s1").owner == "same"
    with pytest.raises(PluginError, match="two plugins are named 'same'"):
        load_plugins(env={"TK_STRICT_PLUGINS": "1"})


def test_installed_plugin_also_given_with_plugin_option_loads_once(site: Path) -> None:
    mod = unique("twice")
    install_dist(site, "tk-twice", "1.0", {"twice": mod}, {mod: backbone_plugin("once-net")})
    plugins = load_plugins([mod], env={"TK_PLUGINS": mod, **NO_ENV})
    assert [r.name for r in third_party(plugins).values()] == ["twice"]
    assert not [r for r in plugins.errors() if not r.builtin]
    assert len(plugins.registry("backbones").list("once-net")) == 1


# -- names: ownership, clashes, did-you-mean, listing ----------------------------------------
@pytest.fixture
def clash(tmp_path: Path) -> Any:
    """Two plugins registering backbone 'twin-net' (and one name each of their own)."""
    alpha = write_module(tmp_path, "alpha", backbone_plugin("twin-net", extra="""
        @hookimpl
        def tk_register_heads(register):
            register("alpha-head", factory)
        """))
    beta = write_module(tmp_path, "beta", backbone_plugin("twin-net"))
    return load_plugins([str(alpha), str(beta)], env=LIGHT)


def test_duplicate_name_is_an_error_naming_both_owners(clash: Any) -> None:
    reg = clash.registry("backbones")
    with pytest.raises(AmbiguousNameError) as err:
        reg.resolve("twin-net")
    message = str(err.value)
    assert "'alpha'" in message and "'beta'" in message
    assert "alpha:twin-net" in message and "beta:twin-net" in message
    assert reg.conflicts() == {"twin-net": ["alpha", "beta"]}
    assert "twin-net" not in reg


def test_plugin_colon_name_picks_one(clash: Any) -> None:
    reg = clash.registry("backbones")
    assert reg.resolve("alpha:twin-net").factory() == "built by tk_plugin_alpha"
    assert reg.resolve("beta:twin-net").factory() == "built by tk_plugin_beta"
    assert reg.build("beta:twin-net", False) == "built by tk_plugin_beta"


def test_fallback_registration_yields_the_bare_name(tmp_path: Path) -> None:
    primary = write_module(tmp_path, "primary", backbone_plugin("shared-net"))
    spare = write_module(tmp_path, "spare", backbone_plugin("shared-net", fallback=True))
    plugins = load_plugins([str(spare), str(primary)], env=LIGHT)
    reg = plugins.registry("backbones")
    assert reg.resolve("shared-net").owner == "primary"
    assert reg.resolve("spare:shared-net").owner == "spare"
    assert reg.conflicts() == {}
    only_spare = load_plugins([str(spare)], env=LIGHT)
    assert only_spare.registry("backbones").resolve("shared-net").owner == "spare"


def test_unknown_names_get_did_you_mean(clash: Any) -> None:
    reg = clash.registry("backbones")
    with pytest.raises(UnknownNameError, match=r"unknown backbone 'twin-nett'; did you mean "
                                               r"'twin-net'\? \(see `tk list backbones`\)"):
        reg.resolve("twin-nett")
    with pytest.raises(UnknownNameError, match=r"unknown plugin 'alpah'.*did you mean 'alpha'"):
        reg.resolve("alpah:twin-net")
    with pytest.raises(UnknownNameError, match=r"plugin 'beta' has no backbone 'twinnet'.*"
                                               r"did you mean 'twin-net'"):
        reg.resolve("beta:twinnet")
    with pytest.raises(UnknownNameError) as err:
        reg.resolve("zzzzzz")
    assert "did you mean" not in str(err.value)
    with pytest.raises(UnknownNameError, match="did you mean 'alpha-head'"):
        clash.registry("heads").resolve("alpha_head")


def test_listing_matches_fnmatch_patterns_on_bare_and_qualified_names() -> None:
    reg = Registry("backbones")
    for owner, name in [("tv", "resnet18"), ("tv", "resnet50"), ("timm", "resnet18"),
                        ("timm", "vit_base"), ("tv", "alexnet")]:
        reg.register(owner, name, print)
    names = lambda pattern: [c.qualified_name for c in reg.list(pattern)]  # noqa: E731
    assert names("resnet*") == ["timm:resnet18", "tv:resnet18", "tv:resnet50"]
    assert names("timm:*") == ["timm:resnet18", "timm:vit_base"]
    assert names("*net?8") == ["timm:resnet18", "tv:resnet18"]
    assert names("alex*") == ["tv:alexnet"]
    assert names("nothing*") == []
    assert len(names(None)) == len(reg) == 5


@pytest.mark.parametrize(("name", "factory", "info", "problem"), [
    ("bad:name", print, {}, "invalid backbone name"),
    ("", print, {}, "invalid backbone name"),
    ("no-factory", 42, {}, "without a factory"),
    ("lr-text", print, {"default_lr": "fast"}, "default_lr='fast': expected a positive number"),
    ("lr-zero", print, {"default_lr": 0}, "default_lr=0: expected a positive number"),
])
def test_bad_registrations_are_reported_against_the_plugin(tmp_path: Path, name: str,
                                                           factory: Any, info: dict[str, Any],
                                                           problem: str) -> None:
    plugin = type("Plugin", (), {})()
    plugin.tk_register_backbones = hookspecs.hookimpl(
        lambda register: (register(name, factory, **info), register("fine", print)))
    plugins = fresh_plugins(("sloppy", plugin), builtins=False, strict=False)
    assert [c.name for c in plugins.registry("backbones").list()] == ["fine"]
    [reported] = plugins.records["sloppy"].problems
    assert problem in reported and "sloppy" in reported


def test_same_plugin_registering_a_name_twice_is_reported(tmp_path: Path) -> None:
    path = write_module(tmp_path, "stutter", backbone_plugin("again", extra="""
        @hookimpl
        def tk_register_datasets(register):
            register("d", factory)
            register("d", factory)
        """))
    plugins = load_plugins([str(path)], env={"TK_LOAD_PLUGINS": ""})
    plugins.registry("datasets")
    assert plugins.records["stutter"].problems == [
        "plugin 'stutter' registered dataset 'd' twice"]


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(PluginError, match="unknown component kind 'models'"):
        fresh_plugins(builtins=False).registry("models")


# -- every hook is called by the core --------------------------------------------------------
class Recorder:
    """A plugin implementing one hook and recording its calls."""

    def __init__(self, hook: str, argnames: list[str]):
        self.calls: list[dict[str, Any]] = []

        def impl(**kwargs: Any) -> None:
            self.calls.append(kwargs)
            if "register" in kwargs:
                kwargs["register"](f"rec-{hook}", lambda *a, **k: (a, k), description="rec")
            if "cli" in kwargs:
                kwargs["cli"].add_command(click.Command("rec-command", callback=lambda: None))

        # pluggy reads the argument names from the signature: build one with exactly those
        namespace: dict[str, Any] = {"impl": impl}
        exec(f"def {hook}({', '.join(argnames)}):\n"
             f"    impl({', '.join(f'{a}={a}' for a in argnames)})", namespace)
        setattr(self, hook, hookspecs.hookimpl(namespace[hook]))


def spec_args(hook: str) -> list[str]:
    import inspect

    return list(inspect.signature(getattr(hookspecs, hook)).parameters)


def call_hook_like_the_core(plugins: Any, hook: str) -> Any:
    """How the core calls each hook: registration hooks when a registry is built, commands
    when the CLI is assembled, lifecycle hooks through ``notify``."""
    if hook.startswith("tk_register_") and hook[len("tk_register_"):] in KINDS:
        return plugins.registry(hook[len("tk_register_"):])
    if hook == "tk_register_commands":
        group = click.Group("tk")
        plugins.add_commands(group)
        return group
    lifecycle = {
        "tk_train_start": {"config": {"backbone": "x", "epochs": 1}},
        "tk_epoch_end": {"epoch": 1, "metrics": {"val_acc": 0.5}},
        "tk_model_saved": {"name": "m", "path": "/tmp/m.safetensors", "metadata": {},
                           "artifacts": {"curves": "/tmp/curves.png"}},
        "tk_train_end": {"name": "m", "status": "finished"},
    }
    if hook in lifecycle:
        plugins.notify(hook, **lifecycle[hook])
        return lifecycle[hook]
    if hook == "tk_dataset_for_path":
        plugins.dataset_for_path("/data/manifest.json")
        return {"path": "/data/manifest.json"}
    raise AssertionError(f"no test knows how the core calls {hook}: add it here and to "
                         "docs/plugins.md")


@pytest.mark.parametrize("hook", HOOKS)
def test_the_core_calls_every_hook(hook: str) -> None:
    recorder = Recorder(hook, spec_args(hook))
    plugins = fresh_plugins(("recorder", recorder), builtins=False)
    assert plugins.records["recorder"].hooks == [hook]
    result = call_hook_like_the_core(plugins, hook)
    assert len(recorder.calls) == 1 and sorted(recorder.calls[0]) == sorted(spec_args(hook))
    if isinstance(result, Registry):
        assert result.resolve(f"rec-{hook}").owner == "recorder"
    elif isinstance(result, click.Group):
        assert "rec-command" in result.commands
    else:
        assert recorder.calls[0] == result


def test_hookspecs_are_documented_in_their_docstrings() -> None:
    for hook in HOOKS:
        assert len((getattr(hookspecs, hook).__doc__ or "").split()) >= 10, hook


def test_a_failing_observer_warns_and_training_goes_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_module(tmp_path, "grumpy", textwrap.dedent("""
        from toolkit.plugin.hookspecs import hookimpl

        @hookimpl
        def tk_epoch_end(epoch, metrics):
            raise OSError("disk full")
        """))
    plugins = load_plugins([str(path)], env={"TK_LOAD_PLUGINS": ""})
    plugins.notify("tk_epoch_end", epoch=2, metrics={})
    assert capsys.readouterr().err == (f"tk: warning: plugin 'grumpy' (--plugin {path}) failed "
                                       "in tk_epoch_end: OSError: disk full\n")
    strict = load_plugins([str(path)], env={"TK_LOAD_PLUGINS": "", "TK_STRICT_PLUGINS": "1"})
    with pytest.raises(PluginBugError, match=r"plugin 'grumpy' \(--plugin .*\) raised "
                                             r"OSError: disk full in tk_epoch_end") as err:
        strict.notify("tk_epoch_end", epoch=2, metrics={})
    assert err.value.exit_code == 1


def test_a_plugin_command_that_fails_to_register_is_reported(tmp_path: Path) -> None:
    path = write_module(tmp_path, "nocmd", textwrap.dedent("""
        from toolkit.plugin.hookspecs import hookimpl

        @hookimpl
        def tk_register_commands(cli):
            cli.add_command(None)
        """))
    plugins = load_plugins([str(path)], env={"TK_LOAD_PLUGINS": ""})
    group = click.Group("tk")
    plugins.add_commands(group)
    assert plugins.records["nocmd"].problems[0].startswith("tk_register_commands raised ")
    assert group.commands == {}


def test_a_plugin_cannot_replace_an_existing_command(tmp_path: Path) -> None:
    path = write_module(tmp_path, "usurper", textwrap.dedent("""
        import click
        from toolkit.plugin.hookspecs import hookimpl

        @hookimpl
        def tk_register_commands(cli):
            cli.add_command(click.Command("list", callback=lambda: print("hijacked")))
            cli.add_command(click.Command("usurp", callback=lambda: None))
        """))
    plugins = load_plugins([str(path)], env=LIGHT)
    original = click.Command("list")
    group = click.Group("tk", commands=[original])
    plugins.add_commands(group)
    assert group.commands["list"] is original
    assert "usurp" in group.commands  # its other command is fine
    assert plugins.records["usurper"].problems == [
        "command 'list' exists already; choose another name"]
    env = isolated_env(tmp_path, {"TK_DISABLE_PLUGINS": "timm,torchvision"})
    help_ = tk("--plugin", str(path), "--help", env=env, cwd=tmp_path)
    assert help_.returncode == 0 and "usurp" in help_.stdout
    assert "List registered components" in help_.stdout  # tk's own `list`
    shown = tk("--plugin", str(path), "plugins", env=env, cwd=tmp_path)
    assert "    problem: command 'list' exists already; choose another name" in shown.stdout


def test_tk_plugins_reports_failures_inside_registration_hooks(tmp_path: Path) -> None:
    path = write_module(tmp_path, "lazy_fail", textwrap.dedent("""
        from toolkit.plugin.hookspecs import hookimpl

        @hookimpl
        def tk_register_heads(register):
            register("fine-head", print)

        @hookimpl
        def tk_register_optimizers(register):
            raise ValueError("optimizer table is corrupt")
        """))
    plugins = load_plugins([str(path)], env=LIGHT)
    assert plugins.records["lazy_fail"].problems == []  # imported fine; hooks not run yet
    plugins.check()
    problem = "tk_register_optimizers raised ValueError: optimizer table is corrupt"
    assert plugins.records["lazy_fail"].problems == [problem]
    assert plugins.registry("heads").resolve("fine-head").owner == "lazy_fail"

    env = isolated_env(tmp_path)
    shown = tk("--plugin", str(path), "plugins", "--json", env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert [(r["name"], r["error"], r["problems"]) for r in json.loads(shown.stdout)] == [
        ("lazy_fail", None, [problem])]
    strict = tk("--plugin", str(path), "plugins", env={**env, "TK_STRICT_PLUGINS": "1"},
                cwd=tmp_path)
    assert strict.returncode == 2 and strict.stderr.strip() == (
        f"tk: error: plugin 'lazy_fail': {problem} (TK_STRICT_PLUGINS=1)")


# -- the CLI, in a subprocess ----------------------------------------------------------------
def tk(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


CHECK_IMPORTS = """
import sys
from toolkit.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("HEAVY=" + ",".join(m for m in MODULES if m in sys.modules), file=sys.stderr)
sys.exit(code)
""".replace("MODULES", repr(HEAVY))


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["plugins", "--all", "--json"],
                                  ["--version"]])
def test_help_and_plugins_do_not_import_torch(tmp_path: Path, args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK_IMPORTS, *args], cwd=tmp_path,
                          env=isolated_env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "HEAVY="


def test_plugin_option_backbone_shows_in_tk_list_and_clash_names_both(tmp_path: Path) -> None:
    alpha = write_module(tmp_path, "alpha", backbone_plugin("twin-net"))
    beta = write_module(tmp_path, "beta", backbone_plugin("twin-net"))
    env = isolated_env(tmp_path, {"TK_DISABLE_PLUGINS": "timm,torchvision"})
    one = tk("--plugin", str(alpha), "list", "backbones", "twin*", env=env, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert one.stdout.split() == ["twin-net", "alpha", "from", "tk_plugin_alpha"]
    both = tk("--plugin", str(alpha), "--plugin", str(beta), "list", "backbones", "--json",
              env=env, cwd=tmp_path)
    assert both.returncode == 0, both.stderr
    listed = [(c["name"], c["plugin"]) for c in json.loads(both.stdout)]
    assert listed == [("twin-net", "alpha"), ("twin-net", "beta")]
    assert "'twin-net' is registered by 'alpha' and 'beta'" in both.stderr
    plugins = tk("--plugin", str(alpha), "plugins", env=env, cwd=tmp_path)
    assert plugins.stdout.splitlines()[:2] == [f"alpha  (--plugin: {alpha})",
                                               "    hooks: tk_register_backbones"]


# -- installed packages (real wheels) --------------------------------------------------------
@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Wheels of tests/plugin_packages/*, each pip-installed into its own target directory
    (a site-packages to put on PYTHONPATH): {"tk-broken-plugin": dir, ...}."""
    base = tmp_path_factory.mktemp("plugin-wheels")
    sources = []
    for pkg in sorted(PACKAGES.iterdir()):
        if (pkg / "pyproject.toml").is_file():  # build from a copy: keep the tree clean
            shutil.copytree(pkg, base / "src" / pkg.name,
                            ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
            sources.append(str(base / "src" / pkg.name))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(base / "dist"), *sources], check=True, capture_output=True)
    out = {}
    for pkg in sources:
        name = Path(pkg).name
        wheel = next((base / "dist").glob(f"{name.replace('-', '_')}-*.whl"))
        subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target",
                        str(base / name), str(wheel)], check=True, capture_output=True)
        out[name] = base / name
    return out


def env_with(installed: dict[str, Path], *names: str, home: Path,
             **extra: str) -> dict[str, str]:
    paths = [str(installed[n]) for n in names]
    return isolated_env(home, {"PYTHONPATH": ":".join(paths),
                               "TK_DISABLE_PLUGINS": "timm,torchvision", **extra})


def test_broken_plugin_is_reported_and_tk_keeps_working(installed: dict[str, Path],
                                                         tmp_path: Path) -> None:
    env = env_with(installed, "tk-broken-plugin", home=tmp_path)
    error = "import: RuntimeError: tk-broken-plugin always fails on import"
    help_ = tk("--help", env=env, cwd=tmp_path)
    assert help_.returncode == 0 and "finetune" in help_.stdout, help_.stderr
    listing = tk("list", "heads", env=env, cwd=tmp_path)
    assert listing.returncode == 0 and "linear" in listing.stdout
    assert f"plugin 'broken' not loaded: {error}" in listing.stderr
    shown = tk("plugins", env=env, cwd=tmp_path)
    assert shown.returncode == 0
    assert shown.stdout.splitlines() == [
        "broken 0.0.1  (tk-broken-plugin: tk_broken_plugin)", f"    error: {error}"]
    as_json = json.loads(tk("plugins", "--json", env=env, cwd=tmp_path).stdout)
    assert [(p["name"], p["distribution"], p["version"], p["error"]) for p in as_json] == [
        ("broken", "tk-broken-plugin", "0.0.1", error)]
    assert "Traceback" not in help_.stderr + listing.stderr + shown.stderr


@pytest.mark.parametrize("disable", ["broken", "tk-broken-plugin", "tk_broken_plugin"])
def test_disabling_the_broken_plugin_silences_it(installed: dict[str, Path], tmp_path: Path,
                                                 disable: str) -> None:
    env = env_with(installed, "tk-broken-plugin", home=tmp_path,
                   TK_DISABLE_PLUGINS=f"timm,torchvision,{disable}")
    listing = tk("list", "heads", env=env, cwd=tmp_path)
    assert listing.returncode == 0 and listing.stderr == ""
    shown = tk("plugins", "--json", env=env, cwd=tmp_path)
    assert json.loads(shown.stdout) == []


def test_strict_makes_the_broken_plugin_fatal_naming_it(installed: dict[str, Path],
                                                        tmp_path: Path) -> None:
    env = env_with(installed, "tk-broken-plugin", home=tmp_path, TK_STRICT_PLUGINS="1")
    for args in (["list", "heads"], ["plugins"]):
        proc = tk(*args, env=env, cwd=tmp_path)
        assert proc.returncode == 2
        assert proc.stderr.strip() == (
            "tk: error: plugin 'broken' failed to import: "
            "RuntimeError: tk-broken-plugin always fails on import")


def test_two_installed_plugins_clash_and_plugin_name_picks_one(installed: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """With the broken plugin installed too: tk finetune still trains."""
    env = env_with(installed, "tk-clash-alpha", "tk-clash-beta", "tk-broken-plugin",
                   home=tmp_path)
    listing = tk("list", "backbones", "twin-net", "--json", env=env, cwd=tmp_path)
    assert [(c["name"], c["plugin"]) for c in json.loads(listing.stdout)] == [
        ("twin-net", "alpha"), ("twin-net", "beta")]
    assert "backbone 'twin-net' is registered by 'alpha' and 'beta'" in listing.stderr

    data = make_image_folder(tmp_path / "data", ["cats", "dogs"], per_class=5, size=32)
    common = ["--classes", "2", "--data", str(data), "--epochs", "1", "--batch-size", "4",
              "--no-pretrained", "--device", "cpu", "--workers", "0",
              "--store", str(tmp_path / "store")]
    ambiguous = tk("finetune", "--backbone", "twin-net", *common, env=env, cwd=tmp_path)
    assert ambiguous.returncode == 2
    last = ambiguous.stderr.strip().splitlines()[-1]
    assert last.startswith("tk: error: backbone 'twin-net' is registered by several plugins")
    assert "'alpha:twin-net'" in last and "'beta:twin-net'" in last

    picked = tk("finetune", "--backbone", "beta:twin-net", "--name", "picked", *common,
                env=env, cwd=tmp_path)
    assert picked.returncode == 0, picked.stderr
    shown = tk("store", "show", "picked", "--json", "--store", str(tmp_path / "store"),
               env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert '"beta:twin-net"' in shown.stdout
    assert '"alpha:twin-net"' not in shown.stdout


# -- what a plugin author meets (issue 13), through installed wheels ------------------------
TRAIN = ["--epochs", "1", "--batch-size", "4", "--no-pretrained", "--device", "cpu",
         "--workers", "0", "-q"]


def write_manifest(root: Path, name: str = "m.json") -> Path:
    """Two classes of real images listed in acme's JSON manifest format."""
    make_image_folder(root / "images", ["cat", "dog"], per_class=4, size=32)
    images = [{"path": p.relative_to(root).as_posix(), "label": p.parent.name}
              for p in sorted((root / "images").rglob("*.png"))]
    manifest = root / name
    manifest.write_text(json.dumps({"images": images}), encoding="utf-8")
    return manifest


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def test_acme_trains_from_a_json_manifest_its_hook_claims(installed: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """Items 1, 2 (observer), 5, 7, 8 in one run: ``--data m.json`` reaches the plugin that
    claims ``.json``; ``--lr`` left out takes the optimizer's default_lr; the observer sees
    documented metric types; a failing observer warns, naming the distribution; the model
    records where each component came from."""
    manifest = write_manifest(tmp_path / "data")
    journal = tmp_path / "journal.jsonl"
    store = tmp_path / "store"
    env = env_with(installed, "tk-plugin-acme", home=tmp_path, ACME_JOURNAL=str(journal),
                   ACME_FAIL_SAVED="1")
    proc = tk("finetune", "--backbone", "acme-tinycnn", "--data", str(manifest),
              "--optimizer", "acme-sgd", "--classes", "2", "--name", "acme-m",
              "--store", str(store), *TRAIN, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ("tk: warning: plugin 'acme' (tk-plugin-acme 0.3.1) failed in tk_model_saved: "
            "OSError: cannot upload acme-m: no network") in proc.stderr.splitlines()
    meta = json.loads(tk("store", "show", "acme-m", "--json", "--store", str(store),
                         env=env, cwd=tmp_path).stdout)
    assert meta["training"]["dataset"] == "acme:acme-json"
    assert meta["training"]["dataset_options"]["path"] == str(manifest.resolve())
    assert meta["classes"] == ["cat", "dog"]
    assert meta["training"]["lr"] == 0.05  # acme-sgd's default_lr
    acme = {"plugin": "acme", "distribution": "tk-plugin-acme", "version": "0.3.1"}
    assert {k: meta["components"]["backbone"][k] for k in (*acme, "name")} == {
        **acme, "name": "acme:acme-tinycnn"}
    assert meta["components"]["optimizer"]["name"] == "acme:acme-sgd"
    assert meta["components"]["head"]["distribution"] == "tk-microtoolkit"

    [event] = [json.loads(line) for line in journal.read_text().splitlines()]
    from typing import get_type_hints

    from toolkit.plugin.hookspecs import EpochMetrics

    documented = {k: t.__name__ for k, t in get_type_hints(EpochMetrics).items()}
    assert event["epoch"] == event["metrics"]["epoch"] == 1
    # 2 classes: no top-5; single-label, no --ema: none of the multi-label or EMA keys
    assert set(event["metrics"]) == set(documented) - {
        "val_top5", "val_map", "val_f1_micro", "val_f1_macro", "ema"}
    assert event["types"] == {k: documented[k] for k in event["metrics"]}

    # uninstalled: the model names the package to install and the version it was made with
    gone = env_with(installed, home=tmp_path)
    image = next((tmp_path / "data" / "images" / "cat").iterdir())
    infer = tk("infer", str(image), "--model", "acme-m", "--store", str(store), env=gone,
               cwd=tmp_path)
    assert infer.returncode == 2 and len(infer.stderr.strip().splitlines()) == 1
    assert infer.stderr.strip().endswith(
        "its backbone 'acme:acme-tinycnn' comes from tk-plugin-acme, which is not installed: "
        "pip install tk-plugin-acme (model made with 0.3.1)")
    shown = tk("store", "show", "acme-m", "--store", str(store), env=gone, cwd=tmp_path)
    [line] = [x for x in shown.stdout.splitlines() if x.startswith("components:")]
    assert line.startswith("components:  backbone acme:acme-tinycnn from tk-plugin-acme 0.3.1 "
                           "(not installed); head heads:linear from tk-microtoolkit ")


def test_dataset_name_and_data_path_hand_the_path_to_that_dataset(
        installed: dict[str, Path], tmp_path: Path) -> None:
    """Item 1: ``--dataset NAME --data PATH`` gives PATH to NAME, whatever its extension
    (the classes in the message come from the manifest itself)."""
    listed = write_manifest(tmp_path / "data", "list.txt")
    env = env_with(installed, "tk-plugin-acme", home=tmp_path)
    proc = tk("finetune", "--backbone", "acme-tinycnn", "--dataset", "acme-json", "--data",
              str(listed), "--classes", "3", *TRAIN, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert last_line(proc) == "tk: error: --classes 3 but the data has 2 classes (cat, dog)"
    nobody = tk("finetune", "--backbone", "acme-tinycnn", "--data", str(listed), "--classes",
                "2", *TRAIN, env=env, cwd=tmp_path)
    assert nobody.returncode == 2 and "no loaded plugin reads a '.txt' file" in last_line(nobody)


@pytest.mark.parametrize(("args", "raised", "where"), [
    (["finetune", "--backbone", "boom-net", "--classes", "2", *TRAIN],
     "ValueError: intentional bug in boom_net", "in boom_net (tk_acme/nets.py:"),
    (["acme-hello", "--fail"], "KeyError: 'missing'", "in hello (tk_acme/plugin.py:"),
    (["finetune", "--backbone", "acme-tinycnn", "--data", "{crash}", "--classes", "2", *TRAIN],
     "RuntimeError: manifest sniffer crashed", "in tk_dataset_for_path("),
], ids=["factory", "command", "hook"])
def test_a_bug_in_plugin_code_names_the_plugin_and_its_distribution(
        installed: dict[str, Path], tmp_path: Path, args: list[str], raised: str,
        where: str) -> None:
    """Item 2: a plain exception from a factory, a command or a hook is one line naming the
    plugin, its distribution and version, exit 1 (a TkError from the same code is exit 2)."""
    crash = tmp_path / "list.crash"
    crash.write_text("{}", encoding="utf-8")
    env = env_with(installed, "tk-plugin-acme", home=tmp_path)
    proc = tk(*[a.format(crash=crash) for a in args], env=env, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    line = last_line(proc)
    assert line.startswith(f"tk: plugin error: plugin 'acme' (tk-plugin-acme 0.3.1) raised "
                           f"{raised} {where}"), line
    assert line.endswith("(a bug in the plugin, not in your input: report it to its authors; "
                         "TK_DEBUG=1 shows the traceback)")
    loud = tk(*[a.format(crash=crash) for a in args], env={**env, "TK_DEBUG": "1"},
              cwd=tmp_path)
    assert loud.returncode == 1 and "Traceback (most recent call last)" in loud.stderr
    assert raised.split(":")[0] in loud.stderr and "PluginBugError" in loud.stderr


def test_optimizer_default_lr_shows_in_tk_list(installed: dict[str, Path],
                                               tmp_path: Path) -> None:
    """Item 8: ``register(..., default_lr=...)`` is listed (the built-ins state theirs)."""
    env = env_with(installed, "tk-plugin-acme", home=tmp_path)
    listing = tk("list", "optimizers", env=env, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()}
    assert rows["acme-sgd"].split(None, 2)[1:] == ["acme", "SGD with momentum [default lr 0.05]"]
    assert rows["adamw"].endswith("[default lr 0.001] [default]")
    as_json = json.loads(tk("list", "optimizers", "acme:*", "--json", env=env,
                            cwd=tmp_path).stdout)
    assert as_json == [{"name": "acme-sgd", "plugin": "acme", "default_lr": 0.05,
                        "description": "SGD with momentum"}]


def test_sloppy_plugin_keeps_its_good_hook_and_reports_the_others(
        installed: dict[str, Path], tmp_path: Path) -> None:
    """Items 3, 4, 10: a misspelt hook argument gets a did-you-mean; a hook-named function
    without @hookimpl is reported (fatal under TK_STRICT_PLUGINS); the plugin's other hook
    still works; an unknown name mentions the plugins with problems or load failures."""
    env = env_with(installed, "tk-plugin-sloppy", "tk-broken-plugin", home=tmp_path)
    shown = tk("plugins", env=env, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.splitlines()
    sloppy = text.index("sloppy 1.0.0  (tk-plugin-sloppy: tk_sloppy)")
    assert text[sloppy + 1:sloppy + 4] == [
        "    hooks: tk_register_losses",
        "    problem: tk_register_backbones has no parameter 'registr' (did you mean "
        "'register'?) (it takes register)",
        "    problem: tk_register_heads is named like a hook but not marked with @hookimpl, "
        "so it would never be called"]
    losses = tk("list", "losses", "sloppy*", env=env, cwd=tmp_path)
    assert losses.stdout.split()[:2] == ["sloppy-loss", "sloppy"]

    unknown = tk("finetune", "--backbone", "sloppy-net", "--classes", "2", *TRAIN, env=env,
                 cwd=tmp_path)
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1
    assert last_line(unknown) == (
        "tk: error: unknown backbone 'sloppy-net' (see `tk list backbones`); note: plugin "
        "'broken' (tk-broken-plugin 0.0.1) failed to load (import: RuntimeError: "
        "tk-broken-plugin always fails on import); plugin 'sloppy' (tk-plugin-sloppy 1.0.0) "
        "has a problem: tk_register_backbones has no parameter 'registr' (did you mean "
        "'register'?) (it takes register) (see `tk plugins`)")

    strict = tk("plugins", env={**env_with(installed, "tk-plugin-sloppy", home=tmp_path),
                                "TK_STRICT_PLUGINS": "1"}, cwd=tmp_path)
    assert strict.returncode == 2 and strict.stderr.strip() == (
        "tk: error: plugin 'sloppy': tk_register_backbones has no parameter 'registr' (did "
        "you mean 'register'?) (it takes register) (TK_STRICT_PLUGINS=1)")


def test_pretrained_weights_a_plugin_ships_are_not_claimed_as_a_download(
        installed: dict[str, Path], tmp_path: Path) -> None:
    """Item 9: the one resolver says what was tried; a plugin without a URL never claims a
    download."""
    env = env_with(installed, "tk-plugin-acme", home=tmp_path)
    proc = tk("finetune", "--backbone", "acme-tinycnn", "--data", str(write_manifest(tmp_path)),
              "--classes", "2", "--epochs", "1", "--device", "cpu", env=env, cwd=tmp_path)
    assert proc.returncode == 2
    line = last_line(proc)
    shipped = installed["tk-plugin-acme"] / "tk_acme" / "weights" / "acme-tinycnn.safetensors"
    assert line == (
        "tk: error: pretrained weights for 'acme:acme-tinycnn' (acme-tinycnn.safetensors) not "
        f"found: tried the weights shipped with tk-plugin-acme {shipped}: not there; run "
        "`tk store import-weights acme:acme-tinycnn FILE` (or pass --weights FILE, or "
        "--no-pretrained for random weights)")
    assert "download" not in line


def test_a_plugin_that_hangs_on_import_does_not_hang_tk(tmp_path: Path) -> None:
    """Issue 12 item 9: the import is given up after TK_PLUGIN_IMPORT_TIMEOUT seconds with
    a line naming the plugin; ``tk --help`` and ``tk plugins`` finish (the subprocess
    timeout turns a hang into a failure)."""
    sleepy = write_module(tmp_path, "sleepy", "import time\ntime.sleep(600)\n")
    env = isolated_env(tmp_path, {"TK_PLUGIN_IMPORT_TIMEOUT": "2", **NO_ENV})
    help_ = subprocess.run([sys.executable, "-m", "toolkit", "--plugin", str(sleepy), "--help"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "finetune" in help_.stdout
    assert help_.stderr.splitlines() == [
        f"tk: warning: plugin 'sleepy' (--plugin {sleepy}) is still importing after 1 s (tk "
        "gives up at 2 s: TK_PLUGIN_IMPORT_TIMEOUT; TK_DISABLE_PLUGINS=sleepy skips it)",
        f"tk: warning: plugin 'sleepy' (--plugin {sleepy}) skipped: import of {sleepy} did not "
        "finish within 2 s (TK_PLUGIN_IMPORT_TIMEOUT)"]
    shown = subprocess.run([sys.executable, "-m", "toolkit", "--plugin", str(sleepy), "plugins",
                            "--json"], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0
    assert json.loads(shown.stdout)[0]["error"] == (
        f"import: import of {sleepy} did not finish within 2 s (TK_PLUGIN_IMPORT_TIMEOUT)")
    bad = subprocess.run([sys.executable, "-m", "toolkit", "plugins"],
                         env={**env, "TK_PLUGIN_IMPORT_TIMEOUT": "soon"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "tk: error: TK_PLUGIN_IMPORT_TIMEOUT='soon': expected a number")


def test_blame_finds_the_plugin_in_a_dataloader_worker_traceback(tmp_path: Path) -> None:
    """A bug in a plugin's dataset comes back from a DataLoader worker process with the
    worker's traceback as text; the plugin is still named, with the original message. An
    exception from code outside every plugin is not blamed on one."""
    path = write_module(tmp_path, "wobbly", textwrap.dedent("""
        from torch.utils.data import Dataset

        class Wobbly(Dataset):
            def __len__(self):
                return 2

            def __getitem__(self, i):
                raise ValueError(f"sample {i} is wobbly")
        """))
    plugins = load_plugins([str(path)], env=LIGHT)
    from torch.utils.data import DataLoader

    dataset = plugins.records["wobbly"].obj.Wobbly()
    for workers in (0, 1):
        with pytest.raises(ValueError) as err:
            list(DataLoader(dataset, num_workers=workers))
        bug = plugins.blame(err.value)
        assert bug is not None and bug.__cause__ is err.value
        assert str(bug).startswith(f"plugin 'wobbly' (--plugin {path}) raised ValueError: "
                                   "sample 0 is wobbly in __getitem__ (wobbly.py:9) "), workers
    try:
        _ = 1 / 0
    except ZeroDivisionError as exc:
        assert plugins.blame(exc) is None


def test_component_versions_are_compared_with_the_installed_ones() -> None:
    """``tk store show``'s description of a recorded component against what is installed
    (tk's own distribution stands in for a plugin's)."""
    from toolkit import __version__
    from toolkit.plugin.provenance import describe, rebuild_hint

    same = {"name": "heads:linear", "plugin": "heads", "distribution": "tk-microtoolkit",
            "version": __version__}
    assert describe(same) == f"heads:linear from tk-microtoolkit {__version__}"
    older = {**same, "version": "0.0.1"}
    assert describe(older) == f"heads:linear from tk-microtoolkit 0.0.1 (installed: {__version__})"
    assert rebuild_hint({"components": {"head": older}}) == (
        f"its head 'heads:linear' was made with tk-microtoolkit 0.0.1, {__version__} is installed")
    loose = {"name": "mine:net", "plugin": "mine", "distribution": None, "version": None}
    assert rebuild_hint({"components": {"backbone": loose}}) == (
        "its backbone 'mine:net' came from plugin 'mine', which was not an installed package: "
        "load it again with --plugin")
    assert rebuild_hint({}) == "" and rebuild_hint({"components": "junk"}) == ""


# -- meta: the hooks, their tests and their documentation stay in step -----------------------
def test_every_hookspec_has_a_section_in_the_authoring_guide() -> None:
    import re

    guide = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    documented = {name: [a.strip() for a in args.split(",") if a.strip()]
                  for name, args in re.findall(r"^#{2,3} `(tk_\w+)\(([^)]*)\)`", guide, re.M)}
    assert sorted(documented) == HOOKS
    for hook in HOOKS:
        assert documented[hook] == spec_args(hook), hook
        section = guide.split(f"`{hook}(")[1].split("\n## ")[0].split("\n### ")[0]
        assert len(section.split()) >= 40, f"{hook}: the section says too little"


def test_every_hookspec_is_exercised_by_a_test() -> None:
    """``test_the_core_calls_every_hook`` is parametrized over the hookspecs themselves, and
    ``call_hook_like_the_core`` fails for a hook it does not know; the example plugin, which
    implements every hook, is driven end to end in tests/test_example_plugin.py."""
    assert {"tk_register_backbones", "tk_register_commands", "tk_epoch_end"} <= set(HOOKS)
    plugins = fresh_plugins(builtins=False)
    for hook in HOOKS:
        call_hook_like_the_core(plugins, hook)  # raises for a hook without a known caller
