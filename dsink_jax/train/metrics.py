"""Evaluation metrics on host arrays: accuracy by class and shot group, noisy-label correction."""

from __future__ import annotations

import numpy as np


def per_class_accuracy(predictions: np.ndarray, labels: np.ndarray, num_classes: int
                       ) -> np.ndarray:
    """Accuracy of each class, float [C] (NaN for a class absent from `labels`)."""
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    correct = np.bincount(labels, weights=(predictions == labels), minlength=num_classes)
    total = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def shot_groups(class_counts: np.ndarray, *, many_threshold: int = 100, few_threshold: int = 20
                ) -> dict[str, np.ndarray]:
    """Class indices of each shot group by training count: many > 100, few < 20, medium between."""
    counts = np.asarray(class_counts)
    return {
        "many": np.flatnonzero(counts > many_threshold),
        "medium": np.flatnonzero((counts <= many_threshold) & (counts >= few_threshold)),
        "few": np.flatnonzero(counts < few_threshold),
    }


def shot_group_accuracies(per_class: np.ndarray, class_counts: np.ndarray, *,
                          many_threshold: int = 100, few_threshold: int = 20) -> dict:
    """Mean per-class accuracy of each shot group ("many_shot_accuracy", ...; None if empty).

    Args:
      per_class: float [C] accuracies (NaN or None for classes absent from the test set).
      class_counts: int [C] training images per class.
    """
    per_class = np.array([np.nan if a is None else a for a in per_class], np.float64)
    out = {}
    groups = shot_groups(class_counts, many_threshold=many_threshold, few_threshold=few_threshold)
    for name, members in groups.items():
        values = per_class[members]
        values = values[~np.isnan(values)]
        out[f"{name}_shot_accuracy"] = float(values.mean()) if values.size else None
        out[f"{name}_shot_classes"] = [int(c) for c in members]
    return out


def classification_summary(predictions: np.ndarray, labels: np.ndarray, class_counts: np.ndarray,
                           *, many_threshold: int = 100, few_threshold: int = 20) -> dict:
    """Overall, per-class and shot-group accuracies (shot groups average their classes' accuracy).

    Returns:
      A JSON-serialisable dict; a shot group without classes has accuracy None.
    """
    num_classes = len(class_counts)
    per_class = per_class_accuracy(predictions, labels, num_classes)
    out = {"test_accuracy": float(np.mean(np.asarray(predictions) == np.asarray(labels)))}
    out.update(shot_group_accuracies(per_class, class_counts, many_threshold=many_threshold,
                                     few_threshold=few_threshold))
    out["per_class_accuracy"] = [None if np.isnan(a) else float(a) for a in per_class]
    return out


def correction_rate(predictions: np.ndarray, clean_labels: np.ndarray,
                    given_labels: np.ndarray) -> float | None:
    """Share of mislabelled training samples whose prediction is their true label.

    A sample is mislabelled when its given label differs from the clean one. None when there are
    no mislabelled samples.
    """
    wrong = np.asarray(given_labels) != np.asarray(clean_labels)
    if not wrong.any():
        return None
    return float(np.mean(np.asarray(predictions)[wrong] == np.asarray(clean_labels)[wrong]))
