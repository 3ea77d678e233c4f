"""Which synthetic products go where, decided before any image is drawn."""

from __future__ import annotations

import dataclasses

import numpy as np

from tfcdisc.catalogue.synth.styles import IMAGES_PER_PRODUCT_P, MIN_PRODUCTS_PER_CATEGORY



@dataclasses.dataclass
class Plan:
    """Which products go where, decided before any image is drawn."""

    product_ids: np.ndarray
    classes: np.ndarray  # the true class: what the images show
    num_images: np.ndarray
    labels: np.ndarray | None = None  # the class written in the file, if it differs


def plan_catalogue(num_classes: int, num_train: int, num_test: int, rng: np.random.Generator,
                   wrong_labels: float = 0.0) -> tuple[Plan, Plan]:
    """Long-tailed category sizes, train in no category order, ids increasing with gaps."""
    if num_train < MIN_PRODUCTS_PER_CATEGORY * num_classes:
        raise ValueError(f"--num_train_products={num_train} is too few for {num_classes} "
                         f"categories: every category gets at least "
                         f"{MIN_PRODUCTS_PER_CATEGORY}; lower --num_categories")
    weights = 1.0 / (np.arange(num_classes) + 2.0) ** 1.1  # Zipf-like, like the real data
    weights = rng.permutation(weights / weights.sum())
    sizes = MIN_PRODUCTS_PER_CATEGORY + rng.multinomial(
        num_train - MIN_PRODUCTS_PER_CATEGORY * num_classes, weights)
    train_classes = rng.permutation(np.repeat(np.arange(num_classes), sizes))
    test_classes = rng.choice(num_classes, size=num_test, p=weights)
    # One increasing id sequence with gaps; a random part of it becomes the test ids.
    ids = np.cumsum(rng.integers(1, 4, size=num_train + num_test)).astype(np.int64)
    is_test = np.zeros(len(ids), bool)
    is_test[rng.choice(len(ids), num_test, replace=False)] = True
    counts = lambda n: rng.choice(4, size=n, p=IMAGES_PER_PRODUCT_P) + 1  # noqa: E731
    train = Plan(ids[~is_test], train_classes, counts(num_train))
    if wrong_labels:  # a separate stream: the easy catalogue is the same with or without
        noisy = np.random.default_rng([int(rng.integers(2**31)), 5])
        wrong = noisy.random(num_train) < wrong_labels
        shift = noisy.integers(1, max(num_classes, 2), size=num_train)
        train.labels = np.where(wrong, (train_classes + shift) % num_classes, train_classes)
    return train, Plan(ids[is_test], test_classes, counts(num_test))
