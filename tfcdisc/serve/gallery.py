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

import numpy as np

from tfcdisc.learn import input_pipeline
from tfcdisc.prepare import metadata
from tfcdisc.catalogue import taxonomy as taxonomy_lib

_CELL = 180  # pixels of one image in the picture


def _pixels(jpeg: bytes) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            return np.asarray(image.convert("RGB").resize((_CELL, _CELL)))
    except (OSError, ValueError):  # an unreadable image shows as grey, not as a failure
        return np.full((_CELL, _CELL, 3), 128, np.uint8)


_COLOURS = {True: "#1a7f37", False: "#cf222e", None: "black"}  # right, wrong, unknown


def figure(products: list[dict], columns: int = 4):
    """A matplotlib figure: one panel per product (``images``: JPEG bytes, ``title``;
    ``right``: True or False to colour the title green or red), its images large enough
    to see (1.6 inches each) and the title above them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = max(1, min(columns, len(products)))
    rows = max(1, -(-len(products) // columns))
    lines = max([len(p["title"].splitlines()) for p in products] or [1])
    fig, axes = plt.subplots(rows, columns, squeeze=False,
                             figsize=(6.6 * columns, (1.7 + 0.16 * lines) * rows))
    for ax in axes.flat:
        ax.axis("off")
    for ax, product in zip(axes.flat, products):
        images = [_pixels(j) for j in product["images"][:input_pipeline.MAX_IMAGES] if j]
        images += [np.full((_CELL, _CELL, 3), 255, np.uint8)] * (
            input_pipeline.MAX_IMAGES - len(images))
        ax.imshow(np.concatenate(images, axis=1))
        ax.set_title("\n".join(line for text in product["title"].splitlines()
                               for line in textwrap.wrap(text, 95)),
                     fontsize=8, loc="left", color=_COLOURS[product.get("right")])
    fig.tight_layout()
    return fig


def to_png(fig) -> bytes:
    """The figure as PNG bytes (and closed): shown the same in any notebook frontend."""
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
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
    taxonomy = metadata.read(builder, data_dir).taxonomy
    ds = input_pipeline.split_products(builder, split, category_ids=True).shuffle(
        4096, seed=seed).take(n)
    return [{"images": [bytes(j) for j in p["images"]],
             "title": f"{int(p['product_id'])}: {_names(taxonomy, int(p['category_id']))}"
             if p["category_id"] >= 0 else str(int(p["product_id"]))}
            for p in ds.as_numpy_iterator()]


def prediction_samples(scoring, n: int = 16, scan: int | None = None) -> list[dict]:
    """The first ``n`` products of an opened export's (`inference.open_scoring`), titled
    with their top 3 categories and probabilities, ``right`` where the truth is known.
    With ``scan``: the ``n`` most confident mistakes among the first ``scan`` products."""
    import tensorflow as tf
    chosen = list(itertools.islice(scoring.products().as_numpy_iterator(), scan or n))
    if not chosen:
        return []
    ds = lambda: tf.data.Dataset.from_tensor_slices(  # noqa: E731
        {k: np.stack([p[k] for p in chosen]) for k in ("images", "product_id", "category_id")})
    outs = list(scoring.predictions(min(len(chosen), 256), progress=False, products=ds,
                                    total=len(chosen)))
    out = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    order = range(len(chosen))
    if scan:
        wrong = [i for i in order if 0 <= out["label_category_id"][i] != out["category_id"][i]]
        order = sorted(wrong, key=lambda i: -out["probability"][i])
    return [_titled(chosen[i], out, i, scoring.export.taxonomy) for i in list(order)[:n]]


def _percent(p: float) -> str:
    return f"{100 * p:.1f}%" if p >= 0.001 else "<0.1%"


def _titled(product: dict, out: dict, i: int, taxonomy: taxonomy_lib.Taxonomy) -> dict:
    truth = int(out["label_category_id"][i])
    top = [f"{rank}. {_names(taxonomy, int(c))}  {_percent(float(p))}" for rank, (c, p) in
           enumerate(zip(out["top_k_category_id"][i][:3], out["top_k_probability"][i][:3]), 1)]
    right = None if truth < 0 else truth == int(out["category_id"][i])
    title = [f"{int(product['product_id'])}" + {True: ": right", False: ": WRONG",
                                                None: ""}[right], *top]
    if right is False:
        title.append(f"true: {_names(taxonomy, truth)}")
    return {"images": [bytes(j) for j in product["images"]], "title": "\n".join(title),
            "right": right}


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
