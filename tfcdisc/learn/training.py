"""Trains an image classifier on the TFDS `cdiscount` dataset, under any strategy.

The model dir (`rundir`: its layout) receives flags.txt, config.json, checkpoints/best.keras
and checkpoints/last.keras, history.csv (one row per finished epoch, ``epoch`` from 0,
with the learning rate), TensorBoard logs in logs/ (scalars every ``log_every_steps``),
and backup/: rerunning the same command after a crash or a preemption resumes at the
last backup, mid-epoch if ``backup_every_steps`` or ``backup_every_minutes`` is set.

Only the chief (JAX: process 0) writes there, holding the folder's lock
(`tfcdisc.catalogue.folder_lock`); the other workers of a multi-worker run write to their own
temporary folders, as TensorFlow's multi-worker guide prescribes (saving may run
collectives, so every worker saves, somewhere). Checkpoints replace the previous ones
only when complete (`WholeCheckpoint`). The same code trains on Keras's JAX backend
(`distribute.JaxDataParallel`) and on TensorFlow under any strategy.

Validation reports the competition metric, product accuracy (a product's images
combined by the masked mean of log-probabilities), with image accuracy and top-5, over
the whole validation split on every worker (`product_predictor`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from typing import Sequence

import keras
import tensorflow as tf

from tfcdisc.catalogue import atomic, folder_lock, stops
from tfcdisc.learn import distribute, input_pipeline, models, product_predictor, rundir, runtime
from tfcdisc.learn import backend as backend_lib
from tfcdisc.prepare import metadata
from tfcdisc import settings
from tfcdisc.settings import TrainConfig

__all__ = ["TrainConfig", "TrainResult", "train", "image_model", "build_and_compile",
           "EpochTimeEstimate", "eval_batch_size", "jit_compile_for"]


# --------------------------------------------------------------------------- callbacks


class ProductEvaluation(keras.callbacks.Callback):
    """Adds val_product_accuracy, val_image_accuracy and val_top5_accuracy to each
    epoch's logs, so CSVLogger, TensorBoard and ModelCheckpoint see them."""

    def __init__(self, dataset, strategy, max_batches=None, fallback_class: int = 0):
        super().__init__()
        self.dataset, self.strategy, self.max_batches = dataset, strategy, max_batches
        self.fallback_class = fallback_class
        self.last: dict = {}
        self._predict = None

    def on_epoch_end(self, epoch, logs=None):
        if self._predict is None:
            self._predict = product_predictor.ProductPredictor(models.image_model_of(self.model), 5,
                                                          self.strategy, self.fallback_class)
        report = product_predictor.accuracy_report(self._predict(self.dataset, self.max_batches))
        self.last = report
        if logs is not None:
            for key in ("product_accuracy", "image_accuracy", "top5_accuracy",
                        "undecodable_images"):
                logs["val_" + key] = report[key]
        logging.info("epoch %d validation: %s", epoch, report)


