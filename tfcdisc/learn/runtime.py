"""What runtime is this (TPU VM, GPU, CPU; Colab, Kaggle or other) and what it needs installed.

What today's images ship, from their own files:
- Kaggle's TPU image (Kaggle/docker-python, ``tpu/requirements.in``): ``tensorflow-cpu``
  2.20, ``jax[tpu]`` and ``keras>3``; ``tensorflow-tpu`` is commented out ("re-enable
  tensorflow-tpu when a compatible libtpu can be found").
- Colab's TPU runtime (v5e-1): JAX with its libtpu and no TensorFlow (googlecolab/
  colabtools#5164, #5174: no tensorflow-tpu release fits modern JAX).
- Cloud TPU VM images built for TensorFlow (``tpu-vm-tf-*``): ``tensorflow-tpu`` and its
  libtpu, no JAX.
- A GPU box: whatever TensorFlow it has, or none.

So on a TPU with JAX, Keras 3 drives the TPU through JAX and TensorFlow is only the data
and SavedModel library: its CPU build is enough. The preinstalled JAX and libtpu are never
uninstalled or replaced; a preinstalled TensorFlow is kept when its version is the tested
one, else replaced by ``tensorflow-cpu``; two TensorFlow distributions (they write the
same ``tensorflow`` module) are never left side by side. A TPU with ``tensorflow-tpu``
and no JAX keeps the second route, TensorFlow's own ``TPUStrategy``.

Imports no TensorFlow, no JAX and no Keras, so the notebook can decide what to install
before anything is.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from typing import Callable, Mapping

# The TensorFlow minor the project is tested with; the newest `tensorflow-tpu` there is.
TF_VERSION = "2.20"
# Where Google publishes the libtpu builds that match each tensorflow-tpu release.
LIBTPU_INDEX = "https://storage.googleapis.com/libtpu-tf-releases/index.html"
# Every name TensorFlow is published under (they all write the ``tensorflow`` module).
_TF_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-tpu",
                     "tensorflow-gpu", "tensorflow-rocm", "tensorflow-macos",
                     "tensorflow-aarch64", "tensorflow-cpu-aws", "intel-tensorflow",
                     "tf-nightly", "tf-nightly-cpu", "tf-nightly-gpu", "tf-nightly-tpu")
_JAX_DISTRIBUTIONS = ("jax", "jaxlib", "libtpu", "libtpu-nightly")
GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on the PCI bus (v4 and later); GPUs are 0x10de, 0x1002
# Which TensorFlow distribution each route wants, and which present ones serve it.
_TF_FOR = {"tpu": "tensorflow-cpu", "tpu-tf": "tensorflow-tpu", "gpu": "tensorflow",
           "cpu": "tensorflow"}
_SERVES = {"tpu": ("tensorflow-cpu", "tensorflow", "tensorflow-intel"),
           "tpu-tf": ("tensorflow-tpu",), "gpu": ("tensorflow", "tensorflow-rocm"),
           "cpu": ("tensorflow", "tensorflow-cpu", "tensorflow-intel", "tensorflow-macos",
                   "tensorflow-aarch64", "tensorflow-cpu-aws", "intel-tensorflow")}


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where the notebook or command runs."""

    accelerator: str  # "tpu", "gpu" or "cpu"
    host: str  # "colab", "kaggle" or "other"
    detail: str = ""  # e.g. the TPU type (v5litepod-1, v3-8) or how it was recognised


def _pci_vendors() -> set[str]:
    import glob
    vendors = set()
    for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(path) as f:
                vendors.add(f.read().strip().lower())
        except OSError:
            pass
    return vendors


def _libtpu_installed() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in ("libtpu", "libtpu_nightly"))


