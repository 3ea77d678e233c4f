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


def _fresh_environment(tmp_path: Path) -> str:
    """A new virtual environment holding tfcdisc only as Dataflow workers get it: the
    sdist that Beam's ``--setup_file=pyproject.toml`` builds (`python -m build --sdist
    --no-isolation`), pip-installed. TensorFlow, TFDS and Beam come from this
    environment's site-packages by a plain path entry, which does not run its .pth
    files, so the editable install of the checkout under test is not visible."""
    import site
    import subprocess
    import sys
    import venv
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir",
                    str(tmp_path / "dist"), str(repo)], check=True, capture_output=True)
    sdist, = (tmp_path / "dist").glob("tfcdisc-*.tar.gz")
    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    python = str(env / "bin" / "python")
    own_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                               "['purelib'])"], check=True, capture_output=True, text=True)
    (Path(own_site.stdout.strip()) / "deps.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", str(sdist)], check=True, capture_output=True,
                   cwd=tmp_path)
    return python


def test_beam_direct_runner_with_the_sdist_builds_the_same_examples(tmp_path):
    """The Beam path as Dataflow runs it: the package installed from its sdist in a fresh
    environment, indexing and shard writing on Beam workers (DirectRunner, two worker
    processes), writes what the local path writes."""
    import subprocess
    dummy = str(Path(__file__).parent / "dummy_data")
    builder = cdiscount_dataset_builder.Builder(data_dir=str(tmp_path / "local"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=dummy))
    python = _fresh_environment(tmp_path)
    where = subprocess.run([python, "-c", "import tfcdisc; print(tfcdisc.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path)
    assert where.stdout.startswith(str(tmp_path / "env")), where.stdout
    done = subprocess.run(
        [python, "-c", "import sys; from tensorflow_datasets.scripts.cli.main import "
         "launch_cli; sys.argv[0] = 'tfds'; sys.exit(launch_cli())", "build",  # `tfds build`
         str(Path(__file__).parent), "--manual_dir", dummy, "--data_dir",
         str(tmp_path / "beam"), "--beam_pipeline_options=runner=DirectRunner,"
         "direct_num_workers=2,direct_running_mode=multi_processing"],
        capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on Beam: 2 byte ranges" in done.stdout + done.stderr  # by workers, not the launcher
    beam_dir = tmp_path / "beam" / "cdiscount" / "default" / "1.0.0"
    for split in ("train", "validation", "test"):
        local, beam = (_examples(d, split) for d in (builder.data_dir, beam_dir))
        assert local and local == beam, split
