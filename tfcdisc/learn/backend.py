"""Which Keras backend runs the model: JAX or TensorFlow, chosen before Keras is imported.

Today's TPU runtimes (Colab, Kaggle) ship JAX and a CPU-only TensorFlow: there Keras 3
drives the TPU through JAX, while tf.data, TFDS and the SavedModel stay TensorFlow's.
Elsewhere TensorFlow is the default: on this project's CPU benchmark it trains faster
than JAX (`benchmarks/RESULTS.md`), and GPUs keep the tested TensorFlow path.

Keras reads ``KERAS_BACKEND`` once, when it is first imported, so entry points call
`select` before importing anything that imports Keras. Imports neither Keras nor
TensorFlow.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Mapping

from tfcdisc.learn import runtime
from tfcdisc.settings import BACKENDS


def choose(name: str, where: runtime.Runtime, have_jax: bool) -> str:
    """The backend a request means on a runtime: ``auto`` is JAX on a TPU VM (when JAX is
    installed), TensorFlow elsewhere.

    Raises:
      ValueError: an unknown name, or JAX asked for where it is not installed.
    """
    if name not in BACKENDS:
        raise ValueError(f"--backend={name}: choose from {', '.join(BACKENDS)}")
    if name == "auto":
        return "jax" if where.accelerator == "tpu" and have_jax else "tensorflow"
    if name == "jax" and not have_jax:
        raise ValueError("--backend=jax: JAX is not installed; pip install jax (jax[tpu] on "
                         "a TPU VM, jax[cuda12] on a GPU), or use --backend=tensorflow")
    return name


def jax_installed() -> bool:
    return importlib.util.find_spec("jax") is not None


def select(name: str = "auto", env: Mapping[str, str] | None = None) -> str:
    """Makes Keras use the backend ``name`` means here (`choose`); returns it.

    Sets ``KERAS_BACKEND`` when Keras is not imported yet; ``auto`` keeps a
    ``KERAS_BACKEND`` the environment names (and says so where it differs from auto's
    choice). Where Keras is imported, ``auto`` keeps the backend it runs on, and another
    named backend is refused: Keras cannot switch.

    Raises:
      ValueError: as `choose`, or Keras already imported with another backend (the
        message says to restart Python or set KERAS_BACKEND first).
    """
    env = os.environ if env is None else env
    if "keras" in sys.modules:
        active = sys.modules["keras"].backend.backend()
        if name == "auto":  # a process that chose already (a notebook, a test) keeps it
            return active
        chosen = choose(name, runtime.detect(env), jax_installed())
        if active != chosen:
            raise ValueError(
                f"--backend={name} means {chosen} here, but Keras was already imported with "
                f"the {active} backend in this process; restart Python (in a notebook: "
                f"restart the runtime) or set KERAS_BACKEND={chosen} before anything imports "
                "Keras")
        return chosen
    where = runtime.detect(env)
    explicit = env.get("KERAS_BACKEND")
    if name == "auto" and explicit:  # the user's own choice, kept (it was overridden)
        if explicit not in BACKENDS[1:]:
            raise ValueError(f"KERAS_BACKEND={explicit} in the environment: tfcdisc runs on "
                             "jax or tensorflow; unset it or set one of them")
        chosen = choose(explicit, where, jax_installed())
        automatic = choose("auto", where, jax_installed())
        if chosen != automatic:
            print(f"backend: {chosen}, from KERAS_BACKEND in the environment (--backend=auto "
                  f"would choose {automatic} here)", file=sys.stderr)
        os.environ["KERAS_BACKEND"] = chosen
        return chosen
    chosen = choose(name, where, jax_installed())
    os.environ["KERAS_BACKEND"] = chosen
    return chosen


def active() -> str:
    """The backend Keras runs on in this process (imports Keras)."""
    import keras
    return keras.backend.backend()
