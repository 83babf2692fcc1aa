"""Long-tailed subsampling of a labelled training set (pure numpy, seeded, deterministic)."""
from __future__ import annotations

import numpy as np

LONG_TAIL_PROFILES = ("exp", "step")

# Separate random streams for the long tail and for the noise, so both can take the same
# user seed without their draws being correlated.
_LONG_TAIL_STREAM = 0x4C54


def is_int(value) -> bool:
    """True for Python and numpy integers, False for bools."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_seed(seed) -> int:
    """Returns ``seed`` as int; raises if it is not a non-negative integer."""
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    return int(seed)


def check_labels(labels, num_classes: int | None = None, *,
                 what: str = "labels") -> tuple[np.ndarray, int]:
    """Validates integer labels; returns them as int32 [N] and the number of classes.

    Args:
      labels: integer [N] class labels.
      num_classes: C; None infers max label + 1.
      what: name used in error messages.

    Returns:
      ``(labels as int32 [N], C)``.

    Raises:
      TypeError: non-integer labels.
      ValueError: not 1-D, empty, or outside [0, C).
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{what} must be integers, got dtype {labels.dtype}.")
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array, got shape {labels.shape}.")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    elif not is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    num_classes = int(num_classes)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"{what} range [{labels.min()}, {labels.max()}] is outside the allowed "
            f"[0, {num_classes}) for num_classes={num_classes}.")
    return labels.astype(np.int32), num_classes


def long_tail_counts(class_counts, imbalance_ratio: float, profile: str = "exp") -> np.ndarray:
    """Target number of samples per class for a long-tailed profile.

    With ``n_max = max(class_counts)`` and ``r = imbalance_ratio = n_max / n_min``:

    * ``exp``: class c keeps ``int(n_max * r ** (-c / (C - 1)))`` (LDAM / RoLT protocol);
      CIFAR-10 at r = 100 gives 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50.
    * ``step``: the first ``C // 2`` classes keep ``n_max``, the others ``int(n_max / r)``
      (for odd C the middle class is a tail class).

    A class that has fewer samples than its target keeps all of them (so r = 1 keeps
    everything, also for slightly unbalanced sources such as digits).

    Args:
      class_counts: int [C] available samples per class (class index = head-to-tail order).
      imbalance_ratio: r >= 1.
      profile: one of :data:`LONG_TAIL_PROFILES`.

    Returns:
      int64 [C] number of samples to keep per class.
    """
    ratio = _check_ratio(imbalance_ratio)
    if profile not in LONG_TAIL_PROFILES:
        raise ValueError(f"Unknown long-tail profile {profile!r}; allowed: {LONG_TAIL_PROFILES}.")
    class_counts = np.asarray(class_counts, np.int64)
    num_classes = class_counts.shape[0]
    n_max = int(class_counts.max())
    classes = np.arange(num_classes)
    if profile == "exp":
        # C == 1 has no tail: the single class is the head.
        exponent = -classes / (num_classes - 1) if num_classes > 1 else np.zeros(1)
        # A Python-int conversion per class reproduces the peers' `int(img_max * factor)` exactly.
        targets = np.array([int(n_max * ratio ** e) for e in exponent], np.int64)
    else:
        targets = np.where(classes < num_classes // 2, n_max, int(n_max / ratio)).astype(np.int64)
    return np.minimum(targets, class_counts)


def _check_ratio(imbalance_ratio) -> float:
    if not (is_int(imbalance_ratio) or isinstance(imbalance_ratio, (float, np.floating))):
        raise TypeError(f"imbalance_ratio must be a number >= 1, got {imbalance_ratio!r}.")
    ratio = float(imbalance_ratio)
    if not np.isfinite(ratio) or ratio < 1.0:
        raise ValueError(
            f"imbalance_ratio must be a finite number >= 1 (n_max / n_min; 1 means balanced), got "
            f"{imbalance_ratio!r}.")
    return ratio


def long_tail_indices(labels, imbalance_ratio: float, profile: str = "exp", seed: int = 0,
                      *, num_classes: int | None = None) -> np.ndarray:
    """Indices of a long-tailed subset of a labelled set (apply to clean labels).

    Class c keeps ``long_tail_counts(...)[c]`` of its samples (see :func:`long_tail_counts`);
    which ones is a seeded uniform choice without replacement.

    Args:
      labels: integer [N] clean labels.
      imbalance_ratio: n_max / n_min >= 1; 1 keeps everything.
      profile: ``"exp"`` or ``"step"``.
      seed: non-negative int; the same seed gives the same indices.
      num_classes: C; None infers max label + 1.

    Returns:
      int64 [K] sorted indices into ``labels``.

    Raises:
      ValueError: ratio < 1, unknown profile, labels out of range, or a class left with zero
        samples (absent from ``labels`` or cut to zero by the ratio).
    """
    ratio = _check_ratio(imbalance_ratio)
    if profile not in LONG_TAIL_PROFILES:
        raise ValueError(f"Unknown long-tail profile {profile!r}; allowed: {LONG_TAIL_PROFILES}.")
    seed = check_seed(seed)
    labels, num_classes = check_labels(labels, num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    keep = long_tail_counts(counts, ratio, profile)
    empty = np.flatnonzero(keep == 0)
    if empty.size:
        raise ValueError(
            f"Long tail (ratio={imbalance_ratio!r}, profile={profile!r}) leaves classes "
            f"{empty.tolist()} with zero samples (available per class: {counts.tolist()}); use a "
            "smaller ratio or a source with more samples per class.")
    rng = np.random.default_rng((seed, _LONG_TAIL_STREAM))
    # Stable sort groups indices by class while keeping their order within a class.
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    kept = [rng.choice(order[starts[c]:starts[c + 1]], size=keep[c], replace=False)
            for c in range(num_classes)]
    return np.sort(np.concatenate(kept)).astype(np.int64)
