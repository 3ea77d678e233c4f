"""Which product goes to which split and shard: decided once, from the offset indexes.

The plan is the build's only whole-catalogue step. It reads the indexes (built in one
pass, or as Beam work by `tfcdisc.catalogue.beam_index`), holds out a stratified, hash-chosen
validation split (a slice of the file would not be stratified, whatever its order), and
writes for every output shard a small members file: the offsets, lengths, ids and
categories of exactly the products it will hold. A shard writer (`tfcdisc.prepare.shards`) then
needs only that file: no worker loads an index or recomputes the hold-out, and a
validation shard reads its members, not the stretches of file around them.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import tensorflow as tf

from tfcdisc.catalogue import atomic, problems
from tfcdisc.catalogue import index as index_lib
from tfcdisc.catalogue import taxonomy as taxonomy_lib
from tfcdisc.prepare.shards import NO_LABEL, TEST, TRAIN, VALIDATION, BuildOptions, ShardSpec

MANUAL_FILES = ("train.bson", "test.bson", "category_names.csv")


@dataclasses.dataclass
class BuildPlan:
    """The shards of every split, and what planning learnt on the way."""

    specs: dict[str, list[ShardSpec]]
    taxonomy: taxonomy_lib.Taxonomy
    class_counts: np.ndarray  # training products per class
    unreadable: dict  # {bson path: what its reading skipped}, products in no split


def validation_quota(sizes: np.ndarray, total: int) -> np.ndarray:
    """Products to hold out per category: proportional to its size, at least one for
    every category with two or more products (so small ones are represented), and
    never a category's last product."""
    sizes = np.asarray(sizes, np.int64)
    cap = np.maximum(sizes - 1, 0)
    total = int(min(total, cap.sum()))
    floor = (sizes >= 2).astype(np.int64)
    if floor.sum() > total:  # too few to give every category one: largest first
        quota = np.zeros_like(sizes)
        quota[np.argsort(-sizes, kind="stable")[:total]] = 1
        return np.minimum(quota, cap)
    quota = floor.copy()
    share = (total - quota.sum()) * (cap - floor) / max((cap - floor).sum(), 1)
    quota += np.floor(share).astype(np.int64)
    remainder = total - quota.sum()
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    for c in order:
        if remainder <= 0:
            break
        if quota[c] < cap[c]:
            quota[c] += 1
            remainder -= 1
    return np.minimum(quota, cap)


def _mix(ids: np.ndarray, seed: int) -> np.ndarray:
    """A fixed pseudo-random order of product ids (splitmix64)."""
    z = ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def validation_mask(index: index_lib.OffsetIndex, options: BuildOptions) -> np.ndarray:
    """True for the products of train.bson held out as the validation split."""
    n = len(index)
    cats, inverse, sizes = np.unique(index.category_ids, return_inverse=True,
                                     return_counts=True)
    total = options.validation_size
    if total is None:  # 2% or 50,000, but never fewer than one per category
        total = min(max(int(round(0.02 * n)), int((sizes >= 2).sum())), 50_000)
    quota = validation_quota(sizes, total)
    order = np.lexsort((_mix(index.product_ids, options.seed), inverse))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - np.repeat(starts, sizes)
    return rank < quota[inverse]


def _shard_runs(n: int, n_shards: int, runs_per_shard: int) -> list[list[tuple[int, int]]]:
    """Cuts positions [0, n) into n_shards * runs_per_shard runs; shard j takes every
    n_shards-th run, so its runs are spread evenly across the file."""
    pieces = max(1, min(n, n_shards * runs_per_shard))
    cuts = np.linspace(0, n, pieces + 1).astype(np.int64)
    return [[(int(cuts[p]), int(cuts[p + 1])) for p in range(j, pieces, n_shards)
             if cuts[p + 1] > cuts[p]] for j in range(n_shards)]


