"""`tk finetune` as a function: a run is a short sequence of steps, each a small function
below::

    components  resolve_components   which backbone/head/loss/optimizer/dataset, options checked
    outputs     plan_outputs         store, model name, run folder; taken (lock), writable
    data        load_data            the dataset's classes, checked against --classes
    session     training_session     device, precision, torchrun process group
    model       build_model          weights, backbone + head (size-checked first), input size
    plan        plan_training        freezing, splits, class counts, loss, optimizer, cache
    observers   RunObservers         --log loggers attached; tk_train_start ... tk_train_end
    lr          find_lr              --lr auto: the LR range test (toolkit.train.lr_find)
    train       Trainer.fit          (toolkit.train.trainer)
    calibrate   calibrate_best       temperature on the validation split (toolkit.train.calibrate)
    save        save_model           the best weights + metadata into the store
    artifacts   write_artifacts      training curves and confusion matrix

Everything goes through the registries: the core names no concrete component."""

from __future__ import annotations

import contextlib
import datetime
import functools
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import DataError, TkError
from toolkit.train.components import (
    Components,
    choose_lr,
    loss_for_task,
    resolve_components,
    with_accepted,
)
from toolkit.train.config import FinetuneArgs
from toolkit.train.observers import RunObservers


@dataclass
class FinetuneResult:
    name: str
    model_path: Path
    best_epoch: int
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    artifacts: dict[str, str]
    stopped_early: bool = False


def finetune(args: FinetuneArgs, plugins: Any, *,
             on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
             checkpoints: bool = True) -> FinetuneResult | None:
    """Run a fine-tuning job. Returns the result on rank 0 (None on other ranks).

    ``on_epoch_end(epoch, metrics)`` is called on rank 0 after each epoch's observers;
    an exception it raises ends the run at once, without saving (observers see
    ``tk_train_end`` status ``"stopped"``), and propagates: ``tk tune`` prunes trials
    this way. ``checkpoints=False`` writes no per-epoch checkpoint: the run leaves
    nothing to resume (a tune trial)."""
    # options, component names and the output places are checked before torch is even
    # imported: user errors come back at once
    args.check()
    components = resolve_components(args, plugins)
    observers = RunObservers(plugins, args.log, args.log_dir)
    outputs = plan_outputs(args, components)
    with observers.observing():
        with outputs.claim():
            if outputs.is_main:
                observers.attach(outputs.name, outputs.run.path)
            data = load_data(args, components)
            loss_for_task(args, components, data.task, plugins)
            with training_session(args) as session:
                built = build_model(args, plugins, components, data, outputs.store, session)
                plan = plan_training(args, components, data, built, outputs.store, session)
                trainer = make_trainer(args, components, data, built, plan, outputs, session,
                                       plugins, observers.epoch_callback(on_epoch_end),
                                       checkpoints)
                saved = trainer.read_checkpoint() if args.resume and session.is_main else None
                found = find_lr(args, trainer, session) if args.lr_auto else None
                record = training_record(args, components, data, built, plan, session)
                if found is not None:
                    record["lr_find"] = found.record()
                if session.is_main:
                    observers.start(dict(record, classes=data.classes))
                    session.log(describe_run(components, data, built, plan, session))
                    say_balance(args, data, plan.balance, session.log)
                try:
                    result = trainer.fit(resume=args.resume, saved=saved)
                except KeyboardInterrupt:
                    if checkpoints:
                        session.log(f"interrupted: the last finished epoch is checkpointed in "
                                    f"{outputs.run.path}; continue with: tk finetune ... "
                                    f"--name {outputs.name} --resume")
                    raise
                except BaseException:
                    if observers.stopped:  # ended on purpose: nothing to resume
                        outputs.run.finish()
                    raise
                if not session.is_main:
                    return None
                calibration = (calibrate_best(args, built, plan, result, session)
                               if data.task != "multi-label" else None)
                info, metadata = save_model(args, components, data, built, plan, result,
                                            record, outputs, plugins, calibration)
                artifacts = write_artifacts(outputs, result, data.classes, session.log, found)
                outputs.run.finish()
        plugins.notify("tk_model_saved", name=outputs.name, path=str(info.path),
                       metadata=metadata, artifacts=artifacts)
        best = result.best_metrics
        shown = (f"val mAP {best['val_map']:.3f}" if data.task == "multi-label"
                 else f"val acc {best['val_acc']:.3f}")
        session.log(f"saved model '{outputs.name}' (best epoch {result.best_epoch}: {shown}, "
                    f"val loss {best['val_loss']:.4f}) to {info.path}; "
                    f"tk version {metadata['tk_version']}")
    return FinetuneResult(outputs.name, Path(info.path), result.best_epoch, best,
                          result.history, artifacts, result.stopped_early)


