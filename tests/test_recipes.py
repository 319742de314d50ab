"""Training recipes of issue 18 through the real `tk` command: multi-label (manifest with a
``labels`` column, thresholds, tk eval / tk infer), class imbalance (--class-weights,
--sampler balanced), --accumulate, --ema (with kill-and-resume), --mixup / --cutmix; and
the pieces they are built from (losses on soft and multi-hot targets, metrics, the
weighted sampler)."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import test_finetune

# the `tk` runner and the isolated-environment fixture of the training tests
tk = test_finetune.tk
HERE = Path(__file__).resolve().parent
TINY = str(HERE / "plugins_for_tests" / "tiny.py")
KILLER = str(HERE / "plugins_for_tests" / "killer.py")
SMALL = ["--opt", "dataset.samples=120", "--opt", "dataset.image_size=32", "--device", "cpu",
         "--no-pretrained", "--backbone", "tiny-cnn"]
COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230)}


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tk: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def colour_patches(root: Path, n: int, seed: int, name: str = "labels.csv") -> Path:
    """``n`` real PNG images on a grey background, each holding a square patch of every
    colour it is labelled with (each of red, green, blue with probability 0.4, so some
    images have none), and a manifest ``path,labels``."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = [["path", "labels"]]
    for i in range(n):
        img = Image.new("RGB", (32, 32), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        labels = [c for c in COLOURS if rng.random() < 0.4]
        for c in labels:
            x, y = rng.randint(0, 20), rng.randint(0, 20)
            draw.rectangle([x, y, x + 11, y + 11], fill=COLOURS[c])
        file = f"{seed}_{i:03d}.png"
        img.save(root / file)
        rows.append([file, ";".join(labels)])
    with open(root / name, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return root / name


def meta_of(name: str, env: dict[str, str]) -> dict:
    return json.loads(tk(["store", "show", name, "--json"], env).stdout)


# -- multi-label -----------------------------------------------------------------------

@pytest.mark.slow
def test_multilabel_train_eval_infer(env: dict[str, str], tmp_path: Path):
    train = colour_patches(tmp_path / "train", 160, seed=1)
    test = colour_patches(tmp_path / "test", 48, seed=2)
    proc = tk(["finetune", "--backbone", "tiny-cnn", "--data", str(train), "--epochs", "4",
               "--lr", "0.01", "--batch-size", "16", "--no-pretrained", "--device", "cpu",
               "--name", "ml", "--json", "-q"], env)
    result = json.loads(proc.stdout)
    assert "val mAP" in proc.stderr and "train images per class:" in proc.stderr
    for key in ("val_map", "val_f1_micro", "val_f1_macro", "val_acc"):
        assert key in result["metrics"]
    meta = meta_of("ml", env)
    assert meta["task"] == "multi-label" and meta["classes"] == ["blue", "green", "red"]
    assert meta["training"]["loss"].endswith(":bce")  # the multi-label default
    assert len(meta["thresholds"]) == 3 and all(0 < t < 1 for t in meta["thresholds"])
    assert meta["threshold_source"] == "validation F1"

    report = json.loads(tk(["eval", "--model", "ml", "--data", str(test), "--json", "-q"],
                           env).stdout)
    assert report["task"] == "multi-label" and report["total"] == 48
    # a constant predictor's AP is the prevalence (about 0.4) and its best F1 about 0.57
    assert report["map"] > 0.85 and report["f1_micro"] > 0.8, report
    assert [m["name"] for m in report["per_class"]] == ["blue", "green", "red"]
    text = tk(["eval", "--model", "ml", "--data", str(test), "-q"], env).stdout
    assert "mAP:" in text and "threshold" in text

    images = sorted(str(p) for p in (tmp_path / "test").glob("*.png"))[:6]
    rows = [json.loads(line) for line in
            tk(["infer", *images, "--model", "ml", "--format", "jsonl", "-q"], env)
            .stdout.splitlines()]
    truth = {r[0]: r[1] for r in csv.reader(open(test)) if r[0] != "path"}
    right = 0
    for row in rows:
        assert set(row) >= {"labels", "label_scores", "label", "score", "topk"}
        assert len(row["labels"]) == len(row["label_scores"])
        assert all(s >= 0.0 for s in row["label_scores"])
        right += sorted(row["labels"]) == sorted(filter(None, truth[Path(row["path"]).name]
                                                        .split(";")))
    assert right >= 4, rows
    out = tk(["infer", *images, "--model", "ml", "--format", "csv", "-q"], env).stdout
    header, *lines = list(csv.reader(out.splitlines()))
    assert header == ["path", "label", "score", "labels", "label_scores", "error"]
    assert all(len(r) == len(header) for r in lines)
    assert any(";" in r[3] for r in lines) or any(r[3] for r in lines)


def test_multilabel_fixed_threshold_and_asl(env: dict[str, str], tmp_path: Path):
    train = colour_patches(tmp_path / "train", 48, seed=3)
    tk(["finetune", "--backbone", "tiny-cnn", "--data", str(train), "--epochs", "1",
        "--batch-size", "16", "--no-pretrained", "--device", "cpu", "--loss", "asl",
        "--threshold", "0.3", "--name", "asl", "-q"], env)
    meta = meta_of("asl", env)
    assert meta["thresholds"] == [0.3, 0.3, 0.3] and meta["threshold_source"] == "--threshold"
    assert meta["training"]["loss"].endswith(":asl")
    # tk review reads single-label models: one line pointing at tk eval, no report written
    review = tk(["review", "asl", "--data", str(train), "-o", str(tmp_path / "r.html"), "-q"],
                env, check=False)
    one_line_error(review, "multi-label", "tk eval")
    assert not (tmp_path / "r.html").exists()


def test_multilabel_bad_inputs(env: dict[str, str], tmp_path: Path):
    train = colour_patches(tmp_path / "train", 8, seed=4)
    both = tmp_path / "train" / "both.csv"
    both.write_text("path,label,labels\n4_000.png,red,red\n")
    one_line_error(tk(["finetune", "--data", str(both), *SMALL[4:]], env, check=False),
                   "both 'label' and 'labels'")
    val = tmp_path / "train" / "val.csv"
    val.write_text("path,labels\n4_000.png,red;purple\n")
    one_line_error(tk(["finetune", "--data", str(train), "--val-data", str(val), *SMALL[4:]],
                      env, check=False), "label 'purple' is not a class of the training data")
    one_line_error(tk(["finetune", "--data", str(train), "--loss", "cross-entropy",
                       *SMALL[4:]], env, check=False), "single-label loss", "multi-label")
    one_line_error(tk(["finetune", "--data", str(train), "--mixup", "0.2", *SMALL[4:]], env,
                      check=False), "--mixup")
    one_line_error(tk(["finetune", "--data", str(train), "--loss", "asl", "--class-weights",
                       "auto", *SMALL[4:]], env, check=False), "takes no pos_weight")
    one_line_error(tk(["finetune", "--threshold", "0.4", *SMALL], env, check=False),
                   "--threshold is for multi-label")


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--ema", "1.5", "--ema must be between 0 and 1"),
    ("--accumulate", "0", "--accumulate must be positive"),
    ("--mixup", "-1", "--mixup must not be negative"),
    ("--cutmix", "nan", "--cutmix must be a finite number"),
    ("--threshold", "1", "--threshold must be between 0 and 1"),
])
def test_recipe_flags_out_of_range(env: dict[str, str], flag: str, value: str, needle: str):
    one_line_error(tk(["finetune", *SMALL, flag, value], env, check=False), needle)


