"""Compiles a run's steps with the TPU compiler before a TPU is rented: HBM, FLOPs, time.

The run's own model, loss, metrics, optimizer and precision policy are built by the code
`training` uses, on Keras's JAX backend, and the steps that run on the chips are lowered
on abstract inputs (`jax.ShapeDtypeStruct`) sharded over a `Mesh` of the target's
devices, which `jax.experimental.topologies` describes with no TPU present (libtpu,
from ``jax[tpu]``, holds the compiler). Compiling then gives what the chip would: the
bytes each chip holds (`memory_analysis`), the FLOPs it runs (`cost_analysis`), or the
out-of-memory error the TPU itself would raise. On a TPU VM the same code compiles for
the local chips (target ``local``).

Steps:
- ``train``: `keras.Model.train_step`, exactly what Keras's JAX trainer jits (its
  ``steps_per_execution`` loops over that one compiled step on the host), global batch
  = per-replica batch x chips, state replicated, the batch split over the chips;
- ``validation``: training's product validation (`product_predictor.scores_fn`: 4 image slots
  per product, all of them computed under XLA) with the training model and policy;
- ``predict``: the same scoring with the export's model (float32, with flip TTA when
  ``tta`` asks), as predict and evaluate run it on the chips.

GPU targets are compiled for a one-chip TPU description (bfloat16 for float16: the same
bytes) and compared with the GPU's memory: an estimate, said so wherever it is shown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import sys
import tempfile
import time
from typing import Callable, Sequence

from tfcdisc.learn import targets as targets_lib
from tfcdisc.settings import TrainConfig

STEPS = ("train", "validation", "predict")
# The real catalogue's taxonomy: what a run on the real data builds.
REAL_CLASSES = {"num_classes": 5270, "num_level1": 49, "num_level2": 483}
_PRODUCT_SLOTS = 4  # `input_pipeline.MAX_IMAGES`


@dataclasses.dataclass
class StepReport:
    """One step compiled for one target."""

    target: str
    step: str
    batch_per_chip: int  # images (train) or products of 4 slots (validation, predict)
    fits: bool
    hbm_gib: float  # the chip's
    needed_gib: float | None  # arguments + outputs + temporaries - donated, per chip
    argument_gib: float | None = None
    temp_gib: float | None = None
    output_gib: float | None = None
    gflops: float | None = None  # per chip per step
    compile_seconds: float = 0.0
    images_per_s_peak: float | None = None  # per chip, at 100% of peak
    note: str = ""

    def images_per_s(self, mfu: float) -> float | None:
        return None if self.images_per_s_peak is None else self.images_per_s_peak * mfu


def tpu_compiler_problem() -> str | None:
    """Why the TPU compiler cannot run here (with the install that fixes it), or None."""
    if importlib.util.find_spec("jax") is None:
        return "JAX is not installed: pip install 'jax[tpu]'"
    if importlib.util.find_spec("libtpu") is None:
        from importlib.metadata import version
        return ("the TPU compiler (libtpu) is not installed: pip install "
                f"\"jax[tpu]=={version('jax')}\" (it keeps this JAX {version('jax')}; a TPU "
                "VM has it already)")
    return None


def devices_for(target: targets_lib.Target | None) -> list:
    """The devices a target's program is compiled for: a described TPU slice (no TPU
    needed), a GPU's stand-in chip, or this TPU VM's own chips (None).

    Raises:
      ValueError: no TPU compiler here, or no TPU for ``local``; the message says what to do.
    """
    import jax
    if target is None:
        if jax.default_backend() != "tpu":
            raise ValueError(f"--target={targets_lib.LOCAL}: JAX sees no TPU here "
                             f"({jax.default_backend()}); name a --target to compile for "
                             "a described one")
        return jax.devices()
    problem = tpu_compiler_problem()
    if problem:
        raise ValueError(problem)
    from jax.experimental import topologies
    spec = targets_lib.GPU_STAND_IN if target.kind == "gpu" else target
    chips = 1 if target.kind == "gpu" else target.chips
    try:
        with _quiet_stderr():  # libtpu looks for a TPU VM's metadata and says it found none
            described = topologies.get_topology_desc(
                platform="tpu", topology_name=spec.topology,
                chip_config_name=spec.chip_config,
                chips_per_host_bounds=spec.chips_per_host_bounds, num_slices=1)
    except Exception as e:  # libtpu's own errors are RuntimeError or XlaRuntimeError
        raise ValueError(f"the TPU compiler could not describe {spec.name} ({spec.topology}): "
                         f"{str(e).splitlines()[0]}; install a libtpu that matches JAX: "
                         "pip install \"jax[tpu]==<your jax version>\"") from None
    return list(described.devices)[:chips]


@contextlib.contextmanager
def _quiet_stderr():
    """The process's stderr (C++ writes included) held back, and shown only if the
    block fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def precision_for(setting: str, target: targets_lib.Target | None) -> str:
    """The run's policy on the target (`distribute.resolve_precision`); a GPU's float16 is
    compiled as bfloat16 on the TPU stand-in (same bytes, same FLOPs)."""
    from tfcdisc.learn import distribute
    kind = "tpu" if target is None else target.kind
    policy = distribute.resolve_precision(setting, kind)
    return "mixed_bfloat16" if policy == "mixed_float16" else policy


