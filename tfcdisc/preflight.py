"""Compiles a run's steps with the TPU compiler, before a TPU is rented; no TPU needed.

    python -m tfcdisc.preflight --flagfile=experiments/xception_tpu.cfg --target=v5e-1 \
        --target=v5e-8 [--steps=train,validation,predict] [--output=preflight.json] \
        [--fit_eval_batch] [any train flag]

For each target and step (train, validation, predict, or those --steps names) it prints
the HBM each chip needs against the chip's, whether it fits, the FLOPs per step, images/s
per chip at peak and at a stated MFU range, the hours of one epoch of the real catalogue
and of the whole run, and the images/s each host must decode. A step that does not fit
exits 2 with one line naming the flag that fixes it (checked by a compile). The TPU
compiler comes with libtpu (`pip install "jax[tpu]"`); GPU targets are estimates made
with it.
"""

from __future__ import annotations

import json
import os
import sys

from tfcdisc import cli
from tfcdisc import settings
from tfcdisc.learn import targets as targets_lib

_HOURS = "{:,.2f}"


def _targets(names: list[str] | None) -> list:
    """The named targets; none named: this TPU VM's type when the table has it, else its
    own chips (None)."""
    if names:
        return [None if n == targets_lib.LOCAL else targets_lib.get(n) for n in names]
    from tfcdisc.learn import runtime
    kind = os.environ.get("TPU_ACCELERATOR_TYPE", "")
    if targets_lib.for_accelerator_type(kind):
        return [targets_lib.get(kind)]
    if runtime.detect().accelerator != "tpu":
        raise ValueError("not on a TPU VM: name where the run would train with --target (e.g. "
                         f"--target=v5e-1 --target=v5e-8; {', '.join(targets_lib.names())})")
    return [None]


def _steps(names: list[str] | None) -> tuple[str, ...]:
    """The steps to compile, in the table's order; a name it lacks is refused before any
    compile."""
    from tfcdisc.learn.preflight import STEPS
    unknown = [n for n in names or () if n not in STEPS]
    if unknown:
        raise ValueError(f"--steps={','.join(names)}: no step {', '.join(unknown)}; choose "
                         f"from {', '.join(STEPS)}")
    return tuple(n for n in STEPS if not names or n in names)