class LearningRateLogger(keras.callbacks.Callback):
    """Puts the learning rate of the epoch's last step into the epoch's logs."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(
                self.model.optimizer.learning_rate))


class EpochCurves(keras.callbacks.TensorBoard):
    """Keras's TensorBoard, with its epoch scalars (train and validation, product accuracy
    among them) written at every epoch. Keras writes them inside the step-level
    ``record_if`` of the epoch's last step, so with ``update_freq=N`` an epoch whose steps
    are not a multiple of N left no point at all (tensorflow/tensorboard#4975): the
    validation logs held an empty file. Keras's one hook for epoch scalars is overridden
    (Keras pinned in pyproject.toml; tests/learn/test_train.py reads the event files)."""

    def _log_epoch_metrics(self, epoch, logs):
        with self.summary.record_if(True):
            super()._log_epoch_metrics(epoch, logs)


class TrainingDiverged(ValueError):
    """The loss or the weights stopped being finite: nothing more of the run is kept."""


_DIVERGED_FIX = ("lower --learning_rate (or --weight_decay, --label_smoothing) and rerun "
                 "with --overwrite")


def check_finite_weights(model: keras.Model, what: str) -> None:
    """Refuses to keep (``what``: a checkpoint, a backup) weights that are not finite:
    a diverging run must never replace its best checkpoint or its backup with them.

    Raises:
      TrainingDiverged: naming the first non-finite weight.
    """
    bad = rundir.non_finite_weight(model)
    if bad:
        raise TrainingDiverged(f"weight {bad} is not finite: the run diverged and {what} was "
                               f"not written (the previous one is kept); {_DIVERGED_FIX}")


class StopsBetweenSteps(keras.callbacks.Callback):
    """Ctrl-C and SIGTERM take effect here, between steps (`catalogue.stops`): raised
    wherever Python runs next they could land inside TensorFlow's own callbacks, and
    crash the process or vanish. Last among the callbacks: a step's backup comes first."""

    def on_train_batch_end(self, batch, logs=None):
        stops.check()

    def on_test_batch_end(self, batch, logs=None):
        stops.check()

    def on_epoch_end(self, epoch, logs=None):
        stops.check()


class StopOnNonFiniteLoss(keras.callbacks.TerminateOnNaN):
    """Keras's TerminateOnNaN, raising at once (no epoch end, so no checkpoint, history
    row or backup of the diverged state), as one line naming the epoch and step."""

    def __init__(self):
        super().__init__(raise_error=True)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_end(self, batch, logs=None):
        try:
            super().on_batch_end(batch, logs)
        except RuntimeError:
            raise TrainingDiverged(
                f"the training loss became {float(logs['loss'])} at epoch {self.epoch}, "
                f"step {batch + 1}: the run diverged; training stopped there, and the "
                f"checkpoints and backup keep the last finite epoch; {_DIVERGED_FIX}"
            ) from None


class WholeCheckpoint(keras.callbacks.ModelCheckpoint):
    """Keras's ModelCheckpoint (its monitor, mode and best-only rule), written whole or
    not at all: Keras saves to a local temporary file, which replaces the checkpoint only
    once complete (`atomic.copy`), so a full disk or a kill mid-write leaves the previous
    checkpoint, never a truncated one."""

    def __init__(self, filepath: str, **kwargs):
        super().__init__(filepath, **kwargs)
        self.target = filepath

    def _is_improvement(self, monitor_value, reference_value):
        """A tie goes to the later epoch: a small validation split that reaches 1.0 early
        would otherwise keep that early epoch as the best (the demo's did, at epoch 3 of 6,
        while the last scored higher on test). Keras's comparison hook, overridden."""
        return bool(super()._is_improvement(monitor_value, reference_value)) or \
            float(monitor_value) == float(reference_value)

    def on_epoch_end(self, epoch, logs=None):
        check_finite_weights(self.model, self.target)
        with atomic.via_local(self.target) as local:  # copied if Keras saved this epoch
            self.filepath = local
            super().on_epoch_end(epoch, logs)


class EpochTimeEstimate(keras.callbacks.Callback):
    """Says, once the first steps have run, how long an epoch will take: timed from the
    end of the first step (which compiles) to the end of step ``after_steps``."""

    def __init__(self, after_steps: int = 50, out=None):
        super().__init__()
        self.after_steps, self.out = max(after_steps, 2), out
        self._start = self._steps = None
        self.seconds_per_epoch: float | None = None

    def on_train_batch_end(self, batch, logs=None):
        if self.seconds_per_epoch is not None:
            return
        if self._start is None:
            self._start, self._steps = time.perf_counter(), batch + 1
            return
        if batch + 1 - self._steps >= self.after_steps - 1 or \
                batch + 1 >= self.params.get("steps", float("inf")):
            rate = (batch + 1 - self._steps) / max(time.perf_counter() - self._start, 1e-9)
            steps = self.params.get("steps") or 0
            self.seconds_per_epoch = steps / rate if rate else float("inf")
            print(f"train: {rate:.2f} steps/s after {batch + 1} steps (compilation "
                  f"excluded): about {self.seconds_per_epoch / 60:.1f} min per epoch of "
                  f"{steps} steps", file=self.out or sys.stderr, flush=True)


class Backup(keras.callbacks.Callback):
    """Backs up weights, optimizer state and position after each epoch, and mid-epoch
    every N steps or M minutes (whichever comes first).

    backup/state.json names the epoch, the steps done in it, the weights file, the best
    validation value so far and the global batch the steps are counted in; it is
    replaced atomically after its weights file is complete, so a kill at any moment
    leaves a consistent pair. ``agree`` turns this process's "the minutes are up" into
    the decision every process takes (saving may be collective), e.g. process 0's.
    """

    def __init__(self, directory: str, every_steps: int | None, best: keras.callbacks.Callback,
                 every_minutes: float | None = None, global_batch_size: int | None = None,
                 clock=time.monotonic, agree=None):
        super().__init__()
        self.directory = directory.rstrip("/")
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.best, self.global_batch_size = best, global_batch_size
        self.clock, self.agree = clock, agree
        self.epoch, self.offset, self._last_saved = 0, 0, 0
        self._last_time = clock()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self._last_saved = epoch, self.offset

    def _minutes_up(self) -> bool:
        if not self.every_minutes:
            return False
        due = self.clock() - self._last_time >= self.every_minutes * 60
        return bool(self.agree(due)) if self.agree is not None else due

    def on_train_batch_end(self, batch, logs=None):
        done = self.offset + batch + 1  # steps finished in this epoch
        if batch + 1 >= self.params.get("steps", float("inf")):
            return  # the epoch's own backup follows its validation and history row
        by_steps = self.every_steps and done - self._last_saved >= self.every_steps
        if by_steps or self._minutes_up():
            sync = getattr(self.model, "jax_state_sync", None)
            if sync is not None:  # JAX holds the state outside the variables mid-epoch
                sync()
            self.save(self.epoch, done)
            self._last_saved = done

    def on_epoch_end(self, epoch, logs=None):
        self.offset = 0
        self.save(epoch + 1, 0)

    def save(self, epoch: int, step: int) -> None:
        check_finite_weights(self.model, f"the backup of epoch {epoch}, step {step}")
        tf.io.gfile.makedirs(self.directory)
        name = f"epoch{epoch}-step{step}.weights.h5"
        # HDF5 writes into a local temporary folder (a full disk inside its write crashed
        # the process); the finished file is then copied whole (`atomic.copy`), and the
        # state names it only after that.
        with atomic.via_local(f"{self.directory}/{name}") as local:
            self.model.save_weights(local, overwrite=True)
        best = getattr(self.best, "best", None)
        state = {"epoch": epoch, "step": step, "weights": name,
                 "best": None if best is None or abs(best) == float("inf") else float(best),
                 "global_batch_size": self.global_batch_size}
        atomic.write(f"{self.directory}/state.json", json.dumps(state))
        self._last_time = self.clock()
        for old in tf.io.gfile.glob(f"{self.directory}/epoch*.weights.h5"):
            if not old.endswith("/" + name):
                tf.io.gfile.remove(old)


def rescaled_position(backup: dict, batch: int, steps_per_epoch: int,
                      previous_batch: int | None) -> tuple[int, int, str | None]:
    """(epoch, step) of a backup counted in steps of ``batch`` images, and what to say
    when the run trained with another global batch (moved to another number of chips with
    the same per-replica batch): the images done in the epoch are kept, so a backup at
    step 800 of 128 images resumes at step 100 of 1,024; the optimizer's step counter,
    which positions the learning-rate schedule, is set to match by the caller."""
    epoch, step = backup["epoch"], backup["step"]
    previous = backup.get("global_batch_size") or previous_batch
    if not previous or previous == batch:
        return epoch, step, None
    moved = min(step * previous // batch, steps_per_epoch - 1) if step else 0
    return epoch, moved, (
        f"the run trained with a global batch of {previous} and now has {batch} (another "
        f"number of replicas): epoch {epoch} step {step} of {previous} images is resumed as "
        f"step {moved} of {batch}, and the learning-rate schedule (peak scaled with the "
        f"batch) is continued at the same fraction of the run")


# --------------------------------------------------------------------------- model


# Variable names AdamW does not decay: biases, and normalisation's scale and offset.
NO_DECAY = ("bias", "gamma", "beta")


def _optimizer(cfg: TrainConfig, batch: int, total_steps: int, steps_per_epoch: int):
    peak = cfg.learning_rate * batch / 256  # scales with the batch
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak, decay_steps=max(total_steps - warmup, 1),
        warmup_target=peak if warmup else None, warmup_steps=warmup)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True,
                                    weight_decay=cfg.weight_decay or None)
    if cfg.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
        # Decay shrinks weights that scale features, not normalisation scales and offsets
        # or biases (pulling a BatchNorm gamma to 0 switches its channel off).
        optimizer.exclude_from_weight_decay(var_names=NO_DECAY)
        return optimizer
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adamw")


