"""Precision "auto" and backends: which precision a device gets, and a fit under JAX loaded by TensorFlow."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cxrkeras import devices, training
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
    monkeypatch.setattr(devices, "gpu_compute_capabilities", lambda: gpus)
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    assert devices.resolve_precision("auto") == expected
    assert devices.resolve_precision("float32") == "float32"  # an explicit choice is kept
    assert devices.resolve_precision("mixed_bfloat16") == "mixed_bfloat16"


def test_cpu_flags_reads_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t\t: spectre\n")
    assert devices.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_bf16"}
    assert devices.cpu_flags(str(tmp_path / "missing")) == set()


# ---------------------------------------------------------------- JAX, without TensorFlow


# Runs with KERAS_BACKEND=jax in a process where `import tensorflow` fails: the commands that train and
# evaluate work on JAX alone (cxrkeras.arrays feeds them); export says it needs TensorFlow.
JAX_WITHOUT_TENSORFLOW = """
import sys
sys.modules["tensorflow"] = None  # `import tensorflow` raises ImportError from here on
import json
import numpy as np
from click.testing import CliRunner
from cxrkeras.cli import main
from cxrkeras.runs import load_model

data, config, out, pixels = sys.argv[1:]

def cli(*args, code=0):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, (args, result.output, result.exception)
    return result.output

runs = {}
for task in ("infected", "covid"):
    output = cli("fit", task, "--data", data, "--config", config.format(task=task), "--epochs", "1", "--out", out, "--name", "jax",
                 "--json")
    runs[task] = json.loads(output[output.index("{"):])
