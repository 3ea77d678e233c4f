"""Choosing the distribution strategy and the mixed-precision policy, once per run.

On the TensorFlow backend a strategy is a `tf.distribute.Strategy`. On the JAX backend
it is `JaxDataParallel`: `keras.distribution.DataParallel` over every device of every
process, with the few members the rest of tfcdisc asks of a strategy (``scope``,
``num_replicas_in_sync``), so training and product scoring read the same either way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading

import keras
import tensorflow as tf

from tfcdisc.learn import runtime
from tfcdisc.settings import PRECISIONS, STRATEGIES, TrainConfig


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


def check_paths_for(strategy, **paths: str | None) -> None:
    """On a TPU node, every path must be on Cloud Storage; on a TPU VM local ones work.

    Raises:
      ValueError: naming the flag whose path the TPU workers cannot read.
    """
    if isinstance(strategy, JaxDataParallel) or not is_tpu(strategy) or \
            not remote_tpu(strategy.cluster_resolver):
        return
    for flag, path in paths.items():
        if path and not path.startswith("gs://"):
            raise ValueError(f"--{flag}={path}: a TPU node's workers read only Cloud Storage; "
                             "use a gs:// path (or run on a TPU VM with --tpu=local)")


def is_chief(strategy) -> bool:
    """Whether this process writes the run's files (one writer per run; the other
    workers of a multi-worker run write to temporary folders)."""
    if isinstance(strategy, JaxDataParallel):
        return strategy.process_index == 0
    return bool(strategy.extended.should_checkpoint)


def global_batch_size(global_size: int, per_replica: int | None, replicas: int) -> int:
    """The global batch: ``per_replica`` times the replicas when given, so one flagfile
    fits a v5e-1 and a v3-8 alike; else ``global_size``, which must split evenly.

    Raises:
      ValueError: a global batch the replicas cannot share evenly.
    """
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


class JaxDataParallel:
    """The JAX backend's strategy: data parallel over every device of every process.

    Variables are replicated on each device and each batch is split along its first
    axis (a TPU's chips, GPUs, or CPU devices in tests). Across hosts (a TPU pod, or
    processes on one machine in tests) each process reads its own share of the input:
    `input_context` says which.
    """

    def __init__(self, devices=None):
        import jax
        self.devices = list(devices if devices is not None else jax.devices())
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.distribution = keras.distribution.DataParallel(devices=self.devices,
                                                            auto_shard_dataset=False)
        # Process-wide, as fit needs it: Keras splits each batch over the devices only
        # under a global distribution (a scope alone places variables, not data).
        keras.distribution.set_distribution(self.distribution)
        self.platform = self.devices[0].platform

    @property
    def num_replicas_in_sync(self) -> int:
        return len(self.devices)

    def scope(self):
        return self.distribution.scope()

    def input_context(self) -> tf.distribute.InputContext | None:
        """This process's share of a global batch (None for one process): its products
        or files, and a per-process batch of global / processes."""
        if self.process_count == 1:
            return None
        return tf.distribute.InputContext(self.process_count, self.process_index,
                                          self.process_count)

    def describe(self) -> str:
        hosts = f" in {self.process_count} processes" if self.process_count > 1 else ""
        return (f"DataParallel over {self.num_replicas_in_sync} {self.platform} "
                f"device{'s' if self.num_replicas_in_sync > 1 else ''}{hosts}")


def describe(strategy) -> str:
    """``backend jax, DataParallel over 2 cpu devices``: the run's first log line."""
    what = (strategy.describe() if isinstance(strategy, JaxDataParallel) else
            f"{type(strategy).__name__} over {strategy.num_replicas_in_sync} replica"
            f"{'s' if strategy.num_replicas_in_sync > 1 else ''}")
    return f"backend {keras.backend.backend()}, {what}"


_DISTRIBUTION_ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                     "KERAS_DISTRIBUTION_PROCESS_ID")


def distribution_env(env=None) -> tuple[str, int, int]:
    """The coordinator address, process count and this process's id that the
    ``KERAS_DISTRIBUTION_*`` variables give (`keras.distribution.initialize` reads the
    same ones).

    Raises:
      ValueError: naming each variable that is missing or wrong (JAX's own words named
        none of them).
    """
    env = os.environ if env is None else env
    problems = [f"{name} is not set" for name in _DISTRIBUTION_ENV if not env.get(name)]
    addresses = env.get(_DISTRIBUTION_ENV[0], "")
    count = env.get(_DISTRIBUTION_ENV[1], "")
    pid = env.get(_DISTRIBUTION_ENV[2], "")
    hosts = [a.strip() for a in addresses.split(",") if a.strip()]
    if addresses and not all(re.fullmatch(r"[^:\s]+:\d+", h) for h in hosts):
        problems.append(f"{_DISTRIBUTION_ENV[0]}={addresses} is not host:port[,host:port...]")
    if count and not (count.isdigit() and int(count) >= 1):
        problems.append(f"{_DISTRIBUTION_ENV[1]}={count} is not a count of processes")
    elif count and len(hosts) > 1 and len(hosts) != int(count):
        problems.append(f"{_DISTRIBUTION_ENV[0]} names {len(hosts)} processes, "
                        f"{_DISTRIBUTION_ENV[1]}={count}")
    if pid and not (pid.isdigit() and (not count.isdigit() or int(pid) < int(count))):
        problems.append(f"{_DISTRIBUTION_ENV[2]}={pid} is not a process id from 0 to "
                        f"{_DISTRIBUTION_ENV[1]} - 1")
    if problems:
        raise ValueError("a multi-host JAX run needs KERAS_DISTRIBUTION_JOB_ADDRESSES "
                         "(the coordinator's host:port first), _NUM_PROCESSES and "
                         f"_PROCESS_ID on every process (a TPU pod sets them itself): "
                         f"{'; '.join(problems)}")
    return hosts[0], int(count), int(pid)


