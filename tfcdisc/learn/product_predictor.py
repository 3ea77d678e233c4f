"""The predictor of validation, evaluate, predict and Beam: the product scoring rule, and
its run over product batches under any strategy.

The competition metric is product accuracy, scored by one rule (`product_scores`: a
product's images combined, the duplicate table's answers blended in where batches carry
them), which the SavedModel also runs. Validation during
training, `tfcdisc.evaluate`, `tfcdisc.predict` and its Beam pipeline all run this one
path over `input_pipeline.batch_products` batches under the run's strategy (TensorFlow's default, mirrored, multi-worker or TPU; on JAX,
data parallel over every device of every process), and keep only small arrays (top-k
classes per product, top class per image), never the products-by-classes probabilities.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfcdisc.catalogue import stops
from tfcdisc.learn import distribute, input_pipeline, models


class ProductPredictor:
    """Runs an image model over distributed product batches; compiled once, reused.

    One scoring rule (`product_scores`) under either backend: on TensorFlow a
    `tf.function` under the strategy; on JAX a `jax.jit` over the models' variables with
    each batch split over the devices. Under XLA (a TPU, ``jit_compile``, the JAX
    backend) every slot of a batch goes through the model (static shapes); elsewhere
    only the real images do (padding is about half the slots).
    """

    def __init__(self, image_model: keras.Model, k: int = 5, strategy=None,
                 fallback_class: int = 0, jit_compile: bool | None = None,
                 duplicate_weight: float = 0.0, weight_grid: Sequence[float] = ()):
        self.strategy = strategy or default_strategy()
        self.k = k
        static = static_shapes(self.strategy) or bool(jit_compile)
        scores = scores_fn(image_model, k, static, fallback_class=fallback_class,
                           duplicate_weight=duplicate_weight, weight_grid=weight_grid)
        self.step, self._run = compile_step(scores, [image_model], self.strategy,
                                            jit_compile)

    def batches(self, dataset, max_batches: int | None = None
                ) -> Iterator[dict[str, np.ndarray]]:
        """Numpy arrays of the valid products of each global batch, in dataset order.

        ``dataset`` comes from `distribute_products`. Keys: top_k_classes [n, k],
        top_k_probabilities [n, k], image_top1 [n, 4] (-1 for padding), mask [n, 4], and
        the batch's own scalars (product_id, labels, ...).
        """
        with stops.deferred():  # a Ctrl-C waits for the batch (`catalogue.stops`)
            for i, batch in enumerate(dataset):
                stops.check()
                if max_batches is not None and i >= max_batches:
                    break
                out = self._run(batch)
                keep = out.pop("valid") > 0
                yield {key: value[keep] for key, value in out.items()}

    def __call__(self, dataset, max_batches: int | None = None) -> dict[str, np.ndarray]:
        """`batches` concatenated."""
        parts: dict[str, list] = {}
        for out in self.batches(dataset, max_batches):
            for key, value in out.items():
                parts.setdefault(key, []).append(value)
        return {key: np.concatenate(chunks) for key, chunks in parts.items()}


_DEVICE_KEYS = ("images", "mask", "duplicate_class", "duplicate_share")


def scores_fn(image_model: keras.Model, k: int, static: bool, *, fallback_class: int = 0,
              duplicate_weight: float = 0.0,
              weight_grid: Sequence[float] = ()) -> Callable:
    """``batch -> product scores`` (`product_scores`) of a product batch's device
    fields; ``static``: every slot goes through the model (XLA), else only real images."""
    def scores(batch):
        mask = batch["mask"]
        return product_scores(
            image_outputs(image_model, batch["images"], None if static else mask),
            mask, k, fallback_class=fallback_class,
            duplicate_class=batch.get("duplicate_class"),
            duplicate_share=batch.get("duplicate_share"),
            duplicate_weight=duplicate_weight, weight_grid=weight_grid)
    return scores


def stateless(fn: Callable, keras_models: Sequence) -> tuple[Callable, list]:
    """``fn(batch)`` as ``pure(values, batch)`` over the models' variables, for `jax.jit`
    (the values passed in, not baked into the program), and those variables."""
    variables = [v for m in keras_models if m is not None for v in m.variables]

    def pure(values, batch):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(batch)
    return pure, variables


def static_shapes(strategy) -> bool:
    """Whether XLA compiles the step (a TPU, the JAX backend): then every slot of a
    batch goes through the model, padding included."""
    return isinstance(strategy, distribute.JaxDataParallel) or distribute.is_tpu(strategy)


def compile_step(fn: Callable, keras_models: Sequence, strategy=None,
                 jit_compile: bool | None = None):
    """``fn(batch) -> dict of tensors`` (keras.ops on the device fields of a batch:
    images, mask, the duplicate table's features) compiled for the backend. Returns
    ``(step, run)``: ``step`` one compiled call on one replica's batch, ``run`` a batch
    of `distribute_products` to numpy results with the batch's other fields (ids,
    labels, valid) beside them, every replica's and process's share joined."""
    strategy = strategy or default_strategy()
    runner = _jax_runner if isinstance(strategy, distribute.JaxDataParallel) else _tf_runner
    return runner(fn, keras_models, strategy, jit_compile)


def _tf_runner(scores, keras_models, strategy, jit_compile):
    """Batch -> numpy results under a tf.distribute strategy: the batch's own fields go
    through the step beside the scores, then every replica's share is joined."""
    del keras_models  # a tf.function reads their variables itself
    step = tf.function(lambda batch: {**scores(batch), **{
        key: value for key, value in batch.items() if key != "images"}},
        jit_compile=jit_compile)
    # Across workers every worker needs every worker's products: a collective gather.
    # On one machine the replicas' results are read where they are (a gather's
    # collective keys can clash between two predictors in one process).
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)

    @tf.function
    def distributed_step(batch):
        out = strategy.run(step, args=(batch,))
        if multi_worker:
            return {key: strategy.gather(value, axis=0) for key, value in out.items()}
        return out

    def run(batch):
        return {key: np.concatenate([t.numpy() for t in
                                     strategy.experimental_local_results(value)])
                for key, value in distributed_step(batch).items()}
    return step, run


