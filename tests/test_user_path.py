"""The user's path (issue 27): paths as users type them, recipes by name, the data dir
one level off."""

import os

import pytest

from tfcdisc import settings
from tfcdisc.learn import input_pipeline


def test_tilde_and_variables_expand_in_every_path_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RUNS", str(tmp_path / "runs"))
    cfg = settings.parse(settings.TrainConfig, ["--data_dir=~/tensorflow_datasets",
                                           "--model_dir=$RUNS/effv2b0",
                                           "--weights=~/keras/x_notop.h5"])
    assert cfg.data_dir == str(tmp_path / "tensorflow_datasets")
    assert cfg.model_dir == str(tmp_path / "runs" / "effv2b0")
    assert cfg.weights == str(tmp_path / "keras" / "x_notop.h5")
    predict = settings.parse(settings.PredictSettings, ["--saved_model=gs://b/~x",
                                                   "--bson=~/kaggle/test.bson"])
    assert predict.saved_model == "gs://b/~x"  # a bucket's object names are not expanded
    assert predict.bson == str(tmp_path / "kaggle" / "test.bson")
    assert settings.parse(settings.TrainConfig, ["--data_dir=d", "--model_dir=m"]).tpu is None


def test_recipes_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = settings.parse(settings.TrainConfig, ["--flagfile=xception_tpu", "--data_dir=d",
                                               "--model_dir=m"])
    assert (by_name.backbone, by_name.image_size) == ("xception", 180)
    phase = settings.parse(settings.TrainConfig, ["--flagfile=experiments/xception_tpu_ft224.cfg",
                                             "--data_dir=d", "--model_dir=m"])
    assert (phase.phase, phase.image_size) == ("ft224", 224)
    assert {"demo_cpu", "xception_tpu", "convnext_small_tpu"} <= set(settings.recipes())
    with pytest.raises(ValueError, match="the shipped recipes: .*xception_tpu"):
        settings.parse(settings.TrainConfig, ["--flagfile=xception_gpu"])


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
    """A flagfile's header and the recipe table (docs/recipes.md) give one range."""
    import re
    from conftest import REPO
    readme = (REPO / "docs" / "recipes.md").read_text().split("What to expect on the real data", 1)[1]
    for name in ("efficientnetv2_b0_gpu", "xception_tpu", "efficientnetv2_s_tpu",
                 "convnext_small_tpu"):
        header = (REPO / "experiments" / f"{name}.cfg").read_text()
        expected = re.search(r"Expected: (0\.\d+-0\.\d+) validation", header).group(1)
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}.cfg`"))
        assert f"| {expected} |" in row, (name, expected, row)


def test_a_build_without_a_kaggle_folder_is_one_line_and_leaves_no_folders(
        tmp_path, monkeypatch, capsys):
    """Was a 30-line traceback, with empty cdiscount/ and downloads/ left behind."""
    import sys
    import types
    import tensorflow_datasets as tfds
    from tfds_builder.cdiscount.cdiscount_dataset_builder import Builder
    monkeypatch.setitem(sys.modules, "tensorflow_datasets.scripts.cli.main",
                        types.ModuleType("tfds_cli"))  # as under the `tfds` command
    (tmp_path / "empty").mkdir()
    for manual, said in ((None, "no --manual_dir was given"),
                         (str(tmp_path / "empty"), "holds no train.bson")):
        data = tmp_path / "data"
        (data / "downloads" / "extracted").mkdir(parents=True)  # what TFDS makes first
        (data / "cdiscount" / ".config").mkdir(parents=True)
        (data / "cdiscount" / ".config" / "metadata.json").write_text("{}")
        with pytest.raises(SystemExit) as exit_:
            Builder(data_dir=str(data)).download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual))
        assert exit_.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("tfds build cdiscount: ") and said in last
        assert "pass --manual_dir=FOLDER" in last
        assert [p.name for p in data.iterdir()] == []


def test_the_build_command_runs_from_any_folder_and_quietly(catalogue, tmp_path):
    """`python -m tfcdisc.build`: TFDS's build without its noise (the CUDA probe,
    apitools, INFO lines, the 170-line dataset description), ending with the splits."""
    import subprocess
    import sys
    folder, _ = catalogue
    done = subprocess.run([sys.executable, "-m", "tfcdisc.build", f"--manual_dir={folder}",
                           f"--data_dir={tmp_path / 'data'}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for noise in ("cuInit", "apitools", "INFO[", "cpu_feature_guard", "tfds.core.DatasetInfo"):
        assert noise not in done.stderr + done.stdout, noise
    lines = done.stdout.strip().splitlines()
    assert lines[0] == f"built {tmp_path / 'data'}/cdiscount/default/1.0.0"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["test", "train", "validation"]
    missing = subprocess.run([sys.executable, "-m", "tfcdisc.build",
                              f"--manual_dir={tmp_path / 'nothing'}",
                              f"--data_dir={tmp_path / 'other'}"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith(
        f"tfds build cdiscount: --manual_dir={tmp_path / 'nothing'} holds no train.bson")
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").rglob("*"))


def test_each_host_has_its_places_and_a_warning_where_a_run_would_be_lost():
    from tfcdisc.learn import runtime
    colab, kaggle = runtime.default_paths("colab"), runtime.default_paths("kaggle")
    vm = runtime.default_paths("other", home="/home/u", cwd="/home/u/work")
    assert colab["RUN_DIR"].startswith("/content/drive/") and colab["OUTPUT_DIR"] == "/content"
    assert kaggle["KAGGLE_DIR"].startswith("/kaggle/input/")
    assert kaggle["OUTPUT_DIR"] == "/kaggle/working" and vm["OUTPUT_DIR"] == "/home/u/work"
    assert runtime.lost_with_session("colab", colab["RUN_DIR"]) is None
    assert "Colab VM's disk" in runtime.lost_with_session("colab", "/content/runs/x")
    assert "Kaggle session" in runtime.lost_with_session("kaggle", kaggle["RUN_DIR"])
    assert runtime.lost_with_session("kaggle", "gs://b/runs/x") is None
    assert runtime.lost_with_session("other", vm["RUN_DIR"]) is None
    assert "temporary folder" in runtime.lost_with_session("other", "/tmp/run")


def test_gs_sign_in_per_host(monkeypatch):
    import sys
    import types
    from tfcdisc.learn import runtime
    calls = []
    colab = types.ModuleType("google.colab")
    colab.auth = types.SimpleNamespace(authenticate_user=lambda: calls.append("colab"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    assert "google.colab.auth" in runtime.sign_in_for_gcs("colab") and calls == ["colab"]

    class Secrets:
        attached = True

        def get_gcloud_credential(self):
            if not Secrets.attached:
                raise RuntimeError("Google Cloud SDK credential not found.")
            return "{}"

        def set_tensorflow_credential(self, credential):
            calls.append(("kaggle", credential))
    monkeypatch.setitem(sys.modules, "kaggle_secrets",
                        types.SimpleNamespace(UserSecretsClient=Secrets))
    assert "add-on" in runtime.sign_in_for_gcs("kaggle") and calls[-1] == ("kaggle", "{}")
    Secrets.attached = False
    with pytest.raises(RuntimeError, match="Add-ons > Google Cloud Services"):
        runtime.sign_in_for_gcs("kaggle")
    assert "Application Default" in runtime.sign_in_for_gcs(
        "other", env={"GOOGLE_APPLICATION_CREDENTIALS": "/k.json"}, exists=lambda p: False)
    with pytest.raises(RuntimeError, match="gcloud auth application-default login"):
        runtime.sign_in_for_gcs("other", env={}, exists=lambda p: False)


def test_a_wheel_installs_as_it_is_and_a_clone_in_place():
    from tfcdisc.learn import runtime
    where = runtime.Runtime("tpu", "kaggle", "v5e-8")
    present = {"tensorflow-cpu": "2.20.0", "jax": "0.6.0"}
    wheel = runtime.install_commands(where, "/kaggle/input/w/tfcdisc-0.1-py3-none-any.whl",
                                     python="py", present=present)[-1]
    assert "-e" not in wheel and wheel[-1] == "/kaggle/input/w/tfcdisc-0.1-py3-none-any.whl[beam]"
    clone = runtime.install_commands(where, "tfcdisc", python="py", present=present)[-1]
    assert clone[-2:] == ["-e", "tfcdisc[beam]"]


def test_show_marks_predictions_right_or_wrong_with_their_top_3_and_finds_the_worst(
        exported, catalogue, tmp_path):
    from PIL import Image
    from tfcdisc import show
    folder, _ = catalogue
    _, export = exported
    base = dict(output=str(tmp_path / "p.png"), saved_model=str(export),
                bson=str(folder / "test.bson"), labels=str(folder / "test_labels.csv"),
                num_products=6, columns=2)
    from tfcdisc.serve import gallery, inference
    from tfcdisc.catalogue import labels as labels_lib
    scoring = inference.open_scoring(str(export), strategy="default", bson=base["bson"],
                                     label_map=labels_lib.read(base["labels"]))
    samples = gallery.prediction_samples(scoring, 6)
    assert len(samples) == 6 and all(s["right"] in (True, False) for s in samples)
    for s in samples:
        lines = s["title"].splitlines()
        assert [line[:3] for line in lines[1:4]] == ["1. ", "2. ", "3. "]
        assert all(line.endswith("%") for line in lines[1:4])
        assert ("true: " in s["title"]) == (s["right"] is False)
    worst = gallery.prediction_samples(scoring, 4, scan=60)
    assert worst and all(s["right"] is False for s in worst)
    confidence = [float(s["title"].splitlines()[1].rsplit(" ", 1)[1].rstrip("%").lstrip("<"))
                  for s in worst]
    assert confidence == sorted(confidence, reverse=True)
    show.main(settings.ShowSettings(**base, worst=True, scan=60))
    with Image.open(tmp_path / "p.png") as png:  # 2 panels a row, 4 images of 1.6 in each
        assert png.size[0] >= 2 * 6.6 * 100 - 10
    with pytest.raises(ValueError, match="--labels marks the products of --bson"):
        show.main(settings.ShowSettings(output=str(tmp_path / "q.png"), saved_model=str(export),
                                        data_dir="d", labels=base["labels"]))


def test_the_demo_holds_out_enough_validation_products_to_tell_epochs_apart(tmp_path):
    """2% of the demo's 4,000 products (80) reached 1.0 at epoch 3, and the demo exported
    that early epoch; the demo's build now holds out 400 (10%)."""
    import json
    import re
    import subprocess
    from conftest import REPO
    plan = subprocess.run(["make", "-n", "-B", "demo", f"DEMO_DIR={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    build = plan.split("tfcdisc.build", 1)[1].split("\n\n", 1)[0]
    config = json.loads(re.search(r"--config='(\{.*?\})'", build.replace("\\\n", "")).group(1))
    trains = int(re.search(r"--num_train_products (\d+)", plan).group(1))
    assert config["validation_size"] >= 400 and config["validation_size"] >= trains // 10
