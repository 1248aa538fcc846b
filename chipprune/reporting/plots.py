"""Figures for people (PNG beside the CSV/JSON that `dvc plots` reads). Matplotlib with the
Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from chipprune.atomic import atomic_path  # noqa: E402


def save_png(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def gate_values_figure(first: dict[str, torch.Tensor], last: dict[str, torch.Tensor], title: str):
    """Gate values z per channel, groups side by side, at the first and the last epoch."""
    fig, axes = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    for ax, z, label in ((axes[0], first, "first epoch"), (axes[1], last, "last epoch")):
        x = 0
        for i, (group, values) in enumerate(z.items()):
            v = values.float().numpy()
            # one filled step artist per group, not a bar per channel: ResNet-101 has 40k
            # channels, and 40k bar patches took 40 s to draw
            ax.stairs(v, range(x, x + len(v) + 1), fill=True, color=f"C{i % 10}", label=group)
            x += len(v)
        ax.set_ylabel(f"z ({label})")
        ax.set_ylim(0, 1.05)
    axes[1].set_xlabel("channel (groups in forward order)")
    fig.suptitle(title)
    return fig


def kept_channels_figure(kept: dict[str, dict[str, int]], dense: dict[str, int], title: str):
    """Kept channels per layer, one line per method (method -> layer -> count)."""
    fig, ax = plt.subplots(figsize=(11, 4))
    layers = list(dense)
    ax.plot(range(len(layers)), [dense[name] for name in layers], "k--", label="dense")
    for method, counts in kept.items():
        ax.plot(range(len(layers)), [counts.get(name, 0) for name in layers], marker=".",
                label=method)
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=6)
    ax.set_ylabel("channels")
    ax.legend()
    ax.set_title(title)
    return fig


def ci_distribution_figure(per_conv: dict[str, torch.Tensor], title: str):
    """One box per prunable conv: the spread of its channels' independence scores."""
    fig, ax = plt.subplots(figsize=(11, 4))
    names = list(per_conv)
    ax.boxplot([per_conv[n].double().cpu().numpy() for n in names], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=90, fontsize=6)
    ax.set_ylabel("channel independence (mean over images)")
    ax.set_title(title)
    return fig
