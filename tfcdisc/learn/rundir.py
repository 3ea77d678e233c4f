"""A run folder (``--model_dir``): its layout, and everything that reads it.

    config.json         the run's TrainConfig, dataset facts, backend and distribution
    flags.txt           the command's flags (a reusable --flagfile)
    history.csv         one row per finished epoch
    checkpoints/        best.keras (best validation product accuracy), last.keras
    backup/             state.json and the weights it names: where a rerun resumes
    logs/               TensorBoard
    phases/NAME/        a phase of the run (a fine-tune from its best checkpoint): a run
                        folder of its own (`phase_dir`)
    .tfcdisc-writer.lock  held by the one process writing it (`catalogue.folder_lock`)

Training writes it (`training`); the fusion head and the export read it, through this
module alone, so that neither reaches into the other or into training.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import zipfile

import keras
import tensorflow as tf

from tfcdisc.catalogue import atomic
from tfcdisc import settings
from tfcdisc.learn import models
from tfcdisc.settings import MODEL_FIELDS, OPERATIONAL_FIELDS, TrainConfig

LOCK_FILE = ".tfcdisc-writer.lock"  # `folder_lock`: one writer per model dir
RUN_FILES = ("config.json", "flags.txt", "history.csv", "checkpoints", "backup", "logs",
             "phases")


def prepare(model_dir: str, cfg: TrainConfig, delete: bool = True) -> bool:
    """Refuses a model dir holding another run, unless ``cfg.overwrite``: then that run's
    files are deleted (by the caller that has ``delete``: the chief). Writes nothing else.

    Returns whether the run may resume from what is there: False when it starts afresh.
    """
    present = [n for n in RUN_FILES if tf.io.gfile.exists(f"{model_dir}/{n}")]
    if not present:
        return True
    if "config.json" not in present:
        problem = (f"{model_dir} holds {', '.join(present)} but no config.json (the remains "
                   "of something else)")
    else:
        saved = load_config(model_dir)["train"]
        model = settings.differences(saved, cfg, MODEL_FIELDS)
        recipe = settings.differences(saved, cfg, [
            k for k in saved if k not in MODEL_FIELDS and k not in OPERATIONAL_FIELDS])
        if not model and not recipe:
            return True  # the same run: resumed (or left alone if finished)
        problem = (f"{model_dir} holds a run of {'another model' if model else 'other settings'}"
                   f": {', '.join(model + recipe)}")
    if not delete:
        # A worker other than the chief: what it sees may be the chief's own fresh start
        # (its checkpoints folder before its config.json). The chief refuses or deletes;
        # the worker starts afresh with it.
        return False
    if not cfg.overwrite:
        raise ValueError(f"{problem}; give the run's own values to resume it, another "
                         "--model_dir, or --overwrite to delete it and start afresh")
    for name in present:
        path = f"{model_dir}/{name}"
        (tf.io.gfile.rmtree if tf.io.gfile.isdir(path) else tf.io.gfile.remove)(path)
    logging.warning("--overwrite: deleted the previous run's %s in %s", ", ".join(present),
                    model_dir)
    return False


def phase_dir(model_dir: str, phase: str) -> str:
    """The folder of a phase of the run (`TrainConfig.phase`), a run folder itself.

    Raises:
      ValueError: a name that is not a plain folder name.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", phase):
        raise ValueError(f"--phase={phase}: letters, digits, '_', '-' and '.' only")
    return f"{model_dir.rstrip('/')}/phases/{phase}"


def config_path(model_dir: str) -> str:
    return model_dir.rstrip("/") + "/config.json"


def load_config(model_dir: str) -> dict:
    """The config.json a run wrote: its TrainConfig plus the dataset's class counts."""
    path = config_path(model_dir)
    return atomic.load_json(path, f"{path}: not a training run (no config.json); give the "
                            "--model_dir of `python -m tfcdisc.train`",
                            "train the run again, or restore the file")


def train_settings(model_dir: str) -> TrainConfig:
    """The run's TrainConfig, as it trained."""
    return TrainConfig(**load_config(model_dir)["train"])


