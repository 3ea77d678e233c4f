"""Faults and ordinary mistakes at every stage: nothing stops a run that should go on,
nothing is lost or corrupted silently, and every mistake gets one line and exit status 2.

docs/reliability.md's table lists these cases.
"""

import csv
import hashlib
import json
import os
import re
import subprocess
import sys

import bson
import pandas as pd
import pytest

from conftest import (REPO, build_dataset, doc, jpeg_bytes, last_json, run_training,
                      train_config, write, write_taxonomy)
from tfcdisc.catalogue import bsonfile, index as index_lib
from tfcdisc.learn import training
from tfcdisc.learn import rundir
from tfcdisc.prepare import metadata
from tfcdisc.serve import exporting, inference


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --------------------------------------------------------------------------- images


def _damaged_jpegs(count=300, seed=0) -> list[bytes]:
    """Random damage to real JPEGs: byte flips, garbage spliced into the scan, cuts,
    markers; the first has intact headers and a garbage scan."""
    import random
    from conftest import garbled_jpeg
    rng = random.Random(seed)
    sources = [jpeg_bytes(seed=1), jpeg_bytes("L", seed=2), jpeg_bytes("CMYK", seed=3),
               jpeg_bytes(progressive=True, seed=4)]
    damaged = [garbled_jpeg(5)]
    for _ in range(count):
        data = bytearray(rng.choice(sources))
        kind = rng.randrange(4)
        at = rng.randrange(2, len(data) - 2)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(2, len(data) - 2)] = rng.randrange(256)
        elif kind == 1:
            data[at:at + 200] = rng.randbytes(200)
        elif kind == 2:
            data = data[:at] + data[-2:]
        else:
            data[at:at + 2] = bytes([0xFF, rng.randrange(256)])
        damaged.append(bytes(data))
    return damaged


def _decodes(data: bytes) -> bool:
    import tensorflow as tf
    try:
        tf.io.decode_jpeg(data, channels=3)
        return True
    except (tf.errors.InvalidArgumentError, tf.errors.ResourceExhaustedError):
        return False


def test_no_image_that_passes_the_header_check_stops_a_pipeline():
    """What the build keeps by default (headers checked) goes through training's and the
    product pipelines' fail-safe decode without an error, and exactly the images
    TensorFlow's full decode rejects come out masked; the build's ``decode_images``
    screen passes only images that decode."""
    import numpy as np
    import tensorflow as tf
    from conftest import slots
    from tfcdisc.learn import input_pipeline as ip
    from tfcdisc.catalogue import screen
    damaged = _damaged_jpegs()
    passed = [d for d, v in zip(damaged, screen.screen(damaged, decode=False)) if v is None]
    truth = [_decodes(d) for d in passed]
    assert not truth[0] and 0 < sum(truth) < len(passed)  # the sample has both kinds
    # Training's decode: groups of 32 (the static graph) and a short last group.
    groups = tf.data.Dataset.from_tensor_slices(passed).batch(32).map(lambda j: {"images": j})
    out = list(ip.decode_failsafe(groups, lambda j: ip.decode_train(j, 180),
                                  tf.TensorSpec([180, 180, 3], tf.uint8), padded=False))
    assert np.concatenate([g["decoded"].numpy() for g in out]).tolist() == truth
    # Evaluation and prediction: products of 1-3 images, padded, in static batches.
    products = [slots(passed[i:i + 1 + i % 3]) for i in range(0, len(passed), 3)]
    expected = [[bool(j) and _decodes(j) for j in p] for p in products]
    for batch_size in (16, 2):  # 64 slots a batch, and 8
        got = list(ip.batch_products(tf.data.Dataset.from_tensor_slices(
            {"images": products, "product_id": np.arange(len(products))}), batch_size, 24,
            len(products)))
        mask = np.concatenate([b["mask"].numpy() for b in got])[:len(products)]
        failed = np.concatenate([b["undecodable"].numpy() for b in got])[:len(products)]
        assert (mask > 0).tolist() == expected
        assert (failed > 0).tolist() == [[bool(j) and not e for j, e in zip(p, ex)]
                                         for p, ex in zip(products, expected)]
        pixels = np.concatenate([b["images"].numpy() for b in got])[:len(products)]
        assert not pixels[~(mask > 0)].any()  # padding and failures are zeros
    # The build's optional screen passes only what decodes.
    verdicts = screen.screen(damaged)
    assert verdicts[0] is not None and verdicts[0].kind == "undecodable"
    assert all(_decodes(d) for d, v in zip(damaged, verdicts) if v is None)


