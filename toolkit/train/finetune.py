"""`tk finetune` as a function: resolve components, data and weights, train, save.

Everything here goes through the registries: the core names no concrete backbone, head,
loss, optimizer or dataset: the defaults are the ones plugins register as such, and which
dataset reads `--data PATH` is asked of the plugins (`tk_dataset_for_path`)."""

from __future__ import annotations

import datetime
import functools
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import DataError, TkError
from toolkit.train.config import COMPONENTS


@dataclass
class FinetuneArgs:
    backbone: str
    classes: int | None = None
    data: str | None = None
    val_data: str | None = None
    dataset: str | None = None
    head: str | None = None  # None: the default a plugin registers (built-in: linear)
    loss: str | None = None  # built-in default: cross-entropy
    optimizer: str | None = None  # built-in default: adamw
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    freeze: str = "none"
    unfreeze_at: int | None = None
    backbone_lr_scale: float | None = None  # default: 0.1 pretrained, 1.0 from scratch
    pretrained: bool = True
    weights: str | None = None
    device: str = "auto"
    precision: str = "32"
    channels_last: bool = False
    compile: bool = False
    image_size: int | None = None
    val_split: float = 0.2
    workers: int = 0
    seed: int = 0
    patience: int | None = None
    warmup_epochs: float = 1.0
    augment: bool = True
    cache_features: bool | None = None  # None: automatic (frozen backbone, no augmentation)
    name: str | None = None
    store: str | None = None
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False
    options: dict[str, dict[str, Any]] = field(default_factory=lambda: {c: {} for c in COMPONENTS})

    def check(self) -> None:
        def positive(flag: str, value: Any) -> None:
            if value is not None and not value > 0:  # NaN is not positive either
                raise TkError(f"{flag} must be positive, got {value}")

        for flag, value in (("--lr", self.lr), ("--weight-decay", self.weight_decay),
                            ("--backbone-lr-scale", self.backbone_lr_scale),
                            ("--warmup-epochs", self.warmup_epochs),
                            ("--val-split", self.val_split)):
            if value is not None and not math.isfinite(value):
                raise TkError(f"{flag} must be a finite number, got {value}")

        positive("--epochs", self.epochs)
        positive("--batch-size", self.batch_size)
        positive("--lr", self.lr)
        positive("--classes", self.classes)
        positive("--image-size", self.image_size)
        positive("--unfreeze-at", self.unfreeze_at)
        positive("--patience", self.patience)
        if self.weight_decay < 0:
            raise TkError(f"--weight-decay must not be negative, got {self.weight_decay}")
        if self.backbone_lr_scale is not None and self.backbone_lr_scale < 0:
            raise TkError("--backbone-lr-scale must not be negative")
        if not 0 < self.val_split < 1:
            raise TkError(f"--val-split must be between 0 and 1, got {self.val_split}")
        if self.warmup_epochs < 0:
            raise TkError(f"--warmup-epochs must not be negative, got {self.warmup_epochs}")
        if self.workers < 0:
            raise TkError("--workers must not be negative")
        if self.weights and not self.pretrained:
            raise TkError("--weights and --no-pretrained contradict each other")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}",
                                                      self.name):
            raise TkError(f"--name {self.name!r}: use letters, digits, '.', '_' and '-'")


@dataclass
class FinetuneResult:
    name: str
    model_path: Path
    best_epoch: int
    metrics: dict[str, float]
    history: list[dict[str, float]]
    artifacts: dict[str, str]
    stopped_early: bool = False


def _dataset_choice(args: FinetuneArgs, plugins: Any) -> tuple[Any, dict[str, Any]]:
    """Which dataset and its options: ``--dataset NAME`` (given ``--data PATH`` as its
    ``path``), else the dataset a plugin claims for ``--data PATH``
    (``tk_dataset_for_path``), else the default dataset a plugin registers (the embedded
    shapes)."""
    registry = plugins.registry("datasets")
    opts = dict(args.options.get("dataset", {}))
    if args.data:
        path = Path(args.data)
        if not path.exists():
            raise DataError(f"--data {args.data}: no such file or directory")
        opts.setdefault("path", str(path.resolve()))
        if args.dataset:
            component = registry.resolve(args.dataset)
        else:
            name = plugins.dataset_for_path(str(path))
            if name is None:
                kind = "folder" if path.is_dir() else f"'{path.suffix or path.name}' file"
                raise DataError(
                    f"--data {args.data}: no loaded plugin reads a {kind} (the built-in "
                    "datasets plugin reads folders and .csv files; is it disabled by "
                    "TK_DISABLE_PLUGINS or TK_LOAD_PLUGINS?); name a dataset with --dataset")
            component = registry.resolve(name)
    else:
        component = registry.resolve(args.dataset) if args.dataset else registry.default()
    if args.val_data:
        opts.setdefault("val_path", str(Path(args.val_data).resolve()))
    return component, opts