def _jax_runner(scores, keras_models, strategy, jit_compile):
    """Batch -> numpy results on the JAX backend: the scores compiled once over the
    models' variables (passed in, not baked into the program), the device fields of
    each batch split over every device of every process; the other fields (ids,
    labels) stay on the host, gathered across processes like the results."""
    import jax
    from jax.experimental import multihost_utils
    pure, variables = stateless(scores, keras_models)
    del jit_compile  # JAX always compiles
    compiled = jax.jit(pure)

    def run(batch):
        host = {key: value.numpy() for key, value in batch.items()}
        device = {key: host[key] for key in _DEVICE_KEYS if key in host}
        del host["images"]
        device = {key: jax.make_array_from_process_local_data(
            strategy.distribution.get_data_layout(value.shape).backend_layout, value)
            for key, value in device.items()}
        out = compiled([v.value for v in variables], device)
        if strategy.process_count > 1:
            out = multihost_utils.process_allgather(out, tiled=True)
            host = multihost_utils.process_allgather(host, tiled=True)
        return {**{key: np.asarray(value) for key, value in out.items()},
                **{key: np.asarray(value) for key, value in host.items()}}
    return (lambda batch: compiled([v.value for v in variables], batch)), run


def default_strategy():
    """The backend's plain placement: TensorFlow's default strategy, or on JAX data
    parallel over this process's devices."""
    if keras.backend.backend() == "jax":
        return distribute.JaxDataParallel()
    return tf.distribute.get_strategy()


