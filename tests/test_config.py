"""cxrkeras.config: one image size, settings applied in one place, checks that need neither Keras nor training."""

import json
import subprocess
import sys

import pytest

from cxrkeras.config import IMAGE_SIZE, DataConfig, ModelConfig, RunConfig


def test_an_older_config_with_the_data_image_size_loads_when_it_agrees_with_the_model():
    config = RunConfig(model=ModelConfig(image_size=224)).to_dict()
    assert "image_size" not in config["data"]
    older = {**config, "data": {**config["data"], "image_size": 224}}
    assert RunConfig.from_dict(older).model.image_size == 224
    default = {"data": {"image_size": IMAGE_SIZE}}  # no model section: the model's default size
    assert RunConfig.from_dict(default).model.image_size == IMAGE_SIZE


def test_an_older_config_whose_data_image_size_differs_is_refused_naming_both(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"data": {"image_size": 224}, "model": {"image_size": 150}}))
    with pytest.raises(ValueError, match=r"config.json.*`data.image_size` 224 differs from `model.image_size` 150"):
        RunConfig.load(path)


def test_with_settings_returns_a_changed_copy_and_leaves_none_alone():
    base = RunConfig()
    changed = base.with_settings(epochs=3, depth=2, augment=False, learning_rate=None)
    assert (changed.train.epochs, changed.model.blocks, changed.data.augment) == (3, 2, False)
    assert changed.train.learning_rate == base.train.learning_rate
    assert (base.train.epochs, base.model.blocks, base.data.augment) == (35, 5, True)  # the original is untouched
    assert changed.setting("depth") == 2
    with pytest.raises(ValueError, match="Unknown setting 'colour'"):
        base.with_settings(colour="red")


@pytest.mark.parametrize("section, key, value", [("data", "val_fraction", 1.0), ("model", "arch", "vgg"),
                                                  ("train", "precision", "float16")])
def test_validate_names_the_first_bad_setting(section, key, value):
    config = RunConfig(data=DataConfig(data_dir="x"))
    config.validate()
    setattr(getattr(config, section), key, value)
    with pytest.raises(ValueError, match=rf"`{key}`.*Received: {key}={value!r}"):
        config.validate()


def test_a_config_is_checked_without_importing_keras_or_training():
    code = ("import sys; from cxrkeras.config import DataConfig, RunConfig; "
            "RunConfig(data=DataConfig(data_dir='x')).validate(); "
            "print(sorted(m for m in ('keras', 'tensorflow', 'cxrkeras.training') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