def test_garbled_images_in_a_built_dataset_are_masked_and_counted(tmp_path, monkeypatch):
    """The default build keeps images whose scan data is garbage (headers checked only):
    training counts them per epoch (``undecodable_images``, weight 0), validation
    too, and predict from the built split counts and lists them; nothing stops."""
    import math
    from conftest import garbled_jpeg, read_split, train_config, write, write_taxonomy
    monkeypatch.setenv("TFCDISC_BUILD_WORKERS", "1")
    pics = lambda *b: [{"picture": x} for x in b]  # noqa: E731
    cats = (1000000100, 1000000200)
    bad = [garbled_jpeg(seed=i) for i in range(6)]
    train = [doc(i, cid=cats[i % 2], imgs=pics(jpeg_bytes(seed=i), *bad[i:i + 1] if i < 3
                                                else ())) for i in range(30)]
    train.append(doc(30, cid=cats[0], imgs=pics(bad[3])))  # only a garbled image
    test = [doc(100 + i, cid=None, imgs=pics(*(bad[4 + i:5 + i] if i < 2 else ()),
                                              jpeg_bytes(seed=50 + i))) for i in range(6)]
    write(tmp_path, *train, name="train.bson")
    write(tmp_path, *test, name="test.bson")
    write_taxonomy(tmp_path, cats)
    builder = build_dataset(tmp_path, tmp_path / "data", validation_size=4)
    garbled_in = {split: sum(j in bad for ex in read_split(builder, split).values()
                             for j in ex["images"]) for split in ("train", "validation")}
    assert sum(garbled_in.values()) == 4  # all kept by the headers-only build
    images = metadata.read(builder).images["train"]
    cfg = train_config(builder, tmp_path / "run", global_batch_size=8,
                       steps_per_epoch=math.ceil(images / 8), shuffle_buffer=1024)
    result = training.train(cfg)  # each image drawn once before any twice
    assert result.history["undecodable_images"][0] >= garbled_in["train"] > 0
    assert math.isfinite(result.history["loss"][0])
    assert result.validation["undecodable_images"] == garbled_in["validation"]
    row, = csv.DictReader(open(tmp_path / "run" / "history.csv"))
    assert float(row["undecodable_images"]) >= garbled_in["train"]
    exporting.export(str(tmp_path / "run"), str(tmp_path / "export"))
    stats = inference.predict(str(tmp_path / "export"), str(tmp_path / "sub.csv"),
                              data_dir=str(tmp_path / "data"), split="test", progress=False)
    assert stats.products == 6 and stats.corrupt_images == 2
    assert sorted(s[0] for s in stats.skipped_images) == [100, 101]
    assert len(open(tmp_path / "sub.csv").read().splitlines()) == 7


# --------------------------------------------------------------------------- resume


def test_a_kill_inside_validation_loses_no_history_row_and_no_best_model(dataset, tmp_path):
    """Killed while validating epoch 2 (the mid-epoch backup at its last step used to be
    taken as a finished epoch, so its row never came); the epochs after the resume score
    worse than epoch 1, so best.keras must stay epoch 1's model."""
    cfg = train_config(dataset, tmp_path, epochs=4, steps_per_epoch=4,
                  backup_every_steps=2)
    scores = {"TEST_VAL_SCORES": "0.5,0.9,0.2,0.3"}
    killed = run_training(cfg, env={**scores, "TEST_KILL_IN_VALIDATION": "2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    best = _digest(tmp_path / "checkpoints" / "best.keras")
    state = json.load(open(tmp_path / "backup" / "state.json"))
    assert (state["epoch"], state["step"], state["best"]) == (2, 2, 0.9)
    resumed = run_training(cfg, env=scores)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert last_json(resumed.stdout)["resumed"] == {"epoch": 2, "step": 2}
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]
    assert [float(r["val_product_accuracy"]) for r in rows] == [0.5, 0.9, 0.2, 0.3]
    assert _digest(tmp_path / "checkpoints" / "best.keras") == best


# --------------------------------------------------------------------------- model dirs


def test_a_model_dir_of_another_run_is_refused_untouched_unless_overwrite(dataset, tmp_path):
    training.train(train_config(dataset, tmp_path))
    before = {name: _digest(tmp_path / name) for name in
              ("config.json", "flags.txt", "history.csv", "checkpoints/best.keras")
              if (tmp_path / name).exists()}
    for other, named in ((dict(learning_rate=0.01), "--learning_rate=0.01 (the run has 0.004)"),
                         (dict(image_size=48), "--image_size=48 (the run has 32)")):
        with pytest.raises(ValueError, match="--overwrite") as e:
            training.train(train_config(dataset, tmp_path, **other))
        assert named in str(e.value)
    with pytest.raises(ValueError, match="epochs"):  # invalid flags: nothing written either
        training.train(train_config(dataset, tmp_path, epochs=0, overwrite=True))
    with pytest.raises(ValueError):  # a model that cannot be built, with --overwrite
        training.train(train_config(dataset, tmp_path, backbone="xception",
                               overwrite=True))
    assert {name: _digest(tmp_path / name) for name in before} == before
    result = training.train(train_config(dataset, tmp_path, image_size=48, epochs=1,
                                    overwrite=True))
    assert result.resumed is None
    again = training.train(train_config(dataset, tmp_path, image_size=48, epochs=1,
                                   overwrite=True))
    assert again.resumed == {"epoch": 1, "step": 0}  # the same run is never deleted
    assert json.load(open(tmp_path / "config.json"))["train"]["image_size"] == 48
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["epoch"] for r in rows] == ["0"]


def test_a_rerun_with_operational_changes_resumes(dataset, tmp_path):
    training.train(train_config(dataset, tmp_path))
    again = training.train(train_config(dataset, tmp_path, log_every_steps=7,
                                   eval_batch_size=4))
    assert again.resumed == {"epoch": 1, "step": 0} and not again.history


# --------------------------------------------------------------------------- catalogues


def _catalogue(folder, categories, per_category, seed=0):
    folder.mkdir(parents=True)
    docs, pid = [], 0
    for k in range(per_category):
        for c in categories:
            pid += 1
            docs.append(doc(pid, cid=c, imgs=[{"picture": jpeg_bytes(seed=pid)}]))
    (folder / "train.bson").write_bytes(b"".join(docs))
    (folder / "test.bson").write_bytes(b"".join(
        doc(10_000 + i, cid=None, imgs=[{"picture": jpeg_bytes(seed=i)}]) for i in range(4)))
    write_taxonomy(folder, categories)
    return folder


def test_a_catalogue_of_three_categories_trains_and_scores_top3(tmp_path):
    folder = _catalogue(tmp_path / "k", [1000000100, 1000000200, 1000000300], 12)
    builder = build_dataset(folder, tmp_path / "data")
    result = training.train(train_config(builder, tmp_path / "run", eval_batch_size=4))
    assert result.validation["products"] == builder.info.splits["validation"].num_examples
    assert result.validation["top5_accuracy"] == 1.0  # every category is in the top 3