# -- imbalance ---------------------------------------------------------------------------

def test_class_weights_and_balanced_sampler_on_imbalanced_folder(env: dict[str, str],
                                                                  tmp_path: Path):
    from toolkit.testing import make_image_folder

    data = make_image_folder(tmp_path / "data", ["big", "small"], per_class=44, size=32)
    for f in sorted((data / "small").iterdir())[4:]:  # 44 : 4 images
        f.unlink()
    weighted = tk(["finetune", "--data", str(data), "--epochs", "1", "--batch-size", "8",
                   *SMALL[4:], "--class-weights", "auto", "--sampler", "balanced",
                   "--name", "weighted", "-q"], env)
    assert "train images per class: big 35, small 3 (largest/smallest 11.7x)" in \
        weighted.stderr
    assert "warning: the classes are imbalanced" not in weighted.stderr  # a recipe is on
    training = meta_of("weighted", env)["training"]
    assert training["class_counts"] == [35, 3]
    assert training["class_weight_values"] == pytest.approx([38 / 70, 38 / 6], rel=1e-5)
    assert training["sampler"] == "balanced" and training["class_weights"] == "auto"


def test_imbalance_warning():
    from toolkit.train.balance import check_counts

    said: list[str] = []
    check_counts([110, 10, 0], ["a", "b", "c"], said.append, recipes=False)
    assert said[0] == "train images per class: a 110, b 10, c 0 (largest/smallest 11.0x)"
    assert said[1] == "warning: no training image for class(es) c"
    assert said[2].startswith("warning: the classes are imbalanced (a: 110 images, b: 10)")
    said.clear()
    check_counts([50, 10], ["a", "b"], said.append, recipes=False)
    assert len(said) == 1


