"""The user's path (issue 27): paths as users type them, recipes by name, the data dir
one level off."""

import os

import pytest

from tfcdisc import cli
from tfcdisc.learn import input_pipeline, settings


def test_tilde_and_variables_expand_in_every_path_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
    cfg = cli.parse(settings.TrainConfig, ["--data_dir=~/tensorflow_datasets",
                                           "--model_dir=$RUNS/effv2b0",
                                           "--weights=~/keras/x_notop.h5"])
    assert cfg.data_dir == str(tmp_path / "tensorflow_datasets")
    assert cfg.model_dir == str(tmp_path / "runs" / "effv2b0")
    assert cfg.weights == str(tmp_path / "keras" / "x_notop.h5")
    predict = cli.parse(settings.PredictSettings, ["--saved_model=gs://b/~x",
                                                   "--bson=~/kaggle/test.bson"])
    assert predict.saved_model == "gs://b/~x"  # a bucket's object names are not expanded
    assert predict.bson == str(tmp_path / "kaggle" / "test.bson")
    assert cli.parse(settings.TrainConfig, ["--data_dir=d", "--model_dir=m"]).tpu is None


def test_recipes_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = cli.parse(settings.TrainConfig, ["--flagfile=xception_tpu", "--data_dir=d",
                                               "--model_dir=m"])
    assert (by_name.backbone, by_name.image_size) == ("xception", 180)
    phase = cli.parse(settings.TrainConfig, ["--flagfile=experiments/xception_tpu_ft224.cfg",
                                             "--data_dir=d", "--model_dir=m"])
    assert (phase.phase, phase.image_size) == ("ft224", 224)
    assert {"demo_cpu", "xception_tpu", "convnext_small_tpu"} <= set(cli.recipes())
    with pytest.raises(ValueError, match="the shipped recipes: .*xception_tpu"):
        cli.parse(settings.TrainConfig, ["--flagfile=xception_gpu"])


def test_a_data_dir_one_level_too_deep_is_answered_with_its_parent(dataset):
    data_dir = str(dataset.data_dir).rsplit("/cdiscount/", 1)[0]
    for deep in (f"{data_dir}/cdiscount", f"{data_dir}/cdiscount/default"):
        with pytest.raises(FileNotFoundError) as e:
            input_pipeline.load_builder(deep)
        assert f"--data_dir={data_dir} " in str(e.value)
        assert "tfds build" not in str(e.value)  # not the build it already ran
    assert input_pipeline.load_builder(f"{data_dir}/cdiscount/default/1.0.0").info.name \
        == "cdiscount"


def test_the_builder_is_found_by_its_import_path_from_any_folder(dataset, tmp_path):
    """What `tfds build --imports=tfds_builder.cdiscount.cdiscount_dataset_builder
    cdiscount` does first, from a folder outside the clone."""
    import subprocess
    import sys
    data_dir = str(dataset.data_dir).rsplit("/cdiscount/", 1)[0]
    code = ("import tensorflow_datasets as tfds, tfds_builder.cdiscount.cdiscount_dataset_builder;"
            f"print(tfds.builder('cdiscount', data_dir={data_dir!r}).info.splits['train']"
            ".num_examples)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == dataset.info.splits["train"].num_examples


def test_the_demo_ends_with_the_readmes_six_commands(tmp_path):
    import json
    from tfcdisc import demo_summary
    from conftest import REPO
    for name in ("report_test.json", "report_validation.json"):
        (tmp_path / name).write_text(json.dumps({"product_accuracy": 0.9, "products": 10}))
    (tmp_path / "submission.csv").write_text("_id,category_id\n1,2\n")
    text = demo_summary.summary(str(tmp_path))
    commands = [line.strip() for line in demo_summary.NEXT_STEPS.splitlines()
                if line.startswith("   ")]
    assert len(commands) == 6 and text.rstrip().endswith(commands[-1])
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Your data in six commands", 1)[1].split("```sh", 1)[1]
    assert section.split("```", 1)[0].strip().splitlines() == commands


def test_each_recipes_expected_accuracy_is_the_readmes():
    """A flagfile's header and the README's recipe table give one range."""
    import re
    from conftest import REPO
    readme = (REPO / "README.md").read_text().split("What to expect on the real data", 1)[1]
    for name in ("efficientnetv2_b0_gpu", "xception_tpu", "efficientnetv2_s_tpu",
                 "convnext_small_tpu"):
        header = (REPO / "experiments" / f"{name}.cfg").read_text()
        expected = re.search(r"Expected: (0\.\d+-0\.\d+) validation", header).group(1)
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}.cfg`"))
        assert f"| {expected} |" in row, (name, expected, row)
