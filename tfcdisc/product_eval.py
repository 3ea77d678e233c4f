"""Product-level predictions over product batches, under any strategy.

The competition metric is product accuracy: a product's images are combined
(`models.combine_log_probs`, or an export's fusion head) before taking the top class;
where batches carry duplicate-table answers (`tfcdisc.duplicates`) they are blended in
first. Validation during training,
`tfcdisc.evaluate` and `tfcdisc.predict` all run this one path over
`input_pipeline.batch_products` batches under the run's strategy (default, mirrored,
multi-worker or TPU), and keep only small arrays (top-k classes per product, top class
per image), never the products-by-classes probabilities.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfcdisc import distribute, duplicates, input_pipeline, models


class ProductPredictor:
    """Runs an image model over distributed product batches; traced once, reused.

    On a TPU every slot of a batch goes through the model (static shapes); elsewhere
    only the real images do (padding is about half the slots).
    """

    def __init__(self, image_model: keras.Model, k: int = 5,
                 strategy: tf.distribute.Strategy | None = None, fallback_class: int = 0,
                 jit_compile: bool | None = None, duplicate_weight: float = 0.0,
                 weight_grid: Sequence[float] = (), fusion: keras.Model | None = None):
        self.strategy = strategy or tf.distribute.get_strategy()
        self.k = k
        tpu = distribute.is_tpu(self.strategy)

        def step(batch):
            mask = batch["mask"]
            outputs = models.image_outputs(image_model, batch["images"],
                                           None if (tpu or jit_compile) else mask)
            per_image = outputs["label"]
            lookup = "duplicate_class" in batch  # batches carry the table's answers

            fused = models.fused_logits(fusion, outputs, mask)

            def blended(weight):  # per image; with a fusion head, its product log-probs
                if fused is None:
                    return duplicates.blend(per_image, batch["duplicate_class"],
                                            batch["duplicate_share"], weight)
                return duplicates.blend_product(
                    tf.nn.log_softmax(fused, axis=-1), batch["duplicate_class"],
                    batch["duplicate_share"], mask, weight)

            if lookup and duplicate_weight:
                out = (models.top_k_of(blended(duplicate_weight), mask, k) if fused is None
                       else models.top_k_of(per_image, mask, k, blended(duplicate_weight)))
            else:
                out = models.top_k_of(per_image, mask, k, fused)
            has_image = tf.reduce_sum(mask, axis=1) > 0
            result = {
                "top_k_classes": tf.where(has_image[:, None], out["top_k_classes"],
                                          tf.constant(fallback_class, tf.int32)),
                "top_k_probabilities": tf.where(has_image[:, None],
                                                out["top_k_probabilities"], 0.0),
                "image_top1": tf.where(mask > 0, out["image_top1"], -1),
            }
            result.update({key: value for key, value in batch.items() if key != "images"})
            if lookup:
                found = tf.cast((batch["duplicate_class"] >= 0) & (mask > 0), tf.int32)
                result["duplicate_hits"] = tf.reduce_sum(found, axis=1)
                if weight_grid:  # top class for each candidate weight (choosing it)
                    result["top1_by_weight"] = tf.stack(
                        [tf.argmax(models.combine_log_probs(blended(w), mask)
                                   if fused is None else blended(w), axis=-1,
                                   output_type=tf.int32) for w in weight_grid], axis=1)
            return result

        self.step = tf.function(step, jit_compile=jit_compile)

        # Across workers every worker needs every worker's products: a collective gather.
        # On one machine the replicas' results are read where they are (a gather's
        # collective keys can clash between two predictors in one process).
        multi_worker = isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)

        @tf.function
        def distributed_step(batch):
            out = self.strategy.run(self.step, args=(batch,))
            if multi_worker:
                return {key: self.strategy.gather(value, axis=0) for key, value in out.items()}
            return out

        self._distributed_step = distributed_step

    def batches(self, dataset, max_batches: int | None = None
                ) -> Iterator[dict[str, np.ndarray]]:
        """Numpy arrays of the valid products of each global batch, in dataset order.

        ``dataset`` is a distributed dataset (`distribute_products`). Keys: top_k_classes
        [n, k], top_k_probabilities [n, k], image_top1 [n, 4] (-1 for padding), mask
        [n, 4], and the batch's own scalars (product_id, labels, ...).
        """
        for i, batch in enumerate(dataset):
            if max_batches is not None and i >= max_batches:
                break
            out = {key: np.concatenate([t.numpy() for t in
                                        self.strategy.experimental_local_results(value)])
                   for key, value in self._distributed_step(batch).items()}
            keep = out.pop("valid") > 0
            yield {key: value[keep] for key, value in out.items()}

    def __call__(self, dataset, max_batches: int | None = None) -> dict[str, np.ndarray]:
        """`batches` concatenated."""
        parts: dict[str, list] = {}
        for out in self.batches(dataset, max_batches):
            for key, value in out.items():
                parts.setdefault(key, []).append(value)
        return {key: np.concatenate(chunks) for key, chunks in parts.items()}


def distribute_products(strategy: tf.distribute.Strategy,
                        products: Callable[[], tf.data.Dataset], batch_size: int,
                        image_size: int, num_products: int | None, duplicate_table=None):
    """``products()`` batched for ``strategy``: static per-replica batches, every product
    once, dummies masked (`input_pipeline.batch_products`).

    ``batch_size`` is global and rounded up to a multiple of the replicas.
    """
    replicas = strategy.num_replicas_in_sync
    if replicas == 1 and not distribute.is_tpu(strategy) and not isinstance(
            strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # One CPU or GPU: the plain dataset (a distributed iterator there costs ~17% of a
        # model-bound prediction, measured on a CPU).
        return input_pipeline.batch_products(products(), batch_size, image_size, num_products,
                                             duplicate_table=duplicate_table)
    batch_size = -(-batch_size // replicas) * replicas
    return strategy.distribute_datasets_from_function(
        lambda ctx: input_pipeline.batch_products(products(), batch_size, image_size,
                                                  num_products, ctx, duplicate_table))


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