def test_balanced_sampler_is_seeded_balanced_and_sharded():
    import torch

    from toolkit.distributed import EpochSampler
    from toolkit.train.balance import class_counts, sample_weights

    targets = [0] * 90 + [1] * 10
    weights = sample_weights(targets, class_counts(targets, 2))
    full = EpochSampler(100, seed=5, shuffle=True, weights=weights)
    full.set_epoch(3)
    drawn = list(full)
    again = EpochSampler(100, seed=5, shuffle=True, weights=weights)
    again.set_epoch(3)
    assert drawn == list(again)  # seeded
    minority = sum(targets[i] for i in drawn)
    assert 30 <= minority <= 70  # about half, not about a tenth
    parts = []
    for rank in range(2):
        s = EpochSampler(100, seed=5, shuffle=True, weights=weights, rank=rank, world_size=2)
        s.set_epoch(3)
        parts.append(list(s))
    assert sorted(parts[0] + parts[1]) == sorted(drawn) and len(parts[0]) == 50
    assert torch.is_tensor(torch.tensor(weights))


def test_loss_weights_formulas():
    from toolkit.train.balance import loss_weights

    assert loss_weights([30, 10], 40, "auto", False) == pytest.approx([40 / 60, 40 / 20])
    assert loss_weights([30, 10], 40, "auto", True) == pytest.approx([10 / 30, 30 / 10])
    eff = loss_weights([1000, 10], 1010, "effective", False)
    assert eff[1] > eff[0] and sum(eff) / 2 == pytest.approx(1.0, rel=1e-4)


# -- accumulation, EMA, MixUp / CutMix ---------------------------------------------------------

def test_accumulate_follows_the_large_batch(env: dict[str, str]):
    """--freeze all: only the linear head trains, with the backbone's BatchNorm in eval
    mode, so 4 micro-batches of 8 give the gradient of one batch of 32 (up to float
    rounding); the LR schedule counts optimizer steps."""
    common = ["finetune", *SMALL, "--classes", "3", "--epochs", "2", "--freeze", "all",
              "--no-cache-features", "--seed", "2", "--json", "-q"]
    big = json.loads(tk([*common, "--batch-size", "32", "--name", "b32"], env).stdout)
    acc = json.loads(tk([*common, "--batch-size", "8", "--accumulate", "4", "--name", "a4"],
                        env).stdout)
    for a, b in zip(big["history"], acc["history"], strict=True):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)


