"""Choosing the distribution strategy and the mixed-precision policy, once per run."""

from __future__ import annotations

import json
import logging
import os

import keras
import tensorflow as tf

from tfcdisc import runtime
from tfcdisc.config import PRECISIONS, STRATEGIES


def connect_tpu(tpu: str | None) -> tf.distribute.cluster_resolver.TPUClusterResolver:
    """Connects to a TPU (an address, a name, "local" on a TPU VM, or None to detect)
    and initialises its system.

    Raises:
      ValueError: no TPU there, or a TensorFlow without TPU kernels; the message says
        what to install or set.
    """
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError, RuntimeError) as e:
        if "OpKernel" in str(e) or "ConfigureDistributedTPU" in str(e):
            problem = runtime.tpu_support_problem()
            if problem:
                raise ValueError(f"strategy 'tpu': {problem}") from None
        raise ValueError(f"strategy 'tpu': no TPU found at {tpu or '(auto-detect)'} "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); pass "
                         "--tpu=local on a TPU VM (Colab, Kaggle), --tpu=grpc://host:8470 or "
                         "the node's name for a TPU node, or choose another --strategy"
                         ) from None
    return resolver


def remote_tpu(resolver) -> bool:
    """True for a TPU node (workers on other machines): they read only gs:// paths."""
    master = resolver.master() if resolver is not None else ""
    return bool(master) and not master.startswith(("local", "grpc://localhost",
                                                   "grpc://127.0.0.1"))


def check_paths_for(strategy: tf.distribute.Strategy, **paths: str | None) -> None:
    """On a TPU node, every path must be on Cloud Storage; on a TPU VM local ones work.

    Raises:
      ValueError: naming the flag whose path the TPU workers cannot read.
    """
    if not is_tpu(strategy) or not remote_tpu(strategy.cluster_resolver):
        return
    for flag, path in paths.items():
        if path and not path.startswith("gs://"):
            raise ValueError(f"--{flag}={path}: a TPU node's workers read only Cloud Storage; "
                             "use a gs:// path (or run on a TPU VM with --tpu=local)")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files (one writer per run; the other
    workers of a multi-worker run write to temporary folders)."""
    return bool(strategy.extended.should_checkpoint)


def global_batch_size(global_size: int, per_replica: int | None,
                      strategy: tf.distribute.Strategy) -> int:
    """The global batch: ``per_replica`` times the replicas when given, so one flagfile
    fits a v5e-1 and a v3-8 alike; else ``global_size``, which must split evenly.

    Raises:
      ValueError: a global batch the replicas cannot share evenly.
    """
    replicas = strategy.num_replicas_in_sync
    if per_replica:
        return per_replica * replicas
    if global_size % replicas:
        raise ValueError(f"--global_batch_size={global_size} does not split over {replicas} "
                         f"replicas; use a multiple of {replicas} or --per_replica_batch_size")
    return global_size


def choose(name: str, tpu: str | None, where: runtime.Runtime, num_gpus: int
           ) -> tuple[str, str | None]:
    """The strategy name and TPU address for a request on a runtime (no TensorFlow).

    "auto": the TPU on a TPU VM (address "local") or a named one (--tpu, TPU_NAME,
    COLAB_TPU_ADDR), else MirroredStrategy over two or more GPUs, else one GPU, else
    the default (CPU). A TPU VM needs no address: "local" is filled in.

    Raises:
      ValueError: an unknown name or an impossible combination, saying why.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    if tpu and name not in ("auto", "tpu"):
        raise ValueError(f"--tpu={tpu} was given with --strategy={name}; use --strategy=tpu "
                         "(or auto)")
    named = tpu or os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR")
    if name == "auto":
        if named or where.accelerator == "tpu":
            name = "tpu"
        elif num_gpus > 1:
            name = "mirrored"
        elif num_gpus:
            name = "one_device"
        else:
            name = "default"
    if name == "tpu" and not tpu and where.accelerator == "tpu" and not named:
        tpu = "local"
    return name, tpu


def get_strategy(name: str = "auto", tpu: str | None = None) -> tf.distribute.Strategy:
    """Returns the strategy named by ``name`` (see `STRATEGIES` and `choose`).

    Raises:
      ValueError: an unknown name, an impossible combination or a missing TPU, saying
        what to do.
    """
    # Physical, not logical: listing logical devices starts the runtime, after which a
    # multi-worker strategy can no longer configure its collectives.
    gpus = tf.config.list_physical_devices("GPU")
    name, tpu = choose(name, tpu, runtime.detect(), len(gpus))
    logging.info("strategy: %s", name)
    if name == "tpu":
        return tf.distribute.TPUStrategy(connect_tpu(tpu))
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker_mirrored":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy 'multi_worker_mirrored' needs the TF_CONFIG environment "
                             "variable describing the cluster (workers and this task)")
        json.loads(os.environ["TF_CONFIG"])  # a malformed TF_CONFIG fails here, clearly
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    return tf.distribute.get_strategy()


def is_tpu(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, (tf.distribute.TPUStrategy,
                                 tf.distribute.experimental.TPUStrategy))


def set_precision(setting: str, strategy: tf.distribute.Strategy) -> str:
    """Sets Keras's global dtype policy and returns its name.

    "auto": bfloat16 on TPU, float16 on GPU, float32 on CPU.

    Raises:
      ValueError: an unknown setting, or float16 on a TPU (TPUs compute in bfloat16).
    """
    if setting not in PRECISIONS:
        raise ValueError(f"unknown mixed precision {setting!r}; choose from "
                         f"{', '.join(PRECISIONS)}")
    tpu = is_tpu(strategy)
    if setting == "auto":
        if tpu:
            setting = "mixed_bfloat16"
        elif tf.config.list_logical_devices("GPU"):
            setting = "mixed_float16"
        else:
            setting = "float32"
    if setting == "mixed_float16" and tpu:
        raise ValueError("mixed_float16 on a TPU: TPUs compute in bfloat16; use "
                         "--mixed_precision=mixed_bfloat16 (or auto)")
    keras.mixed_precision.set_global_policy(setting)
    return setting
