"""``tk textures-preview``: write sample images of the ``textures`` dataset to a folder.

The folder has one sub-folder per class, so it is also a ready ``--data`` image folder
for ``tk finetune`` / ``tk eval`` and input for ``tk infer``.
"""

from __future__ import annotations

from pathlib import Path

import click

from tk_textures.patterns import MAX_CLASSES


@click.command("textures-preview")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", "num_classes", type=click.IntRange(2, MAX_CLASSES), default=4,
              show_default=True, help="How many texture kinds.")
@click.option("--per-class", type=click.IntRange(1, 10_000), default=4, show_default=True,
              help="Images per kind.")
@click.option("--size", type=click.IntRange(8, 1024), default=40, show_default=True,
              help="Image side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Same seed, same images.")
@click.option("--manifest", is_flag=True,
              help="Also write OUT/manifest.json (for tk finetune --data OUT/manifest.json).")
def preview(out: Path, num_classes: int, per_class: int, size: int, seed: int,
            manifest: bool) -> None:
    """Write sample textures as PNG files into OUT/<class>/ (from the textures plugin)."""
    from tk_textures.manifest import write_manifest
    from tk_textures.patterns import class_names, texture_image

    files = []
    for label, name in enumerate(class_names(num_classes)):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            file = folder / f"{name}-{index:04d}.png"
            texture_image(label, index, size, seed).save(file)
            files.append((file, name))
    listed = f" and {write_manifest(out, files)}" if manifest else ""
    click.echo(f"wrote {num_classes * per_class} images of {num_classes} classes to {out}"
               f"{listed}", err=True)
