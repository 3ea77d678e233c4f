"""cdiscount dataset."""

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
