"""Choosing the distribution strategy and the mixed-precision policy, once per run."""

from __future__ import annotations

import json
import logging
import os

import keras
import tensorflow as tf

STRATEGIES = ("auto", "tpu", "mirrored", "multi_worker_mirrored", "one_device", "default")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


def connect_tpu(tpu: str | None) -> tf.distribute.cluster_resolver.TPUClusterResolver:
    """Connects to a TPU (an address, a name, "local" on a TPU VM, or None to detect)
    and initialises its system."""
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError, RuntimeError) as e:
        raise ValueError(f"strategy 'tpu': no TPU found at {tpu or '(auto-detect)'} ({e}); "
                         "pass --tpu=ADDRESS (grpc://host:8470), --tpu=local on a TPU VM, or "
                         "choose another --strategy") from None
    return resolver


def _tpu_hint(tpu: str | None) -> bool:
    return bool(tpu or os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"))


def get_strategy(name: str = "auto", tpu: str | None = None) -> tf.distribute.Strategy:
    """Returns the strategy named by ``name`` (see `STRATEGIES`).

    "auto": a TPU if one is named (--tpu, TPU_NAME, COLAB_TPU_ADDR), else
    MirroredStrategy over two or more GPUs, else one GPU, else the default (CPU).

    Raises:
      ValueError: an unknown name or an impossible combination, saying why.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    gpus = tf.config.list_logical_devices("GPU")
    if tpu and name not in ("auto", "tpu"):
        raise ValueError(f"--tpu={tpu} was given with --strategy={name}; use --strategy=tpu "
                         "(or auto)")
    if name == "auto":
        if _tpu_hint(tpu):
            name = "tpu"
        elif len(gpus) > 1:
            name = "mirrored"
        elif gpus:
            name = "one_device"
        else:
            name = "default"
        logging.info("strategy auto -> %s", name)
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