# -- outputs: store, name, run folder -----------------------------------------------------

@dataclass
class Outputs:
    store: Any  # model_store.ModelStore
    name: str
    run: Any  # toolkit.train.rundir.RunDir
    is_main: bool
    default_name: bool = False  # tk chose the name: another one is fine

    @contextlib.contextmanager
    def claim(self) -> Iterator[None]:
        """Rank 0 holds the run's lock for the whole run and checks, before any work, that
        every place the run writes to is writable. A default name another run holds (two
        runs started in the same second) becomes ``NAME-2``, ``NAME-3``..."""
        if not self.is_main:
            yield
            return
        from toolkit.train.rundir import check_writable

        with self._locked():
            root = self.store.root
            check_writable([(self.store.models_dir, "the model store's models folder"),
                            (self.store.bases_dir, "the model store's bases folder"),
                            (root / "artifacts", "the model store's artifacts folder"),
                            (self.run.path, "the run folder")])
            yield

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        from toolkit.train.rundir import RunDir, RunInProgressError

        base = self.name
        with contextlib.ExitStack() as held:
            for attempt in range(2, 102):
                try:
                    held.enter_context(self.run.lock())
                except RunInProgressError:
                    if not self.default_name:
                        raise
                else:
                    if not (self.default_name and self.store.model_path(self.name).exists()):
                        break
                    held.close()  # a model of that name appeared meanwhile: next name
                self.name = f"{base}-{attempt}"
                self.run = RunDir(self.run.root, self.name)
            else:
                raise TkError(f"no free default name after {base}-101; pass --name")
            yield


def plan_outputs(args: FinetuneArgs, components: Components) -> Outputs:
    from model_store import ModelStore, check_name
    from model_store.atomic import ensure_dir
    from toolkit import env
    from toolkit.train.rundir import RunDir

    store = ModelStore(args.store)
    runs = store.root / "runs"
    ensure_dir(runs, "model store")  # an unwritable store fails now, not after training
    name = args.name
    chosen = name is None and not args.resume
    if name is None:
        name = (RunDir.latest(runs) if args.resume
                else default_name(components.backbone.name, components.dataset.name))
    check_name(name)  # before training, whatever --overwrite / --resume say
    if not (chosen or args.resume or args.overwrite) and store.model_path(name).is_file():
        raise TkError(f"model '{name}' already exists in {store.root}; "
                      "choose another --name or pass --overwrite")
    is_main = env.integer("RANK", 0) == 0  # torchrun's; torch is not imported yet
    return Outputs(store, name, RunDir(runs, name), is_main, default_name=chosen)


