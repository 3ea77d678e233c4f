"""KerasHub image backbones by preset (`--backbone=keras_hub --hub_preset`), offline: the
tests write their own preset folder."""

import numpy as np
import pytest

from conftest import train_config

keras_hub = pytest.importorskip("keras_hub")

import keras  # noqa: E402

from tfcdisc.learn import models, rundir, training  # noqa: E402

_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    """A small ResNet preset: backbone, weights and ImageNet-style converter."""
    folder = tmp_path_factory.mktemp("hub") / "resnet_tiny"
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        image_shape=(None, None, 3))
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(32, 32), scale=[1 / (255 * s) for s in _STD],
        offset=[-m / s for m, s in zip(_MEAN, _STD)])
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return folder, backbone, converter


def _backbone_of(model):
    return next(layer for layer in model.layers if isinstance(layer, keras_hub.models.Backbone))


def test_a_preset_folder_gives_its_weights_and_its_converters_scaling(preset):
    folder, backbone, converter = preset
    model = models.build_image_model("keras_hub", 5, image_size=32, weights="imagenet",
                                     hub_preset=str(folder))
    np.testing.assert_array_equal(_backbone_of(model).weights[0].numpy(),
                                  backbone.weights[0].numpy())
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model.get_layer("scaling")(pixels), converter(pixels),
                               rtol=1e-5, atol=1e-4)
    # --weights=FOLDER: that folder's weights, whatever --hub_preset names.
    named = models.build_image_model("keras_hub", 5, image_size=32, weights=str(folder),
                                     hub_preset="resnet_50_imagenet")
    np.testing.assert_array_equal(_backbone_of(named).weights[0].numpy(),
                                  backbone.weights[0].numpy())
    fresh = models.build_image_model("keras_hub", 5, image_size=32, weights="none",
                                     hub_preset=str(folder))
    assert not np.allclose(_backbone_of(fresh).weights[0].numpy(), backbone.weights[0].numpy())


def test_a_preset_keras_hub_cannot_read_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="KerasHub cannot load it") as e:
        models.build_image_model("keras_hub", 5, image_size=32, weights="imagenet",
                                 hub_preset=str(tmp_path / "empty"))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="needs --hub_preset"):
        models.build_image_model("keras_hub", 5, image_size=32)


def test_a_keras_hub_backbone_trains_and_exports(preset, dataset, tmp_path):
    from tfcdisc.serve import exporting
    folder, backbone, _ = preset
    run = tmp_path / "run"
    training.train(train_config(dataset, run, backbone="keras_hub", hub_preset=str(folder),
                                weights="imagenet", steps_per_epoch=1, eval_max_batches=1))
    restored = rundir.float32_model(str(run / "checkpoints" / "best.keras"))
    assert isinstance(_backbone_of(restored), keras_hub.models.ResNetBackbone)
    summary = exporting.export(str(run), str(tmp_path / "export"))
    assert summary["classes"] == dataset.info.features["label"].num_classes