@pytest.mark.slow
def test_ema_mixup_cutmix_kill_and_resume(env: dict[str, str], tmp_path: Path):
    """EMA + MixUp/CutMix + accumulation in one run: the EMA weights differ from the raw
    ones, both are validated, and a run killed after epoch 1 and resumed ends with the
    same weights, bit for bit, as the uninterrupted run."""
    from safetensors.torch import load_file

    from toolkit.train.checkpoint import load_checkpoint

    common = ["finetune", *SMALL, "--classes", "3", "--epochs", "2", "--batch-size", "8",
              "--seed", "4", "--ema", "0.9", "--mixup", "0.4", "--cutmix", "1.0",
              "--accumulate", "2", "-q"]
    straight = tk([*common, "--name", "straight", "--json"], env)
    history = json.loads(straight.stdout)["history"]
    assert all({"ema", "ema_val_acc", "raw_val_acc"} <= set(h) for h in history)

    killed = tk(["--plugin", KILLER, *common, "--name", "crashy"],
                {**env, "TK_TEST_KILL_AT": "2"}, check=False)
    assert killed.returncode == -9
    saved = load_checkpoint(tmp_path / "store" / "runs" / "crashy" / "checkpoint.safetensors")
    ema = {k.removeprefix("module."): v for k, v in saved["ema"].items() if k != "n_averaged"}
    assert int(saved["ema"]["n_averaged"]) > 0
    assert any(not ema[k].equal(v) for k, v in saved["model"].items()
               if v.is_floating_point()), "EMA weights equal the raw ones"

    tk([*common, "--name", "crashy", "--resume"], env)
    models = tmp_path / "store" / "models"
    a, b = load_file(str(models / "straight.safetensors")), load_file(
        str(models / "crashy.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    training = meta_of("crashy", env)["training"]
    assert (training["ema"], training["mixup"], training["cutmix"],
            training["accumulate"]) == (0.9, 0.4, 1.0, 2)

    other = tk([*common, "--name", "crashy", "--resume", "--overwrite", "--ema", "0.8"], env,
               check=False)
    assert other.returncode == 2 and "ema" in other.stderr


# -- the pieces ------------------------------------------------------------------------------

def test_losses_take_soft_and_multi_hot_targets():
    import torch
    from torch.nn import functional as F

    from plugins.losses import asl, bce, cross_entropy, focal

    logits = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    soft = F.one_hot(y, 4).float()
    for make in (cross_entropy, focal):
        loss = make(num_classes=4)
        assert torch.allclose(loss(logits, y), loss(logits, soft), atol=1e-6)
    multi = (torch.rand(6, 4) > 0.5).float()
    assert torch.isclose(bce()(logits, multi),
                         F.binary_cross_entropy_with_logits(logits, multi))
    assert torch.isclose(asl(gamma_neg=0, gamma_pos=0, clip=0)(logits, multi),
                         F.binary_cross_entropy_with_logits(logits, multi, reduction="sum")
                         / 6, atol=1e-5)


def test_thresholds_maximise_f1():
    import numpy as np

    from toolkit.metrics import best_f1_thresholds, scores

    probs = np.array([[0.9, 0.2], [0.7, 0.6], [0.4, 0.1], [0.2, 0.05]])
    truth = np.array([[1, 0], [1, 1], [1, 0], [0, 0]])
    cuts = best_f1_thresholds(probs, truth)
    assert 0.2 < cuts[0] <= 0.4 and 0.2 < cuts[1] <= 0.6
    s = scores(probs, truth, cuts)
    assert s.f1_macro == 1.0 and s.map == 1.0 and s.exact_match == 1.0


def test_multilabel_rows_scoring():
    import numpy as np

    from toolkit.predict.scoring import multilabel_rows

    rows = multilabel_rows(np.array([[2.0, -2.0, 0.1], [-3.0, -3.0, -3.0]]), [0.5, 0.5, 0.6],
                           ["a", "b", "c"], topk=2)
    assert [lab for lab, _ in rows[0].labels] == ["a"]  # c: 0.525 < its 0.6 threshold
    assert [lab for lab, _ in rows[0].top] == ["a", "c"]
    assert rows[1].labels == []


# -- test-time augmentation ---------------------------------------------------------------------

def test_tta_averages_the_probabilities_of_the_mirror_image(env: dict[str, str],
                                                            tmp_path: Path):
    """`tk infer --tta` and `tk eval --tta` score each image with the mean of the softmax
    of it and of its mirror image (checked against the model run by hand)."""
    import numpy as np
    import torch
    from conftest import save_colour_model
    from PIL import Image

    from model_store import ModelStore
    from toolkit.data.transforms import eval_transform
    from toolkit.model.loading import load_model
    from toolkit.plugin.manager import load_plugins

    store = tmp_path / "store"
    save_colour_model(store, "plain")
    plugins = load_plugins(modules=[TINY], env={})
    loaded = load_model("plain", store, plugins=plugins)
    torch.manual_seed(0)
    with torch.no_grad():  # break the hand-set model's mirror symmetry
        for p in loaded.model.backbone.parameters():
            if p.dim() == 4:
                p.add_(torch.randn_like(p) * 0.3)
        loaded.model.head[-1].weight.mul_(0.1)  # probabilities away from 0 and 1
    ModelStore(store).save("lopsided", loaded.model, loaded.meta)
    folder = tmp_path / "images" / "red"
    folder.mkdir(parents=True)
    ramp = np.zeros((32, 32, 3), dtype=np.uint8)
    ramp[..., 0] = np.linspace(40, 250, 32, dtype=np.uint8)[None, :]
    ramp[..., 1] = np.linspace(200, 10, 32, dtype=np.uint8)[None, :]
    Image.fromarray(ramp).save(folder / "ramp.png")

    tta = json.loads(tk(["infer", str(folder), "--model", "lopsided", "--format", "jsonl",
                         "--topk", "3", "--tta", "-q"], env).stdout)
    model = load_model("lopsided", store, plugins=plugins)
    x = eval_transform(model.data_config)(Image.open(folder / "ramp.png").convert("RGB"))[None]
    with torch.no_grad():
        probs = (model.model(x).softmax(1) + model.model(x.flip(3)).softmax(1)) / 2
    expected = {c: float(p) for c, p in zip(model.classes, probs[0], strict=True)}
    got = {t["label"]: t["score"] for t in tta["topk"]}
    assert got == pytest.approx(expected, abs=2e-6)
    with torch.no_grad():
        unflipped = dict(zip(model.classes, model.model(x).softmax(1)[0].tolist(), strict=True))
    assert max(abs(unflipped[c] - expected[c]) for c in expected) > 1e-3  # the mirror counts
    report = json.loads(tk(["eval", "--model", "lopsided", "--data", str(tmp_path / "images"),
                            "--tta", "--json", "-q"], env).stdout)
    assert report["total"] == 1 and report["confusion"][0][0] + report["confusion"][0][1] \
        + report["confusion"][0][2] == 1


@pytest.mark.xdist_group("torchrun")  # one torchrun job at a time: 2 cores
@pytest.mark.flaky(reruns=1)  # a rare rendezvous hang of torchrun on a loaded machine
@pytest.mark.slow
def test_torchrun_recipes_match_single_process(env: dict[str, str], tmp_path: Path):
    """Under DDP (2 CPU processes, gloo) --accumulate skips the gradient sync on the first
    batch of each step, the balanced sampler's draw is split between the ranks and the EMA
    follows the synced weights: the run agrees with one process taking the same global
    batches (the backbone frozen, so BatchNorm statistics are fixed)."""
    from test_scale import COMPARABLE, torchrun

    recipes = ["--accumulate", "2", "--ema", "0.9", "--sampler", "balanced"]
    single = subprocess.run([sys.executable, "-m", "toolkit", *COMPARABLE, *recipes,
                             "--batch-size", "16", "--name", "single"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    ddp = torchrun([*COMPARABLE, *recipes, "--batch-size", "8", "--name", "ddp"], env)
    assert ddp.returncode == 0, ddp.stderr
    one = json.loads(single.stdout)["history"]
    two = json.loads(ddp.stdout.strip().splitlines()[-1])["history"]
    for a, b in zip(one, two, strict=True):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        for key in ("train_loss", "raw_val_loss", "ema_val_loss"):
            assert abs(a[key] - b[key]) < 1e-3, key


def test_recipes_in_a_config_file(tmp_path: Path):
    from toolkit.errors import TkError
    from toolkit.train.config import finetune_args

    cfg = tmp_path / "run.toml"
    cfg.write_text('backbone = "tiny-cnn"\nema = 0.999\naccumulate = 4\nmixup = 0.2\n'
                   'cutmix = 1\nclass-weights = "auto"\nsampler = "balanced"\n'
                   'multi_label = true\nthreshold = 0.4\n')
    args = finetune_args({"accumulate": 2}, config=cfg)  # the command line wins
    assert (args.ema, args.accumulate, args.mixup, args.cutmix, args.class_weights,
            args.sampler, args.multi_label, args.threshold) == (
        0.999, 2, 0.2, 1.0, "auto", "balanced", True, 0.4)
    cfg.write_text('backbone = "tiny-cnn"\nsampler = "random"\n')
    with pytest.raises(TkError, match="--sampler random: expected one of balanced"):
        finetune_args({}, config=cfg)
