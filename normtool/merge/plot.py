"""The classic barrier plot: loss (and accuracy) along the linear path, one curve per method.

matplotlib is an optional dependency (``pip install 'normtool[plot]'``), imported only here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from normtool import __version__
from normtool.errors import NormtoolError
from normtool.io.atomic import atomic_path
from normtool.merge.path import PathCurve


def plot_barrier(
    curves: Mapping[str, PathCurve], out: Path, title: str, force: bool, inputs: list[Path]
) -> Path:
    """Write a PNG: loss against α (left) and accuracy against α (right)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise NormtoolError(
            "--plot needs matplotlib: pip install 'normtool[plot]' (or omit --plot)", out
        ) from e
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, c in curves.items():
        ax_loss.plot(c.alphas, c.losses, marker="o", label=f"{label} (barrier {c.barrier:.3g})")
        ax_acc.plot(c.alphas, c.accuracies, marker="o", label=label)
    ax_loss.set(xlabel="α (0 = A, 1 = B)", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="α (0 = A, 1 = B)", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(out, inputs, force) as tmp:
            fig.savefig(
                tmp, format="png", dpi=100, metadata={"Software": f"normtool {__version__}"}
            )
    finally:
        plt.close(fig)
    return out
