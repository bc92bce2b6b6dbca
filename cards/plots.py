"""The model card's plots: loss curves from a Trainer's log history, and where the weights sit on the grid.

The statistics (`loss_series`, `level_counts`, `grid_distance_histogram`) need torch only; drawing needs
matplotlib, imported lazily with its Agg backend through the object-oriented API (no pyplot, so the
caller's matplotlib backend and figures are left alone). `matplotlib_available()` says whether plots can
be drawn; the card leaves them out (with a warning) when they cannot.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_lotion.nn import LotionLinear, PackedLinear
from hf_lotion.quant.grid import int_range, scaled_values

# How the plots look on the Hub: about 840 x 480 pixels, readable at the card's column width.
FIGSIZE = (7.0, 4.0)
DPI = 120
DISTANCE_BINS = 50  # bins of the distance histogram over [0, 1/2]
SMOOTH_FROM = 30  # training-loss logs from which a moving average is drawn over the raw curve grid steps


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# -- statistics --------------------------------------------------------------------------------------------


# The log-history keys plotted, with their legend labels. `loss` is the training loss Trainer logs every
# `logging_steps`; LotionTrainer's evaluation logs the quantized model's `eval_loss` and the latent weights'
# `eval_latent_loss`. (`train_loss`, the run's mean in the last entry, is not a curve.)
LOSS_KEYS = {
    "loss": "training loss",
    "eval_loss": "eval loss",
    "eval_latent_loss": "eval loss, latent weights",
}


def loss_series(log_history: Sequence[Mapping] | None) -> dict[str, list[tuple[float, float]]]:
    """`{key: [(step, value), ...]}` for the keys of `LOSS_KEYS` with finite values, in step order."""
    series: dict[str, list[tuple[float, float]]] = {}
    for entry in log_history or ():
        if not isinstance(entry, Mapping):
            continue
        step = _finite(entry.get("step"))
        if step is None:
            continue
        for key in LOSS_KEYS:
            value = _finite(entry.get(key))
            if value is not None:
                series.setdefault(key, []).append((step, value))
    return {key: sorted(points) for key, points in series.items()}


@dataclass
class LevelCounts:
    """How many weights of the quantized layers of one bit width sit at each integer level."""

    bits: int
    grid: str = "full"
    layers: int = 0
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    @property
    def levels(self) -> list[int]:
        low, high = int_range(self.bits)
        return list(range(low, high + 1))

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def share(self, level: int) -> float:
        return float(self.counts[level - int_range(self.bits)[0]]) / max(self.total, 1)

    @property
    def end_levels(self) -> tuple[int, int]:
        """The outermost levels the scale rule reaches: `(-8, 7)` on the full 4-bit grid, `(-7, 7)` restricted."""
        low, high = int_range(self.bits)
        return (-high if self.grid == "restricted" else low), high

    @property
    def end_share(self) -> float:
        """The share of weights at the end levels (those the grid clips to)."""
        low, high = self.end_levels
        return self.share(low) + self.share(high)


@torch.no_grad()
def level_counts(model: nn.Module) -> dict[int, LevelCounts]:
    """Integer-level counts of every quantized layer (packed, or the levels `convert` would pack), by bit width."""
    found: dict[int, LevelCounts] = {}
    for module in model.modules():
        if isinstance(module, PackedLinear):
            bits, grid, q = module.bits, module.grid, module.int_weight()
        elif isinstance(module, LotionLinear):
            q, bits, grid = module.quantize_weight()[0], module.spec.bits, module.spec.grid
        else:
            continue
        entry = found.setdefault(
            bits, LevelCounts(bits, grid, counts=torch.zeros(2**bits, dtype=torch.int64))
        )
        entry.layers += 1
        entry.counts += torch.bincount(q.flatten().long().cpu() - int_range(bits)[0], minlength=2**bits)
    return dict(sorted(found.items()))


@dataclass
class DistanceHistogram:
    """Histogram of the latent weights' distance `|v - q|` to their grid point, in grid steps (`v = w / s`)."""

    counts: torch.Tensor  # DISTANCE_BINS bins over [0, 1/2]
    beyond: int  # weights further than half a step from every level: clipped by a (learned) scale
    layers: int
    pinned: int = 0  # each absmax group's largest weight, left out: the absmax scale fixes where it sits

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.beyond

    def share_within(self, distance: float) -> float:
        """The share of weights within `distance` (a multiple of the bin width) of a grid point."""
        bins = round(distance / (0.5 / DISTANCE_BINS))
        return float(self.counts[:bins].sum()) / max(self.total, 1)


# A distance this little past 1/2 is a scale's rounding (a bf16 scale puts a group's absmax just past
# qmax + 1/2), not clipping: it counts in the last bin.
_HALF_STEP_SLACK = 1e-3


@torch.no_grad()
def grid_distance_histogram(model: nn.Module) -> DistanceHistogram | None:
    """The distance histogram of every `LotionLinear`'s latent weight (None without such layers).

    `q` is the level the weight is packed to, `clamp(round(v))`, so the distance is what rounding (and
    clipping) moves the weight by, in units of its group's scale. With absmax scales, each group's
    largest-magnitude weight sits where the scale rule puts it (0.5 from a level on the full grid, on a
    level on the restricted one), whatever training did: those weights are left out (`pinned`).
    """
    counts = torch.zeros(DISTANCE_BINS, dtype=torch.float64)
    beyond = layers = pinned = 0
    for module in model.modules():
        if not isinstance(module, LotionLinear) or module.weight.is_meta:
            continue
        spec = module.spec
        low, high = int_range(spec.bits)
        v = scaled_values(module.weight.detach(), module.quant_scales().detach(), spec.group_size)
        distance = (v - torch.round(v).clamp_(low, high)).abs_()
        keep = torch.ones_like(distance, dtype=torch.bool)
        if module.weight_scale is None:  # absmax scales
            keep.scatter_(-1, v.abs().argmax(dim=-1, keepdim=True), False)
            pinned += int(keep.numel() - keep.sum())
        distance = distance[keep].cpu()
        inside = distance[distance <= 0.5 + _HALF_STEP_SLACK].clamp_(max=0.5)
        counts += torch.histc(inside.double(), bins=DISTANCE_BINS, min=0.0, max=0.5)
        beyond += distance.numel() - inside.numel()
        layers += 1
    if layers == 0:
        return None
    return DistanceHistogram(counts.round().long(), beyond, layers, pinned)


