"""Every command's settings: one dataclass per command, which is also its flags
(`fields.setting`). In `TrainConfig`, fields marked ``model=True`` define the network: a
resumed or exported run must use the same values."""

from __future__ import annotations

import dataclasses

from tfcdisc.settings.fields import lease_setting, setting

__all__ = ["BACKBONE_NAMES", "STRATEGIES", "INFERENCE_STRATEGIES", "BACKENDS",
           "BACKEND_HELP", "DATASET_CONFIG_HELP", "PRECISIONS", "TRAIN_ON", "TTA_MODES",
           "TrainConfig", "MODEL_FIELDS", "OPERATIONAL_FIELDS", "CHECKPOINTS",
           "ERROR_MODES", "InferenceSettings", "PredictSettings", "EvaluateSettings",
           "ExportSettings", "EnsembleSettings", "check_ensemble_members", "FusionSettings",
           "ShowSettings", "InspectSettings", "BuildSettings", "SynthSettings",
           "PreflightSettings"]

BACKBONE_NAMES = (
    "xception", *(f"efficientnet_b{i}" for i in range(8)),
    *(f"efficientnetv2_b{i}" for i in range(4)), "efficientnetv2_s", "efficientnetv2_m",
    "efficientnetv2_l", "convnext_tiny", "convnext_small", "convnext_base", "resnet50",
    "mobilenetv3_small", "mobilenetv3_large", "small_cnn", "keras_hub")
STRATEGIES = ("auto", "tpu", "mirrored", "multi_worker_mirrored", "one_device", "default")
INFERENCE_STRATEGIES = ("auto", "tpu", "mirrored", "default")
BACKENDS = ("auto", "jax", "tensorflow")  # Keras's backend (`tfcdisc.learn.backend`)
# Help of flags that several commands define (train through its dataclass).
BACKEND_HELP = ("Keras backend that runs the model: auto is JAX on a TPU VM, TensorFlow "
                "elsewhere; a run may resume on the other.")
DATASET_CONFIG_HELP = ("Which build of the dataset in --data_dir: the name given to `tfds "
                       "build --config` (default: the only one there).")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
