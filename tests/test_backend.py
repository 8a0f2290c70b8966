"""Precision "auto" and backends: which precision a device gets, and a fit under JAX loaded by TensorFlow."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cxrkeras import training
from cxrkeras.synth import write_synthetic_dataset


# ---------------------------------------------------------------- precision "auto"


@pytest.mark.parametrize(
    "gpus, flags, expected",
    [
        ([], {"avx2", "fma"}, "float32"),  # this host: bfloat16 would be emulated
        ([], {"avx2", "avx512f", "avx512_bf16"}, "mixed_bfloat16"),
        ([], {"avx2", "amx_bf16", "amx_tile"}, "mixed_bfloat16"),
        ([(7, 5)], {"avx512_bf16"}, "float32"),  # a T4 computes; the CPU's flags do not matter
        ([(8, 0)], set(), "mixed_bfloat16"),
        ([(9, 0), (7, 0)], set(), "float32"),  # the slowest GPU decides
    ],
)
def test_auto_precision_follows_the_device(monkeypatch, gpus, flags, expected):
    monkeypatch.setattr(training, "gpu_compute_capabilities", lambda: gpus)
    monkeypatch.setattr(training, "cpu_flags", lambda: flags)
    assert training.resolve_precision("auto") == expected
    assert training.resolve_precision("float32") == "float32"  # an explicit choice is kept
    assert training.resolve_precision("mixed_bfloat16") == "mixed_bfloat16"


def test_cpu_flags_reads_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t\t: spectre\n")
    assert training.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_bf16"}
    assert training.cpu_flags(str(tmp_path / "missing")) == set()


# ---------------------------------------------------------------- JAX


JAX_FIT = """
import json, sys
import numpy as np
from click.testing import CliRunner
from cxrkeras.cli import main
from cxrkeras.runs import load_model

data, config, out, pixels = sys.argv[1:]
result = CliRunner().invoke(main, ["fit", "infected", "--data", data, "--config", config, "--epochs", "1",
                                   "--out", out, "--name", "jax", "--json"], catch_exceptions=False)
assert result.exit_code == 0, result.output
record = json.loads(result.stdout[result.stdout.index("{"):])
model = load_model(record["run_dir"])
np.save(pixels.replace("pixels", "jax_probs"), np.asarray(model.predict(np.load(pixels), verbose=0)))
json.dump(record, open(pixels.replace("pixels.npy", "record.json"), "w"))
# evaluate and export are TensorFlow's work: under JAX they rerun themselves under TensorFlow
for args in (["evaluate", record["run_dir"], "--data", data, "--split", "val"],
             ["export", record["run_dir"], "--out", out + "/export"]):
    assert CliRunner().invoke(main, args).exit_code == 0, args
"""


def tiny_config(path, data_dir):
    """A two-block classifier on 48x48 images, batches that divide the data (one compiled step shape)."""
    from cxrkeras.config import RunConfig, study_model_config, study_train_config

    config = RunConfig(model=study_model_config("infected"), train=study_train_config("infected"))
    config.model.blocks, config.model.filters, config.model.dense_units = 2, [4, 8], 8
    config.model.image_size = config.data.image_size = 48
    config.train.batch_size = 8
    config.data.data_dir = data_dir
    path.write_text(json.dumps(config.to_dict()))
    return str(path)


def test_a_fit_under_jax_evaluates_exports_and_predicts_the_same_under_tensorflow(tmp_path):
    """fit, evaluate and export with KERAS_BACKEND=jax (JAX's CPU build); ~45 s of CPU here."""
    pytest.importorskip("jax")
    import keras

    data = tmp_path / "data"
    write_synthetic_dataset(data, {"train": 8, "val": 2, "test": 1}, seed=2)
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 48, 48, 1)).astype("float32")
    np.save(tmp_path / "pixels.npy", pixels)
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    args = [str(data), tiny_config(tmp_path / "config.json", str(data)), str(tmp_path / "runs"),
            str(tmp_path / "pixels.npy")]
    done = subprocess.run([sys.executable, "-c", JAX_FIT, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    record = json.loads((tmp_path / "record.json").read_text())
    assert record["completed"] and record["epochs_run"] == 1
    saved = json.loads((tmp_path / "runs" / "infected" / "jax" / "config.json").read_text())
    assert saved["train"]["precision"] == record["precision"] == "float32"  # --config's own, not "auto"
    assert keras.backend.backend() == "tensorflow"
    from cxrkeras.runs import load_model

    model = load_model(record["run_dir"])
    jax_probabilities = np.load(tmp_path / "jax_probs.npy")
    np.testing.assert_allclose(model.predict(pixels, verbose=0), jax_probabilities, atol=1e-4)
    metrics = json.loads((tmp_path / "runs" / "infected" / "jax" / "eval-val" / "metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["classes"] == ["normal", "infected"]
    import tensorflow as tf

    exported = tf.saved_model.load(str(tmp_path / "runs" / "export" / "1"))
    answer = exported.signatures["predict_images"](images=tf.constant(pixels))["probabilities"].numpy()
    np.testing.assert_allclose(answer[:, 1], jax_probabilities[:, 0], atol=1e-4)
