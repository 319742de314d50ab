"""Write images of any registered tk dataset to an image folder (``OUT_DIR/<class>/*.png``).

    python examples/export_dataset.py DATASET OUT_DIR [--classes N] [--per-class K]
        [--split val|train] [--val-split F] [--seed S] [--opt key=value]...

The dataset is built through the plugin registry by name (``shapes``, ``imagefolder`` with
``--opt path=...``, or one from a third-party plugin), its train or validation part is taken
with identity transforms, and the first ``K`` images of each class (in the dataset's order)
are saved as PNG. ``make demo`` uses it to draw fresh images for ``tk infer``:

    python examples/export_dataset.py shapes demo-out/images --classes 5 --per-class 4

``--classes`` and ``--seed`` are handed to the dataset as ``num_classes`` / ``seed`` when
its factory takes them; ``--opt`` sets any other option (values parsed like ``tk --opt``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _identity(img: Any) -> Any:
    return img


def _to_pil(img: Any) -> Any:
    """A PIL image from what the dataset gives (PIL already, or a ``[C,H,W]`` tensor)."""
    if hasattr(img, "save"):
        return img
    from torchvision.transforms.functional import to_pil_image

    return to_pil_image(img)


def export(dataset: str, out_dir: str | Path, *, classes: int | None = None,
           per_class: int = 10, split: str = "val", val_split: float = 0.2, seed: int = 0,
           options: dict[str, Any] | None = None) -> dict[str, int]:
    """Write up to ``per_class`` images of each class of ``dataset``'s ``split`` part to
    ``out_dir/<class>/``. Returns the number written per class."""
    from toolkit.errors import TkError
    from toolkit.plugin.manager import load_plugins

    if split not in ("train", "val"):
        raise TkError(f"--split must be train or val, got {split!r}")
    if per_class < 1:
        raise TkError(f"--per-class must be at least 1, got {per_class}")
    component = load_plugins().registry("datasets").resolve(dataset)
    opts = dict(options or {})
    accepted = component.accepted_options(0)
    for key, value in (("num_classes", classes), ("seed", seed)):
        if value is not None and key not in opts and (accepted is None or key in accepted):
            opts[key] = value
    component.check_options(opts)
    source = component.factory(**opts)
    names = [str(c) for c in source.classes]
    if classes is not None and len(names) != classes:
        raise TkError(f"--classes {classes} but dataset '{dataset}' has {len(names)} classes")
    train, val = source.splits(_identity, _identity, val_split=val_split, seed=seed)
    part = train if split == "train" else val

    out = Path(out_dir)
    counts = dict.fromkeys(names, 0)
    for index in range(len(part)):
        img, label = part[index]
        name = names[int(label)]
        if counts[name] >= per_class:
            if all(n >= per_class for n in counts.values()):
                break
            continue
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        _to_pil(img).convert("RGB").save(folder / f"{name}_{counts[name]:05d}.png")
        counts[name] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="dataset name (tk list datasets)")
    parser.add_argument("out_dir", help="folder to write <class>/<image>.png into")
    parser.add_argument("--classes", type=int, help="number of classes (num_classes)")
    parser.add_argument("--per-class", type=int, default=10, help="images per class [10]")
    parser.add_argument("--split", choices=("val", "train"), default="val",
                        help="which part of the dataset [val]")
    parser.add_argument("--val-split", type=float, default=0.2,
                        help="validation fraction, as tk finetune's [0.2]")
    parser.add_argument("--seed", type=int, default=0, help="seed, as tk finetune's [0]")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="dataset option (repeatable), e.g. samples=2000")
    args = parser.parse_args(argv)

    from toolkit.errors import TkError
    from toolkit.train.config import parse_value

    try:
        options: dict[str, Any] = {}
        for item in args.opt:
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise TkError(f"--opt {item!r}: expected KEY=VALUE")
            options[key.strip()] = parse_value(value.strip())
        counts = export(args.dataset, args.out_dir, classes=args.classes,
                        per_class=args.per_class, split=args.split,
                        val_split=args.val_split, seed=args.seed, options=options)
    except TkError as exc:
        print(f"export_dataset: error: {exc}", file=sys.stderr)
        return 2
    short = [f"{n} ({c})" for n, c in counts.items() if c < args.per_class]
    total = sum(counts.values())
    print(f"wrote {total} images of {len(counts)} classes to {args.out_dir}", file=sys.stderr)
    if short:
        print(f"note: fewer than {args.per_class} images for: {', '.join(short)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