# -- drawing ------------------------------------------------------------------------------------------------


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike) -> None:
    # The caller writes under a temporary name, so the format cannot come from the suffix.
    figure.savefig(path, format="png", dpi=DPI, metadata={"Software": None})


def _rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Centered moving average; near the ends, over the points there are."""
    half = window // 2
    return [
        sum(values[max(0, i - half) : i + half + 1]) / len(values[max(0, i - half) : i + half + 1])
        for i in range(len(values))
    ]


def plot_losses(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    references: Mapping[str, float] | None = None,
) -> None:
    """Loss curves against the optimizer step, with horizontal lines at `references` ({label: value}).

    A long, noisy training loss is drawn faint with its moving average on top.
    """
    figure = _figure()
    axes = figure.add_subplot()
    styles = {
        "loss": dict(color="#1f77b4", linewidth=1.2),
        "eval_loss": dict(color="#d62728", marker="o", markersize=4, linewidth=1.6),
        "eval_latent_loss": dict(color="#9467bd", marker="s", markersize=3, linewidth=1.0, linestyle="--"),
    }
    for key, points in series.items():
        steps, values = zip(*points, strict=True)
        style = dict(styles.get(key, {}))
        if len(points) == 1:
            style.setdefault("marker", "o")
        label = LOSS_KEYS.get(key, key)
        if key == "loss" and len(points) >= SMOOTH_FROM:
            window = max(3, len(points) // 10) | 1
            axes.plot(steps, values, color=style["color"], linewidth=0.8, alpha=0.3, label=label)
            style["linewidth"] = 1.8
            label = f"{label}, moving average of {window} logs"
            values = _rolling_mean(values, window)
        axes.plot(steps, values, label=label, **style)
    reference_colors = ("#2ca02c", "#ff7f0e", "#7f7f7f")
    for (label, value), color in zip((references or {}).items(), reference_colors, strict=False):
        axes.axhline(value, color=color, linestyle=":", linewidth=1.4, label=f"{label} ({value:.3f})")
    # Early training losses dwarf the rest: frame the later part of the run, where the methods differ.
    values = [v for points in series.values() for _, v in points] + list((references or {}).values())
    late = [v for points in series.values() for _, v in points[len(points) // 5 :]]
    late += list((references or {}).values())
    title = "Loss during training"
    if late and max(values) > 1.5 * max(late) > 0:
        low, high = min(values), max(late)
        margin = 0.1 * (high - low) or 0.1
        axes.set_ylim(low - margin, high + 3 * margin)
        title += " (the first steps' higher losses are cut off)"
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    figure.legend(loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    _save(figure, path)


def plot_levels(counts: Mapping[int, LevelCounts], path: str | os.PathLike) -> None:
    """One bar chart per bit width: the share of weights at each integer level."""
    figure = _figure()
    panels = figure.subplots(1, len(counts), squeeze=False)[0]
    for axes, entry in zip(panels, counts.values(), strict=True):
        levels = entry.levels
        shares = [100.0 * entry.share(level) for level in levels]
        axes.bar(levels, shares, width=0.8, color="#1f77b4")
        axes.set_xticks(levels if len(levels) <= 16 else levels[:: len(levels) // 8])
        axes.set_xlabel("integer level q (weight = scale x q)")
        axes.set_ylabel("share of weights (%)")
        layers = f"{entry.layers} layer{'s' if entry.layers != 1 else ''}"
        axes.set_title(f"{entry.bits}-bit levels ({layers}, {entry.total:,} weights)", fontsize=10)
        axes.grid(True, axis="y", alpha=0.3)
    _save(figure, path)


def plot_grid_distance(histogram: DistanceHistogram, path: str | os.PathLike) -> None:
    """The distance histogram as a density over [0, 1/2], with the density of weights that ignore the grid."""
    figure = _figure()
    axes = figure.add_subplot()
    width = 0.5 / DISTANCE_BINS
    edges = [i * width for i in range(DISTANCE_BINS)]
    total = max(histogram.total, 1)
    density = [float(c) / (total * width) for c in histogram.counts]
    axes.bar(edges, density, width=width, align="edge", color="#1f77b4", label="latent weights")
    axes.axhline(2.0, color="#7f7f7f", linestyle=":", linewidth=1.4, label="uniform: no pull to the grid")
    axes.set_xlim(0.0, 0.5)
    axes.set_xlabel("distance to the nearest grid point |w/s - q| (grid steps)")
    axes.set_ylabel("density")
    title = f"Distance to the grid ({histogram.layers} layers, {histogram.total:,} weights)"
    if histogram.beyond:
        title += f"; {histogram.beyond:,} clipped, further than 0.5"
    axes.set_title(title, fontsize=10)
    axes.grid(True, axis="y", alpha=0.3)
    figure.legend(loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    _save(figure, path)