def plan(manual_dir: str, work_dir: str, options: BuildOptions, indexes: dict | None = None
         ) -> BuildPlan:
    """Indexes the BSON files (or reuses their indexes) and lays out every shard.

    Args:
      manual_dir: the Kaggle folder (local or gs://).
      work_dir: scratch folder readable by every worker (indexes, members, stats).
      options: what decides the content of the build.
      indexes: already-built indexes by file name (the Beam path, tests), else built
        in this process or reused.
    """
    paths = check_manual_dir(manual_dir)
    taxonomy = taxonomy_lib.load(paths["category_names.csv"])
    tf.io.gfile.makedirs(work_dir)
    for pattern in ("*.stats.json", "*.members.npz"):
        for old in tf.io.gfile.glob(_join(work_dir, pattern)):
            tf.io.gfile.remove(old)
    indexes = dict(indexes or {})
    for name in ("train.bson", "test.bson"):
        if name not in indexes:
            logging.info("indexing %s", paths[name])
            indexes[name] = index_lib.load_or_build(
                paths[name], index_path=index_path(work_dir, name),
                errors="skip" if options.bad_documents == "skip" else "strict")
    train, test = indexes["train.bson"], indexes["test.bson"]
    if not train.labeled:
        raise ValueError(f"{paths['train.bson']}: no category_id in its products; is it a "
                         "test file?")
    _check_categories(train, taxonomy)
    holdout = validation_mask(train, options)
    class_counts = np.bincount(taxonomy.class_index(train.category_ids[~holdout]),
                               minlength=taxonomy.num_classes)
    specs: dict[str, list[ShardSpec]] = {}
    layouts = ((TRAIN, train, ~holdout, options.runs_per_shard),
               (VALIDATION, train, holdout, options.runs_per_shard),
               (TEST, test, np.ones(len(test), bool), 1))
    for split, index, mask, runs_per_shard in layouts:
        member_bytes = int(index.lengths[mask].sum(dtype=np.int64))
        n_shards = max(2, math.ceil(member_bytes / options.shard_bytes))
        n_shards = min(n_shards, max(1, int(mask.sum())))
        specs[split] = []
        for runs in _shard_runs(len(index), n_shards, runs_per_shard):
            members = [np.flatnonzero(mask[lo:hi]) + lo for lo, hi in runs]
            members = [m for m in members if len(m)]
            if not members:
                continue
            k = len(specs[split])
            stem = _join(work_dir, f"{split}-{k:05d}")
            _write_members(stem + ".members.npz", index, members)
            specs[split].append(ShardSpec(
                split, k, index.path, stem + ".members.npz", paths["category_names.csv"],
                options, stem + ".stats.json", sum(len(m) for m in members)))
    unreadable = {index.path: {
        "bad_documents": index.bad_documents, "bad_document_bytes": index.bad_document_bytes,
        "skipped_bytes": index.skipped_bytes,
        "lost": problems.first(index.problems)}
        for index in (train, test) if index.bad_documents or index.skipped_bytes}
    return BuildPlan(specs, taxonomy, class_counts, unreadable)


def _write_members(path: str, index: index_lib.OffsetIndex, runs: list[np.ndarray]) -> None:
    """A shard's products, run after run: all a shard writer needs of the index."""
    at = np.concatenate(runs)
    atomic.write_arrays(
        path, offsets=index.offsets[at], lengths=index.lengths[at],
        product_ids=index.product_ids[at],
        category_ids=index.category_ids[at] if index.labeled else np.full(
            len(at), NO_LABEL, np.int64),
        run_starts=np.cumsum([0] + [len(r) for r in runs[:-1]]),
        labeled=np.array(index.labeled))


def index_path(work_dir: str, name: str) -> str:
    """Where a build keeps the index of one of its BSON files (readable by workers)."""
    return _join(work_dir, name + ".idx.npz")


def check_manual_dir(manual_dir: str) -> dict[str, str]:
    """Paths of the Kaggle files; a missing one is named with what to do."""
    paths = {name: _join(manual_dir, name) for name in MANUAL_FILES}
    missing = [name for name, p in paths.items() if not tf.io.gfile.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"{manual_dir}: missing {', '.join(missing)}. Put the Kaggle Cdiscount files "
            f"({', '.join(MANUAL_FILES)}) in this folder (local or gs://) and pass it as "
            "--manual_dir.")
    return paths


def _check_categories(index: index_lib.OffsetIndex, taxonomy: taxonomy_lib.Taxonomy) -> None:
    known = np.isin(index.category_ids, taxonomy.category_ids)
    if not known.all():
        j = int(np.flatnonzero(~known)[0])
        raise ValueError(
            f"{index.path}: byte offset {int(index.offsets[j])} (document #{j}, _id "
            f"{int(index.product_ids[j])}): category_id {int(index.category_ids[j])} is not in "
            f"category_names.csv ({int((~known).sum())} products in all); use the "
            "category_names.csv that belongs to this train.bson")


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name
