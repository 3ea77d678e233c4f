"""cdiscount dataset: the Kaggle Cdiscount BSON catalogue as TFRecords.

    tfds build tfds_builder/cdiscount --manual_dir DIR --data_dir OUT
    tfds build tfds_builder/cdiscount --manual_dir DIR --data_dir OUT \
        --beam_pipeline_options="runner=DirectRunner,direct_num_workers=2,direct_running_mode=multi_processing"

The work is in tfcdisc, one module per stage: `tfcdisc.catalogue.beam_index` (with Beam options,
the offset indexes are built as Beam work over byte ranges), `tfcdisc.prepare.plan`
(splits and shards, from the indexes) and `tfcdisc.prepare.shards` (one shard from its
recipe). Without Beam, shards are written by one process per core; with Beam options,
TFDS hands the same shard recipes to Beam. Files are read through tf.io.gfile only, so
a gs:// manual dir works.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import splits as splits_lib

from tfcdisc import cli
from tfcdisc.catalogue import beam_index, folder_lock
from tfcdisc.prepare import metadata, plan as build_plan, records, shards

_HOMEPAGE = "https://www.kaggle.com/c/cdiscount-image-classification-challenge"


@dataclasses.dataclass(eq=False)
class CdiscountConfig(shards.BuildOptions, tfds.core.BuilderConfig):
    """A TFDS config: a name and the build's options (`tfcdisc.prepare.shards.BuildOptions`,
    the one list of them).

    Custom configs from the command line:
      tfds build ... --config '{"name": "val100k", "validation_size": 100000}'
    """

    def options(self) -> shards.BuildOptions:
        return self.plain()


def _under_tfds() -> bool:
    """Whether the `tfds` command runs this build (its entry module is loaded)."""
    return "tensorflow_datasets.scripts.cli.main" in sys.modules


def _fail_under_tfds(message: str, error: Exception) -> None:
    """Bad input, a busy or unwritable folder, a full disk are ordinary: under the `tfds`
    command, one line naming the file and the fix, exit status 2 (TFDS would print a
    traceback); called from Python, the error is raised."""
    if _under_tfds():
        print(f"tfds build cdiscount: {message}", file=sys.stderr)
        sys.exit(2)
    raise error


class NoKaggleFolder(FileNotFoundError):
    """No --manual_dir, or one without train.bson."""


def _kaggle_folder(dl_manager) -> str:
    """The manual dir holding the Kaggle files.

    Raises:
      NoKaggleFolder: one line naming what to pass (TFDS's own assertion printed the
        instructions under a 30-line traceback).
    """
    configured = str(getattr(dl_manager, "_manual_dir", None) or "")  # before TFDS checks it
    try:
        manual = str(dl_manager.manual_dir)
    except AssertionError:  # TFDS: no such folder, or an empty one
        manual = None
    if manual and tf.io.gfile.exists(f"{manual}/train.bson"):
        return manual
    given = configured and not configured.rstrip("/").endswith("/downloads/manual")
    what = (f"--manual_dir={configured} holds no train.bson" if given else
            "no --manual_dir was given")
    raise NoKaggleFolder(f"{what}: pass --manual_dir=FOLDER, the folder holding the Kaggle "
                         "files train.bson, test.bson and category_names.csv (`python -m "
                         "tfcdisc.synth --output_dir FOLDER` writes a synthetic catalogue in "
                         "that format)")


def _remove_empty_folders(folders: list[str]) -> None:
    """Each folder if nothing is in it but empty folders and TFDS's own config note
    (``.config/metadata.json``, written before any build): what a refused build left."""
    for folder in folders:
        if not tf.io.gfile.isdir(folder):
            continue
        files = [os.path.join(d, f) for d, _, names in tf.io.gfile.walk(folder) for f in names]
        if all(f.replace(os.sep, "/").endswith("/.config/metadata.json") for f in files):
            tf.io.gfile.rmtree(folder)


class Builder(tfds.core.ShardBasedBuilder):
    """DatasetBuilder for the Cdiscount image classification catalogue."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [CdiscountConfig(
        name="default", description="train (minus validation), validation (min(2%, 50,000) "
        "products, stratified by category), test; 180x180 JPEGs, bad images dropped and "
        "counted.")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put the four files of the Kaggle "Cdiscount's Image Classification Challenge" in one
    folder (local or gs://) and pass it as --manual_dir:

        train.bson            58.2 GB, 7,069,896 products with category_id
        test.bson             14.5 GB, 1,768,182 products without category_id
        category_names.csv    5,270 categories and their three levels
        sample_submission.csv (not read by the build)

    The real files can no longer be downloaded from Kaggle; a folder in the same
    format for trying things out is written by
        python -m tfcdisc.synth --output_dir DIR --num_train_products 4000 \\
            --num_test_products 1000
    """

    def download_and_prepare(self, *args, **kwargs):
        """TFDS's build, one at a time per config folder (`tfcdisc.catalogue.folder_lock`: two
        builds into one folder mixed their splits); under the lock, the ``incomplete.*``
        folder a killed build left (a dataset-sized copy on the real data) goes first."""
        config_dir = os.path.dirname(str(self.data_dir).rstrip("/"))
        try:
            with folder_lock.hold(f"{config_dir}/.tfcdisc-build.lock", "tfds build",
                                  config_dir), cli.stops_unwind():
                for stale in tf.io.gfile.glob(f"{config_dir}/incomplete.*"):
                    logging.warning("removing %s, left by a build that did not finish", stale)
                    tf.io.gfile.rmtree(stale)
                return super().download_and_prepare(*args, **kwargs)
        except NoKaggleFolder as e:  # refused before any record: leave no folder either
            root = os.path.dirname(os.path.dirname(config_dir))
            _remove_empty_folders([f"{root}/downloads", f"{root}/{self.name}"])
            _fail_under_tfds(str(e), e)
        except KeyboardInterrupt as e:
            if not _under_tfds():
                raise
            cli.stopped("tfds build cdiscount", e, "no dataset was written (TFDS moves a "
                        "build into place only when whole): run the same command to build "
                        "again")
        except (ValueError, FileNotFoundError, shards.ShardWriteError) as e:
            _fail_under_tfds(str(e), e)
        except Exception as e:  # noqa: BLE001 - I/O errors only: a full disk, read-only...
            reason = cli.io_error(e)  # OSError and TensorFlow's own I/O errors, as commands
            if reason is None:
                raise
            _fail_under_tfds(f"{reason}; nothing of this build is kept: fix it and run the "
                             "build again", e)

    def _info(self) -> tfds.core.DatasetInfo:
        options = self.builder_config.options()
        return self.dataset_info_from_configs(
            features=records.features(None, options.image_size),
            supervised_keys=None,
            homepage=_HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
        )

    # ----------------------------------------------------------------------- planning

    def _plan(self, dl_manager: tfds.download.DownloadManager, download_config=None
              ) -> build_plan.BuildPlan:
        if getattr(self, "_build_plan", None) is None:
            # One work folder per config: two configs' plans (members files) never mix.
            work_dir = (str(dl_manager.download_dir).rstrip("/") + "/cdiscount_work/"
                        + self.builder_config.name)
            options = self.builder_config.options()
            indexes = None
            kaggle = _kaggle_folder(dl_manager)
            if download_config is not None and download_config.beam_runner is not None:
                indexes = _index_on_beam(kaggle, work_dir, options,
                                         download_config)
            plan = build_plan.plan(kaggle, work_dir, options, indexes)
            records.set_label_names(self.info.features, plan.taxonomy)
            metadata.record_plan(self.info, plan.taxonomy, plan.class_counts, options.metadata())
            self._build_plan = plan
        return self._build_plan

    def _shard_iterators_per_split(self, dl_manager: tfds.download.DownloadManager):
        return self._plan(dl_manager).specs

    # ----------------------------------------------------------------------- generation

    def _download_and_prepare(self, dl_manager: tfds.download.DownloadManager,
                              download_config: tfds.download.DownloadConfig | None = None
                              ) -> None:
        self._prepare(dl_manager, download_config)

    def _prepare(self, dl_manager, download_config) -> None:
        download_config = download_config or tfds.download.DownloadConfig()
        self._build_plan = None
        if download_config.beam_runner is None and download_config.beam_options is not None:
            # ShardBasedBuilder only takes the Beam branch when a runner is given.
            download_config = dataclasses.replace(
                download_config, beam_runner=_runner_from(download_config.beam_options))
        plan = self._plan(dl_manager, download_config)
        if download_config.beam_runner is not None:
            super()._download_and_prepare(dl_manager, download_config)
        else:
            self._write_locally(plan.specs)
        stats = shards.collect_stats(plan.specs, plan.unreadable)
        metadata.record_stats(self.info, stats)
        logging.info("cdiscount build: %s", {k: v for k, v in stats.items() if k != "examples"})
        if stats["dropped_images"] or stats["dropped_products"]:
            logging.warning("cdiscount build dropped images %s and %d products; first: %s",
                            stats["dropped_images"], stats["dropped_products"],
                            stats["examples"][:3])
        for path, lost in stats["unreadable"].items():
            logging.warning("cdiscount build (bad_documents: skip): %s: %d unreadable "
                            "documents and %d skipped bytes, whose products are in no split; "
                            "first: %s", path, lost["bad_documents"], lost["skipped_bytes"],
                            lost["lost"][:3])

    def _write_locally(self, specs) -> None:
        tasks, layout = [], []
        file_format = self.info.file_format
        for split, shard_specs in specs.items():
            template = self._get_filename_template(split_name=split).replace(split=split)
            paths = [template.sharded_filepath(shard_index=i, num_shards=len(shard_specs))
                     for i in range(len(shard_specs))]
            layout.append((split, template, paths))
            tasks += [(spec, str(path), file_format) for spec, path in zip(shard_specs, paths)]
        counts = iter(shards.write_shards(tasks, shards.default_workers()))
        split_infos = []
        for split, template, paths in layout:
            lengths = [next(counts) for _ in paths]
            split_infos.append(splits_lib.SplitInfo(
                name=split, shard_lengths=lengths,
                num_bytes=sum(tf.io.gfile.stat(str(p)).length for p in paths),
                filename_template=template))
        self.info.set_splits(splits_lib.SplitDict(split_infos))


def _index_on_beam(manual_dir: str, work_dir: str, options: shards.BuildOptions,
                   download_config) -> dict:
    """The offset indexes, built by the build's own Beam runner over byte ranges."""
    paths = build_plan.check_manual_dir(manual_dir)
    names = ("train.bson", "test.bson")
    built = beam_index.index_files(
        [paths[n] for n in names], [build_plan.index_path(work_dir, n) for n in names],
        errors="skip" if options.bad_documents == "skip" else "strict",
        beam_options=download_config.beam_options, beam_runner=download_config.beam_runner)
    return {n: built[paths[n]] for n in names}


def _runner_from(beam_options):
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.runners import create_runner
    return create_runner(beam_options.view_as(StandardOptions).runner or "DirectRunner")