def distribute_products(strategy, products: Callable[[], tf.data.Dataset], batch_size: int,
                        image_size: int, num_products: int | None, duplicate_table=None):
    """``products()`` batched for ``strategy``: static per-replica batches, every product
    once, dummies masked (`input_pipeline.batch_products`).

    ``batch_size`` is global, at most the products there are (a batch of 200,000 for 40
    products padded them all and was OOM-killed), rounded up to a multiple of the
    replicas (devices).
    """
    replicas = strategy.num_replicas_in_sync
    if num_products:
        batch_size = min(batch_size, num_products)
    batch_size = -(-batch_size // replicas) * replicas
    if isinstance(strategy, distribute.JaxDataParallel):  # one batch per process, split
        return input_pipeline.batch_products(  # over its devices by the predictor
            products(), batch_size, image_size, num_products, strategy.input_context(),
            duplicate_table)
    if replicas == 1 and not distribute.is_tpu(strategy) and not isinstance(
            strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # One CPU or GPU: the plain dataset (a distributed iterator there costs ~17% of a
        # model-bound prediction, measured on a CPU).
        return input_pipeline.batch_products(products(), batch_size, image_size, num_products,
                                             duplicate_table=duplicate_table)
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
        "undecodable_images": int(pred["undecodable"].sum()) if "undecodable" in pred else 0,
    }


# --------------------------------------------------------------------------- the scoring rule
# Written with keras.ops, so that one definition scores products under the JAX backend
# (training's validation, predict and evaluate on a TPU) and the TensorFlow backend
# (the same, and the SavedModel's graph).


def image_outputs(image_model: keras.Model, images, mask=None) -> dict:
    """[B, N, H, W, 3] uint8 -> every output of the model per image slot, [B, N, ...]
    float32, in inference mode; ``label`` as log-probabilities.

    With a ``mask`` (TensorFlow backend only), the model runs only on the real images
    (padding is ~55% of the slots at 1.75 images a product) and padded slots get zeros.
    That shape is dynamic: leave ``mask`` out where XLA compiles (a TPU, the JAX
    backend).
    """
    batch, slots = images.shape[0] or ops.shape(images)[0], images.shape[1]
    flat = ops.reshape(images, (-1, *images.shape[2:]))  # static image size for the view

    def run(x):
        out = {key: ops.cast(value, "float32")
               for key, value in image_model(x, training=False).items()}
        out["label"] = ops.log_softmax(out["label"], axis=-1)
        return out

    per_image = run(flat) if mask is None else _run_on_real_images(image_model, run, flat,
                                                                    mask)
    return {key: ops.reshape(value, (batch, slots, value.shape[-1]))
            for key, value in per_image.items()}


def _run_on_real_images(image_model, run, flat, mask):
    """``run`` on the slots ``mask`` marks, zeros elsewhere (TensorFlow: dynamic shapes)."""
    widths = {key: out.shape[-1] for key, out in image_model.output.items()}
    where = tf.where(tf.reshape(mask > 0, [-1]))
    scored = tf.cond(  # a batch of only padding: a replica's share of the filler
        tf.size(where) > 0, lambda: run(tf.gather_nd(flat, where)),
        lambda: {key: tf.zeros([0, width]) for key, width in widths.items()})
    rows = tf.shape(flat, out_type=tf.int64)[0]
    return {key: tf.scatter_nd(where, value, tf.stack(
        [rows, tf.constant(widths[key], tf.int64)])) for key, value in scored.items()}


def top_k_of(per_image, mask, k: int = 5, slot_scores=None) -> dict:
    """Top-k classes and probabilities of each product, and each image's own top class,
    from per-image log-probabilities [B, N, C] (their masked mean, weighted by
    ``slot_scores`` where the model learned them)."""
    combined = models.combine_log_probs(per_image, mask, slot_scores)
    k = min(k, combined.shape[-1])  # a catalogue may have fewer categories than k
    top_log_probs, top_classes = ops.top_k(combined, k=k)
    # exp of the mean log-probability is a geometric mean; renormalise over classes.
    log_norm = ops.logsumexp(combined, axis=-1, keepdims=True)
    return {"top_k_classes": ops.cast(top_classes, "int32"),
            "top_k_probabilities": ops.exp(top_log_probs - log_norm),
            "image_top1": ops.cast(ops.argmax(per_image, axis=-1), "int32")}


def product_scores(outputs: dict, mask, k: int = 5, *, fallback_class: int = 0,
                   duplicate_class=None,
                   duplicate_share=None, duplicate_weight: float = 0.0,
                   weight_grid: Sequence[float] = ()) -> dict:
    """The product scoring rule, the one that validation, evaluate, predict and the
    SavedModel all run, from `image_outputs` and the padding ``mask`` [B, N]:

    - a product's images are combined by the masked mean of their log-probabilities
      (weighted by the model's ``slot_score`` where a product phase or a fusion head
      learned one);
    - where the duplicate table found an image (``duplicate_class`` >= 0, from
      `tfcdisc.learn.duplicates.features`) the table's answer is blended into that
      image's with ``duplicate_weight``;
    - a product with no usable image gets ``fallback_class`` with probability 0, and
      padded slots get image class -1.

    Returns top_k_classes [B, k] int32, top_k_probabilities [B, k], image_top1 [B, N]
    int32; with the table's features also duplicate_hits [B] (images found) and, for a
    ``weight_grid``, top1_by_weight [B, len(grid)] (to choose the weight on validation).
    """
    from tfcdisc.learn import duplicates
    mask = ops.cast(mask, "float32")
    per_image = outputs["label"]
    slots = outputs[models.SLOT_SCORE][..., 0] if models.SLOT_SCORE in outputs else None
    lookup = duplicate_class is not None

    def blended(weight):
        return duplicates.blend(per_image, duplicate_class, duplicate_share, weight)

    if lookup and duplicate_weight:
        out = top_k_of(blended(duplicate_weight), mask, k, slots)
    else:
        out = top_k_of(per_image, mask, k, slots)
    has_image = (ops.sum(mask, axis=1) > 0)[:, None]
    result = {
        "top_k_classes": ops.where(has_image, out["top_k_classes"],
                                   ops.cast(fallback_class, "int32")),
        "top_k_probabilities": ops.where(has_image, out["top_k_probabilities"], 0.0),
        "image_top1": ops.where(mask > 0, out["image_top1"], -1),
    }
    if lookup:
        found = ops.cast((duplicate_class >= 0) & (mask > 0), "int32")
        result["duplicate_hits"] = ops.sum(found, axis=1)
        if weight_grid:
            result["top1_by_weight"] = ops.stack(
                [ops.cast(ops.argmax(models.combine_log_probs(blended(w), mask, slots),
                                     axis=-1), "int32")
                 for w in weight_grid], axis=1)
    return result