def image_model(cfg: TrainConfig, info: dict, weights: str | None = None) -> keras.Model:
    """The run's image model for ``info`` (class counts): the heads its loss weights ask
    for. ``weights`` overrides cfg.weights (export loads a checkpoint this way)."""
    return models.build_image_model(
        cfg.backbone, info["num_classes"], image_size=cfg.image_size,
        weights=weights or cfg.weights,
        num_level1=info["num_level1"] if cfg.level1_loss_weight > 0 else 0,
        num_level2=info["num_level2"] if cfg.level2_loss_weight > 0 else 0,
        dropout=cfg.dropout, bn_momentum=cfg.bn_momentum, crop_area=cfg.crop_area,
        seed=cfg.seed, slot_score=cfg.train_on == "products", hub_preset=cfg.hub_preset)


def build_and_compile(cfg: TrainConfig, info: dict, total_steps: int, steps_per_epoch: int,
                      batch: int | None = None, jit_compile: bool | str = "auto"
                      ) -> keras.Model:
    """The image model for ``info`` (class counts), compiled; call inside strategy.scope().
    With ``--train_on=products``, the product model around it (`models.product_model`):
    the same heads and losses, per product."""
    model = image_model(cfg, info)
    if cfg.train_on == "products":
        model = models.product_model(model)
    losses, weights = {}, {}
    for key, n, w in (("label", info["num_classes"], 1.0),
                      ("label_level1", info["num_level1"], cfg.level1_loss_weight),
                      ("label_level2", info["num_level2"], cfg.level2_loss_weight)):
        if key in model.output:
            losses[key] = models.SparseCrossentropy(n, cfg.label_smoothing)
            weights[key] = w
    model.compile(
        optimizer=_optimizer(cfg, batch or cfg.global_batch_size, total_steps,
                             steps_per_epoch),
        loss=losses, loss_weights=weights,
        # Weighted: an image the pipeline could not decode (weight 0) is left out of the
        # accuracies and counted by UndecodableImages.
        weighted_metrics={"label": [
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=min(5, info["num_classes"]),
                                                        name="top5"),
            models.UndecodableImages()]},
        steps_per_execution=cfg.steps_per_execution, jit_compile=jit_compile)
    return model