def _per_chip(cfg: settings.TrainConfig, chips: int) -> tuple[int, int]:
    """(images per chip per training step, products per chip per validation batch), by
    `training`'s own rules (a global eval batch is rounded up to a multiple of the chips,
    as `product_predictor.distribute_products` does)."""
    from tfcdisc.learn import distribute, training
    train = distribute.global_batch_size(cfg.global_batch_size, cfg.per_replica_batch_size,
                                         chips) // chips
    return train, -(-training.eval_batch_size(cfg, chips) // chips)


def _row(r, target, epochs: int) -> dict:
    from tfcdisc.learn import preflight
    lo, hi = targets_lib.MFU_RANGE
    chips = 1 if target is None else target.chips
    row = {**r.__dict__, "chips": chips}
    if r.fits and r.step == "train" and r.images_per_s_peak:
        row["epoch_hours"] = [preflight.epoch_hours(r, chips, hi),
                              preflight.epoch_hours(r, chips, lo)]
        row["run_hours"] = [h * epochs for h in row["epoch_hours"]]
        if target is not None:
            row["host_images_per_s"] = preflight.host_images_per_s(r, target,
                                                                   targets_lib.HOST_MFU)
    return row


def _print_table(rows: list[dict]) -> None:
    lo, hi = targets_lib.MFU_RANGE
    head = ("target", "step", "batch/chip", "HBM GiB needed/chip", "fits", "GFLOPs/step",
            "img/s/chip 100%", f"img/s/chip {lo:.0%}-{hi:.0%}", "epoch h", "run h",
            f"host img/s ({targets_lib.HOST_MFU:.0%})", "compile s")
    print(" | ".join(head))
    for r in rows:
        needed = "?" if r["needed_gib"] is None else f"{r['needed_gib']:.2f}"
        peak = r["images_per_s_peak"]
        print(" | ".join([
            r["target"], r["step"], str(r["batch_per_chip"]), f"{needed} of {r['hbm_gib']:g}",
            "yes" if r["fits"] else "NO", f"{r['gflops']:,.0f}" if r["gflops"] else "",
            f"{peak:,.0f}" if peak else "",
            f"{peak * lo:,.0f}-{peak * hi:,.0f}" if peak else "",
            "-".join(_HOURS.format(h) for h in r["epoch_hours"]) if "epoch_hours" in r else "",
            "-".join(_HOURS.format(h) for h in r["run_hours"]) if "run_hours" in r else "",
            f"{r['host_images_per_s']:,.0f}" if r.get("host_images_per_s") else "",
            f"{r['compile_seconds']:.0f}"]) + (f"  ({r['note']})" if r["note"] else ""))


def _fix(pre, target, step: str, report, cfg) -> str:
    """The flag (with a value checked by a compile) that makes ``step`` fit."""
    flag = "per_replica_batch_size" if step == "train" else "per_replica_eval_batch_size"
    size, fitted = pre.fit(target, step, report.batch_per_chip, report)
    name = targets_lib.LOCAL if target is None else target.name
    needed = "?" if report.needed_gib is None else f"{report.needed_gib:.2f}"
    if not size:
        return (f"{name}: the {step} step does not fit even with one "
                f"{'image' if step == 'train' else 'product'} per chip ({needed} GiB needed, "
                f"{report.hbm_gib:g} GiB available); choose a smaller --backbone or "
                "--image_size")
    return (f"{name}: the {step} step needs {needed} GiB per chip, {report.hbm_gib:g} GiB "
            f"available: pass --{flag}={size} (it fits: {fitted.needed_gib:.2f} GiB)"
            + (", or --fit_eval_batch for the largest" if step != "train" else ""))


def main(s: settings.PreflightSettings) -> None:
    chosen = _targets(s.target)
    steps = _steps(s.steps)
    if any(t is not None for t in chosen):
        # Described chips: JAX itself stays on the CPU, and libtpu's one-process lock
        # (/tmp/libtpu_lockfile) is not taken, so that the preflight runs beside a process
        # that holds this VM's TPU (the notebook's) or another preflight.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from tfcdisc.learn import input_pipeline, preflight
    from tfcdisc.prepare import metadata
    problem = preflight.tpu_compiler_problem()
    if problem and any(t is not None for t in chosen):
        raise ValueError(problem)
    info = metadata.read(input_pipeline.load_builder(s.data_dir, s.dataset_config),
                         s.data_dir).model_info() if s.data_dir else None
    cfg = settings.TrainConfig(**{**{f: getattr(s, f) for f in
                                     settings.TrainConfig.__dataclass_fields__},
                                  "data_dir": s.data_dir or "-", "model_dir": "-"})
    pre = preflight.Preflight(cfg, info, s.tta)
    rows, failures, fitted = [], [], {}
    for target in chosen:
        chips = 1 if target is None else target.chips
        if target is None:
            chips = len(preflight.devices_for(None))
        train_batch, eval_batch = _per_chip(cfg, chips)
        for step in steps:
            batch = train_batch if step == "train" else eval_batch
            report = pre.step(target, step, batch)
            if step != "train" and s.fit_eval_batch:
                size, best = pre.fit(target, step, batch, report, largest=True)
                name = targets_lib.LOCAL if target is None else target.name
                fitted[f"{name}/{step}"] = size
                if size:
                    print(f"preflight: {name}: the largest {step} batch that fits is "
                          f"--per_replica_eval_batch_size={size} ({best.needed_gib:.2f} GiB "
                          "per chip)", file=sys.stderr)
            elif not report.fits:
                failures.append((target, step, report))
            rows.append(_row(report, target, cfg.epochs))
    _print_table(rows)
    lo, hi = targets_lib.MFU_RANGE
    print(f"(per chip; epoch = {targets_lib.REAL_TRAIN_IMAGES:,} images, times at {hi:.0%} to "
          f"{lo:.0%} MFU; Keras's JAX trainer runs --steps_per_execution="
          f"{cfg.steps_per_execution} of the compiled train step per call)")
    if s.output:
        from tfcdisc.catalogue import atomic
        atomic.write(s.output, json.dumps({"flags": cli.flags_text(), "rows": rows,
                                           "fitted_eval_batch": fitted,
                                           "mfu_range": list(targets_lib.MFU_RANGE)},
                                          indent=2))
    if failures:  # the first one's fix, checked by a compile (each costs one)
        cli.fail("preflight", _fix(pre, *failures[0], cfg) + (
            f" (and {len(failures) - 1} more: see the table)" if len(failures) > 1 else ""))


run = cli.command("preflight", settings.PreflightSettings, main, __doc__, backend="jax")


if __name__ == "__main__":
    run()
