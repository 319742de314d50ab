"""Fast unit tests: built-in heads, losses and optimizers, freezing and parameter groups,
the LR schedule, --opt / --config parsing and pickle-free checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from toolkit.errors import TkError
from toolkit.plugin.manager import load_plugins

TINY = str(Path(__file__).resolve().parent / "plugins_for_tests" / "tiny.py")


@pytest.fixture(scope="module")
def plugins():
    return load_plugins(modules=[TINY], env={})


@pytest.mark.parametrize("name, options", [("linear", {}), ("linear", {"dropout": 0.2}),
                                           ("mlp", {}), ("mlp", {"hidden": 8, "layers": 2})])
def test_heads_map_features_to_logits(plugins, name, options):
    head = plugins.registry("heads").resolve(name).factory(12, 5, **options)
    assert head(torch.randn(4, 12)).shape == (4, 5)


def test_mlp_head_rejects_bad_activation(plugins):
    with pytest.raises(TkError, match="unknown activation"):
        plugins.registry("heads").resolve("mlp").factory(12, 5, activation="tanh")


def test_cross_entropy_options(plugins):
    factory = plugins.registry("losses").resolve("cross-entropy").factory
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    plain = factory()(logits, y)
    assert torch.isclose(plain, nn.functional.cross_entropy(logits, y))
    smooth = factory(label_smoothing=0.1)(logits, y)
    assert not torch.isclose(plain, smooth)
    weighted = factory(class_weights=[1, 0, 0], num_classes=3)(logits, y)
    assert torch.isclose(weighted, nn.functional.cross_entropy(logits[y == 0], y[y == 0]))
    with pytest.raises(TkError, match="2 class_weights for 3 classes"):
        factory(class_weights="1,2", num_classes=3)


def test_focal_loss_reduces_to_cross_entropy_at_gamma_zero(plugins):
    focal = plugins.registry("losses").resolve("focal").factory
    logits, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    assert torch.isclose(focal(gamma=0)(logits, y), nn.functional.cross_entropy(logits, y))
    # confident right answers are down-weighted
    easy = torch.tensor([[10.0, 0, 0, 0]])
    assert focal(gamma=2)(easy, torch.tensor([0])) < nn.functional.cross_entropy(
        easy, torch.tensor([0]))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "timm-lamb", "timm-adabelief"])
def test_optimizers_respect_group_lr_and_decay(plugins, name):
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    groups = [{"params": [a], "lr": 0.1, "weight_decay": 0.0},
              {"params": [b], "lr": 0.01, "weight_decay": 0.0}]
    opt = plugins.registry("optimizers").resolve(name).factory(groups, lr=0.1,
                                                               weight_decay=0.0)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    (a.sum() + b.sum()).backward()
    opt.step()
    assert (a != 1).all() and (b != 1).all()


def test_freezing_and_param_groups(plugins):
    from toolkit.model.assemble import ModelSpec, build_classifier
    from toolkit.model.freezing import apply_freeze, frozen_at_epoch, frozen_count, set_train_mode
    from toolkit.train.optim import param_groups

    model, backbone = build_classifier(plugins, ModelSpec("tiny-cnn", 3))
    n = len(backbone.layer_groups)
    assert frozen_count("all", n) == n and frozen_count("none", n) == 0
    assert frozen_count("1", n) == 1
    with pytest.raises(TkError, match="only 2 layer groups"):
        frozen_count(3, n)
    apply_freeze(backbone, 1)
    stem, body = backbone.layer_groups
    assert not any(p.requires_grad for p in stem.parameters())
    assert all(p.requires_grad for p in body.parameters())
    set_train_mode(model, backbone, 1)
    assert not stem[1].training and body[1].training  # frozen BatchNorm stays in eval
    groups = param_groups(model, lr=1.0, weight_decay=0.1, backbone_lr_scale=0.1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == pytest.approx(0.1)
    assert by_name["backbone-no-decay"]["weight_decay"] == 0.0
    assert by_name["head"]["lr"] == 1.0 and by_name["head"]["weight_decay"] == 0.1
    trained = {id(p) for g in groups for p in g["params"]}
    assert not trained & {id(p) for p in stem.parameters()}
    # gradual unfreezing: one group per epoch from --unfreeze-at
    assert [frozen_at_epoch(2, e, 3) for e in range(1, 6)] == [2, 2, 1, 0, 0]


def test_lr_schedule_warms_up_then_decays():
    from toolkit.train.loop import lr_factor

    values = [lr_factor(s, 100, 10) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert values[-1] == pytest.approx(0.01, abs=0.01)
    assert not any(math.isnan(v) for v in values)


def test_opt_parsing_and_config(tmp_path: Path):
    from toolkit.train.config import load_config, parse_opts

    opts = parse_opts(["head.hidden=512", "loss.class_weights=[1, 2]", "dataset.path=a b",
                       "optimizer.nesterov=false"])
    assert opts["head"] == {"hidden": 512}
    assert opts["loss"] == {"class_weights": [1, 2]}
    assert opts["dataset"] == {"path": "a b"}
    assert opts["optimizer"] == {"nesterov": False}
    for bad in ("head", "head.=3", "nope.x=1", "hidden=3"):
        with pytest.raises(TkError):
            parse_opts([bad])
    cfg = tmp_path / "c.toml"
    cfg.write_text('epochs = 3\nbatch-size = 8\n[head]\nname = "mlp"\nhidden = 64\n')
    loaded = load_config(cfg)
    assert loaded["epochs"] == 3 and loaded["batch_size"] == 8 and loaded["head"] == "mlp"
    assert loaded["options"]["head"] == {"hidden": 64}
    cfg.write_text("epochs = = 3")
    with pytest.raises(TkError, match="not valid TOML"):
        load_config(cfg)


def test_checkpoint_round_trip_without_pickle(tmp_path: Path):
    from toolkit.train.checkpoint import load_checkpoint, save_checkpoint

    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"optimizer": opt.state_dict(), "history": [{"a": 1.5}],
                           "shape": (1, 2), "none": None})
    state = load_checkpoint(path)
    assert state["history"] == [{"a": 1.5}] and state["shape"] == (1, 2)
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt2.load_state_dict(state["optimizer"])
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    path.write_bytes(b"garbage")
    with pytest.raises(TkError, match="damaged"):
        load_checkpoint(path)