def join_processes(timeout_s: float, pod: bool = False, env=None) -> None:
    """Joins this process to the other processes of a multi-host JAX run, as
    `keras.distribution.initialize` does, within ``timeout_s``: a peer that never starts
    is one line and exit status 2 after that wait (JAX aborted the process after 300 s)."""
    import jax
    if pod:
        what, kwargs = "the TPU pod's hosts", {}
    else:
        coordinator, count, pid = distribution_env(env)
        what = (f"the {count} processes of KERAS_DISTRIBUTION_NUM_PROCESSES at the coordinator "
                f"{coordinator} (this is process {pid})")
        kwargs = dict(coordinator_address=coordinator, num_processes=count, process_id=pid)
    program = os.path.basename(sys.argv[0]) or "tfcdisc"

    def give_up() -> None:
        print(f"{program}: waited {timeout_s:g} s for {what} to join; start every process "
              "(each with its own KERAS_DISTRIBUTION_PROCESS_ID), check the coordinator's "
              "address and port, or raise --multihost_timeout", file=sys.stderr, flush=True)
        os._exit(2)  # JAX's wait cannot be interrupted; nothing was written yet

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(initialization_timeout=int(timeout_s) + 60, **kwargs)
    finally:
        watchdog.cancel()
    # What keras.distribution.initialize does after joining: one random seed for all
    # processes (Keras is pinned in pyproject.toml; tests/learn/test_jax.py runs it).
    from keras.src.backend.jax import distribution_lib as jax_distribution
    jax_distribution.initialize_rng()


def _jax_strategy(name: str, where: runtime.Runtime,
                  multihost_timeout: float = TrainConfig.multihost_timeout) -> JaxDataParallel:
    """``name`` on the JAX backend: every strategy but multi_worker_mirrored is data
    parallel over this process's devices; multi_worker_mirrored (or a multi-host TPU
    slice) first joins the other processes (`join_processes`: on a TPU pod JAX finds them
    itself, elsewhere KERAS_DISTRIBUTION_JOB_ADDRESSES, _NUM_PROCESSES and _PROCESS_ID
    name them)."""
    import jax
    pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if name == "multi_worker_mirrored" or pod:
        if not jax.distributed.is_initialized():
            join_processes(multihost_timeout, pod=pod)
    if name == "tpu" and jax.default_backend() != "tpu":
        raise ValueError(f"strategy 'tpu': JAX sees no TPU ({jax.default_backend()} devices "
                         f"only) on this {where.accelerator} runtime; "
                         + (runtime.jax_tpu_problem() or "choose another --strategy"))
    return JaxDataParallel()


def get_strategy(name: str = "auto", tpu: str | None = None,
                 multihost_timeout: float = TrainConfig.multihost_timeout):
    """Returns the strategy named by ``name`` (see `STRATEGIES` and `choose`): a
    `tf.distribute.Strategy`, or on the JAX backend a `JaxDataParallel`.

    Raises:
      ValueError: an unknown name, an impossible combination or a missing TPU, saying
        what to do.
    """
    if keras.backend.backend() == "jax":
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
        if tpu and tpu != "local":
            raise ValueError(f"--tpu={tpu}: the JAX backend drives the TPU of this VM only "
                             "(a TPU node at an address needs --backend=tensorflow)")
        return _jax_strategy(name, runtime.detect(), multihost_timeout)
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


def is_tpu(strategy) -> bool:
    if isinstance(strategy, JaxDataParallel):
        return strategy.platform == "tpu"
    return isinstance(strategy, (tf.distribute.TPUStrategy,
                                 tf.distribute.experimental.TPUStrategy))


def resolve_precision(setting: str, accelerator: str) -> str:
    """The policy name ``setting`` means on an accelerator ("tpu", "gpu" or "cpu"):
    "auto" is bfloat16 on TPU, float16 on GPU, float32 on CPU.

    Raises:
      ValueError: an unknown setting, or float16 on a TPU (TPUs compute in bfloat16).
    """
    if setting not in PRECISIONS:
        raise ValueError(f"unknown mixed precision {setting!r}; choose from "
                         f"{', '.join(PRECISIONS)}")
    if setting == "auto":
        return {"tpu": "mixed_bfloat16", "gpu": "mixed_float16"}.get(accelerator, "float32")
    if setting == "mixed_float16" and accelerator == "tpu":
        raise ValueError("mixed_float16 on a TPU: TPUs compute in bfloat16; use "
                         "--mixed_precision=mixed_bfloat16 (or auto)")
    return setting


def set_precision(setting: str, strategy) -> str:
    """Sets Keras's global dtype policy for the strategy's devices (`resolve_precision`)
    and returns its name."""
    if is_tpu(strategy):
        accelerator = "tpu"
    elif (strategy.platform == "gpu" if isinstance(strategy, JaxDataParallel)
          else tf.config.list_logical_devices("GPU")):
        accelerator = "gpu"
    else:
        accelerator = "cpu"
    setting = resolve_precision(setting, accelerator)
    keras.mixed_precision.set_global_policy(setting)
    return setting
