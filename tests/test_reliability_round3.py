"""The third fault audit's cases (docs/reliability.md): outputs that never overwrite
inputs, diverging runs that never ship, a graph allow-list that holds, locks that survive
recycled VMs, and one line for every refusal."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, train_config
from tfcdisc import settings


def _run(args, env=None, **kw):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=kw.pop("timeout", 300), env=env, **kw)


def _one_line(done, *words):
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- diverging runs


@pytest.mark.parametrize("flag", ["--learning_rate=nan", "--learning_rate=inf",
                                  "--weight_decay=inf", "--label_smoothing=5",
                                  "--crop_area=3", "--dropout=1.5", "--bn_momentum=1"])
def test_meaningless_float_flags_are_refused(flag):
    from absl import flags
    with pytest.raises(flags.IllegalFlagValueError, match=flag.split("=")[0][2:]):
        settings.parse(settings.TrainConfig, ["--data_dir=d", "--model_dir=m", flag])
    name, value = flag[2:].split("=")
    config = settings.TrainConfig(data_dir="d", model_dir="m")
    setattr(config, name, float(value))
    with pytest.raises(ValueError, match=f"--{name}"):
        settings.check(config)


def test_a_diverging_run_stops_at_once_and_keeps_nothing_non_finite(dataset, tmp_path):
    import keras
    import numpy as np
    from tfcdisc.learn import training
    from tfcdisc.serve import exporting
    run, bad = tmp_path / "run", tmp_path / "diverged"
    with pytest.raises(training.TrainingDiverged, match="diverged"):
        training.train(train_config(dataset, bad, learning_rate=1e12))
    assert not (bad / "checkpoints" / "best.keras").exists()
    assert not (bad / "backup" / "state.json").exists()
    assert len((bad / "history.csv").read_text().splitlines()) <= 1  # no epoch row
    # Weights that turned non-finite on an epoch's last step (its loss was still finite)
    # replace neither best.keras nor the backup.
    training.train(train_config(dataset, run))
    best_path = run / "checkpoints" / "best.keras"
    best, state = best_path.read_bytes(), (run / "backup" / "state.json").read_text()
    model = keras.saving.load_model(run / "checkpoints" / "last.keras", compile=False)
    model.weights[0].assign(np.full(model.weights[0].shape, np.nan, "float32"))
    checkpoint = training.WholeCheckpoint(str(best_path), monitor="val_product_accuracy",
                                          mode="max", save_best_only=True)
    checkpoint.set_model(model)
    with pytest.raises(training.TrainingDiverged, match="not finite"):
        checkpoint.on_epoch_end(1, {"val_product_accuracy": 1.0})
    saver = training.Backup(str(run / "backup"), None, checkpoint)
    saver.set_model(model)
    with pytest.raises(training.TrainingDiverged, match="not finite"):
        saver.save(2, 0)
    assert best_path.read_bytes() == best
    assert (run / "backup" / "state.json").read_text() == state
    # A checkpoint holding NaN weights (an older version's) is never exported.
    model.save(best_path)
    with pytest.raises(ValueError, match="not finite"):
        exporting.export(str(run), str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()


def test_a_non_finite_loss_stops_training_naming_the_step():
    from tfcdisc.learn import training
    stop = training.StopOnNonFiniteLoss()
    stop.on_epoch_begin(3)
    stop.on_batch_end(4, {"loss": 2.5})
    with pytest.raises(training.TrainingDiverged, match="nan at epoch 3, step 6"):
        stop.on_batch_end(5, {"loss": float("nan")})


# --------------------------------------------------------------------------- datasets


def test_a_rebuilt_data_dir_of_another_catalogue_is_refused(exported, dataset, tmp_path):
    """`tfds build --overwrite` from another catalogue with the same class count."""
    import shutil
    from tfcdisc.learn import fusion, training
    from tfcdisc.serve import exporting
    source, _ = exported
    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(source, run)
    shutil.copytree(dataset.data_dir, data)
    meta_path = data / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["taxonomy"]["level3_names"][0] = "ANOTHER CATALOGUE"
    meta_path.write_text(json.dumps(meta))
    config = json.loads((run / "config.json").read_text())
    config["train"]["data_dir"] = str(data)
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="another dataset than the one"):
        exporting.export(str(run), str(tmp_path / "export"))
    with pytest.raises(ValueError, match="another dataset than the one"):
        fusion.train(str(run), str(tmp_path / "fusion"))
    with pytest.raises(ValueError, match="another dataset than the one"):
        training.train(training.TrainConfig(**config["train"]))
    assert not (tmp_path / "export").exists() and not (tmp_path / "fusion" / "features").exists()


# --------------------------------------------------------------------------- outputs


def test_an_output_naming_an_input_is_refused_before_any_work(exported, catalogue, tmp_path):
    folder, _ = catalogue
    _, export = exported
    test = tmp_path / "test.bson"
    test.write_bytes((folder / "test.bson").read_bytes())
    labels = tmp_path / "labels.csv"
    labels.write_text((folder / "test_labels.csv").read_text())
    os.symlink(test, tmp_path / "link.bson")
    before = {p: p.read_bytes() for p in (test, labels)}
    cases = [
        (["tfcdisc.predict", f"--saved_model={export}", f"--bson={test}", f"--output={test}"],
         "--bson"),
        (["tfcdisc.predict", f"--saved_model={export}", f"--bson={test}",
          f"--output={tmp_path / 'link.bson'}"], "--bson"),  # the same file through a link
        (["tfcdisc.predict", f"--saved_model={export}", f"--bson={test}",
          f"--output={tmp_path / 's.csv'}", f"--top_k_output={tmp_path / 's.csv'}"], "--output"),
        (["tfcdisc.evaluate", f"--saved_model={export}", f"--bson={test}",
          f"--labels={labels}", f"--output={labels}"], "--labels"),
        (["tfcdisc.show", f"--saved_model={export}", f"--bson={test}", f"--output={test}"],
         "--bson"),
        (["tfcdisc.predict", f"--saved_model={export}", f"--bson={test}",
          f"--output={export}/saved_model.pb"], "--saved_model"),
        (["tfcdisc.export", f"--model_dir={export}/run", f"--export_dir={export}"],
         "--model_dir"),
    ]
    for args, named in cases:
        _one_line(_run(args), "overwrite" if "top_k" not in args[-1] else "also", named)
    assert {p: p.read_bytes() for p in (test, labels)} == before
    # synth writes category_names.csv into --output_dir: given that very file, it refuses.
    names = tmp_path / "k" / "category_names.csv"
    names.parent.mkdir()
    names.write_text("category_id,category_level1,category_level2,category_level3\n1,a,b,c\n")
    _one_line(_run(["tfcdisc.synth", f"--output_dir={names.parent}",
                    f"--category_names={names}"]), "holds a catalogue (category_names.csv)")
    assert names.read_text().endswith("1,a,b,c\n")


def test_synth_never_replaces_a_catalogue_unless_told(tmp_path):
    from tfcdisc.catalogue import synth
    folder = tmp_path / "kaggle"
    folder.mkdir()
    (folder / "train.bson").write_bytes(b"the real one")
    done = _run(["tfcdisc.synth", f"--output_dir={folder}", "--num_train_products=20",
                 "--num_test_products=5", "--num_categories=3", "--workers=1"])
    _one_line(done, "holds a catalogue (train.bson)", "--overwrite")
    assert (folder / "train.bson").read_bytes() == b"the real one"
    synth.generate(str(folder), 20, 5, num_categories=3, workers=1, overwrite=True)
    assert (folder / "train.bson").stat().st_size > 100


def test_writes_through_links_land_in_their_targets(exported, tmp_path):
    """A Drive folder or a shared file linked in: the link stays, the target is new."""
    from tfcdisc.catalogue import atomic
    from tfcdisc.serve import exporting
    run, _ = exported
    drive = tmp_path / "drive"
    drive.mkdir()
    (drive / "submission.csv").write_text("old\n")
    os.symlink(drive / "submission.csv", tmp_path / "submission.csv")
    atomic.write(str(tmp_path / "submission.csv"), "_id,category_id\n")
    assert os.path.islink(tmp_path / "submission.csv")
    assert (drive / "submission.csv").read_text() == "_id,category_id\n"
    exporting.export(str(run), str(drive / "export"))
    os.symlink(drive / "export", tmp_path / "export")
    exporting.export(str(run), str(tmp_path / "export"), top_k=3)
    assert os.path.islink(tmp_path / "export")
    assert json.loads((drive / "export" / "assets" / "tfcdisc.json").read_text())["top_k"] == 3
    assert sorted(os.listdir(tmp_path)) == ["drive", "export", "submission.csv"]
    assert sorted(os.listdir(drive)) == ["export", "submission.csv"]


# --------------------------------------------------------------------------- inputs, batches


def test_an_empty_bson_is_refused_locally_and_on_beam(exported, tmp_path):
    from tfcdisc.serve import beam_predict, inference
    _, export = exported
    empty = tmp_path / "test.bson"
    empty.write_bytes(b"")
    for predict in (lambda out: inference.predict(str(export), out, bson=str(empty)),
                    lambda out: beam_predict.predict(
                        str(export), out, bson=str(empty),
                        beam_options=beam_predict.pipeline_options("runner=DirectRunner"))):
        with pytest.raises(ValueError, match="holds no products"):
            predict(str(tmp_path / "submission.csv"))
        assert not (tmp_path / "submission.csv").exists()


def test_batches_are_clamped_to_the_data(exported, catalogue, dataset, tmp_path,
                                        monkeypatch):
    """A batch of 200,000 products padded 40 products to 200,000 and was OOM-killed; a
    training batch larger than the training split died deep in TensorFlow after
    writing run files."""
    from tfcdisc.learn import input_pipeline, training
    from tfcdisc.serve import inference
    seen, real = [], input_pipeline.batch_products

    def spy(products, batch_size, *args, **kw):
        seen.append(batch_size)
        return real(products, batch_size, *args, **kw)
    monkeypatch.setattr(input_pipeline, "batch_products", spy)
    folder, _ = catalogue
    inference.predict(str(exported[1]), str(tmp_path / "s.csv"),
                      bson=str(folder / "test.bson"), batch_size=200000, strategy="default")
    assert seen == [60]
    assert len((tmp_path / "s.csv").read_text().splitlines()) == 61
    with pytest.raises(ValueError, match="more than the .* training images"):
        training.train(train_config(dataset, tmp_path / "run", global_batch_size=50000))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- locks

_CONTENDER = """
import json, os, sys, pathlib
from tfcdisc.catalogue import folder_lock
lock, go, out, n = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), int(sys.argv[4])
real = json.loads

