"""Every shipped accelerator flagfile compiled for its targets by the TPU compiler.

    python -m benchmarks.run preflight

Each flagfile runs through the user's own command, `python -m tfcdisc.preflight
--flagfile=... --target=... --output=...`, on this machine (no TPU): the TPU flagfiles for
v5e-1 (Colab), v5e-8 (Kaggle) and v6e-8; the GPU flagfile for 16, 40 and 80 GiB (an
estimate, compiled on one TPU chip's description). The table is written into
RESULTS.md and quoted by docs/tpus_and_backends.md and the flagfiles' headers. Also how much libtpu,
installed beside JAX for the compiler, costs JAX's start-up on a CPU machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from benchmarks import common

RECIPES = {
    "xception_tpu.cfg": ("v5e-1", "v5e-8", "v6e-8"),
    "efficientnetv2_s_tpu.cfg": ("v5e-1", "v5e-8", "v6e-8"),
    "efficientnetv2_b0_gpu.cfg": ("gpu-16g", "gpu-40g", "gpu-80g"),
    "convnext_small_tpu.cfg": ("v5e-1", "v5e-8", "v6e-8"),
    # The full-frame fine-tune phases (224 px).
    "xception_tpu_ft224.cfg": ("v5e-1", "v5e-8", "v6e-8"),
    "efficientnetv2_s_tpu_ft224.cfg": ("v5e-1", "v5e-8", "v6e-8"),
    "efficientnetv2_b0_gpu_ft224.cfg": ("gpu-16g", "gpu-40g", "gpu-80g"),
}
_START = """
import sys, time, importlib.abc
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "libtpu" and HIDE:
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Hide())
t = time.perf_counter()
import jax
jax.devices()
print(time.perf_counter() - t)
"""


def _preflight(flagfile: str, targets: tuple[str, ...]) -> tuple[dict, float, str]:
    """One flagfile through the command: its JSON, wall seconds and one-line verdict."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "preflight.json")
        cmd = [sys.executable, "-m", "tfcdisc.preflight",
               f"--flagfile={common.ROOT.parent / 'experiments' / flagfile}",
               *(f"--target={t}" for t in targets), f"--output={out}"]
        with common.Timer() as t:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=7200,
                                 cwd=common.ROOT.parent)
        if run.returncode not in (0, 2) or not os.path.exists(out):
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
        common.log(flagfile, run.stdout)
        return json.load(open(out)), t.seconds, run.stderr.strip().splitlines()[-1] \
            if run.returncode else "all fit"


def _startup(hide: bool) -> float:
    code = f"HIDE = {hide}\n" + _START
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": ""}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _hours(r: dict, key: str) -> str:
    return "-".join(f"{h:,.2f}" for h in r[key]) if key in r else ""


def run() -> None:
    rows, verdicts, walls = [], {}, {}
    for flagfile, targets in RECIPES.items():
        result, walls[flagfile], verdicts[flagfile] = _preflight(flagfile, targets)
        by = {(r["target"], r["step"]): r for r in result["rows"]}
        for target in targets:
            train, val, pred = (by[(target, s)] for s in ("train", "validation", "predict"))
            rows.append([
                flagfile, target, f"{train['batch_per_chip']} / {val['batch_per_chip']}",
                f"{train['needed_gib']:.2f}" if train["needed_gib"] else "?",
                f"{val['needed_gib']:.2f} / {pred['needed_gib']:.2f}"
                if val["needed_gib"] and pred["needed_gib"] else "?",
                f"{train['hbm_gib']:g}",
                "yes" if all(r["fits"] for r in (train, val, pred)) else "**NO**",
                f"{train['gflops']:,.0f}" if train["gflops"] else "",
                f"{train['images_per_s_peak']:,.0f}" if train["images_per_s_peak"] else "",
                _hours(train, "epoch_hours"), _hours(train, "run_hours"),
                f"{train['host_images_per_s']:,.0f}" if train.get("host_images_per_s") else "",
                f"{train['compile_seconds']:.0f} / {val['compile_seconds']:.0f} / "
                f"{pred['compile_seconds']:.0f}"])
    hidden = min(_startup(True) for _ in range(3))
    shown = min(_startup(False) for _ in range(3))
    lo, hi = result["mfu_range"]
    md = f"""## Preflight: every shipped flagfile compiled for its targets (issue 25)

`python -m benchmarks.run preflight` on {common.machine()}, no TPU: each flagfile through
`python -m tfcdisc.preflight --flagfile=... --target=...`, which builds the run's model,
loss, metrics, optimizer and precision as `train` does and compiles its steps with the TPU
compiler (libtpu) for a described slice. Per chip: batch (train images / validation
products of 4 slots), HBM the compiled program needs (arguments + outputs + temporaries -
donated), the training step's FLOPs, images/s at 100% of the chip's bf16 peak, the hours
of one epoch of the real catalogue (12,371,293 images) and of the flagfile's whole run at
{hi:.0%} to {lo:.0%} MFU (an assumed range, not measured), and the images/s each host must
decode at 50% MFU. GPU rows are estimates: the same steps compiled for one TPU chip (bf16
for fp16, same bytes) against the GPU's memory; no GPU compiler ran.

{common.table(["flagfile", "target", "batch/chip", "train GiB", "validation / predict GiB",
               "HBM GiB", "fits", "train GFLOPs/step", "img/s/chip at peak",
               "epoch h", "run h", "host img/s needed", "compile s (train/val/pred)"], rows)}

Verdicts (the command's exit line): {"; ".join(f"`{f}`: {v}" for f, v in verdicts.items())}.
Wall time of each command: {", ".join(f"{f} {s:.0f} s" for f, s in walls.items())}.

libtpu beside JAX on a CPU machine: `import jax; jax.devices()` takes {shown:.2f} s with it
and {hidden:.2f} s with it hidden (best of 3 each, side by side): {shown - hidden:+.2f} s.
"""
    common.write_section("preflight", md)
    print(md)


if __name__ == "__main__":
    run()
