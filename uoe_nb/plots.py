"""Figure scaffolding shared by the ``plot_*`` helpers of the result modules.

The chapters never assemble a figure themselves: each result module draws its own
results (``routing.plot_expert_shares``, ``attribution_report.plot_affinity`` and so
on) and returns the :class:`matplotlib.figure.Figure`. Matplotlib is imported only when
a figure is drawn, so the library loads without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["finish_rank_panels", "layer_panels"]


def layer_panels(
    layers: Sequence[int], *, ncols: int = 4, width: float = 3.4, height: float = 2.9, sharey: bool = True
) -> tuple[Any, dict[int, Any], list[Any]]:
    """One panel per MoE layer, on a grid of at most ``ncols`` columns.

    Returns ``(figure, {layer: axes}, first_column)``: the panels left over on the last
    row are hidden, and ``first_column`` holds the axes whose y axis the caller labels.
    Each panel is titled ``layer <index>``.
    """
    import matplotlib.pyplot as plt

    layers = list(layers)
    if not layers:
        raise ValueError("no layers to draw")
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    ncols = min(ncols, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), sharey=sharey, squeeze=False
    )
    flat = list(axes.ravel())
    for ax in flat[len(layers) :]:
        ax.axis("off")
    panels = dict(zip(layers, flat[: len(layers)], strict=True))
    for layer, ax in panels.items():
        ax.set_title(f"layer {layer}")
    return fig, panels, list(axes[:, 0])


def finish_rank_panels(fig: Any, panels: dict[int, Any], first_column: list[Any], *, xlabel: str, ylabel: str) -> Any:
    """Label :func:`layer_panels` whose x axis ranks experts: whole-number ticks, ``xlabel``
    on each panel, ``ylabel`` on the first column, the legend in the first panel."""
    for ax in panels.values():
        ax.set_xlabel(xlabel)
        ax.xaxis.get_major_locator().set_params(integer=True)  # ranks are whole numbers
    for ax in first_column:
        ax.set_ylabel(ylabel)
    first_column[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