TRAIN_ON = ("images", "products")  # what a training example is (`training`)
TTA_MODES = ("none", "flip")  # test-time views an export averages (`models.with_tta`)


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; the train command fills it from its flags."""

    data_dir: str = setting("", "Where `tfds build` wrote the cdiscount dataset (local or "
                            "gs://).", required=True, role="input")
    dataset_config: str | None = setting(None, DATASET_CONFIG_HELP)
    model_dir: str = setting("", "Run folder: checkpoints, history.csv, TensorBoard logs, "
                             "backup (local or gs://).", required=True,
                             role="output")
    backbone: str = setting("efficientnetv2_b0", "Image backbone (keras_hub: the KerasHub "
                            "image backbone of --hub_preset).", choices=BACKBONE_NAMES,
                            model=True)
    hub_preset: str | None = setting(
        None, "With --backbone=keras_hub: a KerasHub preset name (e.g. resnet_50_imagenet, "
        "downloaded from Kaggle or Hugging Face) or a preset folder (local or gs://: offline; "
        "`keras_hub.models.Backbone.from_preset(...).save_to_preset(FOLDER)` and the image "
        "converter's save_to_preset make one). --weights=imagenet loads the preset's weights, "
        "none its architecture only, a preset folder that folder's weights.", model=True,
        path=True)
    image_size: int = setting(180, "Side of the square model input (images are 180x180; "
                              "Xception needs >= 71).", lower_bound=16, model=True)
    weights: str = setting("none", "none; imagenet (downloaded by Keras: needs a network); "
                           "the path (local or gs://) of Keras's ImageNet weights file for "
                           "the backbone, e.g. xception_weights_tf_dim_ordering_tf_kernels_"
                           "notop.h5 or efficientnetv2-s_notop.h5 (the same weights, offline); "
                           "or a run's .weights.h5 / .keras; with --backbone=keras_hub, a "
                           "KerasHub preset folder.", path=True)
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
    label_smoothing: float = setting(0.1, "Label smoothing of every head.", lower_bound=0.0,
                                     below=1.0)
    dropout: float = setting(0.2, "Dropout before the heads.", lower_bound=0.0, below=1.0)
    level1_loss_weight: float = setting(0.0, "Loss weight of an auxiliary level-1 head "
                                        "(0: no head).", lower_bound=0.0, model=True)
    level2_loss_weight: float = setting(0.0, "Loss weight of an auxiliary level-2 head "
                                        "(0: no head).", lower_bound=0.0, model=True)
    bn_momentum: float | None = setting(None, "BatchNormalization momentum override; 0.9 "
                                        "for short runs, so inference-mode statistics keep "
                                        "up with the weights.", lower_bound=0.0, below=1.0)
    crop_area: float = setting(0.5, "Smallest fraction of an image a training crop covers "
                               "(random resized crop on the accelerator).", lower_bound=0.05,
                               upper_bound=1.0)
    train_on: str = setting(
        "images", "images: each image is an example with its product's label. products: "
        "end to end on whole products (a product phase, e.g. --phase=products after an "
        "image run): one backbone pass over each product's images, pooled by learned "
        "weights that start as the mean of their log-probabilities, the product's label "
        "as the loss; batches hold products of one image count (about the global batch "
        "in images), so no compute goes to padding. One host (a v5e-8, a GPU box); not "
        "under --strategy=tpu or multi_worker_mirrored.", choices=TRAIN_ON, model=True)
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
    eval_batch_size: int = setting(256, "Products per validation batch (global; ignored when "
                                   "--per_replica_eval_batch_size is set).", lower_bound=1)
    per_replica_eval_batch_size: int | None = setting(
        None, "Products per validation batch on each replica (4 image slots each, all of "
        "them computed on a TPU); the global batch is this times the replicas, so one "
        "flagfile fits a v5e-1 and a v5e-8 alike (`tfcdisc.preflight` checks the HBM).",
        lower_bound=1)
    eval_max_batches: int | None = setting(None, "Validate on at most this many batches.",
                                           lower_bound=1)
    backup_every_steps: int | None = setting(
        None, "Also back up every N steps, not only at the end of an epoch: a preemption "
        "then loses at most N steps.", lower_bound=1)
    backup_every_minutes: float | None = setting(
        None, "Also back up when this many minutes have passed since the last backup (checked "
        "after each step; with --backup_every_steps, whichever comes first): a preemption "
        "then loses at most this much time, whatever the step rate.", lower_bound=0.1)
    jit_compile: bool | None = setting(
        None, "TensorFlow backend: compile the training step with XLA. Default: Keras's "
        "choice, which turns XLA off under any tf.distribute strategy (GPUs: not measured "
        "here, see docs/tpus_and_backends.md). The JAX backend always compiles.")
    log_every_steps: int = setting(100, "Write TensorBoard scalars every N steps.",
                                   lower_bound=1)
    seed: int | None = setting(None, "Random seed (weights, shuffling, crops).")
    verbose: int | None = setting(None, "Keras fit verbosity: 0, 1 (progress bar per step) "
                                  "or 2 (a line per epoch); default: 1 on a terminal or in a "
                                  "notebook, 2 otherwise.")
    phase: str | None = setting(
        None, "A phase of the run in --model_dir, e.g. ft224 (experiments/*_ft224.cfg: a "
        "full-frame fine-tune at a higher resolution): it starts from the run's best "
        "checkpoint and keeps its own config, history, checkpoints and backup in "
        "MODEL_DIR/phases/NAME; export it with --phase=NAME.")
    overwrite: bool = setting(False, "Replace another run in --model_dir (its checkpoints, "
                              "backup, history and logs are deleted); without it such a dir "
                              "is refused. The same run always resumes.")
    lock_lease_minutes: float = lease_setting()
    multihost_timeout: float = setting(
        300.0, "Seconds a multi-host JAX run (KERAS_DISTRIBUTION_* variables, a TPU pod) "
        "waits for all its processes to join before it stops with one line.", lower_bound=1.0)


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["model"])
# Settings that change where or how visibly a run trains, not what it trains: a model dir
# may be resumed with other values of these; any other difference is another run.
# A run moved to another number of chips keeps its per-replica batch: `training` rescales
# its schedule and position to the new global batch and says so.
OPERATIONAL_FIELDS = ("model_dir", "data_dir", "backend", "strategy", "tpu", "data_service",
                      "steps_per_execution", "eval_batch_size", "per_replica_eval_batch_size",
                      "eval_max_batches", "backup_every_steps", "backup_every_minutes",
                      "jit_compile", "log_every_steps", "verbose", "deterministic",
                      "shuffle_buffer", "overwrite", "lock_lease_minutes",
                      "multihost_timeout")


# --------------------------------------------------------------------------- other commands

CHECKPOINTS = ("best", "last")
ERROR_MODES = ("strict", "skip")


@dataclasses.dataclass
class InferenceSettings:
    """What predict and evaluate share: the export, the products, where the model runs."""

    saved_model: str = setting(None, "Folder written by tfcdisc.export.", required=True,
                                role="input")
    bson: str | None = setting(None, "A Kaggle-style BSON file (local or gs://).",
                               role="input")
    data_dir: str | None = setting(None, "A built TFDS cdiscount dataset (instead of --bson).",
                                   role="input")
    split: str = setting("test", "The TFDS split, with --data_dir.")
    dataset_config: str | None = setting(None, DATASET_CONFIG_HELP)
    batch_size: int = setting(256, "Products per step across all replicas (rounded up to a "
                              "multiple of them).", lower_bound=1)
    strategy: str = setting("auto", "Where the model runs: auto (a TPU VM's TPU, else every "
                            "GPU, else the CPU), tpu, mirrored (all GPUs, or logical CPUs), "
                            "default (one device).", choices=INFERENCE_STRATEGIES)
    tpu: str | None = setting(None, "TPU address or name (local on a TPU VM).")
    errors: str = setting("strict", "A --bson document that cannot be read: strict stops "
                          "with its byte offset; skip counts it, resynchronises and goes on "
                          "(its product has no row).", choices=ERROR_MODES)


@dataclasses.dataclass
class PredictSettings(InferenceSettings):
    output: str = setting("submission.csv", "The submission CSV (_id,category_id).",
                          role="output")
    top_k_output: str | None = setting(None, "Also write top-k ids and probabilities per "
                                       "product (.parquet or .csv), for ensembling.",
                                       role="output")
    allow_missing: bool = setting(False, "With --errors=skip, write the submission even if "
                                  "unreadable documents leave products without a row (listed "
                                  "in the report as lost).")
    beam_pipeline_options: str | None = setting(
        None, "Run on Apache Beam with these options, comma-separated as for `tfds build` "
        "(e.g. \"runner=DataflowRunner,project=P,region=R,temp_location=gs://B/tmp,"
        "setup_file=./pyproject.toml\"); needs --bson.")


@dataclasses.dataclass
class EvaluateSettings(InferenceSettings):
    split: str = setting("validation", "The TFDS split, with --data_dir.")
    labels: str | None = setting(None, "_id,category_id CSV for an unlabelled --bson "
                                 "(test_labels.csv of a synthetic catalogue).",
                                 role="input")
    output: str | None = setting(None, "Also write the report to this JSON file.",
                                 role="output")
    plot: str | None = setting(None, "Save a PNG: accuracy by category size and by level.",
                               role="output")
    strict: bool = setting(False, "Fail (exit 2) when labels name categories the export "
                           "does not know, instead of warning.")


@dataclasses.dataclass
class ExportSettings:
    model_dir: str = setting(None, "A finished (or running) train run.", required=True,
                             role="input")
    export_dir: str = setting(None, "Where to write the SavedModel (local or gs://).",
                              required=True, role="replaced")
    top_k: int = setting(5, "Categories per product in top_k_* outputs.", lower_bound=1)
    checkpoint: str = setting("best", "best: highest validation product accuracy; last: "
                              "the last finished epoch.", choices=CHECKPOINTS)
    tta: str = setting("none", "Test-time augmentation: flip averages each image's original "
                       "and mirrored views (log-probabilities); twice the compute, same "
                       "signatures.", choices=TTA_MODES)
    phase: str | None = setting(None, "Export this phase of the run (`tfcdisc.train "
                                "--phase`): its own best or last checkpoint.")
    fusion_dir: str | None = setting(None, "A fusion head of this run "
                                     "(`tfcdisc.train_fusion`): each product's images are "
                                     "weighed by the head's scores instead of equally.",
                                     role="input")
    duplicates_from: str | None = setting(
        None, "A built dataset (usually the run's --data_dir): embed a table of its "
        "training and validation images' exact bytes, blended with the model where a "
        "product's image recurs, with a weight chosen on its validation split by the table "
        "of its training split alone.", role="input")
    lock_lease_minutes: float = lease_setting()


@dataclasses.dataclass
class EnsembleSettings:
    saved_model: list[str] = setting(None, "A member export (repeat the flag).",
                                     required=True, repeated=True, role="input")
    weights: list[str] | None = setting(None, "One weight per --saved_model, in order "
                                        "(default: equal).")
    export_dir: str = setting(None, "Where to write the ensemble (local or gs://).",
                              required=True, role="replaced")
    duplicates_from: str | None = setting(
        None, "A built dataset: give the ensemble a duplicate-image table, weighed on its "
        "validation split (as `tfcdisc.export --duplicates_from`).", role="input")
    lock_lease_minutes: float = lease_setting()

    def __post_init__(self):
        check_ensemble_members(self.saved_model or [])


def check_ensemble_members(members) -> None:
    """What every ensemble needs, checked by the command before TensorFlow starts."""
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two --saved_model")


@dataclasses.dataclass
class FusionSettings:
    model_dir: str = setting(None, "A finished train run.", required=True, role="input")
    fusion_dir: str = setting(None, "Where the embeddings' cache and the head go.", required=True,
                              role="output")
    data_dir: str | None = setting(None, "The built dataset whose validation split the head "
                                   "learns on: products the run did not train on (default: "
                                   "the run's).", role="input")
    checkpoint: str = setting("best", "The run's checkpoint whose embeddings the head learns "
                              "from (export uses the same).", choices=CHECKPOINTS)
    epochs: int = setting(10, "Epochs over the cached embeddings.", lower_bound=1)
    batch_size: int = setting(256, "Products per step.", lower_bound=1)
    learning_rate: float = setting(1e-3, "AdamW learning rate.", lower_bound=0.0)
    seed: int = setting(0, "Random seed.")
    lock_lease_minutes: float = lease_setting()


@dataclasses.dataclass
class ShowSettings:
    output: str = setting(None, "The PNG to write (local or gs://).", required=True,
                          role="output")
    data_dir: str | None = setting(None, "A built TFDS cdiscount dataset.", role="input")
    split: str = setting("train", "The split, with --data_dir.")
    dataset_config: str | None = setting(None, DATASET_CONFIG_HELP)
    bson: str | None = setting(None, "A Kaggle-style BSON file, with --saved_model.",
                               role="input")
    saved_model: str | None = setting(None, "An export: show its predictions.",
                                      role="input")
    num_products: int = setting(16, "Products in the picture.", lower_bound=1)
    columns: int = setting(4, "Products per row.", lower_bound=1)
    seed: int = setting(0, "Which products a split shows (random draw).")
    labels: str | None = setting(None, "With --bson: a CSV of _id,category_id (e.g. "
                                 "test_labels.csv), so each prediction is marked right or "
                                 "wrong.", role="input")
    worst: bool = setting(False, "With --saved_model: show the most confident mistakes "
                          "among the first --scan products (needs their categories: "
                          "--data_dir, or --bson with --labels).")
    scan: int = setting(2000, "Products scored to find the mistakes of --worst.",
                        lower_bound=1)


@dataclasses.dataclass
class InspectSettings:
    bson: str = setting(None, "BSON file to inspect (local or gs://).", required=True,
                        path=True)
    errors: str = setting("strict", "strict: stop at the first corrupt document; skip: skip, "
                          "count and list bad documents and bytes.", choices=ERROR_MODES)
    category_names: str | None = setting(None, "category_names.csv for category names "
                                         "(default: the one beside the BSON file, if any; "
                                         "'' for none).", path=True)
    progress: bool = setting(False, "Show a progress bar even when stderr is not a terminal.")


@dataclasses.dataclass
class BuildSettings:
    """`tfds build` of the cdiscount dataset, quiet and from any folder."""

    manual_dir: str = setting(None, "The Kaggle folder: train.bson, test.bson, "
                              "category_names.csv (local or gs://).", required=True,
                              role="input")
    data_dir: str = setting(None, "Where the dataset is written (the --data_dir that "
                            "train, evaluate and predict then take).", required=True,
                            role="output")
    config: str | None = setting(None, "A build config: a name, or JSON of its options, "
                                 "e.g. '{\"name\": \"val400\", \"validation_size\": 400}' "
                                 "(tfds_builder/cdiscount/README.md lists them).")
    overwrite: bool = setting(False, "Replace a finished build of this config and version.")
    beam_pipeline_options: str | None = setting(
        None, "Build on Apache Beam: its pipeline options, e.g. 'runner=DataflowRunner,"
        "project=P,region=R,temp_location=gs://B/tmp' (the TFDS flag of that name).")


@dataclasses.dataclass
class SynthSettings:
    output_dir: str = setting(None, "Folder (local or gs://) to write the catalogue to.",
                              required=True, role="output")
    num_train_products: int = setting(2000, "Products in train.bson.", lower_bound=1)
    num_test_products: int = setting(500, "Products in test.bson.", lower_bound=0)
    num_categories: int | None = setting(None, "Categories used (default 40, fewer if the "
                                         "taxonomy is smaller).", lower_bound=1)
    category_names: str | None = setting(None, "A category_names.csv to sample real "
                                         "categories from (copied whole into the output). "
                                         "Default: a built-in invented taxonomy.",
                                         role="input")
    seed: int = setting(0, "Random seed; the catalogue is deterministic for a seed.")
    workers: int | None = setting(None, "Rendering processes (default: every core).")
    difficulty: str = setting(
        "easy", "easy: distinct looks, clean labels. hard: leaves of a level-1 branch look "
        "alike, 8% noise images shared across categories, stock photos reused across "
        "products and between train and test, half of them unlike their category (about "
        "38% of training images are copies, as in the real file), 5% wrong training labels.",
        choices=("easy", "hard"))
    overwrite: bool = setting(False, "Replace a catalogue already in --output_dir (its "
                              "train.bson, test.bson, category_names.csv); without it such a "
                              "folder is refused.")


@dataclasses.dataclass
class PreflightSettings(TrainConfig):
    """A train command line (its --flagfile and overrides) plus where to compile it."""

    data_dir: str = setting("", "A built dataset whose class counts the model gets (default: "
                            "the real catalogue's 5,270 categories, 49 and 483 upper levels).",
                            path=True)
    model_dir: str = setting("", "Not used: accepted so that a train command line runs as it is.")
    target: list[str] | None = setting(
        None, "Where the run would train (repeat the flag): v5e-1 (Colab), v5e-4, v5e-8 "
        "(Kaggle), v6e-1, v6e-8, v5p-8, v4-8, gpu-16g, gpu-40g, gpu-80g (GPU memory; an "
        "estimate), or local (this TPU VM's chips). Default: this TPU VM's type, else local.",
        repeated=True)
    output: str | None = setting(None, "Also write every figure as JSON (local or gs://).",
                                 path=True)
    steps: list[str] | None = setting(
        None, "Compile only these steps: train, validation, predict (default: all three), "
        "e.g. --steps=validation,predict after a change of --per_replica_eval_batch_size "
        "(a large model's training step takes minutes to compile).")
    fit_eval_batch: bool = setting(False, "Find the largest --per_replica_eval_batch_size "
                                   "that fits each target (a few more compiles).")
    tta: str = setting("none", "The export's test-time augmentation, for the predict step "
                       "(flip: each image twice).", choices=TTA_MODES)
