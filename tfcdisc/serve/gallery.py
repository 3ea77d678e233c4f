"""Pictures of products: their images in a row, titled with their category names.

`tfds.show_examples` refuses the dataset (a product's images are a Sequence), and a
category id means nothing to a person, so one function draws products from a built
split (with their true categories) or from a BSON file or split scored by an export
(with the predicted ones). The notebook and ``python -m tfcdisc.show`` both use it.
"""

from __future__ import annotations

import io
import itertools
import textwrap
from typing import Iterable

import numpy as np

from tfcdisc.learn import input_pipeline
from tfcdisc.catalogue import taxonomy as taxonomy_lib

_CELL = 180  # pixels of one image in the picture


def _pixels(jpeg: bytes) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            return np.asarray(image.convert("RGB").resize((_CELL, _CELL)))
    except (OSError, ValueError):  # an unreadable image shows as grey, not as a failure
        return np.full((_CELL, _CELL, 3), 128, np.uint8)


def figure(products: list[dict], columns: int = 4):
    """A matplotlib figure: one panel per product (``images``: JPEG bytes, ``title``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = max(1, -(-len(products) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, product in zip(axes.flat, products):
        images = [_pixels(j) for j in product["images"][:input_pipeline.MAX_IMAGES] if j]
        images += [np.full((_CELL, _CELL, 3), 255, np.uint8)] * (
            input_pipeline.MAX_IMAGES - len(images))
        ax.imshow(np.concatenate(images, axis=1))
        ax.set_title("\n".join(textwrap.wrap(product["title"], 60)[:3]), fontsize=7)
    fig.tight_layout()
    return fig


def to_png(fig) -> bytes:
    """The figure as PNG bytes (and closed): shown the same in any notebook frontend."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def save(fig, path: str) -> None:
    import tensorflow as tf
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(to_png(fig))


def _names(taxonomy: taxonomy_lib.Taxonomy, category_id: int) -> str:
    if category_id not in set(taxonomy.category_ids.tolist()):
        return str(category_id)
    return " > ".join(taxonomy.names(int(taxonomy.class_index(category_id))))


def split_samples(data_dir: str, split: str = "train", n: int = 16, seed: int = 0,
                  dataset_config: str | None = None) -> list[dict]:
    """``n`` products drawn at random from a built split, titled with their categories."""
    builder = input_pipeline.load_builder(data_dir, dataset_config)
    taxonomy = taxonomy_lib.Taxonomy.from_dict(builder.info.metadata["taxonomy"])
    ds = input_pipeline.split_products(builder, split, category_ids=True).shuffle(
        4096, seed=seed).take(n)
    return [{"images": [bytes(j) for j in p["images"]],
             "title": f"{int(p['product_id'])}: {_names(taxonomy, int(p['category_id']))}"
             if p["category_id"] >= 0 else str(int(p["product_id"]))}
            for p in ds.as_numpy_iterator()]


def prediction_samples(export, products: Iterable[dict], strategy=None, n: int = 16
                       ) -> list[dict]:
    """The first ``n`` of ``products`` (padded product dicts, e.g. from
    `inference.bson_products`), scored by an opened export, titled with the predicted
    category, its probability and, where known, the true one."""
    import tensorflow as tf
    from tfcdisc.serve import inference
    from tfcdisc.learn import product_eval
    chosen = list(itertools.islice(iter(products), n))
    stats = inference.PredictStats()
    ds = lambda: tf.data.Dataset.from_tensor_slices(  # noqa: E731
        {k: np.stack([p[k] for p in chosen]) for k in ("images", "product_id", "category_id")})
    out = next(inference.run_predictions(export, ds, len(chosen),
                                         strategy or product_eval.default_strategy(), stats,
                                         batch_size=max(len(chosen), 1), progress=False))
    samples = []
    for p, cid, prob, truth in zip(chosen, out["category_id"], out["probability"],
                                   out["label_category_id"]):
        title = f"{int(p['product_id'])}: {_names(export.taxonomy, int(cid))} ({prob:.2f})"
        if truth >= 0:
            title += f"\n{'right' if truth == cid else 'true: ' + _names(export.taxonomy, truth)}"
        samples.append({"images": [bytes(j) for j in p["images"]], "title": title})
    return samples


def history_figure(run_dir: str):
    """Learning curves from a run's ``history.csv`` (one row per finished epoch): the
    training loss, and the training and validation accuracies with the competition's
    product accuracy, each point labelled. Where TensorBoard cannot show (Kaggle), the
    notebook draws this; it reads the same numbers."""
    import csv
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow as tf
    with tf.io.gfile.GFile(f"{run_dir.rstrip('/')}/history.csv") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{run_dir}/history.csv has no finished epoch yet")
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 3.6))
    curves = ((loss_ax, "loss", "training loss"),
              (acc_ax, "label_accuracy", "training image accuracy"),
              (acc_ax, "accuracy", "training accuracy"),
              (acc_ax, "val_image_accuracy", "validation image accuracy"),
              (acc_ax, "val_product_accuracy", "validation product accuracy"))
    for ax, key, label in curves:
        if key not in rows[0] or not rows[0][key]:
            continue
        values = [float(r[key]) for r in rows]
        ax.plot(epochs, values, marker="o", label=label)
        for x, y in zip(epochs, values):
            ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 5),
                        ha="center", fontsize=7)
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