def check_dataset(model_dir: str, data_dir: str, found: dict, *,
                  taxonomy_only: bool = False) -> None:
    """Refuses a data dir whose dataset is not the one the run trained on
    (`input_pipeline.fingerprint`; ``taxonomy_only``: another build of the same taxonomy
    will do). A run older than fingerprints is not checked.

    Raises:
      ValueError: naming the run's dataset and the data dir's.
    """
    saved = load_config(model_dir).get("dataset_fingerprint")
    if not saved:
        return
    keys = ("taxonomy_sha256", "classes") if taxonomy_only else tuple(saved)
    if all(saved.get(k) == found.get(k) for k in keys):
        return

    def said(f: dict) -> str:
        splits = ", ".join(f"{k} {v}" for k, v in (f.get("splits") or {}).items())
        return f"{f.get('classes')} categories, taxonomy {f.get('taxonomy_sha256')}, {splits}"
    raise ValueError(
        f"{data_dir} holds another dataset than the one {model_dir} trained on (the run: "
        f"{said(saved)}; {data_dir} now: {said(found)}), rebuilt since?; give the run's own "
        "dataset (rebuild it from its catalogue), or train a new run on this one")


def read_backup(model_dir: str) -> dict | None:
    """The backup state of a run (see `Backup`), or None for a fresh run."""
    return atomic.load_json(model_dir.rstrip("/") + "/backup/state.json", None,
                            "delete the backup folder to start the run afresh")


def keep_history_before(path: str, epoch: int) -> None:
    """history.csv keeps exactly the rows of the epochs before ``epoch``: a run killed
    after writing an epoch's row but before its backup redoes that epoch, once."""
    if not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path) as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    # One row per epoch whatever the file holds (a second header or a repeated epoch from
    # an older version's crash): the last row of each epoch wins.
    by_epoch = {int(r[0]): r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < epoch}
    kept = [rows[0]] + [by_epoch[e] for e in sorted(by_epoch)]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(kept)
    atomic.write(path, out.getvalue())


def checkpoint_path(model_dir: str, which: str = "best") -> str:
    path = f"{model_dir.rstrip('/')}/checkpoints/{which}.keras"
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{path}: no {which} checkpoint; has `python -m tfcdisc.train "
                                f"--model_dir={model_dir}` finished an epoch?")
    return path


def non_finite_weight(model: keras.Model) -> str | None:
    """The path of the model's first weight holding a NaN or an infinity, or None."""
    import numpy as np
    for variable in model.weights:
        if not np.isfinite(keras.ops.convert_to_numpy(variable.value)).all():
            return variable.path
    return None


def _in_float32(config):
    """A serialized model's config with every layer's dtype policy made float32."""
    if isinstance(config, list):
        return [_in_float32(c) for c in config]
    if not isinstance(config, dict):
        return config
    if config.get("class_name") == "DTypePolicy":
        return {**config, "config": {**config["config"], "name": "float32"}}
    return {k: _in_float32(v) for k, v in config.items()}


def float32_model(checkpoint: str) -> keras.Model:
    """The checkpoint's own image model (of a product phase's, the one inside), in
    float32: its architecture is read from the file, not rebuilt from flags. A rebuild can differ: Keras adds a layer to EfficientNet B0-B7
    only when it is built with ``weights="imagenet"``, which a rebuild cannot ask for."""
    with atomic.local_copy(checkpoint) as local:
        with zipfile.ZipFile(local) as z:
            text = z.read("config.json").decode()
        models.import_hub_if_used(text)
        config = json.loads(text)
        previous = keras.mixed_precision.global_policy().name
        keras.mixed_precision.set_global_policy("float32")  # portable serving on any device
        try:
            model = keras.saving.deserialize_keras_object(_in_float32(config))
        finally:
            keras.mixed_precision.set_global_policy(previous)
        model.load_weights(local)
    return models.image_model_of(model)  # a product phase's checkpoint: the image model
