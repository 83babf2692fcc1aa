"""Synthetic and real label noise (pure numpy, seeded, deterministic).

Kinds (docs/method.md section 3), applied to the clean labels of the (long-tailed) training set:

* ``none``: the labels unchanged (a copy).
* ``sym`` (RoLT): exactly ``floor(rate * N)`` samples, chosen uniformly, get a different
  class drawn uniformly from the other C - 1 classes (never their own).
* ``unif`` (TABASCO): each sample independently with probability ``rate`` gets a class
  drawn uniformly from all C classes (it may redraw its own, so the realised rate is about
  ``rate * (C - 1) / C``); transition ``rate / C * 11^T + (1 - rate) I``.
* ``asym``: a fixed class map; exactly ``floor(rate * n_c)`` samples of each source class c
  (chosen uniformly) are moved to ``map[c]``; classes that map to themselves are untouched,
  so on CIFAR-10 the realised rate is below ``rate``. Maps: CIFAR-10 truck->automobile,
  bird->airplane, deer->horse, cat<->dog; CIFAR-100 the next fine class of the same
  superclass (circular over its 5 fine classes in index order); otherwise c -> (c+1) mod C.
* ``flip`` (TABASCO): each class c gets one seeded random other class t_c; exactly
  ``floor(rate * n_c)`` samples of class c are moved to t_c.
* ``imb`` (RoLT): exactly ``floor(rate * N)`` samples, chosen uniformly, get a class drawn
  with probability proportional to the class sizes n_j of ``labels``. **Ours:** the sample's
  own class is excluded and the rest renormalised (``p_j = n_j / (N - n_y)``, j != y), so
  every chosen sample really is corrupted and the realised rate equals ``floor(rate*N)/N``.
* ``real``: a given array of noisy labels (for example CIFAR-10N ``worse_label``) replaces
  the labels; ``rate`` is ignored.
"""
from __future__ import annotations

import numpy as np

from dsink_jax.data.long_tail import check_labels
from dsink_jax.data.long_tail import check_seed

NOISE_KINDS = ("none", "sym", "unif", "asym", "flip", "imb", "real")
ASYM_MAPS = ("auto", "cifar10", "cifar100", "next")

_NOISE_STREAM = 0x4E4F

# Standard CIFAR-100 fine label -> superclass (coarse label) table.
CIFAR100_COARSE = np.array([
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3,
    3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
    0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10,
    16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19,
    2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
    18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
], np.int32)

# CIFAR-10: truck(9)->automobile(1), bird(2)->airplane(0), deer(4)->horse(7), cat(3)<->dog(5).
CIFAR10_ASYM = np.array([0, 1, 0, 5, 7, 3, 6, 7, 8, 1], np.int32)


def _cifar100_asym() -> np.ndarray:
    mapping = np.empty(100, np.int32)
    for coarse in range(20):
        fine = np.flatnonzero(CIFAR100_COARSE == coarse)  # 5 fine classes, in index order.
        mapping[fine] = np.roll(fine, -1)
    return mapping


def asym_class_map(num_classes: int, asym_map: str = "auto", *,
                   dataset_name: str | None = None) -> np.ndarray:
    """The class map of ``asym`` noise.

    Args:
      num_classes: C.
      asym_map: ``"cifar10"``, ``"cifar100"``, ``"next"`` (c -> (c+1) mod C) or ``"auto"``
        (cifar10 / cifar100 when ``dataset_name`` is cifar10[_n] / cifar100[_n] with the
        matching C, else next).
      dataset_name: the Dataset's ``name``, used by ``"auto"``.

    Returns:
      int32 [C]: source class -> target class.
    """
    if asym_map not in ASYM_MAPS:
        raise ValueError(f"Unknown asym_map {asym_map!r}; allowed: {ASYM_MAPS}.")
    if asym_map == "auto":
        base = (dataset_name or "").removesuffix("_n")
        asym_map = {("cifar10", 10): "cifar10", ("cifar100", 100): "cifar100"}.get(
            (base, num_classes), "next")
    expected = {"cifar10": 10, "cifar100": 100}.get(asym_map)
    if expected is not None and num_classes != expected:
        raise ValueError(
            f"asym_map={asym_map!r} needs num_classes={expected}, got {num_classes}; use "
            "asym_map='next' for other datasets.")
    if asym_map == "cifar10":
        return CIFAR10_ASYM.copy()
    if asym_map == "cifar100":
        return _cifar100_asym()
    return ((np.arange(num_classes) + 1) % num_classes).astype(np.int32)


