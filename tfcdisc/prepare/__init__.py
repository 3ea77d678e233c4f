"""The dataset's preparation (TFDS's download_and_prepare): splits and shards planned from
the BSON indexes, each shard's records written with the JPEG bytes untouched, and the
dataset's metadata (`metadata`: written by the builder, read by every later wing)."""
