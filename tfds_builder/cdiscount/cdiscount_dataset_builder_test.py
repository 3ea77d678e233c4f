"""cdiscount dataset."""

from pathlib import Path

import tensorflow_datasets as tfds

from . import cdiscount_dataset_builder


class CdiscountTest(tfds.testing.DatasetBuilderTestCase):
    """Builds dummy_data/ (12 train and 4 test products in 4 categories, made by
    `python -m tfcdisc.synth --output_dir dummy_data --num_train_products 12
    --num_test_products 4 --num_categories 4 --seed 11`)."""

    DATASET_CLASS = cdiscount_dataset_builder.Builder
    SKIP_CHECKSUMS = True  # manual download: nothing to checksum
    SPLITS = {
        "train": 8,  # 12 products minus one validation product per category
        "validation": 4,
        "test": 4,
    }


if __name__ == "__main__":
    tfds.testing.test_main()


def _examples(data_dir, split):
    """{product_id: (labels, image bytes)} of one split, images as stored."""
    builder = tfds.builder_from_directory(data_dir)
    ds = builder.as_dataset(split=split, decoders={"images": tfds.decode.SkipDecoding()})
    return {int(ex["product_id"]): (int(ex["label"]), int(ex["label_level1"]),
                                    int(ex["label_level2"]), [bytes(b) for b in ex["images"]])
            for ex in tfds.as_numpy(ds)}


def test_beam_direct_runner_builds_the_same_examples(tmp_path):
    """The Beam path (what Dataflow runs) writes what the local path writes."""
    from apache_beam.options.pipeline_options import PipelineOptions
    dummy = str(Path(__file__).parent / "dummy_data")
    built = {}
    for name, options in (("local", None), ("beam", PipelineOptions([
            "--runner=DirectRunner", "--direct_num_workers=2",
            "--direct_running_mode=multi_processing"]))):
        builder = cdiscount_dataset_builder.Builder(data_dir=str(tmp_path / name))
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=dummy, beam_options=options))
        built[name] = builder.data_dir
    for split in ("train", "validation", "test"):
        local, beam = (_examples(built[k], split) for k in ("local", "beam"))
        assert local and local == beam, split
