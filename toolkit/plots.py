"""Training-curve and confusion-matrix PNGs (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(history: list[dict[str, float]], path: Path) -> None:
    """Loss (train, val) and accuracy (train, val) per epoch, side by side."""
    plt = _pyplot()
    epochs = [int(m["epoch"]) for m in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    ax_loss.plot(epochs, [m["train_loss"] for m in history], "o-", label="train")
    ax_loss.plot(epochs, [m["val_loss"] for m in history], "o-", label="val")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.plot(epochs, [m["train_acc"] for m in history], "o-", label="train")
    ax_acc.plot(epochs, [m["val_acc"] for m in history], "o-", label="val top-1")
    if history and "val_top5" in history[0]:
        ax_acc.plot(epochs, [m["val_top5"] for m in history], "o--", label="val top-5")
    ax_acc.set(title="accuracy", xlabel="epoch", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def lr_finder(lrs: list[float], losses: list[float], suggestion: float, path: Path) -> None:
    """The LR range test: smoothed loss against the learning rate (log scale), the
    suggestion marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=100)
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggestion {suggestion:.2g}")
    finite = [v for v in losses if v == v and abs(v) != float("inf")]
    if finite:  # the divergence at the end would squash the interesting part flat
        low, first = min(finite), finite[0]
        high = max(first, low) + 0.5 * max(abs(first - low), 0.05 * abs(low), 1e-3)
        ax.set_ylim(low - 0.1 * (high - low), high)
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss (smoothed)", title="LR range test")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path,
                     title: str = "confusion (rows: true, columns: predicted)") -> None:
    plt = _pyplot()
    n = len(classes)
    size = min(12.0, 2.5 + 0.5 * n)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    peak = max((v for row in matrix for v in row), default=0)
    if n <= 30:
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center",
                        color="white" if v > peak / 2 else "black", fontsize=8)
    ax.set(title=title, xlabel="predicted", ylabel="true")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path: Path) -> None:  # type: ignore[no-untyped-def]
    """Render to memory, then write atomically through the store's writer (a killed
    writer's temp file goes with the next successful write)."""
    import io

    from model_store.atomic import atomic_write, clean_stale_temps

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write(path, [buf.getvalue()], "plot")
    clean_stale_temps(path.parent)