def _with_accepted(component: Any, positional: int, candidates: dict[str, Any],
                   options: dict[str, Any]) -> dict[str, Any]:
    """Add the core's common options (``num_classes``, ``seed``...) that the factory
    accepts and the user did not set."""
    accepted = component.accepted_options(positional)
    out = dict(options)
    for key, value in candidates.items():
        if value is not None and key not in out and (accepted is None or key in accepted):
            out[key] = value
    return out


def resolve_weights(args: FinetuneArgs, qualified: str, store: Any) -> tuple[Any, str | None]:
    """What to pass as the backbone factory's ``pretrained``: --weights FILE, the store's
    imported weights, or True (the plugin's cache, then a download)."""
    if not args.pretrained:
        return False, None
    if args.weights:
        path = Path(args.weights)
        if not path.is_file():
            raise TkError(f"--weights {args.weights}: no such file")
        return str(path), "file"
    found = store.find_weights(qualified)
    if found is not None:
        return str(found), "store"
    return True, None


def default_name(backbone: str, dataset: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    bare = re.sub(r"[^A-Za-z0-9._-]", "-", backbone.split(":")[-1])
    return f"{bare}-{dataset}-{stamp}"


def finetune(args: FinetuneArgs, plugins: Any) -> FinetuneResult | None:
    """Run a fine-tuning job. Returns the result on rank 0 (None on other ranks)."""
    # options and component names are checked before torch is even imported: user errors
    # come back at once
    args.check()
    # components and their options (unknown options fail before any work)
    reg = {kind: plugins.registry(kind) for kind in
           ("backbones", "heads", "losses", "optimizers", "datasets")}
    bb_c = reg["backbones"].resolve(args.backbone)
    head_c = reg["heads"].resolve(args.head) if args.head else reg["heads"].default()
    loss_c = reg["losses"].resolve(args.loss) if args.loss else reg["losses"].default()
    opt_c = (reg["optimizers"].resolve(args.optimizer) if args.optimizer
             else reg["optimizers"].default())
    ds_c, ds_opts = _dataset_choice(args, plugins)
    bb_c.check_options(args.options["backbone"], positional=1)
    head_c.check_options(args.options["head"], positional=2)
    loss_c.check_options(args.options["loss"])
    opt_c.check_options(args.options["optimizer"], positional=3)

    from model_store import ModelStore, check_name
    from model_store.atomic import ensure_dir

    store = ModelStore(args.store)
    name = args.name or (default_name(bb_c.name, ds_c.name) if not args.resume else None)
    run_root = store.root / "runs"
    if args.resume and name is None:
        name = _latest_run(run_root)
    assert name is not None
    check_name(name)  # before training, whatever --overwrite / --resume say
    if not args.resume and not args.overwrite and store.model_path(name).is_file():
        raise TkError(f"model '{name}' already exists in {store.root}; "
                      "choose another --name or pass --overwrite")
    run_dir = run_root / name
    ensure_dir(run_root, "model store")  # an unwritable store fails now, not after training

    # data (listing files needs no torch either)
    ds_opts = _with_accepted(ds_c, 0, {"num_classes": args.classes, "seed": args.seed},
                             ds_opts)
    ds_c.check_options(ds_opts)
    source = ds_c.factory(**ds_opts)
    classes = list(source.classes)
    if args.classes is not None and len(classes) != args.classes:
        raise DataError(f"--classes {args.classes} but the data has {len(classes)} classes"
                        f" ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
    if len(classes) < 2:
        raise DataError(f"need at least 2 classes, the data has {len(classes)}")

    import torch

    from toolkit import __version__
    from toolkit import distributed as D
    from toolkit.data.transforms import eval_transform, train_transform
    from toolkit.devices import check_precision, resolve_device
    from toolkit.model.assemble import (
        Classifier,
        ModelSpec,
        build_backbone,
        build_head,
        call_factory,
    )
    from toolkit.model.freezing import frozen_count
    from toolkit.train import features
    from toolkit.train.optim import param_groups
    from toolkit.train.trainer import TrainConfig, Trainer, seed_everything

    dist = D.from_env()
    log = _logger(dist.is_main)

    device = resolve_device(args.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    precision = check_precision(args.precision, device)
    D.init(dist, device)
    try:
        # backbone with its weights, and the head (seeded: random init repeats exactly)
        seed_everything(args.seed)
        pretrained, weights_source = resolve_weights(args, bb_c.qualified_name, store)
        backbone = build_backbone(plugins, bb_c.qualified_name, pretrained,
                                  args.options["backbone"])
        if weights_source == "store":
            backbone.weights.source = "store"
        head = build_head(plugins, head_c.qualified_name, backbone.num_features, len(classes),
                          args.options["head"])
        model = Classifier(backbone.module, head)
        data_config = _choose_input_size(backbone, args.image_size,
                                         getattr(source, "image_size", None), log)

        n_groups = len(backbone.layer_groups)
        frozen = frozen_count(args.freeze, n_groups)
        if args.unfreeze_at and frozen == 0:
            raise TkError("--unfreeze-at needs a frozen backbone (--freeze all or N)")
        lr_scale = args.backbone_lr_scale
        if lr_scale is None:
            lr_scale = 0.1 if args.pretrained else 1.0

        loss_opts = _with_accepted(loss_c, 0, {"num_classes": len(classes)},
                                   args.options["loss"])
        loss_fn = call_factory("loss", loss_c.name, loss_c.factory,
                               options=args.options["loss"], **loss_opts)
        optimizer_factory = functools.partial(opt_c.factory, **args.options["optimizer"])
        # a bad optimizer option value fails now, with one line, not when training starts
        call_factory("optimizer", opt_c.name, optimizer_factory,
                     param_groups(model, args.lr, args.weight_decay, lr_scale),
                     options=args.options["optimizer"], lr=args.lr,
                     weight_decay=args.weight_decay)

        use_cache = features.should_cache(args.cache_features, frozen == n_groups,
                                          args.augment, args.unfreeze_at)
        augment = args.augment and not use_cache
        if use_cache and args.augment:
            log("note: with --cache-features the features are computed once, without "
                "augmentation")
        train_set, val_set = source.splits(
            train_transform(data_config, augment=augment), eval_transform(data_config),
            val_split=args.val_split, seed=args.seed)
        if len(val_set) == 0:
            raise DataError("the validation split is empty: add images or raise --val-split")

        cfg = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            weight_decay=args.weight_decay, frozen_groups=frozen, unfreeze_at=args.unfreeze_at,
            backbone_lr_scale=lr_scale, warmup_epochs=args.warmup_epochs,
            patience=args.patience, precision=precision, channels_last=args.channels_last,
            compile=args.compile, workers=args.workers, seed=args.seed, quiet=args.quiet)

        head_only = False
        if use_cache:
            train_set, val_set = features.cached_features(
                backbone, data_config, (train_set, val_set),
                key_parts={"backbone": bb_c.qualified_name,
                           "backbone_options": args.options["backbone"],
                           "dataset": ds_c.qualified_name, "options": ds_opts,
                           "val_split": args.val_split, "seed": args.seed,
                           },
                cache_dir=store.root / "cache" / "features", device=device,
                precision=precision, batch_size=args.batch_size, workers=args.workers,
                dist=dist, log=log)
            head_only = True

        training = {k: v for k, v in asdict(args).items() if k not in ("options",)}
        training.update(backbone=bb_c.qualified_name, head=head_c.qualified_name,
                        loss=loss_c.qualified_name, optimizer=opt_c.qualified_name,
                        options=args.options, backbone_lr_scale=lr_scale,
                        frozen_groups=frozen, layer_groups=n_groups, device=str(device),
                        world_size=dist.world_size, dataset=ds_c.qualified_name,
                        dataset_options=_jsonable(ds_opts), feature_cache=use_cache)
        if dist.is_main:
            plugins.notify("tk_train_start", config=dict(training, classes=classes))
            log(f"fine-tuning {backbone.name} ({n_groups} layer groups, {frozen} frozen, "
                f"weights: {backbone.weights.source}) on {ds_c.name}: {len(classes)} classes, "
                f"{len(train_set)} train / {len(val_set)} val images at "
                f"{data_config.input_size[1]}px, device {device}, precision {precision}")

        trainer = Trainer(
            model, backbone, loss_fn, optimizer_factory, train_set, val_set, len(classes),
            cfg, device, run_dir=run_dir, dist=dist,
            on_epoch_end=lambda e, m: plugins.notify("tk_epoch_end", epoch=e, metrics=m),
            head_only=head_only, log=log)
        try:
            result = trainer.fit(resume=args.resume)
        except KeyboardInterrupt:
            if dist.is_main:
                log(f"interrupted: the last finished epoch is checkpointed in {run_dir}; "
                    f"continue with: tk finetune ... --name {name} --resume")
            raise

        if not dist.is_main:
            return None
        model.load_state_dict(result.best_state)
        spec = ModelSpec(backbone=bb_c.qualified_name, num_classes=len(classes),
                         head=head_c.qualified_name,
                         backbone_options=args.options["backbone"],
                         head_options=args.options["head"])
        metadata = {
            "spec": spec.to_dict(),
            "classes": classes,
            "data_config": data_config.to_dict(),
            "training": _jsonable(training),
            "metrics": {"best_epoch": result.best_epoch, "best": result.best_metrics,
                        "history": result.history, "confusion": result.confusion,
                        "stopped_early": result.stopped_early},
            "weights": backbone.weights.to_dict(),
            "tk_version": __version__,
        }
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        fully_frozen = result.frozen_groups_end == n_groups
        info = store.save(name, state, metadata, shared=["backbone."] if fully_frozen else [
                              k for k, p in model.named_parameters() if not p.requires_grad],
                          overwrite=args.overwrite or args.resume)
        artifacts = _plots(store, name, result.history, result.confusion, classes, log)
        (run_dir / "checkpoint.safetensors").unlink(missing_ok=True)  # finished: not needed
        plugins.notify("tk_model_saved", name=name, path=str(info.path), metadata=metadata)
        best = result.best_metrics
        log(f"saved model '{name}' (best epoch {result.best_epoch}: val acc "
            f"{best['val_acc']:.3f}, val loss {best['val_loss']:.4f}) to {info.path}; "
            f"tk version {__version__}")
        return FinetuneResult(name, Path(info.path), result.best_epoch, best, result.history,
                              artifacts, result.stopped_early)
    finally:
        D.shutdown()


def _choose_input_size(backbone: Any, requested: int | None, preferred: int | None,
                       log: Any) -> Any:
    """--image-size, else the dataset's own image size when the backbone accepts it (checked
    with one forward pass), else the size the backbone's weights expect."""
    import torch

    dc = backbone.data_config
    size = requested or preferred
    if not size or size == dc.input_size[1]:
        return dc
    module = backbone.module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, size, size))
    except Exception as exc:
        if requested:
            raise TkError(f"--image-size {size}: backbone {backbone.name} cannot take "
                          f"{size}px input ({' '.join(str(exc).split())[:200]})") from None
        log(f"note: {backbone.name} needs {dc.input_size[1]}px input; resizing the data to it")
        return dc
    finally:
        module.train(was_training)
    return dc.with_image_size(size)


def _plots(store: Any, name: str, history: list[dict[str, float]],
           confusion: list[list[int]], classes: list[str], log: Any) -> dict[str, str]:
    from toolkit import plots

    out = {}
    try:
        curves = store.artifact_path(name, "curves.png")
        plots.training_curves(history, curves)
        out["curves"] = str(curves)
        cm = store.artifact_path(name, "confusion.png")
        plots.confusion_matrix(confusion, classes, cm)
        out["confusion"] = str(cm)
    except Exception as exc:  # a plot must never lose a trained model
        log(f"warning: could not draw the plots ({exc})")
    return out


def _latest_run(run_root: Path) -> str:
    runs = sorted((p for p in run_root.glob("*/checkpoint.safetensors")),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise TkError(f"--resume: no interrupted run in {run_root}; pass --name NAME")
    return runs[-1].parent.name


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))


def _logger(enabled: bool) -> Any:
    def log(msg: str) -> None:
        if enabled:
            print(msg, file=sys.stderr, flush=True)

    return log
