"""The preflight: a run's steps compiled by the real TPU compiler for described TPU slices
(libtpu, installed with the tests' extra), with no TPU present."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

_SMALL = ["--backbone=small_cnn", "--image_size=32", "--decode_size=32", "--weights=none",
          "--per_replica_batch_size=16", "--per_replica_eval_batch_size=8",
          "--mixed_precision=auto", "--level1_loss_weight=0.2", "--epochs=2"]


def _preflight(*args, data_dir=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the command quiets TensorFlow itself
    cmd = [sys.executable, "-m", "tfcdisc.preflight", *_SMALL, *args]
    if data_dir:
        cmd.append(f"--data_dir={data_dir}")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def test_training_and_validation_steps_compile_for_v5e_1_and_v5e_8(dataset, tmp_path):
    out = tmp_path / "preflight.json"
    run = _preflight("--target=v5e-1", "--target=v5e-8", f"--output={out}",
                     data_dir=dataset.data_dir)
    assert run.returncode == 0, run.stderr
    rows = {(r["target"], r["step"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(t, s) for t in ("v5e-1", "v5e-8")
                         for s in ("train", "validation", "predict")}
    for r in rows.values():
        assert r["fits"] and 0 < r["needed_gib"] < r["hbm_gib"] == 16
        assert r["gflops"] > 0 and r["compile_seconds"] > 0
    one, eight = rows[("v5e-1", "train")], rows[("v5e-8", "train")]
    # The global batch is 8x on a v5e-8 and split over its chips: each chip's FLOPs and
    # images stay those of one chip (the step's all-reduce adds little), and the epoch
    # bound falls with the chips.
    assert eight["gflops"] == pytest.approx(one["gflops"], rel=0.1)
    assert eight["epoch_hours"][0] == pytest.approx(one["epoch_hours"][0] / 8, rel=0.15)
    assert eight["host_images_per_s"] == pytest.approx(8 * one["host_images_per_s"], rel=0.15)
    assert rows[("v5e-1", "validation")]["batch_per_chip"] == 8
    assert "v5e-8 | train | 16 |" in run.stdout  # the printed table
    assert run.stderr == ""  # libtpu's notices about a missing TPU VM are held back


def test_an_eval_batch_that_does_not_fit_is_refused_with_the_flag_that_fixes_it(dataset):
    run = _preflight("--target=v5e-1", "--per_replica_eval_batch_size=131072",
                     "--image_size=64", "--decode_size=64", data_dir=dataset.data_dir)
    assert run.returncode == 2
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("preflight: v5e-1: the validation step needs ") and \
        "GiB per chip, 15.75 GiB available: pass --per_replica_eval_batch_size=" in line
    fixed = int(line.split("--per_replica_eval_batch_size=")[1].split()[0])
    assert 8 <= fixed < 131072 and "it fits" in line
    assert "v5e-1 | validation | 131072 |" in run.stdout and "| NO |" in run.stdout


def test_the_missing_compiler_names_the_install(monkeypatch):
    import importlib.util
    from importlib.metadata import version
    from tfcdisc.learn import preflight
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    problem = preflight.tpu_compiler_problem()
    assert f'pip install "jax[tpu]=={version("jax")}"' in problem


def test_targets_are_named_as_runtimes_name_them():
    from tfcdisc.learn import targets
    assert targets.for_accelerator_type("v5litepod-8") == "v5e-8"
    assert targets.for_accelerator_type("v6e-8") == "v6e-8"
    assert targets.for_accelerator_type("v2-8") is None
    with pytest.raises(ValueError, match="choose from v5e-1"):
        targets.get("v9-8")
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
               "HLO temporaries (18.31G) exceeds available HBM (15.75G)")
    assert targets.out_of_memory(message) == (18.31, 15.75)
    assert targets.out_of_memory("INVALID_ARGUMENT: something else") is None
