"""What runtime is this (TPU VM, GPU, CPU; Colab, Kaggle or other) and what it needs installed.

Today's Colab and Kaggle TPU runtimes are TPU VMs without TensorFlow: they need the
`tensorflow-tpu` wheel with its libtpu, and must not get plain `tensorflow` on top of it
(both install the module ``tensorflow``; the plain one has no TPU kernels). The project's
extras follow that split: ``tfcdisc[tpu]``, ``tfcdisc[gpu]``, ``tfcdisc[cpu]``.

Imports no TensorFlow, so the notebook can decide what to install before anything is.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import shutil
import sys
from typing import Callable, Mapping

# The TensorFlow minor the project is tested with; the newest `tensorflow-tpu` there is.
TF_VERSION = "2.20"
# Where Google publishes the libtpu builds that match each tensorflow-tpu release.
LIBTPU_INDEX = "https://storage.googleapis.com/libtpu-tf-releases/index.html"
_TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "COLAB_TPU_ADDR", "TPU_WORKER_ID",
            "TPU_WORKER_HOSTNAMES")
_TF_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-tpu")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where the notebook or command runs."""

    accelerator: str  # "tpu", "gpu" or "cpu"
    host: str  # "colab", "kaggle" or "other"
    detail: str = ""  # e.g. the TPU type (v5litepod-1, v3-8) or how it was recognised

    @property
    def extra(self) -> str:
        return self.accelerator


def detect(env: Mapping[str, str] | None = None,
           exists: Callable[[str], bool] = os.path.exists,
           which: Callable[[str], str | None] = shutil.which) -> Runtime:
    """Recognises the runtime from its environment and device files (no TensorFlow).

    A TPU VM shows /dev/accel* (v2-v4) or /dev/vfio/* (v5e and later) or sets a TPU_*
    variable; a GPU shows /dev/nvidia0 or nvidia-smi.
    """
    env = os.environ if env is None else env
    host = ("colab" if "COLAB_RELEASE_TAG" in env or "COLAB_GPU" in env else
            "kaggle" if "KAGGLE_KERNEL_RUN_TYPE" in env or "KAGGLE_URL_BASE" in env else
            "other")
    tpu_env = [k for k in _TPU_ENV if env.get(k)]
    if tpu_env:
        return Runtime("tpu", host, env.get("TPU_ACCELERATOR_TYPE") or tpu_env[0])
    for dev in ("/dev/accel0", "/dev/vfio/0", "/dev/vfio/vfio"):
        if exists(dev):
            return Runtime("tpu", host, dev)
    if exists("/dev/nvidia0") or which("nvidia-smi"):
        return Runtime("gpu", host, "nvidia")
    return Runtime("cpu", host)


def installed(names=_TF_DISTRIBUTIONS) -> dict[str, str]:
    """The TensorFlow distributions installed here, with their versions."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def install_commands(runtime: Runtime, repo: str, *, python: str = sys.executable,
                     extras: tuple[str, ...] = ("beam",),
                     present: Mapping[str, str] | None = None) -> list[list[str]]:
    """The pip commands that make this runtime ready for tfcdisc (in order).

    On a TPU, any plain TensorFlow goes first (it would shadow the TPU build), then the
    project with its ``tpu`` extra and libtpu from its index. Elsewhere the project with
    the ``gpu`` or ``cpu`` extra, at the tested TensorFlow minor.
    """
    present = installed() if present is None else present
    pip = [python, "-m", "pip", "install", "--quiet"]
    spec = f"{repo}[{','.join((runtime.extra, *extras))}]"
    commands = []
    if runtime.accelerator == "tpu":
        plain = sorted(n for n in present if n != "tensorflow-tpu")
        if plain:
            commands.append([python, "-m", "pip", "uninstall", "--yes", *plain])
        commands.append([*pip, "-e", spec, "-f", LIBTPU_INDEX])
    else:
        if "tensorflow-tpu" in present:  # a TPU build cannot drive a GPU or a bare CPU
            commands.append([python, "-m", "pip", "uninstall", "--yes", "tensorflow-tpu"])
        commands.append([*pip, "-e", spec])
    return commands


def tpu_support_problem(present: Mapping[str, str] | None = None) -> str | None:
    """Why this TensorFlow cannot drive a TPU, with what to install; None when it can."""
    present = installed() if present is None else present
    if "tensorflow-tpu" in present and len(present) == 1:
        if not present["tensorflow-tpu"].startswith(TF_VERSION + "."):
            return (f"tensorflow-tpu {present['tensorflow-tpu']} is installed; tfcdisc is "
                    f"tested with {TF_VERSION}: pip install -e 'REPO[tpu]' -f {LIBTPU_INDEX}")
        return None
    if "tensorflow-tpu" in present:
        others = ", ".join(n for n in present if n != "tensorflow-tpu")
        return (f"{others} is installed beside tensorflow-tpu and shadows its TPU kernels: "
                f"pip uninstall -y {others}, then pip install --force-reinstall "
                f"'tensorflow-tpu=={TF_VERSION}.*' -f {LIBTPU_INDEX}")
    return ("this TensorFlow has no TPU kernels (the plain `tensorflow` wheel): on a TPU VM "
            f"run `pip uninstall -y tensorflow` and `pip install -e 'REPO[tpu]' -f "
            f"{LIBTPU_INDEX}` (the notebook's install cell does both), then restart Python")


def in_notebook() -> bool:
    """True inside a Jupyter kernel (Colab, Kaggle): per-step progress bars show there,
    although stdout is not a terminal."""
    return "ipykernel" in sys.modules