def check_noise_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise TypeError(f"noise rate must be a number in [0, 1), got {rate!r}.")
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"noise rate must be in [0, 1), got {rate!r}.")
    return float(rate)


def _move_per_class(rng, labels, targets, rate, num_classes) -> np.ndarray:
    """Moves exactly floor(rate * n_c) random samples of each class c to ``targets[c]``."""
    noisy = labels.copy()
    for c in range(num_classes):
        if targets[c] == c:
            continue
        members = np.flatnonzero(labels == c)
        chosen = rng.choice(members, size=int(np.floor(rate * members.size)), replace=False)
        noisy[chosen] = targets[c]
    return noisy


def corrupt_labels(labels, kind: str, rate: float, num_classes: int, seed: int = 0, *,
                   noisy_labels=None, asym_map: str = "auto",
                   dataset_name: str | None = None) -> np.ndarray:
    """Returns noisy labels; see the module docstring for each kind.

    Args:
      labels: integer [N] clean labels in [0, C).
      kind: one of :data:`NOISE_KINDS`.
      rate: noise rate in [0, 1) (ignored by ``none`` and ``real``, but still validated).
      num_classes: C.
      seed: non-negative int; the same seed gives the same labels.
      noisy_labels: integer [N] real noisy labels; required for ``real``, refused otherwise.
      asym_map: class map of ``asym``, see :func:`asym_class_map`.
      dataset_name: dataset name for ``asym_map="auto"``.

    Returns:
      int32 [N] noisy labels.

    Raises:
      ValueError: unknown kind, rate outside [0, 1), labels out of range, mismatched lengths,
        fewer than 2 classes for a kind that changes labels.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"Unknown noise kind {kind!r}; allowed: {NOISE_KINDS}.")
    if asym_map not in ASYM_MAPS:
        raise ValueError(f"Unknown asym_map {asym_map!r}; allowed: {ASYM_MAPS}.")
    rate = check_noise_rate(rate)
    seed = check_seed(seed)
    labels, num_classes = check_labels(labels, num_classes)
    if kind == "real":
        if noisy_labels is None:
            raise ValueError("noise kind 'real' needs noisy_labels (an integer [N] array).")
        noisy, _ = check_labels(noisy_labels, num_classes, what="noisy_labels")
        if noisy.shape != labels.shape:
            raise ValueError(
                f"noisy_labels has length {noisy.shape[0]}, labels has {labels.shape[0]}; "
                "they must match.")
        return noisy.copy()
    if noisy_labels is not None:
        raise ValueError(f"noisy_labels is only used by kind 'real', got kind {kind!r}.")
    if kind == "asym":
        # Validate the map even when rate is 0, so a bad configuration fails early.
        mapping = asym_class_map(num_classes, asym_map, dataset_name=dataset_name)
    if kind == "none" or rate == 0.0:
        return labels.copy()
    if num_classes < 2:
        raise ValueError(f"noise kind {kind!r} needs num_classes >= 2, got {num_classes}.")

    rng = np.random.default_rng((seed, _NOISE_STREAM))
    n = labels.shape[0]
    if kind == "sym":
        chosen = rng.choice(n, size=int(np.floor(rate * n)), replace=False)
        noisy = labels.copy()
        # An offset in 1..C-1 is a uniform draw over the other classes.
        offsets = rng.integers(1, num_classes, size=chosen.size)
        noisy[chosen] = (labels[chosen] + offsets) % num_classes
        return noisy
    if kind == "unif":
        flipped = rng.random(n) < rate
        return np.where(flipped, rng.integers(0, num_classes, size=n), labels).astype(np.int32)
    if kind == "asym":
        return _move_per_class(rng, labels, mapping, rate, num_classes)
    if kind == "flip":
        offsets = rng.integers(1, num_classes, size=num_classes)
        targets = (np.arange(num_classes) + offsets) % num_classes
        return _move_per_class(rng, labels, targets, rate, num_classes)
    # kind == "imb"
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    chosen = np.sort(rng.choice(n, size=int(np.floor(rate * n)), replace=False))
    noisy = labels.copy()
    for c in range(num_classes):
        members = chosen[labels[chosen] == c]
        if members.size == 0:
            continue
        probs = counts.copy()
        probs[c] = 0.0
        if probs.sum() == 0.0:
            raise ValueError(
                f"noise kind 'imb' needs samples of at least two classes; only class {c} "
                "is present.")
        noisy[members] = rng.choice(num_classes, size=members.size, p=probs / probs.sum())
    return noisy
