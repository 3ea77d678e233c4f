"""Scores an export on labelled products: the report's numbers and its plot.

It runs the same prediction path as `tfcdisc.serve.inference` (and training's validation),
so its ``product_accuracy`` is exactly the submission's score against the labels.
"""

from __future__ import annotations

import collections
import logging
import json

import numpy as np
import pandas as pd
import tensorflow as tf

from tfcdisc.catalogue import labels as labels_lib
from tfcdisc.catalogue import taxonomy as taxonomy_lib
from tfcdisc import settings
from tfcdisc.serve import inference

_TOP = 20
MIN_SUPPORT = 5  # products a category needs to be ranked among the worst


_DEFAULT = settings.EvaluateSettings  # one default per setting (its flag's)


def evaluate(saved_model, *, bson: str | None = None, labels: str | None = None,
             data_dir: str | None = None, split: str = _DEFAULT.split,
             batch_size: int = _DEFAULT.batch_size, progress: bool = True,
             strategy=_DEFAULT.strategy, tpu: str | None = None,
             errors: str = _DEFAULT.errors, dataset_config: str | None = None,
             strict: bool = _DEFAULT.strict, label_map: dict[int, int] | None = None,
             thumbnails: bool = False) -> dict:
    """Predicts every product and compares with its category; returns the report dict.
    ``thumbnails``: also a picture of each most confused pair (`pair_thumbnails`), for
    `plot`.

    ``saved_model`` is an export folder or a `export_format.Export`; ``strategy`` as in
    `inference.predict`; ``label_map``: the ``labels`` file already read
    (`catalogue.labels.read`: the command reads it before TensorFlow starts).
    """
    if label_map is None and labels:
        label_map = labels_lib.read(labels)
    index = None
    if bson:  # what can be checked before predicting is checked before predicting
        from tfcdisc.catalogue import index as index_lib
        index = index_lib.load_or_build(bson, errors=errors)
        if label_map is None and not index.labeled:
            raise ValueError(f"{bson}: its products have no category_id; give --labels "
                             "(an _id,category_id CSV) for a test file")
        if label_map is not None:
            lacking = np.flatnonzero(~np.isin(index.product_ids, list(label_map)))
            if len(lacking):
                raise ValueError(f"{labels}: no label for product _id "
                                 f"{int(index.product_ids[lacking[0]])} of {bson} "
                                 f"({len(lacking)} products lack one)")
    opened = inference.open_scoring(
        saved_model, strategy=strategy, tpu=tpu, bson=bson, data_dir=data_dir, split=split,
        errors=errors, dataset_config=dataset_config, index=index, label_map=label_map)
    export, stats = opened.export, opened.stats
    cols = collections.defaultdict(list)
    for out in opened.predictions(batch_size, progress):
        for key in ("label_category_id", "top_k_category_id", "image_category_id",
                    "num_images", "product_id", "duplicate_hits"):
            cols[key].append(out[key])
    data = {k: np.concatenate(v) for k, v in cols.items()}
    truth = data["label_category_id"]
    if (truth == -2).any():
        raise ValueError(f"{labels}: no label for product _id "
                         f"{int(data['product_id'][truth == -2][0])}")
    if (truth < 0).any():
        raise ValueError(f"{bson or data_dir}: product _id "
                         f"{int(data['product_id'][truth < 0][0])} has no category; give "
                         "--labels for a test file")
    unknown = ~np.isin(truth, export.category_ids)
    if unknown.any():  # such products can only be scored wrong
        first = int(data["product_id"][unknown][0])
        message = (f"{int(unknown.sum())} of {len(truth)} products are labelled with "
                   f"{len(np.unique(truth[unknown]))} categories the export does not know "
                   f"(first: _id {first}, category {int(truth[unknown][0])}); are the labels "
                   "or the export of another catalogue?")
        if strict:
            raise ValueError(f"{labels or bson or data_dir}: {message} (--strict)")
        logging.warning("evaluate: %s", message)
    report = score(truth, data["top_k_category_id"], data["image_category_id"],
                   data["num_images"], export.taxonomy)
    report["products_with_unknown_categories"] = int(unknown.sum())
    if export.duplicate_table is not None:  # what the duplicate lookup touched
        touched = data["duplicate_hits"] > 0
        hit = data["top_k_category_id"][:, 0] == truth
        report["duplicates"] = {
            "weight": export.duplicate_table.weight,
            "products_touched": int(touched.sum()),
            "accuracy_on_touched": float(hit[touched].mean()) if touched.any() else None}
    report["input"] = {"saved_model": export.path, "source": bson or f"{data_dir}[{split}]",
                       "labels": labels, **stats.as_dict()}
    if thumbnails:
        report["_thumbnails"] = pair_thumbnails(opened.products, report["most_confused"],
                                                data["product_id"], truth,
                                                data["top_k_category_id"][:, 0])
    return report