def test_one_product_per_category_is_refused_before_anything_is_written(tmp_path):
    folder = _catalogue(tmp_path / "k", [1000000100 + i for i in range(6)], 1)
    builder = build_dataset(folder, tmp_path / "data")
    with pytest.raises(ValueError, match="validation split is empty"):
        training.train(train_config(builder, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- files


def test_a_truncated_index_is_rebuilt(catalogue, tmp_path):
    path = tmp_path / "train.bson"
    path.write_bytes((catalogue[0] / "train.bson").read_bytes())
    first = index_lib.load_or_build(str(path))
    stored = first.stored_at
    data = open(stored, "rb").read()
    open(stored, "wb").write(data[: len(data) // 2])
    again = index_lib.load_or_build(str(path))
    assert again.product_ids.tolist() == first.product_ids.tolist()


def test_a_stale_index_is_named_with_the_fix(tmp_path):
    """An in-place edit that keeps size, times and the head and tail of the file cannot
    be seen by the index's fingerprint; the build finds it and says to delete the index."""
    categories = [1000000100, 1000000200]
    folder = _catalogue(tmp_path / "k", categories, 6)
    path = folder / "train.bson"
    index = index_lib.load_or_build(str(path))
    raw = bytearray(path.read_bytes())
    stat = os.stat(path)
    at = int(index.offsets[5])
    pos = raw.index(b"category_id\x00", at) + len(b"category_id\x00")
    raw[pos:pos + 4] = (1000000300).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(bsonfile.BsonFormatError, match="delete the index file") as e:
        list(index.iter_products())
    assert e.value.offset == at and "changed since its index was built" in str(e.value)


# --------------------------------------------------------------------------- predict skip


def test_predict_skips_unreadable_documents_only_when_told(exported, tmp_path):
    good = jpeg_bytes(seed=1)
    docs = [doc(i, cid=None, imgs=[{"picture": good}]) for i in range(1, 11)]
    broken = bytearray(docs[4])
    broken[0:4] = (len(broken) + 7).to_bytes(4, "little")  # a corrupt length prefix
    path = write(tmp_path, *docs[:4], bytes(broken), *docs[5:], name="test.bson")
    out = tmp_path / "submission.csv"
    with pytest.raises(bsonfile.BsonFormatError, match="byte offset"):
        inference.predict(str(exported[1]), str(out), bson=path, progress=False)
    with pytest.raises(inference.MissingProductsError, match="--allow_missing"):
        inference.predict(str(exported[1]), str(out), bson=path, progress=False,
                          errors="skip")
    assert not out.exists()
    stats = inference.predict(str(exported[1]), str(out), bson=path, progress=False,
                              errors="skip", allow_missing=True)
    assert pd.read_csv(out)["_id"].tolist() == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert stats.products_lost and stats.lost[0][0] == sum(map(len, docs[:4]))
    assert stats.skipped_bytes == len(broken)


def test_the_build_skips_unreadable_documents_when_configured(tmp_path):
    folder = _catalogue(tmp_path / "k", [1000000100, 1000000200], 6)
    raw = bytearray((folder / "train.bson").read_bytes())
    index = index_lib.build(str(folder / "train.bson"))
    at = int(index.offsets[3])
    raw[at + 4] = 0x55  # an element type that does not exist: the document cannot decode
    (folder / "train.bson").write_bytes(bytes(raw))
    with pytest.raises(bsonfile.BsonFormatError, match="invalid BSON"):
        build_dataset(folder, tmp_path / "strict")
    builder = build_dataset(folder, tmp_path / "data", bad_documents="skip")
    splits = builder.info.splits
    assert splits["train"].num_examples + splits["validation"].num_examples == 11
    lost = metadata.read(builder).build_stats["unreadable"][str(folder / "train.bson")]
    assert lost["skipped_bytes"] == int(index.lengths[3]) and lost["lost"][0][0] == at


# --------------------------------------------------------------------------- commands


def _run(args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=300, env=env, **kw)


def _mistakes(catalogue, exported, tmp):
    """(name, argv, words the one line must contain)."""
    folder, _ = catalogue
    saved = str(exported[1])
    test_bson = str(folder / "test.bson")
    labels = {"empty": "", "header_only": "_id,category_id\n",
              "missing_ids": "_id,category_id\n1,1000000100\n",
              "blank_id": "_id,category_id\n,1000000100\n",
              "category_not_integer": "_id,category_id\n1,shoes\n"}
    for name, text in labels.items():
        (tmp / f"{name}.csv").write_text(text)
    (tmp / "folder").mkdir()
    predict = ["-m", "tfcdisc.predict", f"--saved_model={saved}"]
    evaluate = ["-m", "tfcdisc.evaluate", f"--saved_model={saved}", f"--bson={test_bson}"]
    return [
        ("bson_missing", predict + ["--bson=/no/such/test.bson"], "no such file"),
        ("bson_is_a_folder", predict + [f"--bson={folder}"], "is a folder"),
        ("output_in_a_missing_folder", predict + [f"--bson={test_bson}",
                                                  f"--output={tmp}/nope/sub.csv"],
         "does not exist"),
        ("output_onto_a_folder", predict + [f"--bson={test_bson}", f"--output={tmp}/folder"],
         "is a folder"),
        ("not_an_export", ["-m", "tfcdisc.predict", f"--saved_model={tmp}/folder",
                           f"--bson={test_bson}"], "not a tfcdisc export"),
        ("model_dir_missing", ["-m", "tfcdisc.export", "--model_dir=/no/such/run",
                               f"--export_dir={tmp}/e"], "not a training run"),
        ("labels_empty", evaluate + [f"--labels={tmp}/empty.csv"], "empty file"),
        ("labels_header_only", evaluate + [f"--labels={tmp}/header_only.csv"], "no rows"),
        ("labels_missing_ids", evaluate + [f"--labels={tmp}/missing_ids.csv"],
         "no label for product _id"),
        ("labels_blank_id", evaluate + [f"--labels={tmp}/blank_id.csv"],
         "line 2: _id '' is not an integer"),
        ("labels_category_not_integer", evaluate + [f"--labels={tmp}/category_not_integer.csv"],
         "line 2: category_id 'shoes' is not an integer"),
        ("labels_missing_file", evaluate + [f"--labels={tmp}/nope.csv"], "no such file"),
        ("evaluate_unlabelled_without_labels", evaluate, "give --labels"),
        ("inspect_missing", ["-m", "tfcdisc.inspect", "--bson=/no/such.bson"], "no such file"),
        ("ensemble_of_one", ["-m", "tfcdisc.ensemble", f"--saved_model={saved}",
                             f"--export_dir={tmp}/e"], "at least two"),
        ("global_batch_size_zero", ["-m", "tfcdisc.train", f"--data_dir={tmp}",
                                    f"--model_dir={tmp}/r", "--global_batch_size=0"],
         "global_batch_size"),
        ("epochs_zero", ["-m", "tfcdisc.train", f"--data_dir={tmp}", f"--model_dir={tmp}/r",
                         "--epochs=0"], "epochs"),
        ("unknown_strategy", predict + [f"--bson={test_bson}", "--strategy=gpu"], "strategy"),
        ("train_data_dir_missing", ["-m", "tfcdisc.train", f"--data_dir={tmp}/nodata",
                                    f"--model_dir={tmp}/r"], "no prepared cdiscount dataset"),
    ]


# Refused before TensorFlow starts (in a fraction of a second): run where it cannot import.
_BEFORE_TENSORFLOW = {"bson_missing", "bson_is_a_folder", "output_in_a_missing_folder",
                      "output_onto_a_folder", "not_an_export", "labels_empty",
                      "labels_header_only", "labels_blank_id", "labels_category_not_integer",
                      "labels_missing_file", "inspect_missing", "ensemble_of_one",
                      "global_batch_size_zero", "epochs_zero", "unknown_strategy"}
_WITHOUT_TENSORFLOW = ("import runpy, sys; sys.modules['tensorflow'] = sys.modules['jax'] = "
                       "None; module = sys.argv.pop(1); "
                       "runpy.run_module(module, run_name='__main__', alter_sys=True)")


def test_ordinary_mistakes_get_one_line_and_exit_2(catalogue, exported, tmp_path):
    cases = _mistakes(catalogue, exported, tmp_path)
    assert _BEFORE_TENSORFLOW <= {name for name, _, _ in cases}
    failures = []
    for name, argv, words in cases:
        if name in _BEFORE_TENSORFLOW:
            assert argv[0] == "-m"
            argv = ["-c", _WITHOUT_TENSORFLOW, *argv[1:]]
        done = _run(argv)
        lines = done.stderr.strip().splitlines()
        ok = (done.returncode == 2 and "Traceback" not in done.stderr and len(lines) == 1
              and words in lines[-1])
        if not ok:
            failures.append(f"{name}: exit {done.returncode}: {done.stderr[-600:]}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "r").exists()  # refused flags wrote no model dir


def test_a_pipe_as_bson_is_refused_not_waited_on(exported, catalogue, tmp_path):
    fifo = tmp_path / "named.pipe"
    os.mkfifo(fifo)
    read_end, write_end = os.pipe()  # what `<(cat test.bson)` hands over: /dev/fd/N
    try:
        for path, fds in ((str(fifo), ()), (f"/dev/fd/{read_end}", (read_end,))):
            done = _run(["-m", "tfcdisc.predict", f"--saved_model={exported[1]}",
                         f"--bson={path}", f"--output={tmp_path}/s.csv"], pass_fds=fds)
            assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr
    finally:
        os.close(read_end)
        os.close(write_end)


def test_tfds_build_names_an_empty_category_file(catalogue, tmp_path):
    folder = tmp_path / "k"
    folder.mkdir()
    for name in ("train.bson", "test.bson"):
        (folder / name).write_bytes((catalogue[0] / name).read_bytes())
    (folder / "category_names.csv").write_text("")
    done = _run(["-c", "import sys; from tensorflow_datasets.scripts.cli.main import "
                 "launch_cli; sys.argv[0] = 'tfds'; launch_cli()", "build",
                 str(REPO / "tfds_builder" / "cdiscount"), f"--manual_dir={folder}",
                 f"--data_dir={tmp_path}/data"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "category_names.csv: empty file" in last and last.startswith("tfds build")


def test_without_tensorflow_a_command_names_the_extra_to_install():
    # A file that exists: its path passes the checks made before TensorFlow is needed.
    done = _run(["-c", "import sys; sys.modules['tensorflow'] = None\n"
                 f"sys.argv = ['tfcdisc-inspect', '--bson={REPO / 'pyproject.toml'}']\n"
                 "from tfcdisc import inspect; inspect.run()"])
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "pip install 'tfcdisc[cpu]'" in done.stderr.strip().splitlines()[-1]


def test_the_base_install_runs_a_local_tfds_build():
    """`tfds build` (tensorflow-datasets 4.9.10's command) imports Apache Beam even for a
    local build, so Beam is a base dependency, not only the `beam` extra."""
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert any(re.match(r"apache-beam\b", d) for d in project["dependencies"])
    done = _run(["-c", "import sys; sys.modules['apache_beam'] = None\n"
                 "from tensorflow_datasets.scripts.cli import main"])
    assert done.returncode != 0 and "apache_beam" in done.stderr  # why it must be there


def test_a_data_dir_holding_two_builds_is_never_resolved_silently(tmp_path):
    """The README's own flow (a default build, then `--config val...` into the same data
    dir) used to train on whichever config sorted last."""
    from conftest import train_config
    from tfcdisc.learn import input_pipeline
    from tfcdisc.catalogue import synth
    synth.generate(str(tmp_path / "k"), 80, 10, num_categories=4, seed=3, workers=1)
    data = tmp_path / "data"
    build_dataset(tmp_path / "k", data)
    only = input_pipeline.load_builder(str(data))  # one config: no name needed
    assert only.data_dir.endswith("/cdiscount/default/1.0.0")
    build_dataset(tmp_path / "k", data, validation_size=20)  # config "test"
    with pytest.raises(ValueError, match=r"2 builds of the dataset \(configs default, test\)"
                                         r"; name one with --dataset_config=NAME"):
        input_pipeline.load_builder(str(data))
    work = data / "downloads" / "cdiscount_work"  # each config plans in its own folder
    assert sorted(p.name for p in work.iterdir()) == ["default", "test"]
    chosen = input_pipeline.load_builder(str(data), "test")
    assert chosen.info.splits["validation"].num_examples == 20
    assert input_pipeline.load_builder(str(data), "default").info.splits[
        "validation"].num_examples != 20
    with pytest.raises(FileNotFoundError, match="no build of config 'val100k'"):
        input_pipeline.load_builder(str(data), "val100k")
    with pytest.raises(ValueError, match="--dataset_config=NAME"):
        training.train(train_config(only, tmp_path / "refused", data_dir=str(data)))
    assert not (tmp_path / "refused").exists()  # refused before anything was written
    result = training.train(train_config(only, tmp_path / "run", data_dir=str(data),
                                         dataset_config="test", steps_per_epoch=1))
    assert result.validation["products"] == 20
    assert json.load(open(tmp_path / "run" / "config.json"))["train"]["dataset_config"] == "test"


def test_a_reexport_that_fails_leaves_the_old_export_whole(exported, tmp_path, monkeypatch):
    """A kill or a full disk mid re-export used to leave the new saved_model.pb beside the
    old Keras model and metadata, which predict then used."""
    from tfcdisc.catalogue import atomic
    from tfcdisc.serve import export_format
    run, _ = exported
    out = tmp_path / "export"
    exporting.export(str(run), str(out), top_k=5)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_write = atomic.write

    def full_disk(path, data):  # the last file of the export
        if path.endswith(export_format.METADATA):
            raise OSError(28, "No space left on device", path)
        real_write(path, data)

    monkeypatch.setattr(atomic, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        exporting.export(str(run), str(out), top_k=3, tta="flip")
    monkeypatch.setattr(atomic, "write", real_write)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # byte for byte the old export
    assert export_format.load(str(out)).top_k == 5
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # nothing left beside it
    # What a SIGKILL leaves (a sibling of a dead process) goes with the next export.
    (tmp_path / "export.incomplete-999999999").mkdir()
    exporting.export(str(run), str(out), top_k=3)
    assert export_format.load(str(out)).top_k == 3
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_an_export_into_a_folder_that_is_not_an_export_is_refused(exported, tmp_path):
    run, _ = exported
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(ValueError, match="holds files and is not a tfcdisc export"):
        exporting.export(str(run), str(folder))
    assert [p.name for p in folder.iterdir()] == ["holiday.jpg"]
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]


def test_inputs_that_used_to_be_wrong_without_an_error_are_named(tmp_path):
    """A flagfile line without dashes, a negative category id, a compressed file given as
    BSON: each was silently ignored or misreported."""
    import gzip
    import zipfile
    from tfcdisc import settings
    flagfile = tmp_path / "run.cfg"
    flagfile.write_text("# comment\n--epochs=2\n\nimage_size=48\n")
    with pytest.raises(ValueError, match=r"run.cfg:4: 'image_size=48' is not a flag .*"
                                         r"--image_size=48"):
        settings.parse(settings.TrainConfig, [f"--flagfile={flagfile}", "--data_dir=d",
                                              "--model_dir=m"])
    done = subprocess.run([sys.executable, "-m", "tfcdisc.train", f"--flagfile={flagfile}",
                           "--data_dir=d", "--model_dir=m"], capture_output=True, text=True)
    assert done.returncode == 2 and "run.cfg:4: 'image_size=48' is not a flag" in done.stderr
    path = write(tmp_path, doc(1), doc(2, cid=-1), doc(3))
    with pytest.raises(bsonfile.BsonFormatError, match=r"byte offset \d+ \(document #1, "
                                                       r"_id 2\).*'category_id' -1 is not a "
                                                       r"valid category id"):
        index_lib.build(path)
    raw = open(path, "rb").read()
    (tmp_path / "train.bson.gz").write_bytes(gzip.compress(raw))
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as z:
        z.writestr("train.bson", raw)
    for name, kind, fix in (("train.bson.gz", "gzip", "gunzip"), ("train.zip", "zip", "unzip")):
        for errors in ("strict", "skip"):  # never "resynchronised" through a whole archive
            with pytest.raises(bsonfile.BsonFormatError,
                               match=f"byte offset 0 .*this is a {kind} file, not BSON.*{fix}"):
                index_lib.build(str(tmp_path / name), errors=errors)


def test_ensemble_weights_must_be_finite_and_positive(exported, tmp_path):
    _, export = exported
    for weights in ([1, float("nan")], [1, float("inf")], [1e308, 1e308], [1, 0], [1, -1]):
        with pytest.raises(ValueError, match="finite positive numbers"):
            exporting.ensemble([str(export), str(export)], str(tmp_path / "e"), weights)
    assert not (tmp_path / "e").exists()


def test_a_folder_has_one_writer_at_a_time(dataset, exported, tmp_path):
    """Two trainings into one model dir both exited 0 with a history.csv of two headers;
    two exports, two fusion heads interleaved the same way. A second writer is refused at
    once, naming the holder; a dead writer's lock is taken over."""
    import os
    import socket
    from conftest import train_config
    from tfcdisc.catalogue import folder_lock
    from tfcdisc.learn import fusion
    run, _ = exported
    cfg = train_config(dataset, tmp_path / "run", steps_per_epoch=1)
    lock = tmp_path / "run" / rundir.LOCK_FILE
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE)  # a live process of this host
    try:
        lock.parent.mkdir()
        lock.write_text(json.dumps({"what": "tfcdisc.train", "host": socket.gethostname(),
                                    "pid": holder.pid, "since": "now"}))
        with pytest.raises(folder_lock.FolderBusyError,
                           match=f"run is being written by tfcdisc.train \\(host "
                                 f"{re.escape(socket.gethostname())}, pid {holder.pid}"):
            training.train(cfg)
        assert [p.name for p in lock.parent.iterdir()] == [lock.name]  # nothing written
        export_lock = tmp_path / "export.tfcdisc-writer.lock"
        export_lock.write_text(lock.read_text())
        with pytest.raises(folder_lock.FolderBusyError, match="export is being written"):
            exporting.export(str(run), str(tmp_path / "export"))
        (tmp_path / "fusion").mkdir()
        (tmp_path / "fusion" / rundir.LOCK_FILE).write_text(lock.read_text())
        with pytest.raises(folder_lock.FolderBusyError, match="fusion is being written"):
            fusion.train(str(run), str(tmp_path / "fusion"))
    finally:
        holder.communicate(b"")
    # The holder is gone now: its lock is taken over, and released at the end.
    result = training.train(cfg)
    assert result.validation["products"] > 0 and not lock.exists()
    with folder_lock.hold(str(lock), "test") as _:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_history_keeps_one_row_per_epoch_whatever_the_file_holds(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss\n0,2.0\nepoch,loss\n0,1.9\n1,1.5\n1,1.4\n2,1.0\n")
    rundir.keep_history_before(str(path), 2)  # what a resumed run at epoch 2 keeps
    assert path.read_text() == "epoch,loss\n0,1.9\n1,1.4\n"


def test_image_counts_fit_any_document_and_a_forged_index_is_rebuilt(tmp_path, caplog):
    """40,000 images overflowed the index's int16 counts; an index whose documents do not
    cover the file (one product left out) gave 59 rows for 60 products, exit 0."""
    import numpy as np
    from tfcdisc.catalogue import atomic
    many = bson.encode({"_id": 1, "imgs": [{"picture": b"\xff\xd8%d\xff\xd9" % i}
                                           for i in range(40_000)], "category_id": 7})
    path = write(tmp_path, many, doc(2), doc(3), doc(4))
    built = index_lib.load_or_build(path)
    assert built.num_images.tolist() == [40_000, 1, 1, 1]
    data = atomic.read_arrays(built.stored_at)
    meta = data.pop("meta")
    keep = np.array([0, 2, 3])  # product 2 forged away
    atomic.write_arrays(built.stored_at, meta, **{k: v[keep] for k, v in data.items()})
    import logging
    with caplog.at_level(logging.WARNING):
        again = index_lib.load_or_build(path)
    assert again.product_ids.tolist() == [1, 2, 3, 4]  # rebuilt, not trusted
    assert "cover" in caplog.text and "rebuilding" in caplog.text


def test_a_fusion_cache_made_from_another_run_is_not_reused(exported, tmp_path):
    from tfcdisc.learn import fusion
    run, _ = exported
    folder = tmp_path / "fusion"
    fusion.train(str(run), str(folder), epochs=1)
    key_path = folder / "features" / fusion.CACHE_KEY
    key = json.loads(key_path.read_text())
    assert key["model_dir"] == str(run) and len(key["checkpoint_sha256"]) == 64
    stamp = (folder / "features" / "validation.tfrecord").stat().st_mtime_ns
    fusion.train(str(run), str(folder), epochs=1)  # the same run: the cache is reused
    assert (folder / "features" / "validation.tfrecord").stat().st_mtime_ns == stamp
    key_path.write_text(json.dumps({**key, "checkpoint_sha256": "0" * 64}))  # another run's
    fusion.train(str(run), str(folder), epochs=1)
    assert (folder / "features" / "validation.tfrecord").stat().st_mtime_ns != stamp
    assert json.loads(key_path.read_text()) == key


def test_labels_of_categories_the_export_does_not_know_are_named(exported, catalogue,
                                                                   tmp_path, caplog):
    """They gave accuracy 0.0, exit 0, no warning."""
    import logging
    from tfcdisc.serve import scoring
    folder, _ = catalogue
    _, export = exported
    labels = pd.read_csv(folder / "test_labels.csv")
    labels.loc[: 9, "category_id"] = 999  # ten products of a category no one knows
    labels.to_csv(tmp_path / "labels.csv", index=False)
    with caplog.at_level(logging.WARNING):
        report = scoring.evaluate(str(export), bson=str(folder / "test.bson"),
                                  labels=str(tmp_path / "labels.csv"), progress=False)
    assert report["products_with_unknown_categories"] == 10
    assert "10 of 60 products are labelled with 1 categories the export does not know" \
        in caplog.text
    with pytest.raises(ValueError, match="categories the export does not know.*--strict"):
        scoring.evaluate(str(export), bson=str(folder / "test.bson"),
                         labels=str(tmp_path / "labels.csv"), progress=False, strict=True)


def test_a_product_with_more_images_than_slots_uses_its_first_usable_ones(tmp_path):
    """50 images, the first 4 corrupt: the product got the fallback, and 46 images were
    neither read nor counted."""
    from conftest import garbled_jpeg
    images = [garbled_jpeg(seed=i) for i in range(4)] + [jpeg_bytes(seed=i) for i in range(46)]
    first = bsonfile.Product(1, 7, images, 0)
    stats = inference.PredictStats()
    (batch,) = list(inference.screened(iter([first]), stats))
    (product, slots), = batch
    assert slots == images[4:8]  # the first four usable ones
    assert (stats.corrupt_images, stats.images, stats.extra_images) == (4, 4, 42)
    assert [s[1] for s in stats.skipped_images] == [0, 1, 2, 3]


@pytest.mark.parametrize("full_at", ["last.keras", "epoch2-step0.weights.h5"])
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(dataset, tmp_path,
                                                                      monkeypatch, full_at):
    """A full disk while writing last.keras left it truncated (and a raw OSError); while
    writing the epoch's backup, a segfault inside HDF5, and the rerun wrote epochs 0 0 1.
    The disk fills up during epoch 1's write of ``full_at``."""
    import keras
    from conftest import train_config
    from tfcdisc.catalogue import atomic
    cfg = train_config(dataset, tmp_path, epochs=2, steps_per_epoch=2)
    real_copy, copies = atomic.copy, []

    def full_at_epoch_1(local, path):
        copies.append(path)
        if path.endswith(full_at) and sum(p.endswith("last.keras") for p in copies) == 2:
            with atomic.writing(path) as f:  # the disk fills up half-way through
                f.write(open(local, "rb").read(1000))
                raise OSError(28, "No space left on device", path)
        real_copy(local, path)

    monkeypatch.setattr(atomic, "copy", full_at_epoch_1)
    with pytest.raises(OSError, match="No space left"):
        training.train(cfg)
    monkeypatch.setattr(atomic, "copy", real_copy)
    last = tmp_path / "checkpoints" / "last.keras"
    keras.saving.load_model(str(last), compile=False)  # whole
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.keras", "last.keras"]
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == [
        "epoch1-step0.weights.h5", "state.json"]  # the half-written one is gone
    state = json.load(open(tmp_path / "backup" / "state.json"))
    assert (state["epoch"], state["step"]) == (1, 0)  # epoch 1 is redone
    resumed = training.train(cfg)
    assert resumed.resumed == {"epoch": 1, "step": 0}
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    keras.saving.load_model(str(last), compile=False)


def test_a_damaged_export_is_named_by_every_loader(exported, catalogue, tmp_path):
    """A truncated image_model.keras gave "File not found: /tmp/tmp…/m.keras", a damaged
    tfcdisc.json "Expecting ',' delimiter", a deleted variables/ folder a local predict that
    worked and a Beam predict that failed: now each loader names the export and the file."""
    import shutil
    from tfcdisc.serve import export_format
    _, export = exported
    recorded = export_format.read_metadata(str(export))["files"]
    assert "saved_model.pb" in recorded and export_format.KERAS_MODEL in recorded
    cases = {
        "truncated": (export_format.KERAS_MODEL, lambda p: p.write_bytes(p.read_bytes()[:1000]),
                      "assets/image_model.keras differs from what the export recorded"),
        "variables": ("variables", lambda p: shutil.rmtree(p),
                      "variables/variables.data-00000-of-00001 is missing"),
        "graph": ("saved_model.pb", lambda p: p.write_bytes(p.read_bytes() + b"\0"),
                  "saved_model.pb differs"),
        "metadata": (export_format.METADATA, lambda p: p.write_text(p.read_text()[:-10]),
                     "assets/tfcdisc.json is damaged"),
    }
    for name, (rel, damage, message) in cases.items():
        copy = tmp_path / name
        shutil.copytree(export, copy)
        damage(copy / rel)
        with pytest.raises(ValueError, match=re.escape(f"{copy}: {message}")):
            export_format.load(str(copy))
        done = subprocess.run([sys.executable, "-m", "tfcdisc.predict", f"--saved_model={copy}",
                               f"--bson={catalogue[0] / 'test.bson'}",
                               f"--output={tmp_path / 'sub.csv'}"],
                              capture_output=True, text=True) if name == "truncated" else None
        if done is not None:  # the command: one line, exit 2
            assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    export_format.verify(str(export))  # the original is whole


def test_an_output_that_cannot_be_written_is_refused_before_the_work(exported, catalogue,
                                                                    tmp_path, monkeypatch):
    """A read-only folder failed with a traceback after all the work; a full disk while
    writing the submission must leave the old one."""
    from tfcdisc.catalogue import atomic
    folder, _ = catalogue
    _, export = exported
    done = subprocess.run([sys.executable, "-m", "tfcdisc.predict", f"--saved_model={export}",
                           "--bson=/nonexistent/never-read.bson",
                           "--output=/sys/submission.csv"],  # sysfs: no new files, even root
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "--output=/sys/submission.csv: cannot write in /sys" in done.stderr
    output = tmp_path / "submission.csv"
    output.write_text("_id,category_id\nthe old one\n")

    def full_disk(local, path):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(atomic, "copy", full_disk)
    with pytest.raises(OSError, match="No space left"):
        inference.predict(str(export), str(output), bson=str(folder / "test.bson"),
                          progress=False)
    assert output.read_text() == "_id,category_id\nthe old one\n"


def test_a_read_only_folder_is_refused_in_one_line_before_the_work(catalogue, dataset,
                                                                   exported, tmp_path):
    """Read-only data, model, export and fusion dirs gave raw OSError or
    PermissionDeniedError tracebacks (after the work, for an export). /sys takes no new
    files, even from root."""
    from conftest import train_config
    from tfcdisc.catalogue import folder_lock
    from tfcdisc.learn import fusion
    folder, _ = catalogue
    run, _ = exported
    refused = "/sys/tfcdisc-{}: cannot write there"
    with pytest.raises(folder_lock.FolderNotWritableError, match=refused.format("data/cdiscount/default")):
        build_dataset(folder, "/sys/tfcdisc-data")
    with pytest.raises(folder_lock.FolderNotWritableError, match=refused.format("run")):
        training.train(train_config(dataset, "/sys/tfcdisc-run"))
    with pytest.raises(folder_lock.FolderNotWritableError, match=refused.format("export")):
        exporting.export(str(run), "/sys/tfcdisc-export")
    with pytest.raises(folder_lock.FolderNotWritableError, match=refused.format("fusion")):
        fusion.train(str(run), "/sys/tfcdisc-fusion")
    done = subprocess.run([sys.executable, "-m", "tfcdisc.ensemble",
                           f"--saved_model={exported[1]}", f"--saved_model={exported[1]}",
                           "--export_dir=/sys/tfcdisc-export"], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].endswith(
        "/sys/tfcdisc-export: cannot write there (Permission denied); give a folder this "
        "user can write, or fix its permissions or mount"), done.stderr[-2000:]


_LAUNCHER = """
import os, sys, time
from tfcdisc.prepare import shards
if __name__ == "__main__":
    pool = shards.worker_pool(2)
    busy = [pool.submit(time.sleep, 600) for _ in range(2)]  # as a shard write would be
    while len(pool._processes) < 2 or not all(f.running() for f in busy):
        time.sleep(0.01)
    print(*pool._processes, flush=True)
    time.sleep(600)
"""


def test_the_build_workers_die_with_a_killed_launcher(tmp_path):
    """A SIGKILL of `tfds build` orphaned its workers: they finished their shards and then
    blocked forever on a pipe (about 750 MB each). Waits on the workers' pidfds."""
    import select
    import signal
    script = tmp_path / "launcher.py"
    script.write_text(_LAUNCHER)
    launcher = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                                text=True, cwd=REPO)
    workers = [int(p) for p in launcher.stdout.readline().split()]
    assert len(workers) == 2
    fds = [os.pidfd_open(pid) for pid in workers]
    try:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        ended = set()
        while len(ended) < len(fds):
            ready, _, _ = select.select([f for f in fds if f not in ended], [], [], 60)
            assert ready, f"workers {workers} still run 60 s after their launcher's kill"
            ended.update(ready)
    finally:
        for fd in fds:
            os.close(fd)


def _crafted(export, out, io_op) -> None:
    """``export`` copied to ``out`` with its graph replaced by one whose serving signature
    runs ``io_op`` too, its checksums recomputed (as a hostile author would)."""
    import shutil
    import tensorflow as tf
    from tfcdisc.serve import export_format
    shutil.copytree(export, out)

    class Hostile(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.string, name="images")])
        def serve(self, images):
            io_op(str(out / "written-by-the-graph"))
            return {"category_id": tf.zeros([tf.shape(images)[0]], tf.int64)}

    module = Hostile()
    tf.saved_model.save(module, str(out / "graph"), signatures={"serving_default": module.serve})
    for name in ("saved_model.pb", "variables"):
        shutil.rmtree(out / name, ignore_errors=True)
        (out / name).unlink(missing_ok=True)
        shutil.move(out / "graph" / name, out / name)
    shutil.rmtree(out / "graph")
    meta = export_format.read_metadata(str(out))
    meta["files"] = export_format.checksums(str(out))
    (out / export_format.METADATA).write_text(json.dumps(meta))


def test_an_export_whose_graph_does_io_is_refused_by_every_loader(exported, catalogue,
                                                                 tmp_path):
    """Beam predict ran a crafted graph's tf.io.write_file, while local predict ran the
    .keras model: two sources of truth, one of them code. Every loader now checks the graph
    against the inference allow-list, and every path scores the same Keras model."""
    import tensorflow as tf
    from tfcdisc.serve import beam_predict, export_format
    _, export = exported
    for name, io_op in {
            "writes": lambda path: tf.io.write_file(path, "x"),
            "reads": lambda path: tf.io.read_file(path),
            "prints": lambda path: tf.print("x", output_stream=f"file://{path}")}.items():
        crafted = tmp_path / name
        _crafted(export, crafted, io_op)
        op = {"writes": "WriteFile", "reads": "ReadFile", "prints": "(StringFormat|PrintV2)"}[name]
        message = (re.escape(f"{crafted}: saved_model.pb is not an inference graph: its graph "
                             "runs ") + op)
        with pytest.raises(ValueError, match=message):
            export_format.load(str(crafted))
        with pytest.raises(ValueError, match=message):
            beam_predict.predict(str(crafted), str(tmp_path / "beam.csv"),
                                 bson=str(catalogue[0] / "test.bson"),
                                 beam_options=beam_predict.pipeline_options(
                                     "runner=DirectRunner"))
        assert not (crafted / "written-by-the-graph").exists()
    done = subprocess.run([sys.executable, "-m", "tfcdisc.predict", f"--saved_model={crafted}",
                           f"--bson={catalogue[0] / 'test.bson'}",
                           f"--output={tmp_path / 'sub.csv'}"], capture_output=True, text=True)
    assert done.returncode == 2 and re.search(message, done.stderr), done.stderr[-2000:]
    export_format.verify(str(export))  # the real export's graph passes


def test_a_shard_that_cannot_be_written_stops_the_build_in_one_line():
    """A full disk during the build ended in a raw RemoteTraceback of a worker's stack.
    /sys takes no new files (the same path as ENOSPC: the worker's write fails)."""
    from tfcdisc.prepare import shards
    spec = shards.ShardSpec("train", 0, "unused.bson", "unused.npz", "unused.csv",
                            shards.BuildOptions(), "unused.json", num_products=1)
    tasks = [(spec, f"/sys/tfcdisc-train.tfrecord-0000{k}-of-00002", None) for k in range(2)]
    for workers in (1, 2):
        with pytest.raises(shards.ShardWriteError) as failed:
            shards.write_shards(tasks, workers, progress=False)
        message = str(failed.value)
        assert message.startswith("writing /sys/tfcdisc-train.tfrecord-0000") and \
            "rerun the same command" in message and "\n" not in message, message
        assert failed.value.__cause__ is None and failed.value.__suppress_context__