def detect(env: Mapping[str, str] | None = None,
           exists: Callable[[str], bool] = os.path.exists,
           which: Callable[[str], str | None] = shutil.which,
           pci_vendors: Callable[[], set[str]] = _pci_vendors,
           libtpu: Callable[[], bool] = _libtpu_installed) -> Runtime:
    """Recognises the runtime from the device's own evidence (no TensorFlow).

    A TPU: its driver's /dev/accel0 (v2-v4), or a VFIO device group /dev/vfio/0 (v5e and
    later) backed by a Google PCI device or a libtpu, or the runtime's
    TPU_ACCELERATOR_TYPE. Not /dev/vfio/vfio (any VM with VFIO has it) nor a stray
    TPU_NAME alone. A GPU: /dev/nvidia0 or nvidia-smi (NVIDIA), /dev/kfd (AMD ROCm).
    """
    env = os.environ if env is None else env
    host = ("colab" if "COLAB_RELEASE_TAG" in env or "COLAB_GPU" in env else
            "kaggle" if "KAGGLE_KERNEL_RUN_TYPE" in env or "KAGGLE_URL_BASE" in env else
            "other")
    if env.get("TPU_ACCELERATOR_TYPE"):
        return Runtime("tpu", host, env["TPU_ACCELERATOR_TYPE"])
    if exists("/dev/accel0"):
        return Runtime("tpu", host, "/dev/accel0")
    if exists("/dev/vfio/0"):
        if GOOGLE_PCI_VENDOR in pci_vendors():
            return Runtime("tpu", host, "/dev/vfio/0, Google PCI device")
        if libtpu():
            return Runtime("tpu", host, "/dev/vfio/0, libtpu")
    if exists("/dev/nvidia0") or which("nvidia-smi"):
        return Runtime("gpu", host, "nvidia")
    if exists("/dev/kfd"):
        return Runtime("gpu", host, "rocm")
    return Runtime("cpu", host)