PLOTTED_PAIRS = 6  # the most confused pairs `plot` draws with their pictures


def pair_thumbnails(products, pairs: list[dict], product_ids: np.ndarray,
                    truth: np.ndarray, predicted: np.ndarray) -> dict[tuple, tuple]:
    """``{(true, predicted): (mistake, example)}`` for the first `PLOTTED_PAIRS` pairs: the
    first image (JPEG bytes) of the first product of the true category taken for the other,
    and of the first product truly of the other category (None where the set has none).
    One more pass over the products, without the model, that stops at the last one needed
    (the first of each kind, so it stops early)."""
    wanted: dict[int, int] = {}  # position -> product id
    plan = {}
    for pair in pairs[:PLOTTED_PAIRS]:
        t, p = pair["true"], pair["predicted"]
        mistake = np.flatnonzero((truth == t) & (predicted == p))
        example = np.flatnonzero(truth == p)
        plan[(t, p)] = tuple(int(k[0]) if len(k) else None for k in (mistake, example))
        wanted.update({k: int(product_ids[k]) for k in plan[(t, p)] if k is not None})
    images: dict[int, bytes] = {}
    if wanted:
        last = max(wanted)
        for position, product in enumerate(products().as_numpy_iterator()):
            if position in wanted and int(product["product_id"]) == wanted[position]:
                images[position] = next((bytes(j) for j in product["images"] if j), None)
            if position >= last:
                break
    return {pair: tuple(images.get(k) if k is not None else None for k in where)
            for pair, where in plan.items()}


def score(truth: np.ndarray, top_k: np.ndarray, image_pred: np.ndarray,
          num_images: np.ndarray, taxonomy: taxonomy_lib.Taxonomy) -> dict:
    """The report's numbers from category ids (true [N], top-k [N, k], per image [N, 4])."""
    pred = top_k[:, 0]
    hit = pred == truth
    valid_images = image_pred >= 0
    known = np.isin(truth, taxonomy.category_ids)
    t_cls = np.full(len(truth), -1)
    t_cls[known] = taxonomy.class_index(truth[known])
    p_cls = taxonomy.class_index(pred)
    l2, l1 = taxonomy.class_to_level2, taxonomy.class_to_level1
    by_images = {str(n): {"products": int((num_images == n).sum()),
                          "product_accuracy": float(hit[num_images == n].mean())}
                 for n in sorted(set(num_images.tolist()))}
    report = {
        "product_accuracy": float(hit.mean()) if len(hit) else 0.0,
        "image_accuracy": float((image_pred == truth[:, None])[valid_images].mean())
        if valid_images.any() else 0.0,
        f"top{min(5, top_k.shape[1])}_accuracy": float(
            (top_k[:, :5] == truth[:, None]).any(axis=1).mean()) if len(hit) else 0.0,
        "level1_accuracy": float((l1[t_cls[known]] == l1[p_cls[known]]).mean())
        if known.any() else 0.0,
        "level2_accuracy": float((l2[t_cls[known]] == l2[p_cls[known]]).mean())
        if known.any() else 0.0,
        "products": int(len(truth)),
        "images": int(valid_images.sum()),
        "accuracy_by_num_images": by_images,
    }
    known_ids = set(taxonomy.category_ids.tolist())

    def names(c: int) -> list[str] | None:
        return list(taxonomy.names(int(taxonomy.class_index(c)))) if c in known_ids else None

    wrong = collections.Counter(zip(truth[~hit].tolist(), pred[~hit].tolist()))
    report["most_confused"] = [
        {"true": t, "predicted": p, "count": n, "true_names": names(t),
         "predicted_names": names(p)} for (t, p), n in wrong.most_common(_TOP)]
    frame = pd.DataFrame({"category_id": truth, "hit": hit})
    per_cat = frame.groupby("category_id")["hit"].agg(["mean", "size"])
    report["categories"] = int(len(per_cat))
    ranked = per_cat[per_cat["size"] >= MIN_SUPPORT].sort_values(["mean", "size"],
                                                               ascending=[True, False])
    report["worst_categories"] = [
        {"category_id": int(c), "products": int(r["size"]), "accuracy": float(r["mean"]),
         "names": names(int(c))} for c, r in ranked.head(_TOP).iterrows()]
    level1 = np.where(known, l1[np.maximum(t_cls, 0)], -1)
    report["accuracy_by_level1"] = {
        taxonomy.level1_names[g]: {"products": int((level1 == g).sum()),
                                   "product_accuracy": float(hit[level1 == g].mean())}
        for g in sorted(set(level1[known].tolist()))}
    report["_per_category"] = per_cat  # for the plot; dropped from the JSON
    return report


