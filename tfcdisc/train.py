"""Trains an image classifier on the TFDS `cdiscount` dataset.

    python -m tfcdisc.train --flagfile=experiments/demo_cpu.cfg --data_dir=DATA \
        --model_dir=RUN [any flag to override]

The model dir receives flags.txt (the flags used), config.json (what export needs to
rebuild the model), checkpoints/best.keras and checkpoints/last.keras, history.csv (one
row per finished epoch, ``epoch`` from 0, appended across restarts), TensorBoard logs
in logs/, and a BackupAndRestore backup: rerunning the same command after a crash or a
preemption resumes at the last finished epoch.

Validation reports the competition metric, product accuracy (a product's images
combined by the masked mean of log-probabilities), with image accuracy and top-5.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Sequence

import keras
import tensorflow as tf

from tfcdisc import distribute, input_pipeline, models, product_eval


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs; `main` fills it from flags."""

    data_dir: str
    model_dir: str
    backbone: str = "efficientnetv2_b0"
    image_size: int = 180
    weights: str = "none"
    global_batch_size: int = 256
    epochs: int = 10
    steps_per_epoch: int | None = None  # None: one pass over the training images
    optimizer: str = "sgd"
    learning_rate: float = 0.1  # per 256 images; scaled by global_batch_size / 256
    warmup_epochs: float = 1.0
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    dropout: float = 0.2
    level1_loss_weight: float = 0.0  # > 0 adds the level-1 head
    level2_loss_weight: float = 0.0  # > 0 adds the level-2 head
    bn_momentum: float | None = None
    mixed_precision: str = "auto"
    strategy: str = "auto"
    tpu: str | None = None
    steps_per_execution: int = 1
    shuffle_buffer: int = 16384
    deterministic: bool = False
    data_service: str | None = None
    eval_batch_size: int = 256
    eval_max_batches: int | None = None
    seed: int | None = None
    verbose: int = 2


def _config_path(model_dir: str) -> str:
    return model_dir.rstrip("/") + "/config.json"


def load_config(model_dir: str) -> dict:
    """The config.json a run wrote: its TrainConfig plus the dataset's class counts."""
    with tf.io.gfile.GFile(_config_path(model_dir)) as f:
        return json.load(f)


class ProductEvaluation(keras.callbacks.Callback):
    """Adds val_product_accuracy, val_image_accuracy and val_top5_accuracy to each
    epoch's logs, so CSVLogger, TensorBoard and ModelCheckpoint see them."""

    def __init__(self, dataset, strategy, max_batches=None):
        super().__init__()
        self.dataset, self.strategy, self.max_batches = dataset, strategy, max_batches
        self.last: dict = {}
        self._predict = None

    def on_epoch_end(self, epoch, logs=None):
        if self._predict is None:
            self._predict = product_eval.ProductPredictor(self.model, 5, self.strategy)
        pred = self._predict(self.dataset, self.max_batches)
        report = product_eval.accuracy_report(pred)
        self.last = report
        if logs is not None:
            for key in ("product_accuracy", "image_accuracy", "top5_accuracy"):
                logs["val_" + key] = report[key]
        logging.info("epoch %d validation: %s", epoch, report)


def _optimizer(cfg: TrainConfig, total_steps: int, steps_per_epoch: int):
    peak = cfg.learning_rate * cfg.global_batch_size / 256  # scales with the batch
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak, decay_steps=max(total_steps - warmup, 1),
        warmup_target=peak if warmup else None, warmup_steps=warmup)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True,
                                    weight_decay=cfg.weight_decay or None)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def image_model(cfg: TrainConfig, info: dict, weights: str | None = None) -> keras.Model:
    """The run's image model for ``info`` (class counts): the heads its loss weights ask
    for. ``weights`` overrides cfg.weights (export loads a checkpoint this way)."""
    return models.build_image_model(
        cfg.backbone, info["num_classes"], image_size=cfg.image_size,
        weights=weights or cfg.weights,
        num_level1=info["num_level1"] if cfg.level1_loss_weight > 0 else 0,
        num_level2=info["num_level2"] if cfg.level2_loss_weight > 0 else 0,
        dropout=cfg.dropout, bn_momentum=cfg.bn_momentum)


