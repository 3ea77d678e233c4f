"""Train settings: one dataclass that is also the source of the train command's flags.

Each field carries its help text (and choices or bounds) in its metadata, so the
`tfcdisc.train` flags, their defaults and `TrainConfig` cannot drift apart. Fields marked
``model=True`` define the network: a resumed or exported run must use the same values.

This module imports no TensorFlow: ``--help`` answers at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

BACKBONE_NAMES = (
    "xception", *(f"efficientnet_b{i}" for i in range(8)),
    *(f"efficientnetv2_b{i}" for i in range(4)), "efficientnetv2_s", "efficientnetv2_m",
    "efficientnetv2_l", "resnet50", "mobilenetv3_small", "mobilenetv3_large", "small_cnn")
STRATEGIES = ("auto", "tpu", "mirrored", "multi_worker_mirrored", "one_device", "default")
INFERENCE_STRATEGIES = ("auto", "tpu", "mirrored", "default")
BACKENDS = ("auto", "jax", "tensorflow")  # Keras's backend (`tfcdisc.backend`)
# Help of flags that several commands define (train through its dataclass).
BACKEND_HELP = ("Keras backend that runs the model: auto is JAX on a TPU VM, TensorFlow "
                "elsewhere; a run may resume on the other.")
DATASET_CONFIG_HELP = ("Which build of the dataset in --data_dir: the name given to `tfds "
                       "build --config` (default: the only one there).")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
TTA_MODES = ("none", "flip")  # test-time views an export averages (`models.with_tta`)


def setting(default: Any, help: str, *, choices: tuple | None = None,
            lower_bound: float | None = None, required: bool = False,
            model: bool = False) -> Any:
    """A dataclass field that also describes its flag."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, choices=choices, lower_bound=lower_bound, required=required, model=model))


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; the train command fills it from its flags."""

    data_dir: str = setting("", "Where `tfds build` wrote the cdiscount dataset (local or "
                            "gs://).", required=True)
    dataset_config: str | None = setting(None, DATASET_CONFIG_HELP)
    model_dir: str = setting("", "Run folder: checkpoints, history.csv, TensorBoard logs, "
                             "backup (local or gs://).", required=True)
    backbone: str = setting("efficientnetv2_b0", "Image backbone.", choices=BACKBONE_NAMES,
                            model=True)
    image_size: int = setting(180, "Side of the square model input (images are 180x180; "
                              "Xception needs >= 71).", lower_bound=16, model=True)
    weights: str = setting("none", "none, imagenet (downloaded by Keras; needs a network) or "
                           "a .weights.h5 / .keras path.")
    global_batch_size: int = setting(256, "Images per step across all replicas (ignored when "
                                     "--per_replica_batch_size is set).", lower_bound=1)
    per_replica_batch_size: int | None = setting(
        None, "Images per step on each replica; the global batch is this times the number "
        "of replicas (8 on a v3-8, 1 on a v5e-1), so one flagfile fits every TPU.",
        lower_bound=1)
    epochs: int = setting(10, "Epochs to train.", lower_bound=1)
    steps_per_epoch: int | None = setting(None, "Steps per epoch (default: one pass over "
                                          "the training images).", lower_bound=1)
    optimizer: str = setting("sgd", "SGD with Nesterov momentum 0.9, or AdamW.",
                             choices=("sgd", "adamw"))
    learning_rate: float = setting(0.1, "Peak learning rate per 256 images; scaled by the "
                                   "global batch / 256.", lower_bound=0.0)
    warmup_epochs: float = setting(1.0, "Linear warm-up, then cosine decay.", lower_bound=0.0)
    weight_decay: float = setting(5e-5, "Decoupled weight decay.", lower_bound=0.0)
    label_smoothing: float = setting(0.1, "Label smoothing of every head.", lower_bound=0.0)
    dropout: float = setting(0.2, "Dropout before the heads.", lower_bound=0.0)
    level1_loss_weight: float = setting(0.0, "Loss weight of an auxiliary level-1 head "
                                        "(0: no head).", lower_bound=0.0, model=True)
    level2_loss_weight: float = setting(0.0, "Loss weight of an auxiliary level-2 head "
                                        "(0: no head).", lower_bound=0.0, model=True)
    bn_momentum: float | None = setting(None, "BatchNormalization momentum override; 0.9 "
                                        "for short runs, so inference-mode statistics keep "
                                        "up with the weights.")
    crop_area: float = setting(0.5, "Smallest fraction of an image a training crop covers "
                               "(random resized crop on the accelerator).", lower_bound=0.05)
    backend: str = setting("auto", BACKEND_HELP, choices=BACKENDS)
    mixed_precision: str = setting("auto", "auto: bfloat16 on TPU, float16 on GPU, float32 "
                                   "on CPU.", choices=PRECISIONS)
    strategy: str = setting("auto", "Distribution strategy; multi_worker_mirrored reads "
                            "TF_CONFIG.", choices=STRATEGIES)
    tpu: str | None = setting(None, "TPU address or name (local on a TPU VM, "
                              "grpc://host:8470 for a TPU node).")
    steps_per_execution: int = setting(1, "Steps per compiled call (32-128 on TPU).",
                                       lower_bound=1)
    shuffle_buffer: int = setting(16384, "Images in the shuffle buffer.", lower_bound=1)
    decode_size: int = setting(180, "Side of the uint8 images the host decodes for training "
                               "(the catalogue's own size: no resize on the host).",
                               lower_bound=16)
    deterministic: bool = setting(False, "Reproducible input order (slower).")
    data_service: str | None = setting(None, "tf.data service dispatcher address.")
    eval_batch_size: int = setting(256, "Products per validation batch (global).",
                                   lower_bound=1)
    eval_max_batches: int | None = setting(None, "Validate on at most this many batches.",
                                           lower_bound=1)
    backup_every_steps: int | None = setting(
        None, "Also back up every N steps, not only at the end of an epoch: a preemption "
        "then loses at most N steps.", lower_bound=1)
    log_every_steps: int = setting(100, "Write TensorBoard scalars every N steps.",
                                   lower_bound=1)
    seed: int | None = setting(None, "Random seed (weights, shuffling, crops).")
    verbose: int | None = setting(None, "Keras fit verbosity: 0, 1 (progress bar per step) "
                                  "or 2 (a line per epoch); default: 1 on a terminal or in a "
                                  "notebook, 2 otherwise.")
    overwrite: bool = setting(False, "Replace another run in --model_dir (its checkpoints, "
                              "backup, history and logs are deleted); without it such a dir "
                              "is refused. The same run always resumes.")


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["model"])
# Settings that change where or how visibly a run trains, not what it trains: a model dir
# may be resumed with other values of these; any other difference is another run.
OPERATIONAL_FIELDS = ("model_dir", "data_dir", "backend", "strategy", "tpu", "data_service",
                      "steps_per_execution", "eval_batch_size", "eval_max_batches",
                      "backup_every_steps", "log_every_steps", "verbose", "deterministic",
                      "shuffle_buffer", "overwrite")


def check(settings: Any) -> None:
    """Refuses values the flags would refuse, for callers that build a config in Python."""
    for f in dataclasses.fields(settings):
        value, m = getattr(settings, f.name), f.metadata
        if m.get("required") and not value:
            raise ValueError(f"--{f.name} is required")
        if value is None:
            continue
        if m.get("choices") and value not in m["choices"]:
            raise ValueError(f"--{f.name}={value}: choose from {', '.join(m['choices'])}")
        if m.get("lower_bound") is not None and value < m["lower_bound"]:
            raise ValueError(f"--{f.name}={value}: must be at least {m['lower_bound']}")


def differences(saved: dict, settings: Any, fields: Sequence[str]) -> list[str]:
    """``--name=value (the run has other)`` for each of ``fields`` that differs."""
    return [f"--{k}={getattr(settings, k)} (the run has {saved.get(k)})" for k in fields
            if k in saved and saved[k] != getattr(settings, k)]


def define_flags(cls: type, flag_values=None) -> None:
    """Defines one absl flag per field of ``cls`` (a dataclass made with `setting`)."""
    from absl import flags
    fv = flag_values if flag_values is not None else flags.FLAGS
    for f in dataclasses.fields(cls):
        m = f.metadata
        default = None if m["required"] else f.default
        kind = str(f.type).split("|")[0].strip()
        kwargs = dict(flag_values=fv, required=m["required"])
        if m["choices"]:
            flags.DEFINE_enum(f.name, default, list(m["choices"]), m["help"], **kwargs)
        elif kind == "bool":
            flags.DEFINE_bool(f.name, default, m["help"], **kwargs)
        elif kind == "int":
            flags.DEFINE_integer(f.name, default, m["help"], lower_bound=m["lower_bound"],
                                 **kwargs)
        elif kind == "float":
            flags.DEFINE_float(f.name, default, m["help"], lower_bound=m["lower_bound"],
                               **kwargs)
        else:
            flags.DEFINE_string(f.name, default, m["help"], **kwargs)


def from_flags(cls: type, flag_values=None) -> Any:
    """An instance of ``cls`` from parsed flags defined by `define_flags`."""
    from absl import flags
    fv = flag_values if flag_values is not None else flags.FLAGS
    return cls(**{f.name: fv[f.name].value for f in dataclasses.fields(cls)})


def check_flagfiles(argv: Sequence[str]) -> None:
    """Refuses a flagfile line that is not a flag: absl ignores ``image_size=48``
    (no dashes) without a word, and the run silently uses the default.

    Raises:
      ValueError: naming the file, the line number and the fix.
    """
    paths, args = [], list(argv)
    for i, arg in enumerate(args):
        if arg.startswith("--flagfile="):
            paths.append(arg.split("=", 1)[1])
        elif arg == "--flagfile" and i + 1 < len(args):
            paths.append(args[i + 1])
    seen: set[str] = set()
    while paths:
        path = paths.pop()
        if path in seen:
            continue
        seen.add(path)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            continue  # absl's own parse names a missing flagfile
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith(("#", "//")):
                continue
            if not line.startswith("-"):
                raise ValueError(f"{path}:{number}: {line!r} is not a flag (flags start "
                                 f"with --, e.g. --{line}); fix or comment out the line")
            if line.startswith("--flagfile="):
                paths.append(line.split("=", 1)[1])


def parse(cls: type, argv: list[str]) -> Any:
    """An instance of ``cls`` from command-line style flags (``--flagfile=...`` works),
    without touching the process's global flags: for notebooks and tests."""
    from absl import flags
    check_flagfiles(argv)
    fv = flags.FlagValues()
    define_flags(cls, fv)
    fv(["tfcdisc", *argv])
    return from_flags(cls, fv)
