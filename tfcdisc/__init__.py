"""tfcdisc: e-commerce product classification from images, on TensorFlow and Keras 3.

The package's top level holds the commands users run (``python -m tfcdisc.X``: synth,
inspect, build, preflight, train, train_fusion, export, ensemble, predict, evaluate, show;
`cli` runs them). The library sits in four wings in the order data flows through them; each
imports only the wings before it (tests/test_layout.py checks it):

  catalogue/  BSON files, their offset index, JPEG facts and the image screen, problem
              lists, the taxonomy, the synthetic catalogue; the file helpers every wing
              uses (whole-or-nothing writes, one writer per folder). No Keras.
  prepare/    the TFDS build's split and shard plan, shard writing, the record layout.
  learn/      input pipelines, models, the fusion head, the duplicate table, training,
              the run folder, settings, distribution, runtime and backend detection, the
              accelerator targets and the TPU compiler's preflight.
  serve/      the export format, exporting, batch inference (local and Beam), scoring,
              pictures.
"""
