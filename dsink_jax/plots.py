"""PNG figures of a pipeline's results (matplotlib, headless)."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str) -> None:
    """Saves and closes a figure; only process 0 writes (multi-host runs)."""
    import jax
    if jax.process_index() == 0:
        fig.savefig(path, dpi=120)
    plt.close(fig)


def per_class_accuracy_vs_size(rows: list[dict], class_counts, path: str) -> None:
    """Per-class test accuracy of every stage against the class's training count (log x)."""
    counts = np.asarray(class_counts)
    order = np.argsort(-counts)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        acc = np.array([np.nan if a is None else a for a in row["per_class_accuracy"]], float)
        ax.plot(counts[order], 100 * acc[order], marker="o", label=row["name"])
    ax.set_xscale("log")
    ax.set_xlabel("training images in the class (log scale)")
    ax.set_ylabel("test accuracy of the class (%)")
    ax.set_title("Per-class accuracy against class size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def read_metric_curve(metrics_path: str, key: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of `key` from a stage's metrics.jsonl, skipping epochs without it."""
    epochs, values = [], []
    if not os.path.exists(metrics_path):
        return epochs, values
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if record.get(key) is not None:
                epochs.append(record["epoch"])
                values.append(record[key])
    return epochs, values


def correction_over_epochs(curves: dict[str, tuple[list[int], list[float]]], path: str,
                           *, title: str = "Noisy training labels corrected") -> None:
    """Correction rate (%) over epochs, one line per stage/curve."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (epochs, values) in curves.items():
        if epochs:
            ax.plot(epochs, 100 * np.asarray(values), marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mislabelled samples predicted as their true label (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