cli("cascade", runs["infected"]["run_dir"], runs["covid"]["run_dir"], "--out", out + "/cascade")
cli("evaluate", out + "/cascade", "--data", data, "--split", "test")
exported = cli("export", runs["infected"]["run_dir"], "--out", out + "/export", code=1)
assert "export" in exported and "needs TensorFlow" in exported and len(exported.strip().splitlines()) == 1, exported
assert "tensorflow" not in {m for m in sys.modules if sys.modules[m] is not None}
model = load_model(runs["infected"]["run_dir"])
np.save(pixels.replace("pixels", "jax_probs"), np.asarray(model.predict(np.load(pixels), verbose=0)))
json.dump(runs["infected"], open(pixels.replace("pixels.npy", "record.json"), "w"))
from cxrkeras import explain
explainers = explain.stage_explainers(load_model(out + "/cascade"), "cascade")
decisions = np.array([0, 1, 2])
heat = [np.asarray(explain.explain_heatmaps(explainers, np.load(pixels), decisions)) for _ in range(2)]
assert explain._jax_parts.cache_info().hits == 2, explain._jax_parts.cache_info()  # the second batch rebuilt nothing
np.testing.assert_array_equal(heat[0], heat[1])
np.save(pixels.replace("pixels", "jax_heat"), heat[0])
"""


def tiny_run_config(data_dir, task="infected"):
    """A two-block classifier on 48x48 images, batches that divide the data (one compiled step shape)."""
    from cxrkeras.config import RunConfig, study_model_config, study_train_config

    config = RunConfig(model=study_model_config("infected"), train=study_train_config(task))
    config.model.task = task
    config.model.blocks, config.model.filters, config.model.dense_units = 2, [4, 8], 8
    config.model.image_size = 48
    config.train.batch_size = 8
    config.data.data_dir = data_dir
    return config


def tiny_config(path, data_dir, task="infected"):
    path.write_text(json.dumps(tiny_run_config(str(data_dir), task).to_dict()))
    return str(path)


def test_jax_without_tensorflow_fits_a_cascade_and_evaluates_it_and_tensorflow_loads_the_same(tmp_path):
    """fit (both stages), cascade and evaluate with KERAS_BACKEND=jax where TensorFlow cannot be imported."""
    pytest.importorskip("jax")
    import keras

    data = tmp_path / "data"
    write_synthetic_dataset(data, {"train": 8, "val": 2, "test": 1}, seed=2)
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 48, 48, 1)).astype("float32")
    np.save(tmp_path / "pixels.npy", pixels)
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    for task in ("infected", "covid"):
        tiny_config(tmp_path / f"{task}.json", data, task)
    args = [str(data), str(tmp_path / "{task}.json"), str(tmp_path / "runs"),
            str(tmp_path / "pixels.npy")]
    done = subprocess.run([sys.executable, "-c", JAX_WITHOUT_TENSORFLOW, *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    record = json.loads((tmp_path / "record.json").read_text())
    assert record["completed"] and record["epochs_run"] == 1
    saved = json.loads((tmp_path / "runs" / "infected" / "jax" / "config.json").read_text())
    assert saved["train"]["precision"] == record["precision"] == "float32"  # --config's own, not "auto"
    metrics = json.loads((tmp_path / "runs" / "cascade" / "eval-test" / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["classes"] == ["normal", "non-covid", "covid"]
    assert list((tmp_path / "runs" / "cascade" / "eval-test").glob("gradcam_*.png"))
    assert keras.backend.backend() == "tensorflow"
    from cxrkeras.runs import load_model

    model = load_model(record["run_dir"])
    np.testing.assert_allclose(model.predict(pixels, verbose=0), np.load(tmp_path / "jax_probs.npy"), atol=1e-4)
    from cxrkeras import explain  # Grad-CAM by jax.grad is TensorFlow's GradientTape's

    explainers = explain.stage_explainers(load_model(str(tmp_path / "runs" / "cascade")), "cascade")
    heat = explain.explain_heatmaps(explainers, pixels, np.array([0, 1, 2]))
    assert np.asarray(heat).max() > 0.5  # some image has heat to compare, not zeros on both sides
    np.testing.assert_allclose(np.asarray(heat), np.load(tmp_path / "jax_heat.npy"), atol=1e-3)


# ---------------------------------------------------------------- the arrays path and tf.data


def test_the_arrays_path_and_tf_data_give_the_same_pixels_and_labels(synthetic_dataset):
    """Each epoch covers the same images with the same labels (augmentation off); the order may differ."""
    from cxrkeras import arrays, data as data_lib

    config = tiny_run_config(synthetic_dataset)
    task = training.load_task_data(config)
    for paths, labels in ((task.train_paths, task.train_labels), (task.val_paths, task.val_labels)):
        pipeline = data_lib.make_dataset(paths, labels, "infected", batch_size=8, shuffle=True, seed=3, image_size=48)
        batches = arrays.ArrayBatches(arrays.load_arrays(paths, 48, cache=False),
                                      data_lib.label_array(labels, "infected"), 8, shuffle=True, seed=3)
        for _ in range(2):  # two epochs: both reshuffle, each covers every image once
            tf_x, tf_y = (np.concatenate(part) for part in zip(*[(x.numpy(), y.numpy()) for x, y in pipeline]))
            ar_x, ar_y = (np.concatenate(part) for part in zip(*[batches[i] for i in range(len(batches))]))
            batches.on_epoch_end()
            assert len(ar_x) == len(tf_x) == len(paths)
            np.testing.assert_allclose(_sorted_rows(ar_x, ar_y), _sorted_rows(tf_x, tf_y), atol=1e-5)


def _sorted_rows(images, labels):
    """Images with their label appended, in a fixed order (by content), to compare two epochs as sets."""
    rows = np.concatenate([images.reshape(len(images), -1), labels.reshape(len(labels), -1)], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def test_one_training_step_gives_the_same_weights_on_either_path(synthetic_dataset):
    from cxrkeras import arrays, data as data_lib

    config = tiny_run_config(synthetic_dataset)
    task = training.load_task_data(config)
    paths, labels = task.train_paths[:8], task.train_labels[:8]
    x_tf, y_tf = next(iter(data_lib.make_dataset(paths, labels, "infected", batch_size=8, image_size=48)))
    x_ar, y_ar = arrays.ArrayBatches(arrays.load_arrays(paths, 48, cache=False),
                                     data_lib.label_array(labels, "infected"), 8)[0]
    weights = []
    for x, y in ((x_tf.numpy(), y_tf.numpy()), (x_ar, y_ar)):
        model, _ = training.build_and_compile(config, augment_on="data")
        model.train_on_batch(x, y)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_decoded_arrays_are_cached_on_disk_by_the_files_and_the_size(tmp_path, monkeypatch):
    from PIL import Image

    from cxrkeras import arrays
    from cxrkeras.images import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((20, 30), 80 * i, "uint8")).save(paths[-1])
    first = arrays.load_arrays(paths, 16)
    assert len(list((tmp_path / "cache").glob("arrays-*.npy"))) == 1
    np.testing.assert_array_equal(arrays.load_arrays(paths, 16), first)  # read back
    arrays.load_arrays(paths, 8)
    Image.fromarray(np.full((20, 30), 255, "uint8")).save(paths[0])  # a changed file decodes again
    os.utime(paths[0], ns=(1, 1))
    assert arrays.load_arrays(paths, 16)[0].min() == pytest.approx(1.0)
    assert len(list((tmp_path / "cache").glob("arrays-*.npy"))) == 3


def test_the_arrays_path_is_taken_off_tensorflow_while_the_images_fit_in_memory(tmp_path):
    from cxrkeras import arrays

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  4000 kB\nMemAvailable:  1000 kB\n")
    assert arrays.fits_in_memory(10, 10, str(meminfo))  # 4 kB of 1000
    assert not arrays.fits_in_memory(100, 150, str(meminfo))  # 9 MB
    assert arrays.fits_in_memory(10**9, 150, str(tmp_path / "none"))  # unknown: try
    task = training.TaskData(["a"] * 3, [0] * 3, ["b"], [0], "", [])
    assert training.input_path(tiny_run_config("x"), task) == "tf.data"  # the TensorFlow backend


def test_fit_speed_reads_the_references_pytorch_fp32_figures_on_the_h200(tmp_path):
    from scripts import load_script

    fit_speed = load_script("benchmarks/fit_speed.py")
    reference = tmp_path / "reference.md"
    reference.write_text("| machine | PyTorch fp32 eager |\n|---|---|\n| 2-core CPU like yours, infected | 61 |\n\n"
                         "| H200 GPU, batch 64 | PyTorch fp32 eager | PyTorch bf16 |\n|---|---|---|\n"
                         "| infected | 12,400 | 13,600 |\n| covid | 6,400 | 9,500 |\n")
    assert fit_speed.reference_pytorch_fp32(str(reference)) == {"infected": 12400, "covid": 6400}
    assert fit_speed.reference_pytorch_fp32(str(tmp_path / "missing.md")) == {}