def loads(*args, **kwargs):  # the worst interleaving: every writer reads the stale lock
    try:                     # before any of them acts on what it read
        return real(*args, **kwargs)
    finally:
        (out / f"read-{os.getpid()}").touch()
        while len(list(out.glob("read-*"))) < n and not list(out.glob("held-*")):
            pass
json.loads = loads
while not go.exists():
    pass
try:
    with folder_lock.hold(lock, "contender"):
        (out / f"held-{os.getpid()}").touch()
        (out / f"tried-{os.getpid()}").touch()
        while len(list(out.glob("tried-*"))) < n:  # hold it until every other one tried
            pass
except folder_lock.FolderBusyError:
    (out / f"tried-{os.getpid()}").touch()
"""


@pytest.mark.parametrize("left", ["dead", "empty", "garbage"])
def test_of_six_simultaneous_writers_on_a_stale_lock_exactly_one_holds_it(tmp_path, left):
    lock, go, out = tmp_path / "run" / ".lock", tmp_path / "go", tmp_path / "out"
    lock.parent.mkdir()
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket
    lock.write_bytes({"dead": json.dumps({"what": "train", "host": socket.gethostname(),
                                          "pid": int(dead), "since": "then"}).encode(),
                      "empty": b"", "garbage": b"\x00\xff[1, 2"}[left])
    procs = [subprocess.Popen([sys.executable, "-c", _CONTENDER, str(lock), str(go), str(out),
                               "6"], cwd=REPO) for _ in range(6)]
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0] * 6
    assert len(list(out.glob("held-*"))) == 1
    assert not lock.exists()  # released by its holder


def test_a_lock_of_another_host_is_taken_over_after_its_lease(tmp_path, caplog):
    import time
    from tfcdisc.catalogue import folder_lock
    lock = tmp_path / ".lock"
    def left_by(beat):
        lock.write_text(json.dumps({"what": "tfcdisc.train", "host": "recycled-vm",
                                    "pid": 1, "since": "yesterday", "heartbeat": beat}))
    left_by(time.time() - 30)  # its holder wrote half a minute ago: it may be writing
    with pytest.raises(folder_lock.FolderBusyError, match="recycled-vm"):
        with folder_lock.hold(str(lock), "tfcdisc.train", lease_minutes=5):
            pass
    left_by(time.time() - 3600)
    with folder_lock.hold(str(lock), "tfcdisc.train", lease_minutes=5):
        held = json.loads(lock.read_text())
        assert held["pid"] == os.getpid() and held["host"] != "recycled-vm"
        first = held["heartbeat"]
    assert "taking over the lock of tfcdisc.train (host recycled-vm" in caplog.text
    assert "60.0 min" in caplog.text
    assert first <= time.time()
    lock.mkdir()
    with pytest.raises(folder_lock.FolderBusyError, match="is a folder where"):
        with folder_lock.hold(str(lock), "tfcdisc.train"):
            pass


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    import time
    from tfcdisc.catalogue import folder_lock
    lock = folder_lock._Lock(str(tmp_path / ".lock"), {"pid": 1, "host": "h"},
                             os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT))
    lock.beat()
    first = json.loads((tmp_path / ".lock").read_text())["heartbeat"]
    while time.time() == first:
        pass
    lock.beat()
    assert json.loads((tmp_path / ".lock").read_text())["heartbeat"] > first
    lock.release()
    assert not (tmp_path / ".lock").exists()


# --------------------------------------------------------------------------- exports


def test_the_graph_allow_list_holds_against_registered_stateless_io(exported, tmp_path):
    """Ops TensorFlow registers as stateless that still do I/O, checksums recomputed."""
    import re
    import tensorflow as tf
    from test_reliability import _crafted
    from tfcdisc.serve import export_format
    _, export = exported
    cases = {
        "DebugIdentity": lambda path: tf.raw_ops.DebugIdentity(
            input=tf.constant(1.0), debug_urls=[f"file://{path}"]),
        "GenerateVocabRemapping": lambda path: tf.raw_ops.GenerateVocabRemapping(
            new_vocab_file="/etc/passwd", old_vocab_file=path, new_vocab_offset=0,
            num_new_vocab=1),
        "Copy": lambda path: tf.raw_ops.Copy(input=tf.constant(1.0),
                                             debug_ops_spec=[f"DebugIdentity;file://{path};0"]),
        "CopyHost": lambda path: tf.raw_ops.CopyHost(input=tf.constant(1.0)),
    }
    for op, io_op in cases.items():
        crafted = tmp_path / op
        _crafted(export, crafted, io_op)
        with pytest.raises(ValueError, match=re.escape(f"its graph runs {op} (")):
            export_format.load(str(crafted))
        assert not (crafted / "written-by-the-graph").exists()
    # Without its checksum list an export is refused, not checked with a warning.
    unlisted = tmp_path / "unlisted"
    import shutil
    shutil.copytree(export, unlisted)
    meta = export_format.read_metadata(str(unlisted))
    del meta["files"]
    (unlisted / export_format.METADATA).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="records no checksums"):
        export_format.load(str(unlisted))


# --------------------------------------------------------------------------- full disks


def test_a_first_epoch_whose_backup_failed_is_redone_with_one_history_row(dataset, tmp_path,
                                                                          monkeypatch):
    """No state.json existed yet, so the rerun kept the first epoch's row and wrote
    history epochs 0 0 1."""
    import csv
    import tensorflow as tf
    from tfcdisc.catalogue import atomic
    from tfcdisc.learn import training
    cfg = train_config(dataset, tmp_path, epochs=2, steps_per_epoch=2)
    real_copy = atomic.copy

    def full(local, path):
        if path.endswith("epoch1-step0.weights.h5"):  # TensorFlow's own disk-full error
            raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
        real_copy(local, path)

    monkeypatch.setattr(atomic, "copy", full)
    with pytest.raises(tf.errors.ResourceExhaustedError):
        training.train(cfg)
    assert not (tmp_path / "backup" / "state.json").exists()
    monkeypatch.setattr(atomic, "copy", real_copy)
    training.train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]


def test_io_errors_of_tensorflow_and_python_are_one_line_in_every_command(tmp_path,
                                                                          monkeypatch, capsys):
    import tensorflow as tf
    from tfcdisc import cli
    from tfcdisc import settings as settings_lib

    def full(settings):
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    monkeypatch.setattr(sys, "argv", ["tfcdisc-export", "--model_dir=m", "--export_dir=e"])
    with pytest.raises(SystemExit) as exit_:
        cli.command("export", settings_lib.ExportSettings, full, None)()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["export: ResourceExhaustedError: No space left on device"]
    assert cli.io_error(KeyError("x")) is None


_HOLDER = """
import pathlib, sys
from tfcdisc.catalogue import folder_lock
with folder_lock.hold(sys.argv[1], "tfds build"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes its end
"""


def test_tfds_build_says_busy_unwritable_and_full_in_one_line(catalogue, tmp_path,
                                                              monkeypatch, capsys):
    """Under the `tfds` command these were tracebacks: FolderBusyError,
    FolderNotWritableError, and a full disk while TFDS writes its final metadata."""
    import types
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from conftest import build_dataset
    monkeypatch.setitem(sys.modules, "tensorflow_datasets.scripts.cli.main",
                        types.ModuleType("tfds_cli"))  # as under the `tfds` command
    folder, _ = catalogue

    def one_line(data_dir, *words):
        with pytest.raises(SystemExit) as exit_:
            build_dataset(folder, data_dir)
        assert exit_.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("tfds build cdiscount: "), lines
        for word in words:
            assert word in lines[-1], lines[-1]

    config_dir = tmp_path / "busy" / "cdiscount" / "default"
    config_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(config_dir / ".tfcdisc-build.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline().strip() == "held"
    one_line(tmp_path / "busy", "is being written by tfds build")
    holder.stdin.close()
    holder.wait(timeout=60)
    one_line("/sys/tfcdisc-data", "cannot write there")

    def full(self, *args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")
    monkeypatch.setattr(tfds.core.DatasetInfo, "write_to_directory", full)
    one_line(tmp_path / "full", "No space left on device", "run the build again")


# --------------------------------------------------------------------------- unclear words


def test_ids_past_int64_are_named_not_wrapped(tmp_path):
    from tfcdisc.catalogue import labels, taxonomy
    names = tmp_path / "category_names.csv"
    names.write_text("category_id,category_level1,category_level2,category_level3\n"
                     "1000000100,A,B,C\n99999999999999999999,A,B,D\n")
    with pytest.raises(ValueError, match="line 3: category_id '99999999999999999999'"):
        taxonomy.load(str(names))
    ids = tmp_path / "labels.csv"
    ids.write_text("_id,category_id\n1,1000000100\n99999999999999999999,1000000100\n")
    with pytest.raises(ValueError, match="line 3: _id '99999999999999999999'"):
        labels.read(str(ids))


def test_unclear_failures_name_the_file_and_the_fix(exported, dataset, tmp_path):
    import shutil
    import numpy as np
    from tfcdisc.catalogue import paths
    from tfcdisc.learn import training
    from tfcdisc.serve import export_format
    run, export = exported
    # A pickled duplicates.npz (checksums recomputed): never unpickled, and named.
    crafted = tmp_path / "export"
    shutil.copytree(export, crafted)
    meta = export_format.read_metadata(str(crafted))
    np.save(crafted / export_format.DUPLICATES, np.array([{"a": 1}], dtype=object),
            allow_pickle=True)
    os.replace(str(crafted / export_format.DUPLICATES) + ".npy",
               crafted / export_format.DUPLICATES)
    meta["duplicates"] = True
    meta["files"] = export_format.checksums(str(crafted))
    (crafted / export_format.METADATA).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{crafted}: .*duplicates.npz is not the table"):
        export_format.load(str(crafted))
    # --weights of a run with another class count names the file.
    other = train_config(dataset, tmp_path / "run", level1_loss_weight=0.2,
                         weights=str(run / "checkpoints" / "best.keras"))
    with pytest.raises(ValueError, match="--weights=.*best.keras: its weights do not fit"):
        training.train(other)
    # A symbolic link loop is not "no such file".
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(FileNotFoundError, match="symbolic link that leads nowhere"):
        paths.check_input_file(str(tmp_path / "loop"))


# --------------------------------------------------------------------------- multi-host, backends


def test_the_multi_host_start_names_each_variable_and_a_missing_peer(tmp_path):
    from conftest import free_ports
    from tfcdisc.learn import distribute
    with pytest.raises(ValueError, match="KERAS_DISTRIBUTION_PROCESS_ID is not set"):
        distribute.distribution_env({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234",
                                     "KERAS_DISTRIBUTION_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="KERAS_DISTRIBUTION_PROCESS_ID=2 is not a process id"):
        distribute.distribution_env({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234",
                                     "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
                                     "KERAS_DISTRIBUTION_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="JOB_ADDRESSES=10.0.0.1 is not host:port"):
        distribute.distribution_env({"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1",
                                     "KERAS_DISTRIBUTION_NUM_PROCESSES": "x",
                                     "KERAS_DISTRIBUTION_PROCESS_ID": "0"})
    assert distribute.distribution_env({
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234,10.0.0.2:1234",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
        "KERAS_DISTRIBUTION_PROCESS_ID": "1"}) == ("10.0.0.1:1234", 2, 1)
    # Process 1 of 2, whose coordinator never starts: one line after the stated wait.
    port, = free_ports(1)
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}",
           "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "1"}
    done = subprocess.run([sys.executable, "-c", "import sys; sys.argv[0] = 'train'\n"
                           "from tfcdisc.learn import distribute\n"
                           "distribute.join_processes(3)"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("train: waited 3 s for the 2 processes") and \
        "--multihost_timeout" in last, done.stderr[-3000:]


def test_backend_auto_keeps_keras_backend_from_the_environment():
    code = "from tfcdisc.learn import backend; print(backend.select('auto'))"
    for value, expected in (("jax", "jax"), ("tensorflow", "tensorflow")):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "KERAS_BACKEND": value}, cwd=REPO)
        assert done.stdout.strip() == expected, done.stderr[-2000:]
    assert "from KERAS_BACKEND in the environment" in subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "KERAS_BACKEND": "jax"}).stderr  # this CPU's auto: tensorflow
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": "torch"}, cwd=REPO)
    assert "KERAS_BACKEND=torch in the environment" in done.stderr


def test_a_full_temporary_folder_is_named_as_such(tmp_path, monkeypatch):
    import errno
    from tfcdisc.catalogue import atomic
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    with pytest.raises(OSError, match=f"no space left in the temporary folder {tmp_path}/tmp"):
        with atomic.via_local(str(tmp_path / "last.keras")) as local:
            raise OSError(errno.ENOSPC, "No space left on device", local)
    assert not (tmp_path / "last.keras").exists()


def _as_from_a_terminal():
    """A child whose Ctrl-C and SIGTERM arrive: default handling, and not blocked (a test
    runner's worker may block them, and a child inherits the mask)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _stop_training(dataset, tmp_path, signum):
    """`python -m tfcdisc.train` signalled as its first epoch begins (Keras prints
    "Epoch 1/2" there): the process's exit and its stderr."""
    import signal
    import subprocess
    import sys
    args = [sys.executable, "-m", "tfcdisc.train", f"--data_dir={dataset.data_dir}",
            f"--model_dir={tmp_path / 'run'}", "--backbone=small_cnn", "--image_size=32",
            "--decode_size=48", "--global_batch_size=8", "--epochs=2",
            "--steps_per_epoch=100000", "--strategy=default", "--mixed_precision=float32",
            "--shuffle_buffer=64", "--eval_batch_size=8", "--verbose=2", "--seed=0"]
    # As from a terminal: a parent that runs in the background (a CI job) passes SIGINT
    # on ignored, and Python then never installs its Ctrl-C handler.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "KERAS_BACKEND": "tensorflow",
                                 "PYTHONUNBUFFERED": "1"},  # the line arrives as printed
                            preexec_fn=_as_from_a_terminal)
    for line in proc.stdout:
        if line.startswith("Epoch 1/"):
            break
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


def test_ctrl_c_and_sigterm_stop_training_in_one_line_that_says_how_to_resume(
        dataset, tmp_path):
    import signal
    for signum, code, how in ((signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")):
        returncode, err = _stop_training(dataset, tmp_path, signum)
        assert returncode == code, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"train: stopped by {how}; the checkpoints and the last backup "
                               f"in {tmp_path / 'run'} are kept"), last
        assert last.endswith("rerun the same command to resume there")
        assert "busy" not in err  # the first stop released the run's lock