# --------------------------------------------------------------------------- training


def jit_compile_for(setting: bool | None) -> bool | str:
    """Keras's ``jit_compile`` for ``--jit_compile``: unset is Keras's own choice (XLA on
    JAX always; on TensorFlow only on an accelerator outside tf.distribute strategies),
    since XLA on GPUs was not measured here."""
    return "auto" if setting is None else setting


def _check_jit_compile(cfg: TrainConfig, strategy) -> None:
    """XLA under a mirrored strategy needs real devices: TensorFlow's logical CPUs cannot
    run it (a replica's variable read from another device)."""
    mirrored = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
    if cfg.jit_compile and isinstance(strategy, mirrored) and \
            strategy.num_replicas_in_sync > 1 and not tf.config.list_physical_devices("GPU"):
        raise ValueError("--jit_compile under a mirrored strategy needs GPUs: TensorFlow "
                         "cannot compile its replicas on logical CPUs; drop --jit_compile or "
                         "use --strategy=default")


def eval_batch_size(cfg: TrainConfig, replicas: int) -> int:
    """Products per global validation batch: per replica times the replicas when
    ``--per_replica_eval_batch_size`` is set, else ``--eval_batch_size``."""
    if cfg.per_replica_eval_batch_size:
        return cfg.per_replica_eval_batch_size * replicas
    return cfg.eval_batch_size