def default_name(backbone: str, dataset: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    bare = re.sub(r"[^A-Za-z0-9._-]", "-", backbone.split(":")[-1])
    return f"{bare}-{dataset}-{stamp}"


# -- data ------------------------------------------------------------------------------------

@dataclass
class Data:
    source: Any  # DatasetSource: classes, splits(...)
    classes: list[str]
    options: dict[str, Any]  # what the dataset factory got
    task: str = "single-label"  # or "multi-label" (the source says, or --multi-label)


def load_data(args: FinetuneArgs, components: Components) -> Data:
    """The dataset (listing files needs no torch), its classes checked."""
    ds = components.dataset
    options = with_accepted(ds, 0, {"num_classes": args.classes, "seed": args.seed},
                            components.dataset_options)
    ds.check_options(options)
    source = ds.factory(**options)
    classes = list(source.classes)
    if args.classes is not None and len(classes) != args.classes:
        raise DataError(f"--classes {args.classes} but the data has {len(classes)} classes"
                        f" ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
    if len(classes) < 2:
        raise DataError(f"need at least 2 classes, the data has {len(classes)}")
    multi = args.multi_label or getattr(source, "task", None) == "multi-label"
    if multi and (args.mixup or args.cutmix):
        raise TkError("--mixup and --cutmix are for single-label data; this data is "
                      "multi-label")
    if args.threshold is not None and not multi:
        raise TkError("--threshold is for multi-label data (a csv with a 'labels' column, "
                      "or --multi-label)")
    return Data(source, classes, options, "multi-label" if multi else "single-label")


# -- session: device, precision, process group ---------------------------------------------

@dataclass
class Session:
    dist: Any  # toolkit.distributed.DistInfo
    device: Any  # torch.device
    precision: str
    log: Callable[[str], None]
    workers: int = 0  # DataLoader workers (--workers, else the machine's default)
    auto: tuple[str, ...] = ()  # the settings tk chose for this machine (not given)

    @property
    def is_main(self) -> bool:
        return bool(self.dist.is_main)


@contextlib.contextmanager
def training_session(args: FinetuneArgs) -> Iterator[Session]:
    import torch

    from toolkit import distributed as D
    from toolkit.devices import resolve_device, resolve_precision, train_workers

    dist = D.from_env()
    device = resolve_device(args.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    precision = resolve_precision(args.precision, device)
    workers = train_workers(dist.world_size) if args.workers is None else args.workers
    auto = tuple(k for k, given in (("precision", args.precision != "auto"),
                                    ("channels_last", args.channels_last is not None),
                                    ("workers", args.workers is not None)) if not given)
    D.init(dist, device)
    try:
        yield Session(dist, device, precision, _logger(dist.is_main), workers, auto)
    finally:
        D.shutdown()


# -- model -----------------------------------------------------------------------------------

@dataclass
class Built:
    backbone: Any  # toolkit.model.backbone.Backbone
    model: Any  # Classifier
    data_config: Any  # DataConfig


def build_model(args: FinetuneArgs, plugins: Any, components: Components, data: Data,
                store: Any, session: Session) -> Built:
    """Backbone (with its weights) + head. Both are first built on torch's meta device to
    check their size before anything is allocated; the real build is seeded, so random
    initialisation repeats exactly."""
    from toolkit.model.assemble import Classifier, build_backbone, build_head
    from toolkit.model.budget import Budget, check_on_meta
    from toolkit.train.trainer import seed_everything

    bb, head = components.backbone, components.head
    bb_opts, head_opts = args.options["backbone"], args.options["head"]

    def build(budget: Budget, pretrained: Any = False) -> tuple[Any, Any]:
        with budget.building(_labelled("backbone", bb, bb_opts)):
            backbone = build_backbone(plugins, bb.qualified_name,
                                      pretrained, bb_opts)
        with budget.building(_labelled("head", head, head_opts)):
            module = build_head(plugins, head.qualified_name,
                                backbone.num_features, len(data.classes), head_opts)
        return backbone, module

    check_on_meta(build)
    seed_everything(args.seed)
    pretrained, weights_source = resolve_weights(args, bb.qualified_name, store)
    backbone, head_module = build(Budget(), pretrained)
    if weights_source == "store":
        backbone.weights.source = "store"
    model = Classifier(backbone.module, head_module)
    data_config = _choose_input_size(backbone, args.image_size,
                                     getattr(data.source, "image_size", None), session.log)
    return Built(backbone, model, data_config)


def _labelled(role: str, component: Any, options: dict[str, Any]) -> str:
    given = ", ".join(f"{k}={v!r}" for k, v in options.items())
    return f"{role} '{component.qualified_name}'" + (f" ({given})" if given else "")


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


# -- plan: freezing, loss, optimizer, data splits, feature cache ---------------------------

@dataclass
class Plan:
    config: Any  # TrainConfig
    freezing: Any  # Freezing
    loss_fn: Any
    optimizer_factory: Callable[..., Any]
    train_set: Any
    val_set: Any
    lr_source: str
    feature_cache: bool
    balance: Any = None  # Balance


@dataclass
class Balance:
    """The training split's class counts and what the imbalance recipes made of them."""

    counts: list[int] | None
    loss_weights: list[float] | None = None
    sample_weights: list[float] | None = None


def class_balance(args: FinetuneArgs, data: Data, train_set: Any) -> Balance:
    """Count the training images per class; the loss weights of ``--class-weights`` and the
    image weights of ``--sampler balanced``."""
    from toolkit.train import balance as B

    targets = B.targets_of(train_set)
    if targets is None:
        if args.class_weights or args.sampler:
            raise DataError("--class-weights and --sampler need a dataset that lists its "
                            "labels (a 'targets' attribute); this one does not")
        return Balance(None)
    counts = B.class_counts(targets, len(data.classes))
    out = Balance(counts)
    if args.class_weights:
        out.loss_weights = B.loss_weights(counts, len(targets), args.class_weights,
                                          data.task == "multi-label")
    if args.sampler == "balanced":
        out.sample_weights = B.sample_weights(targets, counts)
    return out


def say_balance(args: FinetuneArgs, data: Data, balance: Balance | None, log: Any) -> None:
    """The counts per class, and a warning when they are far apart (after a resume's
    checkpoint was accepted: a refused resume stays one line)."""
    from toolkit.train import balance as B

    if balance is not None and balance.counts is not None:
        B.check_counts(balance.counts, data.classes, log,
                       bool(args.class_weights or args.sampler))


def make_loss(args: FinetuneArgs, components: Components, data: Data, balance: Balance
              ) -> Any:
    """The loss module, given ``num_classes`` (when it takes it) and, with
    ``--class-weights``, the weights as its ``class_weights`` (single-label) or
    ``pos_weight`` (multi-label) option."""
    from toolkit.model.assemble import call_factory

    loss_c = components.loss
    given = dict(args.options["loss"])
    if balance.loss_weights is not None:  # the loss takes them (checked by loss_for_task)
        key = "pos_weight" if data.task == "multi-label" else "class_weights"
        given[key] = balance.loss_weights
    loss_opts = with_accepted(loss_c, 0, {"num_classes": len(data.classes)}, given)
    return call_factory("loss", loss_c.name, loss_c.factory, options=given, **loss_opts)


def plan_training(args: FinetuneArgs, components: Components, data: Data, built: Built,
                  store: Any, session: Session) -> Plan:
    from toolkit.data.transforms import eval_transform, train_transform
    from toolkit.devices import resolve_channels_last
    from toolkit.model.assemble import call_factory
    from toolkit.model.freezing import Freezing
    from toolkit.train import features
    from toolkit.train.optim import param_groups
    from toolkit.train.trainer import TrainConfig

    freezing = Freezing.from_options(built.backbone, args.freeze, args.unfreeze_at)
    lr, lr_source = choose_lr(args, components.optimizer)
    lr_scale = args.backbone_lr_scale
    if lr_scale is None:
        lr_scale = 0.1 if args.pretrained else 1.0

    opt_c = components.optimizer
    optimizer_factory = functools.partial(opt_c.factory, **args.options["optimizer"])
    # a bad optimizer option value fails now, with one line, not when training starts
    call_factory("optimizer", opt_c.name, optimizer_factory,
                 param_groups(built.model, lr, args.weight_decay, lr_scale),
                 options=args.options["optimizer"], lr=lr, weight_decay=args.weight_decay)

    use_cache = features.should_cache(args.cache_features, freezing.initial == freezing.n_groups,
                                      args.augment, args.unfreeze_at)
    use_cache = use_cache and not (args.mixup or args.cutmix)  # they mix images
    if use_cache and args.augment:
        session.log("note: with --cache-features the features are computed once, without "
                    "augmentation")
    train_set, val_set = data.source.splits(
        train_transform(built.data_config, augment=args.augment and not use_cache),
        eval_transform(built.data_config), val_split=args.val_split, seed=args.seed)
    if len(val_set) == 0:
        raise DataError("the validation split is empty: add images or raise --val-split")
    balance = class_balance(args, data, train_set)
    loss_fn = make_loss(args, components, data, balance)
    if use_cache:
        train_set, val_set = features.cached_features(
            built.backbone, built.data_config, (train_set, val_set),
            key_parts={"backbone": components.backbone.qualified_name,
                       "backbone_options": args.options["backbone"],
                       "dataset": components.dataset.qualified_name, "options": data.options,
                       "val_split": args.val_split, "seed": args.seed},
            cache_dir=store.root / "cache" / "features", device=session.device,
            precision=session.precision, batch_size=args.batch_size, workers=session.workers,
            dist=session.dist, log=session.log)
        freezing.use_features_only()

    config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=lr, weight_decay=args.weight_decay,
        backbone_lr_scale=lr_scale, warmup_epochs=args.warmup_epochs, patience=args.patience,
        precision=session.precision,
        channels_last=resolve_channels_last(args.channels_last, built.model, session.device),
        compile=args.compile, workers=session.workers, seed=args.seed, quiet=args.quiet,
        task=data.task, accumulate=args.accumulate, ema=args.ema, mixup=args.mixup,
        cutmix=args.cutmix, sample_weights=balance.sample_weights)
    return Plan(config, freezing, loss_fn, optimizer_factory, train_set, val_set, lr_source,
                use_cache, balance)


def run_identity(args: FinetuneArgs, components: Components, data: Data, built: Built,
                 plan: Plan) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the model, the data, the classes and
    the training recipe that shaped the saved state."""
    return _jsonable({
        "backbone": components.backbone.qualified_name,
        "backbone_options": args.options["backbone"],
        "head": components.head.qualified_name, "head_options": args.options["head"],
        "input_size": list(built.data_config.input_size),
        "classes": data.classes,
        "dataset": components.dataset.qualified_name, "dataset_options": data.options,
        "val_split": args.val_split, "seed": args.seed,
        "loss": components.loss.qualified_name, "loss_options": args.options["loss"],
        "optimizer": components.optimizer.qualified_name,
        "optimizer_options": args.options["optimizer"],
        "freeze": plan.freezing.initial, "unfreeze_at": args.unfreeze_at,
        "feature_cache": plan.feature_cache,
        **recipe_identity(args, data),
    })


def recipe_identity(args: FinetuneArgs, data: Data) -> dict[str, Any]:
    """The recipes that shape a checkpoint's state (a resume with others is refused);
    only those that are on, so checkpoints of runs without them keep their identity."""
    out: dict[str, Any] = {}
    if data.task != "single-label":
        out["task"] = data.task
    for key in ("class_weights", "sampler", "ema"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    for key in ("mixup", "cutmix"):
        if getattr(args, key):
            out[key] = getattr(args, key)
    if args.accumulate != 1:
        out["accumulate"] = args.accumulate
    return out


def make_trainer(args: FinetuneArgs, components: Components, data: Data, built: Built,
                 plan: Plan, outputs: Outputs | None, session: Session, plugins: Any,
                 on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
                 checkpoints: bool = True) -> Any:
    """The trainer (``outputs`` None: no checkpoints, for `tk lr-find`)."""
    from toolkit.train.trainer import Trainer

    return Trainer(
        built.model, plan.freezing, plan.loss_fn, plan.optimizer_factory, plan.train_set,
        plan.val_set, len(data.classes), plan.config, session.device,
        checkpoint=outputs.run.checkpoint if checkpoints and outputs is not None else None,
        run_identity=run_identity(args, components, data, built, plan), dist=session.dist,
        on_epoch_end=on_epoch_end or (
            lambda e, m: plugins.notify("tk_epoch_end", epoch=e, metrics=m)),
        log=session.log)


def training_record(args: FinetuneArgs, components: Components, data: Data, built: Built,
                    plan: Plan, session: Session) -> dict[str, Any]:
    """The ``training`` metadata: the arguments as given, and every default chosen."""
    record = {k: v for k, v in asdict(args).items() if k != "options"}
    record.update(
        backbone=components.backbone.qualified_name, head=components.head.qualified_name,
        loss=components.loss.qualified_name, optimizer=components.optimizer.qualified_name,
        options=args.options, lr=plan.config.lr, lr_source=plan.lr_source,
        backbone_lr_scale=plan.config.backbone_lr_scale,
        frozen_groups=plan.freezing.initial, layer_groups=plan.freezing.n_groups,
        device=str(session.device), precision=session.precision,
        channels_last=plan.config.channels_last, workers=plan.config.workers,
        auto=list(session.auto),
        world_size=session.dist.world_size, dataset=components.dataset.qualified_name,
        dataset_options=data.options, feature_cache=plan.feature_cache, task=data.task,
        # where --data was, whatever the working folder (tk review's leakage check)
        data_resolved=str(Path(args.data).resolve()) if args.data else None)
    if plan.balance is not None and plan.balance.counts is not None:
        record["class_counts"] = plan.balance.counts
        if plan.balance.loss_weights is not None:
            record["class_weight_values"] = plan.balance.loss_weights
    return _jsonable(record)


def describe_run(components: Components, data: Data, built: Built, plan: Plan,
                 session: Session) -> str:
    backbone = built.backbone
    return (f"fine-tuning {backbone.name} ({plan.freezing.n_groups} layer groups, "
            f"{plan.freezing.initial} frozen, weights: {backbone.weights.source}) on "
            f"{components.dataset.name}: {len(data.classes)} classes, {len(plan.train_set)} "
            f"train / {len(plan.val_set)} val images at {built.data_config.input_size[1]}px, "
            f"device {session.device}, {speed_settings(plan.config, session)}, "
            f"lr {plan.config.lr:g}")


def speed_settings(config: Any, session: Session) -> str:
    """``precision bf16-mixed (auto), channels-last on (auto), 2 workers (auto)``."""
    def auto(key: str) -> str:
        return " (auto)" if key in session.auto else ""

    return (f"precision {config.precision}{auto('precision')}, channels-last "
            f"{'on' if config.channels_last else 'off'}{auto('channels_last')}, "
            f"{config.workers} workers{auto('workers')}")


# -- lr: the range test ------------------------------------------------------------------------

def find_lr(args: FinetuneArgs, trainer: Any, session: Session, what: str = "--lr auto"
            ) -> Any:
    """``--lr auto``: the LR range test on the training split (model restored after); the
    trainer then trains with its suggestion, said on stderr."""
    from toolkit.train.lr_find import range_test

    session.log(f"{what}: LR range test ({args.lr_find_steps} steps, 1e-07 .. 10)...")
    found = range_test(trainer, steps=args.lr_find_steps)
    trainer.cfg.lr = found.suggestion
    low = found.record()["min_loss_lr"] or 0
    if found.why:
        session.log(f"{what}: lr {found.suggestion:.3g} (valley rule: {found.why}; "
                    f"{len(found.lrs)} steps, lowest loss at lr {low:.3g})")
    else:
        session.log(f"{what}: lr {found.suggestion:.3g} ({found.rule}: {len(found.lrs)} "
                    f"steps, lowest loss at lr {low:.3g}; fastai's valley rule would say "
                    f"{found.valley:.3g})")
    return found


@dataclass
class LrFindResult:
    suggestion: float
    record: dict[str, Any]
    plot: str | None


def lr_find(args: FinetuneArgs, plugins: Any) -> LrFindResult | None:
    """`tk lr-find`: the steps of :func:`finetune` up to the trainer, then the LR range
    test alone (nothing trained, nothing saved but the plot,
    ``$TK_HOME/artifacts/NAME/lr_find.png``). Returns the result on rank 0."""
    from model_store import ModelStore, check_name
    from toolkit import plots

    args.check()
    args.lr_auto = True
    components = resolve_components(args, plugins)
    store = ModelStore(args.store)
    name = args.name or default_name(components.backbone.name, components.dataset.name)
    check_name(name)
    data = load_data(args, components)
    with training_session(args) as session:
        built = build_model(args, plugins, components, data, store, session)
        plan = plan_training(args, components, data, built, store, session)
        trainer = make_trainer(args, components, data, built, plan, None, session, plugins)
        found = find_lr(args, trainer, session, "lr-find")
        if not session.is_main:
            return None
    png: str | None = str(store.artifact_path(name, "lr_find.png"))
    try:
        plots.lr_finder(found.lrs, found.losses, found.suggestion, Path(str(png)))
    except Exception as exc:  # noqa: BLE001 - the suggestion stands without its plot
        session.log(f"warning: could not draw the plot ({exc})")
        png = None
    return LrFindResult(found.suggestion, found.record(), png)


# -- save and artifacts ------------------------------------------------------------------------

def calibrate_best(args: FinetuneArgs, built: Built, plan: Plan, result: Any,
                   session: Session) -> dict[str, Any] | None:
    """The best epoch's weights, and their calibration temperature fitted on the
    validation split (``meta["calibration"]``; said on stderr)."""
    from toolkit.train.calibrate import calibrate

    built.model.load_state_dict(result.best_state)
    net = built.model.head if plan.feature_cache else built.model
    try:
        record = calibrate(net, plan.val_set, device=session.device,
                           precision=session.precision, batch_size=args.batch_size,
                           channels_last=args.channels_last and not plan.feature_cache)
    except Exception as exc:  # calibration must never lose a trained model
        session.log(f"warning: could not calibrate the scores ({exc}); scores stay the raw "
                    "softmax")
        return None
    if record is not None and not args.quiet:
        if record.get("rejected"):
            session.log(f"calibration: scores stay the plain softmax: the temperature "
                        f"fitted on {record['images']} validation images "
                        f"({record['fitted']:.3f}) is not used, {record['rejected']}")
        else:
            session.log(f"calibration: temperature {record['temperature']:.3f} on "
                        f"{record['images']} validation images (ECE "
                        f"{record['ece_before']:.4f} -> {record['ece_after']:.4f})")
    return record


def save_model(args: FinetuneArgs, components: Components, data: Data, built: Built,
               plan: Plan, result: Any, record: dict[str, Any], outputs: Outputs,
               plugins: Any, calibration: dict[str, Any] | None = None
               ) -> tuple[Any, dict[str, Any]]:
    """The best epoch's weights and everything inference needs, into the store (a fully
    frozen backbone goes into a shared base)."""
    from toolkit.model.assemble import ModelSpec
    from toolkit.version import __version__

    model = built.model
    model.load_state_dict(result.best_state)
    spec = ModelSpec(backbone=components.backbone.qualified_name,
                     num_classes=len(data.classes), head=components.head.qualified_name,
                     backbone_options=args.options["backbone"],
                     head_options=args.options["head"])
    metadata = {
        "spec": spec.to_dict(),
        "task": data.task,
        "classes": data.classes,
        "data_config": built.data_config.to_dict(),
        "training": record,
        "components": components.record(plugins),
        "metrics": {"best_epoch": result.best_epoch, "best": result.best_metrics,
                    "history": result.history, "confusion": result.confusion,
                    "stopped_early": result.stopped_early},
        "weights": built.backbone.weights.to_dict(),
        "tk_version": __version__,
    }
    if data.task == "multi-label":
        metadata.update(multilabel_meta(args, result, data.classes))
    if calibration is not None:
        metadata["calibration"] = calibration
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fully_frozen = result.frozen_groups_end == plan.freezing.n_groups
    # frozen tensors are kept once in the store (shared with the weights they came from)
    shared = ["backbone."] if fully_frozen else [
        k for k, p in model.named_parameters() if not p.requires_grad]
    info = outputs.store.save(outputs.name, state, metadata, shared=shared,
                              overwrite=args.overwrite or args.resume)
    return info, metadata


def multilabel_meta(args: FinetuneArgs, result: Any, classes: list[str]) -> dict[str, Any]:
    """``thresholds`` (per class: maximising F1 on the validation split, or ``--threshold``)
    and the best model's validation scores at those thresholds (``metrics_at_thresholds``)."""
    from toolkit.metrics import best_f1_thresholds, scores

    probs, targets = result.val_outputs
    if args.threshold is not None:
        thresholds, source = [float(args.threshold)] * len(classes), "--threshold"
    else:
        thresholds, source = best_f1_thresholds(probs, targets), "validation F1"
    s = scores(probs, targets, thresholds)
    return {"thresholds": thresholds, "threshold_source": source,
            "metrics_at_thresholds": {"map": s.map, "f1_micro": s.f1_micro,
                                      "f1_macro": s.f1_macro, "exact_match": s.exact_match,
                                      "ap": s.ap}}


def write_artifacts(outputs: Outputs, result: Any, classes: list[str], log: Any,
                    found: Any = None) -> dict[str, str]:
    from toolkit import plots

    store, name = outputs.store, outputs.name
    out = {}
    try:
        if found is not None:
            lr_png = store.artifact_path(name, "lr_find.png")
            plots.lr_finder(found.lrs, found.losses, found.suggestion, lr_png)
            out["lr_find"] = str(lr_png)
        curves = store.artifact_path(name, "curves.png")
        plots.training_curves(result.history, curves)
        out["curves"] = str(curves)
        cm = store.artifact_path(name, "confusion.png")
        plots.confusion_matrix(result.confusion, classes, cm)
        out["confusion"] = str(cm)
    except Exception as exc:  # a plot must never lose a trained model
        log(f"warning: could not draw the plots ({exc})")
    return out


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))


def _logger(enabled: bool) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if enabled:
            print(msg, file=sys.stderr, flush=True)

    return log