def build_and_compile(cfg: TrainConfig, info: dict, total_steps: int,
                      steps_per_epoch: int) -> keras.Model:
    """The image model for ``info`` (class counts), compiled; call inside strategy.scope()."""
    model = image_model(cfg, info)
    losses, weights = {}, {}
    for key, n, w in (("label", info["num_classes"], 1.0),
                      ("label_level1", info["num_level1"], cfg.level1_loss_weight),
                      ("label_level2", info["num_level2"], cfg.level2_loss_weight)):
        if key in model.output:
            losses[key] = models.SparseCrossentropy(n, cfg.label_smoothing)
            weights[key] = w
    model.compile(
        optimizer=_optimizer(cfg, total_steps, steps_per_epoch), loss=losses,
        loss_weights=weights,
        metrics={"label": [keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                           keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5")]},
        steps_per_execution=cfg.steps_per_execution)
    return model


def dataset_info(builder) -> dict:
    """Class counts and image count of a built dataset, from its features and metadata."""
    features = builder.info.features
    stats = builder.info.metadata.get("build_stats", {}) if builder.info.metadata else {}
    images = stats.get("splits", {}).get("train", {}).get("images")
    return {"num_classes": features["label"].num_classes,
            "num_level1": features["label_level1"].num_classes,
            "num_level2": features["label_level2"].num_classes,
            "train_images": images or builder.info.splits["train"].num_examples}


def train(cfg: TrainConfig, callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict:
    """Trains and validates; returns the last validation report and the history.

    Rerunning with the same model_dir resumes from the last finished epoch.
    """
    strategy = distribute.get_strategy(cfg.strategy, cfg.tpu)
    policy = distribute.set_precision(cfg.mixed_precision, strategy)
    if cfg.seed is not None:
        keras.utils.set_random_seed(cfg.seed)
    builder = input_pipeline.load_builder(cfg.data_dir)
    info = dataset_info(builder)
    steps_per_epoch = cfg.steps_per_epoch or max(1, info["train_images"] // cfg.global_batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    model_dir = cfg.model_dir.rstrip("/")
    tf.io.gfile.makedirs(model_dir + "/checkpoints")
    with tf.io.gfile.GFile(_config_path(model_dir), "w") as f:
        json.dump({"train": dataclasses.asdict(cfg), "dataset": info, "policy": policy,
                   "strategy": type(strategy).__name__,
                   "replicas": strategy.num_replicas_in_sync}, f, indent=2)
    logging.info("training %s on %d replicas (%s), %d steps/epoch x %d epochs", cfg.backbone,
                 strategy.num_replicas_in_sync, policy, steps_per_epoch, cfg.epochs)

    options = input_pipeline.PipelineOptions(
        image_size=cfg.image_size, shuffle_buffer=cfg.shuffle_buffer,
        deterministic=cfg.deterministic, seed=cfg.seed, data_service=cfg.data_service)
    with strategy.scope():
        model = build_and_compile(cfg, info, total_steps, steps_per_epoch)
    label_keys = tuple(model.output)

    def train_fn(ctx):
        ds = input_pipeline.train_dataset(builder, cfg.global_batch_size, options,
                                          input_context=ctx)
        return ds.map(lambda x, y: (x, {k: y[k] for k in label_keys}))

    train_ds = strategy.distribute_datasets_from_function(train_fn)
    val_ds = input_pipeline.product_dataset(builder, "validation", cfg.eval_batch_size, options)
    evaluation = ProductEvaluation(val_ds, strategy, cfg.eval_max_batches)
    all_callbacks = [
        keras.callbacks.BackupAndRestore(model_dir + "/backup"),
        evaluation,  # before the callbacks that read its val_* logs
        keras.callbacks.ModelCheckpoint(model_dir + "/checkpoints/best.keras",
                                        monitor="val_product_accuracy", mode="max",
                                        save_best_only=True),
        keras.callbacks.ModelCheckpoint(model_dir + "/checkpoints/last.keras"),
        keras.callbacks.CSVLogger(model_dir + "/history.csv", append=True),
        keras.callbacks.TensorBoard(model_dir + "/logs"),
        *callbacks,
    ]
    history = model.fit(train_ds, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch,
                        callbacks=all_callbacks, verbose=cfg.verbose)
    return {"validation": evaluation.last, "history": history.history, "model": model}


# --------------------------------------------------------------------------- entry point


def _define_flags() -> None:
    from absl import flags
    from tfcdisc import models as m
    d = TrainConfig(data_dir="", model_dir="")
    flags.DEFINE_string("data_dir", None, "Where `tfds build` wrote the cdiscount dataset "
                        "(local or gs://).", required=True)
    flags.DEFINE_string("model_dir", None, "Run folder: checkpoints, history.csv, TensorBoard "
                        "logs, backup (local or gs://; gs:// on TPU).", required=True)
    flags.DEFINE_enum("backbone", d.backbone, list(m.BACKBONES), "Image backbone.")
    flags.DEFINE_integer("image_size", d.image_size, "Side of the square model input "
                         "(images are 180x180; Xception needs >= 71).")
    flags.DEFINE_string("weights", d.weights, "none, imagenet (downloaded by Keras; needs a "
                        "network) or a .weights.h5 / .keras path.")
    flags.DEFINE_integer("global_batch_size", d.global_batch_size, "Images per step across "
                         "all replicas.")
    flags.DEFINE_integer("epochs", d.epochs, "Epochs to train.")
    flags.DEFINE_integer("steps_per_epoch", None, "Steps per epoch (default: one pass over "
                         "the training images).")
    flags.DEFINE_enum("optimizer", d.optimizer, ["sgd", "adamw"], "SGD with Nesterov momentum "
                      "0.9, or AdamW.")
    flags.DEFINE_float("learning_rate", d.learning_rate, "Peak learning rate per 256 images; "
                       "scaled by global_batch_size / 256.")
    flags.DEFINE_float("warmup_epochs", d.warmup_epochs, "Linear warm-up, then cosine decay.")
    flags.DEFINE_float("weight_decay", d.weight_decay, "Decoupled weight decay.")
    flags.DEFINE_float("label_smoothing", d.label_smoothing, "Label smoothing of every head.")
    flags.DEFINE_float("dropout", d.dropout, "Dropout before the heads.")
    flags.DEFINE_float("level1_loss_weight", d.level1_loss_weight, "Loss weight of an "
                       "auxiliary level-1 head (0: no head).")
    flags.DEFINE_float("level2_loss_weight", d.level2_loss_weight, "Loss weight of an "
                       "auxiliary level-2 head (0: no head).")
    flags.DEFINE_float("bn_momentum", None, "BatchNormalization momentum override; 0.9 for "
                       "short runs, so inference-mode statistics keep up with the weights.")
    flags.DEFINE_enum("mixed_precision", d.mixed_precision, list(distribute.PRECISIONS),
                      "auto: bfloat16 on TPU, float16 on GPU, float32 on CPU.")
    flags.DEFINE_enum("strategy", d.strategy, list(distribute.STRATEGIES),
                      "Distribution strategy; multi_worker_mirrored reads TF_CONFIG.")
    flags.DEFINE_string("tpu", None, "TPU address or name (grpc://host:8470, local).")
    flags.DEFINE_integer("steps_per_execution", d.steps_per_execution, "Steps per "
                         "compiled call (32-128 on TPU).")
    flags.DEFINE_integer("shuffle_buffer", d.shuffle_buffer, "Images in the shuffle buffer.")
    flags.DEFINE_bool("deterministic", d.deterministic, "Reproducible input order (slower).")
    flags.DEFINE_string("data_service", None, "tf.data service dispatcher address.")
    flags.DEFINE_integer("eval_batch_size", d.eval_batch_size, "Products per validation "
                         "batch (global).")
    flags.DEFINE_integer("eval_max_batches", None, "Validate on at most this many batches.")
    flags.DEFINE_integer("seed", None, "Random seed (weights, shuffling, crops).")
    flags.DEFINE_integer("verbose", d.verbose, "Keras fit verbosity: 0, 1 (bar) or 2.")


def main(argv: Sequence[str]) -> None:
    from absl import flags
    del argv
    f = flags.FLAGS
    cfg = TrainConfig(**{field.name: f[field.name].value
                         for field in dataclasses.fields(TrainConfig)})
    tf.io.gfile.makedirs(cfg.model_dir)
    with tf.io.gfile.GFile(cfg.model_dir.rstrip("/") + "/flags.txt", "w") as out:
        out.write(f.flags_into_string())
    try:
        result = train(cfg)
    except ValueError as e:
        print(f"train: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"validation": result["validation"]}, indent=2))


def run() -> None:
    from tfcdisc import cli
    cli.run(_define_flags, main)


if __name__ == "__main__":
    run()
