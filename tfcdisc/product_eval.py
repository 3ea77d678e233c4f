"""Product-level predictions over a padded product dataset, under any strategy.

The competition metric is product accuracy: a product's images are combined
(`models.combine_log_probs`) before taking the top class. This module runs that over
a `input_pipeline.product_dataset` and keeps only small arrays (top-k classes per
product, top class per image), never the products-by-classes probabilities.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tfcdisc import models


class ProductPredictor:
    """Runs the product model over padded product datasets; traced once, reused."""

    def __init__(self, image_model: keras.Model, k: int = 5,
                 strategy: tf.distribute.Strategy | None = None):
        self.strategy = strategy or tf.distribute.get_strategy()

        @tf.function
        def step(features, labels):
            out = models.product_predictions(image_model, features["images"],
                                             features["mask"], k)
            out.update(product_id=features["product_id"], mask=features["mask"],
                       valid=features["valid"], **labels)
            return out

        self._step = step

    def __call__(self, dataset: tf.data.Dataset, max_batches: int | None = None
                 ) -> dict[str, np.ndarray]:
        """Arrays for the valid products, in dataset order.

        Keys: product_id, top_k_classes [N, k], top_k_probabilities [N, k],
        image_top1 [N, 4], mask [N, 4], and the dataset's labels (-1 where absent).
        """
        dist = self.strategy.experimental_distribute_dataset(dataset)
        parts: dict[str, list] = {}
        for i, (features, labels) in enumerate(dist):
            if max_batches is not None and i >= max_batches:
                break
            out = self.strategy.run(self._step, args=(features, labels))
            for key, value in out.items():
                for local in self.strategy.experimental_local_results(value):
                    parts.setdefault(key, []).append(local.numpy())
        result = {key: np.concatenate(chunks) for key, chunks in parts.items()}
        keep = result.pop("valid") > 0
        return {key: value[keep] for key, value in result.items()}


def accuracy_report(pred: dict[str, np.ndarray]) -> dict[str, float]:
    """Product accuracy (the competition metric), image accuracy and top-5."""
    label = pred["label"]
    top = pred["top_k_classes"]
    mask = pred["mask"] > 0
    image_hits = (pred["image_top1"] == label[:, None]) & mask
    return {
        "product_accuracy": float(np.mean(top[:, 0] == label)) if len(label) else 0.0,
        "image_accuracy": float(image_hits.sum() / max(mask.sum(), 1)),
        "top5_accuracy": float(np.mean((top[:, :5] == label[:, None]).any(axis=1)))
        if len(label) else 0.0,
        "products": int(len(label)),
    }