def _agreement(strategy):
    """How every process takes process 0's time-based decisions (None: one process)."""
    if isinstance(strategy, distribute.JaxDataParallel) and strategy.process_count > 1:
        import numpy as np
        from jax.experimental import multihost_utils
        return lambda due: bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
    return None


def _check_dataset(builder, data_dir: str) -> None:
    """What would otherwise fail after an epoch (or deep inside tf.data), said first."""
    splits = builder.info.splits
    for split in ("train", "validation"):
        if split not in splits or not splits[split].num_examples:
            raise ValueError(
                f"{data_dir}: the {split} split is empty (a catalogue whose categories have "
                "one product each leaves nothing to validate on); build it with more "
                "products per category, or set validation_size in the build config")
    if builder.info.features["label"].num_classes < 2:
        raise ValueError(f"{data_dir}: one category only; a classifier needs at least two")


def _check_product_phase(cfg: TrainConfig, strategy, batch: int) -> None:
    """Where batches of one image count per step cannot run, said first: a batch's shape
    changes with the count, which TPUStrategy's static compile refuses, and processes of
    one run would each draw their own counts, so their collectives would not line up."""
    if distribute.is_tpu(strategy) or isinstance(strategy,
                                                 tf.distribute.MultiWorkerMirroredStrategy):
        raise ValueError(f"--train_on=products under --strategy={cfg.strategy}: batches "
                         "change shape with the products' image count; on a TPU train it "
                         "with the JAX backend (--backend=jax, the default on a TPU VM), "
                         "elsewhere on one host (--strategy=mirrored or default)")
    if getattr(strategy, "process_count", 1) > 1:
        raise ValueError("--train_on=products runs on one host's devices (a v5e-8, a GPU "
                         "box): the processes of a multi-host run would each draw their own "
                         "image counts per step; drop the KERAS_DISTRIBUTION_* variables")
    if batch < input_pipeline.MAX_IMAGES * strategy.num_replicas_in_sync:
        raise ValueError(f"--train_on=products with a global batch of {batch} images: a "
                         f"step needs at least {input_pipeline.MAX_IMAGES} images per replica "
                         f"({strategy.num_replicas_in_sync} replicas), for a product of "
                         f"{input_pipeline.MAX_IMAGES}; raise --global_batch_size")


def _vector_logs(model: keras.Model) -> None:
    """Keras 3's fit under MultiWorkerMirroredStrategy averages each step's logs across
    workers over axis 0, which a scalar lacks ("Invalid reduction dimension 0 for input
    with 0 dimensions", tensorflow/tensorflow#72388). Logs of shape [1] average to the
    same scalars."""
    step = model.train_step
    model.train_step = lambda data: {k: tf.reshape(v, [1]) for k, v in step(data).items()}



def _build_for_multi_worker(model: keras.Model, strategy: tf.distribute.Strategy,
                            batch: int, size: int, label_keys: Sequence[str]) -> None:
    """Builds loss, metrics and optimizer from the known batch shapes, for
    MultiWorkerMirroredStrategy only.

    Keras's fit learns them by pulling a distributed batch and all-reducing it (MEAN);
    under MultiWorkerMirroredStrategy that reduce fails on uint8 images and int labels
    ("Attempt to convert a value (PerReplica...) to a Tensor"). No public Keras API
    builds a compiled model's loss and metrics, so this one path calls Keras internals
    (``_symbolic_build``, ``_maybe_symbolic_build``); Keras is pinned to the tested range
    in pyproject.toml and tests/learn/test_train.py fails when those internals change.
    """
    per_replica = batch // strategy.num_replicas_in_sync
    spec = (tf.TensorSpec([per_replica, size, size, 3], tf.uint8),
            {k: tf.TensorSpec([per_replica], tf.int32) for k in label_keys})
    with strategy.scope():
        model._symbolic_build(data_batch=spec)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None


