"""Exporting: a run (or several, as an ensemble) into one export (`export_format`).

From a run folder (`learn.rundir`: the checkpoint's own model in float32, the dataset its
config names), with flip TTA, a fusion head (`learn.fusion`), or a duplicate-image table whose blend
weight is chosen on the validation split (the table stays off unless it helped). A JAX
process runs `export` in a TensorFlow-backend process (`in_tensorflow_process`): the
SavedModel is always TensorFlow's own graph. The commands are `tfcdisc.export` and
`tfcdisc.ensemble`.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfcdisc.catalogue import taxonomy as taxonomy_lib
from tfcdisc import settings
from tfcdisc.learn import duplicates, input_pipeline, models, product_predictor, rundir
from tfcdisc.prepare import metadata
from tfcdisc.serve import export_format


_EXPORT = settings.ExportSettings  # one default per setting (its flag's)


def export(model_dir: str, export_dir: str, *, top_k: int = _EXPORT.top_k,
           checkpoint: str = _EXPORT.checkpoint, tta: str = _EXPORT.tta,
           duplicates_from: str | None = None,
           fusion_dir: str | None = None,
           lock_lease_minutes: float = _EXPORT.lock_lease_minutes,
           phase: str | None = None) -> dict:
    """Writes the SavedModel; returns a summary (paths, classes, fallback category).

    ``tta="flip"`` averages each image's original and mirrored views in log-probability
    space (`models.with_tta`): twice the compute, the same signatures.
    ``duplicates_from`` (a built dataset of the same taxonomy) embeds a duplicate-image
    table made from its train split, blended with a weight chosen on its validation
    split (`tfcdisc.learn.duplicates`; the weight is 0, the table off, unless it helped).
    ``fusion_dir`` (of `tfcdisc.train_fusion`) weighs each product's images by its
    fusion head's scores (`fusion.with_head`) instead of equally; it uses the checkpoint
    the head learned from. ``phase`` exports a phase of the run (`training.for_phase`)
    instead of its main training.
    """
    if phase:
        model_dir = rundir.phase_dir(model_dir, phase)
    if keras.backend.backend() != "tensorflow":
        return in_tensorflow_process(export, model_dir, export_dir, top_k=top_k,
                                     checkpoint=checkpoint, tta=tta,
                                     duplicates_from=duplicates_from, fusion_dir=fusion_dir,
                                     lock_lease_minutes=lock_lease_minutes)
    # A busy or read-only export dir is refused before the work.
    with export_format.writer(export_dir, lock_lease_minutes):
        return _export(model_dir, export_dir, top_k=top_k, checkpoint=checkpoint, tta=tta,
                       duplicates_from=duplicates_from, fusion_dir=fusion_dir)


def _export(model_dir: str, export_dir: str, *, top_k: int, checkpoint: str, tta: str,
            duplicates_from: str | None, fusion_dir: str | None) -> dict:
    cfg = rundir.train_settings(model_dir)
    builder = input_pipeline.load_builder(cfg.data_dir, cfg.dataset_config)
    rundir.check_dataset(model_dir, cfg.data_dir, input_pipeline.fingerprint(builder))
    facts = metadata.read(builder, cfg.data_dir)
    taxonomy = facts.taxonomy
    if not facts.class_counts.size:
        logging.warning("no class counts in the dataset metadata: falling back to class 0 for "
                        "products without images")
    if fusion_dir:
        from tfcdisc.learn import fusion
        checkpoint = fusion.load_config(fusion_dir)["checkpoint"]
    path = rundir.checkpoint_path(model_dir, checkpoint)
    image_model = rundir.float32_model(path)
    bad = rundir.non_finite_weight(image_model)
    if bad:  # a diverged run's: it would put every product in one category
        raise ValueError(f"{path}: weight {bad} is not finite (the run diverged); export "
                         "another checkpoint, or retrain with a lower --learning_rate")
    if fusion_dir:  # before TTA: the views' scores are averaged as their embeddings were
        image_model = fusion.with_head(image_model, fusion_dir, model_dir)
    image_model = models.with_tta(image_model, tta)
    table = None
    if duplicates_from:
        table = duplicate_table(duplicates_from, taxonomy, image_model, cfg.image_size)
    summary = export_format.write(
        export_dir, image_model, taxonomy, image_size=cfg.image_size, top_k=top_k,
        fallback_class=facts.fallback_class,
        max_image_pixels=int(np.prod(facts.image_size)) if facts.image_size else None,
        duplicate_table=table, tta=tta, fusion=bool(fusion_dir))
    return {**summary, "checkpoint": checkpoint}


def in_tensorflow_process(fn: Callable[..., dict], *args, **kwargs) -> dict:
    """``fn(*args, **kwargs)`` (a library function of this module) in a fresh process whose
    Keras runs on TensorFlow: a SavedModel is TensorFlow's graph, which a process whose
    Keras runs on JAX cannot trace (Keras's own JAX export would wrap it in XlaCallModule
    ops, which TF Serving and TF.js may not run). The function's own exception comes
    back as it was raised (a ValueError's one line included)."""
    import concurrent.futures
    import multiprocessing
    from tfcdisc.learn import backend
    # spawn: a fork would inherit the JAX runtime and this process's Keras; the
    # initializer chooses the backend before the function's module imports Keras.
    with concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"),
            initializer=backend.select, initargs=("tensorflow",)) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def duplicate_table(data_dir: str, taxonomy: taxonomy_lib.Taxonomy, image_model: keras.Model,
                    image_size: int, batch_size: int = 256) -> duplicates.Table:
    """The table of ``data_dir``'s train and validation splits (never test), with the
    blend weight that a table of the train split alone scores best with on the validation
    split: the weight is chosen by the table that leaves validation out, and the
    submission's table then knows every labelled image and how often each was seen in
    each category."""
    builder = input_pipeline.load_builder(data_dir)
    if not np.array_equal(metadata.read(builder, data_dir).taxonomy.category_ids,
                          taxonomy.category_ids):
        raise ValueError(f"--duplicates_from={data_dir}: not built with the run's taxonomy")
    # Each split read once (the train split is most of the catalogue's bytes): the table
    # that chooses the weight and the submission's are made from the same sightings.
    train = duplicates.sightings(input_pipeline.image_labels(builder, "train"))
    validation = duplicates.sightings(input_pipeline.image_labels(builder, "validation"))
    train_only = duplicates.table_of(*train)
    grid = duplicates.WEIGHT_GRID
    predictor = product_predictor.ProductPredictor(image_model, 1, weight_grid=grid)
    hits = np.zeros(len(grid))
    n = builder.info.splits["validation"].num_examples
    batches = product_predictor.distribute_products(
        tf.distribute.get_strategy(), lambda: input_pipeline.split_products(builder, "validation"),
        batch_size, image_size, n, duplicate_table=train_only)
    for out in predictor.batches(batches):
        hits += (out["top1_by_weight"] == out["label"][:, None]).sum(axis=0)
    table = duplicates.table_of(*(np.concatenate(pair) for pair in zip(train, validation)))
    table.weight = duplicates.choose_weight(list(hits), grid)
    table.accuracy_by_weight = {str(w): float(h / max(n, 1)) for w, h in zip(grid, hits)}
    logging.info("duplicate table: %d unique images of %d (train and validation); weight "
                 "%.1f, chosen with the train split's %d on validation: accuracy by weight %s",
                 len(table), table.images, table.weight, len(train_only),
                 table.accuracy_by_weight)
    return table


