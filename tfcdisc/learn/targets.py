"""The accelerators a run is sized for: TPU slices the TPU compiler can describe with no
TPU present, and GPU memory sizes, with each figure's public source.

Imports neither JAX nor TensorFlow: ``--help`` and the notebook read it at once.
"""

from __future__ import annotations

import dataclasses
import re

# The real Cdiscount train.bson: the images one epoch passes over.
REAL_TRAIN_IMAGES = 12_371_293
# Model FLOPs utilisation assumed for the time bounds: convolutional networks in bfloat16
# on TPUs commonly reach 30-55% (MLPerf ResNet-50 submissions); stated, not measured here.
MFU_RANGE = (0.3, 0.5)
# The host pipeline's rate is sized for this MFU (issue 25).
HOST_MFU = 0.5


@dataclasses.dataclass(frozen=True)
class Target:
    """One accelerator slice: ``topology`` for `jax.experimental.topologies`, or a GPU
    (compiled for a one-chip TPU description as a stand-in: see `preflight`)."""

    name: str
    kind: str  # "tpu" or "gpu"
    chips: int
    hbm_gib: float  # per chip
    peak_tflops: float  # dense bf16 (fp16 on GPUs) per chip
    chips_per_host: int
    host_vcpus: int
    topology: str = ""
    chips_per_host_bounds: tuple[int, int, int] = (1, 1, 1)
    chip_config: str = "default"  # "megacore": one device per chip of two cores (v4)

    @property
    def hosts(self) -> int:
        return max(1, self.chips // self.chips_per_host)


def _tpu(name, topology, chips, bounds, hbm, tflops, per_host, vcpus,
         chip_config="default") -> Target:
    return Target(name, "tpu", chips, hbm, tflops, per_host, vcpus, topology, bounds,
                  chip_config)


TARGETS: dict[str, Target] = {t.name: t for t in (
    # v5e: 16 GiB HBM2 per chip, 197 TFLOP/s bf16; hosts ct5lp-hightpu-1t (24 vCPUs),
    # -4t (112), -8t (224 vCPUs, 8 chips, one host). cloud.google.com/tpu/docs/v5e
    # Colab's TPU runtime is a v5e-1, Kaggle's a v5e-8.
    _tpu("v5e-1", "v5e:1x1", 1, (1, 1, 1), 16, 197, 1, 24),
    _tpu("v5e-4", "v5e:2x2", 4, (2, 2, 1), 16, 197, 4, 112),
    _tpu("v5e-8", "v5e:2x4", 8, (2, 4, 1), 16, 197, 8, 224),
    # v6e (Trillium): 32 GB HBM per chip, 918 TFLOP/s bf16; ct6e-standard-1t (44 vCPUs),
    # -8t (180 vCPUs, 8 chips, one host). cloud.google.com/tpu/docs/v6e
    _tpu("v6e-1", "v6e:1x1", 1, (1, 1, 1), 32, 918, 1, 44),
    _tpu("v6e-8", "v6e:2x4", 8, (2, 4, 1), 32, 918, 8, 180),
    # v5p: 95 GB HBM per chip, 459 TFLOP/s bf16, 4 chips and 208 vCPUs per host; v5p-8 is
    # 4 chips (the name counts TensorCores). cloud.google.com/tpu/docs/v5p
    _tpu("v5p-8", "v5p:2x2x1", 4, (2, 2, 1), 95, 459, 4, 208),
    # v4: 32 GiB HBM per chip, 275 TFLOP/s bf16, 4 chips and 240 vCPUs per host; v4-8 is
    # 4 chips. cloud.google.com/tpu/docs/v4
    # JAX drives a v4 chip's two cores as one device (megacore).
    _tpu("v4-8", "v4:2x2x1", 4, (2, 2, 1), 32, 275, 4, 240, "megacore"),
    # GPUs, one per replica (MirroredStrategy): T4 16 GB (65 TFLOP/s fp16 tensor cores,
    # nvidia.com T4 datasheet), A100 40/80 GB (312 TFLOP/s bf16/fp16 dense, A100
    # datasheet), H100 SXM 80 GB (989 TFLOP/s dense, H100 datasheet). Host figures are
    # typical cloud VMs (GCP n1-standard-8 per T4; a2-highgpu-1g 12 vCPUs per A100).
    Target("gpu-16g", "gpu", 1, 16, 65, 1, 8),
    Target("gpu-40g", "gpu", 1, 40, 312, 1, 12),
    Target("gpu-80g", "gpu", 1, 80, 989, 1, 26),
)}
# A real TPU VM compiles for its own chips: this target names them.
LOCAL = "local"
# The one-chip TPU description GPU targets are compiled on (the largest HBM, so that
# the bytes are measured rather than refused), with bfloat16 standing in for float16.
GPU_STAND_IN = TARGETS["v5p-8"]


def names() -> list[str]:
    return [*TARGETS, LOCAL]


def get(name: str) -> Target:
    """The target of a name; also the runtime's own names (``v5litepod-8``).

    Raises:
      ValueError: an unknown name, listing the known ones.
    """
    name = re.sub(r"^v5litepod-", "v5e-", name)
    if name not in TARGETS:
        raise ValueError(f"--target={name}: choose from {', '.join(names())}")
    return TARGETS[name]


# JAX's ``device_kind`` of each TPU generation in the table.
_DEVICE_KINDS = {"TPU v5 lite": "v5e-1", "TPU v6 lite": "v6e-1", "TPU v5": "v5p-8",
                 "TPU v4": "v4-8"}


def peak_of_device_kind(kind: str) -> float:
    """A chip's bf16 peak TFLOP/s from JAX's ``device_kind`` (a v5e's when unknown)."""
    return TARGETS[_DEVICE_KINDS.get(kind, "v5e-1")].peak_tflops


def for_accelerator_type(accelerator_type: str) -> str | None:
    """The target of a TPU VM's ``TPU_ACCELERATOR_TYPE`` (``v5litepod-8``, ``v6e-8``),
    or None when it is not in the table."""
    try:
        return get(accelerator_type.strip().lower()).name
    except ValueError:
        return None


def parse_gib(text: str) -> float | None:
    """``18.31G`` / ``512.00M`` in a compiler message -> GiB."""
    m = re.fullmatch(r"([\d.]+)\s*([KMGT])i?B?", text.strip())
    if not m:
        return None
    return float(m.group(1)) * {"K": 2**-20, "M": 2**-10, "G": 1, "T": 1024}[m.group(2)]


def out_of_memory(message: str) -> tuple[float | None, float | None] | None:
    """(GiB needed, GiB available) from the TPU compiler's out-of-memory error, None when
    the message is not one."""
    if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
        return None
    m = re.search(r"\(([\d.]+[KMGT])\) exceeds available HBM \(([\d.]+[KMGT])\)", message) \
        or re.search(r"Used ([\d.]+[KMGT]) of ([\d.]+[KMGT]) hbm", message)
    if not m:
        return None, None
    return parse_gib(m.group(1)), parse_gib(m.group(2))


def for_runtime(accelerator: str, host: str, detail: str = "") -> str | None:
    """The target a notebook's runtime trains on (`runtime.detect`): its TPU type when
    the VM names it, else the host's one TPU offer (Colab: v5e-1, Kaggle: v5e-8); None
    off TPUs (a GPU's estimate needs libtpu, which GPU images lack)."""
    if accelerator != "tpu":
        return None
    return for_accelerator_type(detail) or {"colab": "v5e-1", "kaggle": "v5e-8"}.get(host)