def plot(report: dict, path: str) -> None:
    """The report as a PNG, every bar labelled with its value: accuracy by level-1
    category, by images per product and by taxonomy level, and the most confused pairs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_l1 = sorted(report.get("accuracy_by_level1", {}).items(),
                   key=lambda kv: kv[1]["product_accuracy"])[:20]
    fig, axes = plt.subplots(2, 2, figsize=(14, 4 + 0.28 * max(len(by_l1), 8)))
    (l1_ax, images_ax), (levels_ax, confused_ax) = axes
    _bars(l1_ax, [f"{name[:30]} ({v['products']})" for name, v in by_l1],
          [v["product_accuracy"] for _, v in by_l1], horizontal=True)
    l1_ax.set_title("Product accuracy by level-1 category (products), the worst 20")
    by_images = report["accuracy_by_num_images"]
    _bars(images_ax, [f"{n} ({v['products']})" for n, v in by_images.items()],
          [v["product_accuracy"] for v in by_images.values()])
    images_ax.set_title("Product accuracy by images per product (products)")
    _bars(levels_ax, ["level 1", "level 2", "category", "image"],
          [report["level1_accuracy"], report["level2_accuracy"],
           report["product_accuracy"], report["image_accuracy"]])
    levels_ax.set_title("Accuracy by taxonomy level, and of single images")
    _confused_pairs(confused_ax, report.get("most_confused", []),
                    report.get("_thumbnails", {}))
    fig.tight_layout()
    with tf.io.gfile.GFile(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _confused_pairs(ax, pairs: list[dict], thumbnails: dict) -> None:
    """The most confused pairs, one per row: with `pair_thumbnails`, a product of the true
    category that was taken for the other, beside a product of the other."""
    ax.axis("off")
    ax.set_title("Most confused pairs (products): a mistake | the category taken")
    if not pairs:
        ax.text(0, 1, "No mistakes", va="top", fontsize=9)
        return
    shown = pairs[:PLOTTED_PAIRS] if thumbnails else pairs[:10]
    row = 1.0 / len(shown)
    for i, pair in enumerate(shown):
        top = 1.0 - i * row
        pictures = thumbnails.get((pair["true"], pair["predicted"]), ())
        for j, jpeg in enumerate(pictures):
            inset = ax.inset_axes([0.11 * j, top - row * 0.95, 0.1, row * 0.9])
            inset.set_xticks([])
            inset.set_yticks([])
            if jpeg:
                inset.imshow(_pixels(jpeg))
            else:
                inset.text(0.5, 0.5, "none in\nthis set", ha="center", va="center",
                           fontsize=6)
        names = [" > ".join((pair[k] or [str(pair[k.split("_")[0]])])[-2:])
                 for k in ("true_names", "predicted_names")]
        ax.text(0.23 if thumbnails else 0.0, top - row * 0.5,
                f"{pair['count']} x  {names[0][:48]}\n      taken for {names[1][:48]}",
                va="center", fontsize=8, family="monospace")


def _pixels(jpeg: bytes) -> np.ndarray:
    import io
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def _bars(ax, labels: list[str], values: list[float], horizontal: bool = False) -> None:
    """Bars from 0 to 1 with each value written at its end."""
    if horizontal:
        bars = ax.barh(labels, values, color="#4c72b0")
        ax.set_xlim(0, 1.12)
    else:
        bars = ax.bar(labels, values, color="#4c72b0")
        ax.set_ylim(0, 1.12)
    ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=8, padding=2)
    ax.tick_params(labelsize=8)


def to_json(report: dict) -> str:
    return json.dumps({k: v for k, v in report.items() if not k.startswith("_")}, indent=2,
                      ensure_ascii=False)
