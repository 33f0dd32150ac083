"""Alignments made visible: a text heatmap for the terminal and a labelled PNG (matplotlib).

Rows are output tokens, columns source tokens; a cell is that output token's cross-attention
weight on that source token (the head mean of the layer named in the model's config.json).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

SHADES = " .:-=+*#%@"  # ten levels, light to dark


def _label(token: str, width: int) -> str:
    text = token.replace("\u2581", "_")  # the tokenizer's word-start mark
    return text[:width].ljust(width)


def text_heatmap(source_tokens: Sequence[str], output_tokens: Sequence[str], weights: np.ndarray, *,
                 cell: int | None = None) -> str:
    """The (T, S) weights as characters, darker = more attention; source labels run down the header."""
    weights = np.asarray(weights, dtype=float)
    if weights.shape != (len(output_tokens), len(source_tokens)):
        raise ValueError(f"weights {weights.shape} do not match {len(output_tokens)} outputs x "
                         f"{len(source_tokens)} sources")
    if cell is None:  # wide enough for the source labels, within reason
        cell = min(8, max([3] + [len(t) for t in source_tokens])) + 1
    row_label = max([len(t) for t in output_tokens] + [6])
    labels = [_label(t, cell - 1) for t in source_tokens]
    lines = [" " * (row_label + 1) + "".join(label + " " for label in labels)]
    for token, row in zip(output_tokens, weights):
        levels = np.minimum((row * len(SHADES)).astype(int), len(SHADES) - 1)
        cells = "".join((SHADES[level] * (cell - 1)) + " " for level in levels)
        lines.append(f"{_label(token, row_label)} {cells}")
    return "\n".join(line.rstrip() for line in lines)


def plot_heatmap(source_tokens: Sequence[str], output_tokens: Sequence[str], weights: np.ndarray,
                 path: str | Path, *, title: str = "") -> Path:
    """Write a labelled heatmap PNG (needs matplotlib: the `loadtest` or `train` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = np.asarray(weights, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(source_tokens) + 1.5),
                                    max(3.0, 0.35 * len(output_tokens) + 1.2)))
    image = ax.imshow(weights, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(source_tokens)), [t.replace("\u2581", "_") for t in source_tokens], rotation=60,
                  ha="right", fontsize=8)
    ax.set_yticks(range(len(output_tokens)), [t.replace("\u2581", "_") for t in output_tokens], fontsize=8)
    ax.set_xlabel("source token")
    ax.set_ylabel("output token")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.04, label="attention weight")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