def installed(names=_TF_DISTRIBUTIONS + _JAX_DISTRIBUTIONS) -> dict[str, str]:
    """The TensorFlow and JAX distributions installed here, with their versions."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def route(where: Runtime, present: Mapping[str, str]) -> str:
    """Which install route a runtime takes: ``tpu`` (JAX drives the TPU, TensorFlow's CPU
    build feeds it), ``tpu-tf`` (a TensorFlow TPU VM image: tensorflow-tpu and no JAX),
    ``gpu`` or ``cpu``."""
    if where.accelerator == "tpu":
        return "tpu-tf" if "tensorflow-tpu" in present and "jax" not in present else "tpu"
    return where.accelerator


def _supported(version: str) -> bool:
    return version.startswith(TF_VERSION + ".")


def install_commands(runtime: Runtime, repo: str, *, python: str = sys.executable,
                     extras: tuple[str, ...] = ("beam",),
                     present: Mapping[str, str] | None = None) -> list[list[str]]:
    """The pip commands that make this runtime ready for tfcdisc (in order).

    The runtime's own JAX and libtpu stay as they are. Its TensorFlow stays when it is
    one distribution that serves the route (`route`) at the tested version; otherwise
    every TensorFlow distribution goes first and the route's own comes with the
    project's extra (``tpu``: tensorflow-cpu, ``tpu-tf``: tensorflow-tpu with libtpu from
    its index, ``gpu``, ``cpu``). A TPU without JAX gets ``jax[tpu]`` unless it takes
    the TensorFlow route.
    """
    present = installed() if present is None else present
    way = route(runtime, present)
    pip = [python, "-m", "pip", "install", "--quiet"]
    tf_present = {n: v for n, v in present.items() if n in _TF_DISTRIBUTIONS}
    keep = (len(tf_present) == 1 and next(iter(tf_present)) in _SERVES[way]
            and _supported(next(iter(tf_present.values()))))
    commands = []
    if tf_present and not keep:
        commands.append([python, "-m", "pip", "uninstall", "--yes", *sorted(tf_present)])
    chosen = list(extras)
    if not keep:
        chosen.insert(0, way)
    elif way == "cpu":
        chosen.insert(0, "jax")  # tests and CPU runs use both backends
    # A clone is installed in place (-e); a wheel (`make wheel`) as it is.
    source = f"{repo}[{','.join(chosen)}]"
    command = [*pip, source] if repo.endswith(".whl") else [*pip, "-e", source]
    if way == "tpu" and "jax" not in present:
        command.append("jax[tpu]")
    if way == "tpu-tf" and not keep:
        command += ["-f", LIBTPU_INDEX]
    commands.append(command)
    return commands


def tpu_support_problem(present: Mapping[str, str] | None = None) -> str | None:
    """Why TensorFlow's own TPU route (`TPUStrategy`) cannot run here, with what to
    install; None when it can."""
    present = installed() if present is None else present
    tf_present = {n: v for n, v in present.items() if n in _TF_DISTRIBUTIONS}
    if "tensorflow-tpu" in tf_present and len(tf_present) == 1:
        if not _supported(tf_present["tensorflow-tpu"]):
            return (f"tensorflow-tpu {tf_present['tensorflow-tpu']} is installed; tfcdisc is "
                    f"tested with {TF_VERSION}: pip install -e 'REPO[tpu-tf]' -f "
                    f"{LIBTPU_INDEX}")
        if "jax" in present:
            return ("tensorflow-tpu is installed beside JAX, whose libtpu it may not find a "
                    "TPU with; use --backend=jax (the default on TPUs with JAX)")
        return None
    if "tensorflow-tpu" in tf_present:
        others = ", ".join(n for n in tf_present if n != "tensorflow-tpu")
        return (f"{others} is installed beside tensorflow-tpu and shadows its TPU kernels: "
                f"pip uninstall -y {others}, then pip install --force-reinstall "
                f"'tensorflow-tpu=={TF_VERSION}.*' -f {LIBTPU_INDEX}")
    return ("this TensorFlow has no TPU kernels: drive the TPU with --backend=jax "
            "(JAX ships with Colab's and Kaggle's TPU images; elsewhere pip install "
            "'jax[tpu]'), or, on a TPU VM without JAX, pip install -e 'REPO[tpu-tf]' -f "
            f"{LIBTPU_INDEX} for TensorFlow's TPUStrategy")


def jax_tpu_problem(present: Mapping[str, str] | None = None) -> str | None:
    """Why JAX cannot drive a TPU here, with what to install; None when nothing is
    missing (the TPU may still be busy or absent)."""
    present = installed() if present is None else present
    if "jax" not in present:
        return "JAX is not installed: pip install 'jax[tpu]'"
    if not any(n.startswith("libtpu") for n in present):
        return ("JAX has no libtpu: pip install 'jax[tpu]' (it brings the matching libtpu; "
                "never install tensorflow-tpu's libtpu beside it)")
    return ("libtpu is installed but JAX found no TPU: another process may hold it "
            "(restart the runtime), or this VM has none")


def build_space_problem(sources: list[str], data_dir: str, factor: float = 1.1,
                        free: Callable[[str], int] | None = None) -> str | None:
    """Why ``tfds build`` would run out of disk, or None: TFRecords take about the
    BSON files' size again (JPEG bytes are moved, not re-encoded), plus a margin.
    Cloud Storage (gs://) has no such limit; sources there count as 0 bytes here."""
    if data_dir.startswith("gs://"):
        return None
    need = int(sum(os.path.getsize(s) for s in sources
                   if not s.startswith("gs://") and os.path.exists(s)) * factor)
    folder = os.path.abspath(data_dir)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    have = (free or (lambda f: shutil.disk_usage(f).free))(folder)
    if have >= need:
        return None
    return (f"{data_dir}: {have / 1e9:.1f} GB free on its disk, the build needs about "
            f"{need / 1e9:.1f} GB (the BSON files' size again, plus 10%); free space, "
            "choose a DATA_DIR on a bigger disk, or a gs:// bucket")


def in_notebook() -> bool:
    """True inside a Jupyter kernel (Colab, Kaggle): per-step progress bars show there,
    although stdout is not a terminal."""
    return "ipykernel" in sys.modules


# --------------------------------------------------------------------------- the notebook


def default_paths(host: str, home: str | None = None, cwd: str | None = None
                  ) -> dict[str, str]:
    """Where the notebook keeps things on each host when its parameters name nothing:
    Colab on Drive (outlives the VM), Kaggle in /kaggle/working (its outputs) with the
    data of an attached dataset in /kaggle/input, any other machine under the home
    folder. OUTPUT_DIR is where the host keeps the zipped submission."""
    if host == "colab":
        drive = "/content/drive/MyDrive"
        return {"KAGGLE_DIR": f"{drive}/cdiscount", "DATA_DIR": "/content/tensorflow_datasets",
                "RUN_DIR": f"{drive}/tfcdisc/runs/xception",
                "EXPORT_DIR": f"{drive}/tfcdisc/exports/xception", "OUTPUT_DIR": "/content"}
    if host == "kaggle":
        return {"KAGGLE_DIR": "/kaggle/input/cdiscount-image-classification-challenge",
                "DATA_DIR": "/kaggle/tmp/tensorflow_datasets",
                "RUN_DIR": "/kaggle/working/runs/xception",
                "EXPORT_DIR": "/kaggle/working/exports/xception",
                "OUTPUT_DIR": "/kaggle/working"}
    home = home or os.path.expanduser("~")
    return {"KAGGLE_DIR": f"{home}/cdiscount", "DATA_DIR": f"{home}/tensorflow_datasets",
            "RUN_DIR": f"{home}/tfcdisc/runs/xception",
            "EXPORT_DIR": f"{home}/tfcdisc/exports/xception",
            "OUTPUT_DIR": cwd or os.getcwd()}


def lost_with_session(host: str, path: str) -> str | None:
    """Why a run or export folder will not outlive this session, or None: a recycled
    runtime then starts the run again instead of resuming it."""
    import tempfile
    if path.startswith("gs://"):
        return None
    if host == "colab" and not path.startswith("/content/drive/"):
        return (f"{path} is on this Colab VM's disk: a recycled runtime loses it; put it on "
                "Drive (/content/drive/MyDrive/...) or gs:// to resume there")
    if host == "kaggle":
        return (f"{path} is on this Kaggle session's disk: it is kept only by a committed "
                "version (Save Version > Save & Run All: /kaggle/working, up to 20 GB), not "
                "by an interactive session that stops; put it on gs:// to resume across "
                "sessions")
    if path.startswith(("/tmp/", tempfile.gettempdir() + "/")):
        return f"{path} is a temporary folder: a restart may empty it; choose another"
    return None


def sign_in_for_gcs(host: str, env: Mapping[str, str] | None = None,
                    exists: Callable[[str], bool] = os.path.exists) -> str:
    """Makes gs:// paths readable and writable from this notebook, per host; says how.

    Raises:
      RuntimeError: no credentials here, naming the step that gives them.
    """
    env = os.environ if env is None else env
    if host == "colab":
        from google.colab import auth  # the user's Google account
        auth.authenticate_user()
        return "signed in with your Google account (google.colab.auth)"
    if host == "kaggle":
        from kaggle_secrets import UserSecretsClient
        client = UserSecretsClient()
        try:
            credential = client.get_gcloud_credential()
        except Exception:  # noqa: BLE001 - Kaggle's own NotFoundError, BackendError
            raise RuntimeError("gs:// paths on Kaggle need the notebook's Google Cloud "
                               "credential: Add-ons > Google Cloud Services > attach your "
                               "account, then rerun this cell") from None
        client.set_tensorflow_credential(credential)
        return "signed in with the notebook's Google Cloud Services add-on"
    adc = os.path.expanduser("~/.config/gcloud/application_default_credentials.json")
    if env.get("GOOGLE_APPLICATION_CREDENTIALS") or exists(adc) or _on_google_cloud(exists):
        return "Application Default Credentials (gcloud, a key file, or this VM's account)"
    raise RuntimeError("gs:// paths need Google Cloud credentials here: run `gcloud auth "
                       "application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS "
                       "to a service account's key file), then rerun this cell")


def _on_google_cloud(exists: Callable[[str], bool]) -> bool:
    """A Compute Engine or Cloud TPU VM: its own service account signs requests."""
    path = "/sys/class/dmi/id/product_name"
    if not exists(path):
        return False
    with open(path) as f:
        return "Google" in f.read()