def ensemble(members: Sequence[str], export_dir: str,
             weights: Sequence[float] | None = None, duplicates_from: str | None = None,
             lock_lease_minutes: float = _EXPORT.lock_lease_minutes) -> dict:
    """One self-contained export that averages its members' probabilities (with
    ``weights``, equal by default). Members are exports of the same taxonomy; they may
    differ in backbone and image size and carry their own test-time augmentation. A
    member's duplicate table is not used (it was weighed for that member alone):
    ``duplicates_from`` gives the ensemble its own, weighed for the ensemble."""
    settings.check_ensemble_members(members)
    weights = [1.0] * len(members) if not weights else [float(w) for w in weights]
    if len(weights) != len(members) or not all(math.isfinite(w) and w > 0 for w in weights) \
            or not math.isfinite(sum(weights)):
        raise ValueError(f"--weights: {len(members)} finite positive numbers with a finite "
                         f"sum, one per --saved_model (got {list(weights)})")
    with export_format.writer(export_dir, lock_lease_minutes):
        return _ensemble(members, export_dir, weights, duplicates_from)


def _ensemble(members: Sequence[str], export_dir: str, weights: list[float],
              duplicates_from: str | None) -> dict:
    opened = [export_format.load(m) for m in members]
    first = opened[0]
    for e in opened[1:]:
        if not np.array_equal(e.taxonomy.category_ids, first.taxonomy.category_ids):
            raise ValueError(f"{e.path}: another taxonomy than {first.path}; an ensemble's "
                             "members must classify into the same categories")
    limits = [e.max_image_pixels for e in opened]
    model = models.ensemble_model([e.image_model for e in opened], list(weights))
    image_size = max(e.image_size for e in opened)
    table = None
    if duplicates_from:
        table = duplicate_table(duplicates_from, first.taxonomy, model, image_size)
    return export_format.write(export_dir, model, first.taxonomy, image_size=image_size,
                 top_k=max(e.top_k for e in opened), fallback_class=first.fallback_class,
                 max_image_pixels=None if None in limits else max(limits),
                 duplicate_table=table,
                 members=[{"saved_model": e.path, "weight": w, "image_size": e.image_size}
                          for e, w in zip(opened, weights)])