def _abstract(values, sharding):
    import jax
    return [jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for v in values]


def _mesh(devices):
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    mesh = Mesh(np.array(devices), ("batch",))
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("batch"))


def train_program(cfg: TrainConfig, info: dict, batch_per_chip: int, devices: Sequence):
    """``train_step`` of the run's compiled model, lowered for ``devices`` (not compiled).

    Loss and metric state are built from the batch's shapes by Keras's own
    ``_symbolic_build``, as fit does (the Keras internal `training` also relies on: Keras
    is pinned to the tested range)."""
    import jax
    from tfcdisc.learn import training
    chips = len(devices)
    batch = batch_per_chip * chips
    steps = max(1, targets_lib.REAL_TRAIN_IMAGES // batch)
    model = training.build_and_compile(cfg, info, steps * cfg.epochs, steps, batch,
                                       jit_compile=True)
    model.optimizer.build(model.trainable_variables)
    size = cfg.decode_size
    labels = {k: jax.ShapeDtypeStruct((batch,), "int32") for k in model.output}
    model._symbolic_build(data_batch=(  # what fit builds from its first batch
        jax.ShapeDtypeStruct((batch, size, size, 3), "uint8"), labels,
        jax.ShapeDtypeStruct((batch,), "float32")))
    replicated, split = _mesh(devices)
    state = tuple(_abstract(vs, replicated) for vs in (
        model.trainable_variables, model.non_trainable_variables, model.optimizer.variables,
        model.metrics_variables))
    data = (jax.ShapeDtypeStruct((batch, size, size, 3), "uint8", sharding=split),
            {k: jax.ShapeDtypeStruct((batch,), "int32", sharding=split) for k in labels},
            jax.ShapeDtypeStruct((batch,), "float32", sharding=split))
    shardings = tuple([replicated] * len(s) for s in state)
    step = jax.jit(model.train_step, donate_argnums=0, out_shardings=(None, shardings))
    return step.lower(state, data)


def scoring_program(image_model, batch_per_chip: int, image_size: int, devices: Sequence):
    """Product scoring (`product_predictor.scores_fn`, static shapes) of ``image_model``,
    lowered for ``devices``: ``batch_per_chip`` products of 4 image slots per chip."""
    import jax
    from tfcdisc.learn import product_predictor
    pure, variables = product_predictor.stateless(
        product_predictor.scores_fn(image_model, 5, static=True), [image_model])
    replicated, split = _mesh(devices)
    products = batch_per_chip * len(devices)
    batch = {"images": jax.ShapeDtypeStruct(
        (products, _PRODUCT_SLOTS, image_size, image_size, 3), "uint8", sharding=split),
        "mask": jax.ShapeDtypeStruct((products, _PRODUCT_SLOTS), "float32", sharding=split)}
    return jax.jit(pure).lower(_abstract([v.value for v in variables], replicated), batch)


def _gib(n) -> float:
    return float(n) / 2**30


def compile_report(lower: Callable, target_name: str, step: str, batch_per_chip: int,
                   hbm_gib: float, images_per_step: int, peak_tflops: float) -> StepReport:
    """Compiles ``lower()`` and reads its bytes and FLOPs (images/s at ``peak_tflops``);
    an out-of-memory compile is a report that does not fit (other compile errors
    propagate)."""
    start = time.perf_counter()
    try:
        compiled = lower().compile()
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED, as on the chip
        oom = targets_lib.out_of_memory(str(e))
        if oom is None:
            raise
        needed, available = oom
        return StepReport(target_name, step, batch_per_chip, False,
                          available or hbm_gib, needed,
                          compile_seconds=time.perf_counter() - start,
                          note="the TPU compiler ran out of HBM")
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    needed = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
              + mem.generated_code_size_in_bytes - mem.alias_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    return StepReport(
        target_name, step, batch_per_chip, _gib(needed) <= hbm_gib, hbm_gib, _gib(needed),
        _gib(mem.argument_size_in_bytes), _gib(mem.temp_size_in_bytes),
        _gib(mem.output_size_in_bytes), flops / 1e9, seconds,
        None if not flops else images_per_step * peak_tflops * 1e12 / flops)


class Preflight:
    """Compiles a run's steps for targets, its model built anew for each compile (each
    step has its own precision policy, and a fitting search compiles several batches)."""

    def __init__(self, cfg: TrainConfig, info: dict | None = None, tta: str = "none"):
        from tfcdisc import settings
        settings.check(cfg)
        # Shapes only: ImageNet weights would be a download for nothing.
        self.cfg = dataclasses.replace(cfg, weights="none")
        self.info = {**REAL_CLASSES, **(info or {})}
        self.tta = tta

    def _policy(self, name: str) -> None:
        import keras
        keras.mixed_precision.set_global_policy(name)

    def _scoring_model(self, step: str, target):
        import keras
        from tfcdisc.learn import models, training
        self._policy("float32" if step == "predict" else
                     precision_for(self.cfg.mixed_precision, target))
        keras.utils.clear_session()
        model = training.image_model(self.cfg, self.info)
        return models.with_tta(model, self.tta) if step == "predict" else model

    def step(self, target: targets_lib.Target | None, step: str,
             batch_per_chip: int) -> StepReport:
        """One step compiled for one target (None: this TPU VM's chips)."""
        import keras
        devices = devices_for(target)
        name = targets_lib.LOCAL if target is None else target.name
        hbm = target.hbm_gib if target is not None else _local_hbm_gib(devices[0])
        if step == "train":
            self._policy(precision_for(self.cfg.mixed_precision, target))
            keras.utils.clear_session()
            lower = lambda: train_program(self.cfg, self.info, batch_per_chip, devices)  # noqa: E731
            images = batch_per_chip
        elif step in ("validation", "predict"):
            model = self._scoring_model(step, target)
            lower = lambda: scoring_program(model, batch_per_chip, self.cfg.image_size,  # noqa: E731
                                            devices)
            images = batch_per_chip * _PRODUCT_SLOTS  # products' image slots, per chip
        else:
            raise ValueError(f"unknown step {step!r}; choose from {', '.join(STEPS)}")
        peak = target.peak_tflops if target is not None else _local_peak(devices[0])
        report = compile_report(lower, name, step, batch_per_chip, hbm, images, peak)
        notes = [report.note] if report.note else []
        if step == "predict" and self.tta == "flip":
            notes.append("flip TTA: each image twice")
        if target is not None and target.kind == "gpu":
            notes.append("GPU estimate: TPU compiler on one chip, bfloat16 for float16")
        report.note = "; ".join(notes)
        logging.info("preflight %s %s: %s", name, step, report)
        return report

    def fit(self, target: targets_lib.Target | None, step: str, start: int,
            report: StepReport | None = None, largest: bool = False,
            multiple: int = 8) -> tuple[int, StepReport]:
        """A batch per chip that fits ``step`` on ``target``: from a failed ``start``, an
        estimate from the bytes, checked and halved until it compiles; with ``largest``,
        the largest multiple of ``multiple`` that fits (a search over compiles)."""
        report = report or self.step(target, step, start)
        good, bad = (start, None) if report.fits else (None, start)
        best = report if report.fits else None
        if not report.fits:
            ratio = (report.hbm_gib / report.needed_gib) if report.needed_gib else 0.5
            guess = max(multiple, int(start * ratio * 0.9) // multiple * multiple)
            while guess >= 1:
                r = self.step(target, step, guess)
                if r.fits:
                    good, best = guess, r
                    break
                bad, guess = guess, guess // 2
            if good is None:
                return 0, r
        if not largest:
            return good, best
        if bad is None:  # grow until a batch fails (at most 64x)
            probe = good
            while bad is None and probe < start * 64:
                probe *= 2
                r = self.step(target, step, probe)
                good, best, bad = (probe, r, None) if r.fits else (good, best, probe)
        while bad - good > multiple:
            mid = (good + bad) // 2 // multiple * multiple
            if mid <= good:
                break
            r = self.step(target, step, mid)
            good, best, bad = (mid, r, bad) if r.fits else (good, best, mid)
        return good, best


def _local_hbm_gib(device) -> float:
    stats = device.memory_stats() or {}
    return _gib(stats.get("bytes_limit", 0)) or 16.0


def _local_peak(device) -> float:
    """A local chip's bf16 peak, from its JAX device kind (a v5e's when unknown)."""
    return targets_lib.peak_of_device_kind(device.device_kind)


# --------------------------------------------------------------------------- figures


def epoch_hours(report: StepReport, chips: int, mfu: float,
                images: int = targets_lib.REAL_TRAIN_IMAGES) -> float | None:
    """Hours for one pass over ``images`` at ``mfu`` of the chips' peak."""
    rate = report.images_per_s(mfu)
    return None if not rate else images / (rate * chips) / 3600


def host_images_per_s(report: StepReport, target: targets_lib.Target, mfu: float
                      ) -> float | None:
    """Images/s each host must decode to keep its chips busy at ``mfu``."""
    rate = report.images_per_s(mfu)
    return None if not rate else rate * min(target.chips, target.chips_per_host)


def rounded_down(n: float, multiple: int = 8) -> int:
    return max(multiple, int(math.floor(n / multiple)) * multiple)