@dataclasses.dataclass
class TrainResult:
    """What a training run gives back: its last validation report (product accuracy...),
    the Keras history, the model and its strategy (to predict with on the same
    accelerator), where a resumed run started (epoch and step, or None), and its shape."""

    validation: dict | None
    history: dict[str, list]
    model: keras.Model
    resumed: dict | None
    global_batch_size: int
    steps_per_epoch: int
    strategy: object
    distribution: str


@dataclasses.dataclass
class _Setup:
    """What a run is, decided (and checked) before anything is written."""

    strategy: object
    distribution: str
    backend: str
    policy: str
    builder: object
    info: dict
    batch: int
    steps_per_epoch: int


def _set_up(cfg: TrainConfig) -> _Setup:
    settings.check(cfg)
    used_backend = backend_lib.select(cfg.backend)
    strategy = distribute.get_strategy(cfg.strategy, cfg.tpu, cfg.multihost_timeout)
    distribution = distribute.describe(strategy)  # e.g. backend jax, DataParallel over 8 ...
    logging.info("train: %s", distribution)  # the run's first log line
    distribute.check_paths_for(strategy, data_dir=cfg.data_dir, model_dir=cfg.model_dir)
    policy = distribute.set_precision(cfg.mixed_precision, strategy)
    if cfg.seed is not None:
        keras.utils.set_random_seed(cfg.seed)
    builder = input_pipeline.load_builder(cfg.data_dir, cfg.dataset_config)
    info = metadata.read(builder, cfg.data_dir).model_info()
    _check_dataset(builder, cfg.data_dir)
    batch = distribute.global_batch_size(cfg.global_batch_size, cfg.per_replica_batch_size,
                                         strategy.num_replicas_in_sync)
    if batch > info["train_images"]:
        raise ValueError(
            f"a step of {batch} images is more than the {info['train_images']} training "
            f"images in {cfg.data_dir}: no whole batch exists; lower --global_batch_size "
            "(or --per_replica_batch_size)")
    _check_jit_compile(cfg, strategy)
    if cfg.train_on == "products":
        _check_product_phase(cfg, strategy, batch)
    if cfg.backup_every_minutes and isinstance(strategy,
                                               tf.distribute.MultiWorkerMirroredStrategy):
        raise ValueError("--backup_every_minutes under multi_worker_mirrored: the workers' "
                         "clocks would disagree on when to save, and saving is collective; "
                         "use --backup_every_steps")
    return _Setup(strategy, distribution, used_backend, policy, builder, info, batch,
                  cfg.steps_per_epoch or max(1, info["train_images"] // batch))


def _model(cfg: TrainConfig, run: _Setup) -> keras.Model:
    """The compiled model, its optimizer state built (a resumed run loads into it)."""
    strategy = run.strategy
    with strategy.scope():
        model = build_and_compile(cfg, run.info, run.steps_per_epoch * cfg.epochs,
                                  run.steps_per_epoch, run.batch,
                                  jit_compile_for(cfg.jit_compile))
        model.optimizer.build(model.trainable_variables)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        _build_for_multi_worker(model, strategy, run.batch, cfg.decode_size,
                                tuple(model.output))
        _vector_logs(model)
    return model


def _write_run_files(cfg: TrainConfig, run: _Setup, flags_text: str | None) -> None:
    model_dir = cfg.model_dir.rstrip("/")
    atomic.write(rundir.config_path(model_dir), json.dumps(
        {"train": dataclasses.asdict(cfg), "dataset": run.info,
         "dataset_fingerprint": input_pipeline.fingerprint(run.builder), "policy": run.policy,
         "backend": run.backend, "distribution": run.distribution,
         "strategy": type(run.strategy).__name__,
         "replicas": run.strategy.num_replicas_in_sync, "global_batch_size": run.batch,
         "steps_per_epoch": run.steps_per_epoch}, indent=2))
    if flags_text is not None:
        atomic.write(model_dir + "/flags.txt", flags_text)


def _train_data(cfg: TrainConfig, run: _Setup, label_keys: tuple):
    """``start_step -> dataset``: the training stream from a step on, for the strategy."""
    options = input_pipeline.PipelineOptions(
        image_size=cfg.image_size, decode_size=cfg.decode_size,
        shuffle_buffer=cfg.shuffle_buffer, deterministic=cfg.deterministic, seed=cfg.seed,
        data_service=cfg.data_service)

    jax = isinstance(run.strategy, distribute.JaxDataParallel)

    def from_step(start_step: int):
        def fn(ctx):
            if cfg.train_on == "products":  # JAX splits each batch over the devices
                ds = input_pipeline.product_train_dataset(
                    run.builder, run.batch, options, input_context=ctx,
                    start_step=start_step,
                    multiple=run.strategy.num_replicas_in_sync if jax else 1)
            else:
                ds = input_pipeline.train_dataset(run.builder, run.batch, options,
                                                  input_context=ctx, start_step=start_step)
            return ds.map(lambda x, y, w: (x, {k: y[k] for k in label_keys}, w))
        if jax:  # Keras splits each batch
            return fn(run.strategy.input_context())  # over the devices; a process reads its share
        return run.strategy.distribute_datasets_from_function(fn)
    return from_step


def for_phase(cfg: TrainConfig) -> TrainConfig:
    """A phase's settings (``cfg.phase``, e.g. a full-frame fine-tune at 224 px after a run
    at 180): its own folder inside the run, started from the run's best checkpoint. The
    networks here hold no weight whose shape depends on the image size, so the weights
    carry across sizes.

    Raises:
      FileNotFoundError: the run has no best checkpoint yet (train it first).
    """
    if not cfg.phase:
        return cfg
    start = rundir.checkpoint_path(cfg.model_dir, "best")
    return dataclasses.replace(cfg, model_dir=rundir.phase_dir(cfg.model_dir, cfg.phase),
                               weights=start)


def train(cfg: TrainConfig, callbacks: Sequence[keras.callbacks.Callback] = (),
          flags_text: str | None = None) -> TrainResult:
    """Trains and validates (`TrainResult`). Rerunning with the same model_dir resumes
    from the last backup. ``flags_text`` is written to flags.txt once the settings have
    proved valid. A ``cfg.phase`` trains in the run's phase folder (`for_phase`)."""
    cfg = for_phase(cfg)
    run = _set_up(cfg)
    strategy, steps_per_epoch = run.strategy, run.steps_per_epoch
    model = _model(cfg, run)
    model_dir = cfg.model_dir.rstrip("/")
    # Every check, the model's own included, ran before this: the first write (the chief's),
    # under the model dir's lock (one writer per run).
    chief = distribute.is_chief(strategy)
    with contextlib.ExitStack() as lock:
        if chief:  # the lock makes the folder: a read-only one is refused here
            lock.enter_context(folder_lock.hold(f"{model_dir}/{rundir.LOCK_FILE}",
                                                "tfcdisc.train", model_dir,
                                                cfg.lock_lease_minutes))
        resume = rundir.prepare(model_dir, cfg, delete=chief)
        if resume and tf.io.gfile.exists(rundir.config_path(model_dir)):
            rundir.check_dataset(model_dir, cfg.data_dir, input_pipeline.fingerprint(run.builder))
        backup = rundir.read_backup(model_dir) if resume else None
        # Read before config.json is rewritten: the global batch the backup counted in.
        previous_batch = (rundir.load_config(model_dir).get("global_batch_size")
                          if backup and tf.io.gfile.exists(rundir.config_path(model_dir))
                          else None)
        out_dir = model_dir if chief else tempfile.mkdtemp(prefix="tfcdisc-worker-")
        tf.io.gfile.makedirs(out_dir + "/checkpoints")
        if chief:
            _write_run_files(cfg, run, flags_text)
        logging.info("training %s on %d replicas (%s), %d steps/epoch x %d epochs of %d images",
                     cfg.backbone, strategy.num_replicas_in_sync, run.policy, steps_per_epoch,
                     cfg.epochs, run.batch)

        epoch, step = (backup["epoch"], backup["step"]) if backup else (0, 0)
        best = WholeCheckpoint(out_dir + "/checkpoints/best.keras",
                               monitor="val_product_accuracy", mode="max",
                               save_best_only=True)
        if backup is not None:
            model.load_weights(f"{model_dir}/backup/{backup['weights']}")
            epoch, step, moved = rescaled_position(backup, run.batch, steps_per_epoch,
                                                   previous_batch)
            if moved:
                model.optimizer.iterations.assign(epoch * steps_per_epoch + step)
                print(f"train: {moved}", file=sys.stderr)
            if backup.get("best") is not None:
                best.best = backup["best"]
            print(f"train: resuming {model_dir} at epoch {epoch}, step {step}", file=sys.stderr)

        if chief:  # rows of epochs past the backup (or of a first epoch whose backup
            # failed, when there is none) are redone: one row per epoch
            rundir.keep_history_before(model_dir + "/history.csv", epoch)
        train_data = _train_data(cfg, run, tuple(model.output))
        val_ds = product_predictor.distribute_products(
            strategy, lambda: input_pipeline.split_products(run.builder, "validation"),
            eval_batch_size(cfg, strategy.num_replicas_in_sync), cfg.image_size,
            run.builder.info.splits["validation"].num_examples)
        evaluation = ProductEvaluation(val_ds, strategy, cfg.eval_max_batches,
                                       run.info["fallback_class"])
        saver = Backup(out_dir + "/backup", cfg.backup_every_steps, best,
                       cfg.backup_every_minutes, run.batch, agree=_agreement(strategy))
        all_callbacks = [
            StopOnNonFiniteLoss(),  # first: nothing after it sees a diverged step
            evaluation,  # before the callbacks that read its val_* logs
            LearningRateLogger(),
            best,
            WholeCheckpoint(out_dir + "/checkpoints/last.keras"),
            keras.callbacks.CSVLogger(out_dir + "/history.csv", append=True),
            EpochCurves(out_dir + "/logs", update_freq=cfg.log_every_steps),
            saver,  # a backup records a finished epoch only once everything above ran
            *callbacks,
            StopsBetweenSteps(),  # last: a stop comes after the step's own work
        ]
        verbose = cfg.verbose
        if verbose is None:
            verbose = 1 if sys.stdout.isatty() or runtime.in_notebook() else 2
        history: dict[str, list] = {}

        def fit(start_epoch: int, end_epoch: int, steps: int, start_step: int) -> None:
            with stops.deferred():  # a Ctrl-C waits for the end of its step
                h = model.fit(train_data(start_step), initial_epoch=start_epoch,
                              epochs=end_epoch, steps_per_epoch=steps,
                              callbacks=all_callbacks, verbose=verbose,
                              shuffle=False)  # the pipeline shuffles
            for key, values in h.history.items():
                history.setdefault(key, []).extend(values)

        if step and epoch < cfg.epochs:  # finish the interrupted epoch first
            saver.offset = step
            fit(epoch, epoch + 1, steps_per_epoch - step, epoch * steps_per_epoch + step)
            epoch += 1
        if epoch < cfg.epochs:
            fit(epoch, cfg.epochs, steps_per_epoch, epoch * steps_per_epoch)
        if not chief:
            shutil.rmtree(out_dir, ignore_errors=True)
        return TrainResult(
            evaluation.last, history, model,
            {"epoch": backup["epoch"], "step": backup["step"]} if backup else None,
            run.batch, steps_per_epoch, strategy, run.distribution)
