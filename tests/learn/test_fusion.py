"""The product-level fusion head: trained on a run's cached embeddings, exported with the
same signatures, runnable under XLA (TPU rules)."""

import subprocess
import sys

import numpy as np
import pandas as pd
import tensorflow as tf

from conftest import read_split, serve_without_tfcdisc, slots
from tfcdisc.catalogue import bsonfile
from tfcdisc.learn import fusion, input_pipeline, product_predictor
from tfcdisc.serve import inference, export_format
from tfcdisc.serve import exporting


def test_a_fusion_head_trains_exports_and_predicts(exported, dataset, catalogue, tmp_path):
    run, _ = exported
    head = tmp_path / "fusion"
    summary = fusion.train(str(run), str(head), epochs=3, batch_size=64)
    by_epoch = summary["validation_product_accuracy_by_epoch"]
    assert summary["embedding_dim"] > 0 and len(by_epoch) == 3
    # The best epoch is kept, and it learned something: better than chance.
    assert summary["validation_product_accuracy"] == max(by_epoch) > 1 / summary["classes"]
    cached = sum(1 for _ in tf.data.TFRecordDataset(str(head / "features" / "train.tfrecord")))
    assert cached == dataset.info.splits["train"].num_examples  # every product, once
    out = tmp_path / "export"
    # With flip TTA (the head reads the views' mean embedding): the SavedModel scores as
    # the head over that mean.
    flip = exporting.export(str(run), str(out), fusion_dir=str(head), tta="flip")
    assert flip["tta"] == "flip" and flip["fusion"]
    tta = export_format.load(str(out))
    pixels = np.random.default_rng(0).integers(0, 255, (2, 4, 32, 32, 3), dtype="uint8")
    outputs = product_predictor.image_outputs(tta.image_model, pixels)
    mask = np.ones((2, 4), "float32")
    served = tf.saved_model.load(str(out)).signatures["predict_decoded"](
        images=tf.constant(pixels), mask=tf.constant(mask))["category_id"].numpy()
    fused = tta.fusion_model({"embedding": outputs["embedding"],
                              "mask": tf.constant(mask)})["label"]
    names = dataset.info.features["label"].names
    assert served.tolist() == [int(names[c]) for c in np.argmax(fused, axis=-1)]
    # With the duplicate table too: blended with the head's product predictions.
    summary = exporting.export(str(run), str(out), fusion_dir=str(head),
                             duplicates_from=dataset.data_dir)
    export = export_format.load(str(out))
    assert export.fusion_model is not None and export.duplicate_table is not None
    # This catalogue has no recurring images, so validation chose a weight of 0 (off). At
    # weight 1 the table alone decides wherever a product's images are in it: every
    # training product must then get its own category, through the SavedModel alone and
    # through predict (the host-side lookup and the predictor's product-level blend).
    if export.duplicate_table.weight != 1.0:
        export.duplicate_table.weight = 1.0
        export_format.write(str(out), export.image_model, export.taxonomy,
                      image_size=export.image_size, top_k=export.top_k,
                      fallback_class=export.fallback_class,
                      duplicate_table=export.duplicate_table,
                      fusion_model=export.fusion_model)
        export = export_format.load(str(out))
    sub = tmp_path / "submission.csv"
    test = str(catalogue[0] / "test.bson")
    done = subprocess.run([sys.executable, "-m", "tfcdisc.predict", f"--saved_model={out}",
                           f"--bson={test}", f"--output={sub}"], capture_output=True,
                          text=True, timeout=300)  # a fresh process: the head's layers load
    assert done.returncode == 0, done.stderr[-3000:]
    rows = pd.read_csv(sub)
    # The same answers from the SavedModel alone, in a process that cannot import tfcdisc.
    products = list(bsonfile.iter_products(test))[:12]
    images = [slots(p.images) for p in products]
    got = serve_without_tfcdisc(out, images)
    assert got["category_id"] == rows["category_id"][:12].tolist()
    train = list(read_split(dataset, "train").values())[:12]
    names = dataset.info.features["label"].names
    truth = [int(names[ex["label"]]) for ex in train]
    got = serve_without_tfcdisc(out, [slots(ex["images"])
                                      for ex in train])
    assert got["category_id"] == truth
    sub_train = tmp_path / "train.csv"
    inference.predict(str(out), str(sub_train), data_dir=dataset.data_dir, split="train",
                      progress=False)
    by_id = dict(zip(*pd.read_csv(sub_train).to_numpy().T))
    assert [by_id[int(ex["product_id"])] for ex in train] == truth
    # The head is what scores the products (checked by hand), and under XLA (static
    # shapes, every slot through the model) it gives the same answers.
    batch = next(iter(input_pipeline.batch_products(
        inference.bson_products(test, inference.PredictStats()), 16, export.image_size, 60)))
    eager = product_predictor.ProductPredictor(export.image_model, 5, fusion=export.fusion_model)
    xla = product_predictor.ProductPredictor(export.image_model, 5, fusion=export.fusion_model,
                                        jit_compile=True)
    ds = tf.data.Dataset.from_tensors(batch)
    a, b = (p(ds)["top_k_classes"][:, 0] for p in (eager, xla))
    np.testing.assert_array_equal(a, b)
    outputs = product_predictor.image_outputs(export.image_model, batch["images"])
    logits = export.fusion_model({"embedding": outputs["embedding"], "mask": batch["mask"]})
    by_hand = np.argmax(logits["label"].numpy(), axis=-1)[batch["valid"].numpy() > 0]
    np.testing.assert_array_equal(a, by_hand)
