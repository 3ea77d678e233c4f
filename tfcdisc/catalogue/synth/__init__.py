"""Synthetic Cdiscount-format catalogues for the demo, the tests and the benchmarks.

The real data can no longer be downloaded, so this writes a folder in exactly the
Kaggle layout (``train.bson``, ``test.bson``, ``category_names.csv``,
``sample_submission.csv``) plus ``test_labels.csv`` to score the test set.

The images are learnable through the hierarchy: the level-1 category decides the
coarse look (background tint and gradient, the object's hue band), level 2 the shape
family, level 3 the detail (exact hue, texture, mark). A product's 1-4 images are
views of one item (position, scale, rotation, lighting, noise). Category sizes are
long-tailed, and train.bson is in no category order, as the real file is (its first
five products are in four categories).

Its jobs, one module each: `styles` (the taxonomy and how each category looks),
`drawing` (a product's images), `plan` (which products go where), `writer` (the files,
rendered by worker processes). The command is `tfcdisc.synth`.
"""

from tfcdisc.catalogue.synth.drawing import render_product
from tfcdisc.catalogue.synth.plan import Plan, plan_catalogue
from tfcdisc.catalogue.synth.styles import (DIFFICULTIES, IMAGE_SIZE, IMAGES_PER_PRODUCT_P,
                                            MIN_PRODUCTS_PER_CATEGORY, CategoryStyle,
                                            Difficulty, builtin_taxonomy_frame,
                                            category_styles, sample_categories)
from tfcdisc.catalogue.synth.writer import duplicate_rates, generate, replicate

__all__ = ["DIFFICULTIES", "IMAGE_SIZE", "IMAGES_PER_PRODUCT_P", "MIN_PRODUCTS_PER_CATEGORY",
           "CategoryStyle", "Difficulty", "Plan", "builtin_taxonomy_frame", "category_styles",
           "duplicate_rates", "generate", "plan_catalogue", "render_product", "replicate",
           "sample_categories"]
