"""SavedModel export: signatures, equivalence with Keras in a fresh process, Grad-CAM, classify, versions, op check."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tiny_models import TINY, force, tiny

from cxrkeras import export as export_lib
from cxrkeras import savedmodel
from cxrkeras.cli import main
from cxrkeras.config import RunConfig
from cxrkeras.data import load_images
from cxrkeras.explain import explained_model, grad_cam
from cxrkeras.models.cascade import build_cascade, model_kind, predict
from cxrkeras.runs import TaskUnknownError, load_model
from cxrkeras.synth import synth_image

# Runs in a fresh interpreter with TensorFlow only: serving must need no Python of ours.
FRESH_PROCESS = r"""
import json, sys
import numpy as np
import tensorflow as tf

job = json.load(open(sys.argv[1]))
contents = [open(p, "rb").read() for p in job["images"]]
arrays = np.load(job["arrays"])
result = {}
for name, folder in job["exports"].items():
    loaded = tf.saved_model.load(folder)
    entry = {"signatures": sorted(loaded.signatures)}
    for signature, images in (("serving_default", tf.constant(contents)), ("predict_images", tf.constant(arrays))):
        fn = loaded.signatures[signature]
        out = fn(images=images)
        entry[signature] = {
            "inputs": {k: [v.dtype.name, v.shape.as_list()] for k, v in fn.structured_input_signature[1].items()},
            "outputs": {k: v.dtype.name for k, v in fn.structured_outputs.items()},
            "probabilities": out["probabilities"].numpy().tolist(),
            "class_id": out["class_id"].numpy().tolist(),
            "class_name": [n.decode() for n in out["class_name"].numpy()],
        }
    explained = loaded.signatures["explain"](images=tf.constant(contents))
    entry["explain"] = {k: v.numpy().tolist() for k, v in explained.items() if k not in ("class_name", "explained_by")}
    entry["explain"]["explained_by"] = [n.decode() for n in explained["explained_by"].numpy()]
    examples = []
    for c in contents:
        example = tf.train.Example()
        example.features.feature["image"].bytes_list.value.append(c)
        examples.append(example.SerializeToString())
    classified = loaded.signatures["classify"](inputs=tf.constant(examples))
    entry["classify"] = {
        "classes": [[n.decode() for n in row] for row in classified["classes"].numpy()],
        "scores": classified["scores"].numpy().tolist(),
    }
    entry["class_names"] = [n.decode() for n in loaded.class_names.numpy()]
    entry["thresholds"] = loaded.thresholds.numpy().tolist()
    entry["kind"] = loaded.kind.numpy().decode()
    result[name] = entry
result["our_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "cxrkeras")
json.dump(result, open(job["result"], "w"))
"""


def write_images(folder):
    """PNGs of several sizes and modes (gray, RGB, RGBA, 16-bit), and one JPEG."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    gray = [synth_image(label, rng) for label in ("normal", "non-covid", "covid", "covid")]
    pictures = {
        "gray.png": Image.fromarray(gray[0], "L"),
        "rgb.png": Image.fromarray(np.stack([gray[1]] * 3, -1), "RGB").resize((220, 180)),
        "rgba.png": Image.fromarray(np.dstack([gray[2]] * 3 + [np.full_like(gray[2], 255)]), "RGBA").resize((100, 130)),
        "deep.png": Image.fromarray(gray[3].astype("uint16") * 257).convert("I;16"),
        "photo.jpg": Image.fromarray(gray[1], "L").resize((300, 300)),
    }
    paths = []
    for name, picture in pictures.items():
        picture.save(folder / name)
        paths.append(str(folder / name))
    return paths


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Four exports (cascade, binary from a run folder, three-class, a strict cascade), loaded in a fresh process."""
    keras.utils.set_random_seed(0)  # session fixtures start before the tests' seeding
    root = tmp_path_factory.mktemp("export")
    paths = write_images(root / "images")
    arrays = load_images(paths)
    np.save(root / "arrays.npy", arrays)

    sources = {}
    infected = tiny("infected")
    p_infected = np.sort(infected.predict(arrays, verbose=0)[:, 0])
    # a threshold between the 2nd and 3rd image: some decisions are normal, others infected
    sources["cascade"] = build_cascade(infected, tiny("covid"), {"infected": float(p_infected[1:3].mean())})
    sources["binary"] = tiny("infected")
    sources["three-class"] = tiny("three-class")
    sources["strict"] = build_cascade(force(tiny("infected"), 0.8), force(tiny("covid"), 0.8), {"covid": 0.9})
    models, exports = {}, {}
    for name, model in sources.items():
        folder = root / "models" / name
        folder.mkdir(parents=True)
        model.save(folder / "model.keras")
        if name == "binary":
            RunConfig(model=TINY["infected"]).save(folder / "config.json")
        models[name] = load_model(folder)
        exports[name] = export_lib.export(folder, root / "serving" / name)
    job = {
        "images": paths,
        "arrays": str(root / "arrays.npy"),
        "exports": exports,
        "result": str(root / "result.json"),
    }
    (root / "job.json").write_text(json.dumps(job))
    (root / "fresh.py").write_text(FRESH_PROCESS)
    command = [sys.executable, str(root / "fresh.py"), str(root / "job.json")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((root / "result.json").read_text())
    return {"models": models, "exports": exports, "arrays": arrays, "result": result, "paths": paths}


@pytest.mark.parametrize("name, k", [("cascade", 3), ("binary", 2), ("three-class", 3)])
def test_fresh_process_matches_keras(exported, name, k):
    probabilities, class_ids = predict(exported["models"][name], exported["arrays"])
    assert probabilities.shape == (len(exported["paths"]), k)
    assert np.ptp(probabilities[:, -1]) > 1e-3  # the images give different answers: decoding matters
    entry = exported["result"][name]
    names = entry["class_names"]
    for signature in ("serving_default", "predict_images"):
        out = entry[signature]
        np.testing.assert_allclose(out["probabilities"], probabilities, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(out["class_id"], class_ids)
        assert out["class_name"] == [names[i] for i in class_ids]
    assert exported["result"]["our_modules"] == []


def test_signatures_and_keys(exported):
    entry = exported["result"]["cascade"]
    assert entry["signatures"] == ["classify", "explain", "predict_images", "serving_default"]
    assert entry["serving_default"]["inputs"] == {"images": ["string", [None]]}
    assert entry["predict_images"]["inputs"] == {"images": ["float32", [None, 150, 150, 1]]}
    for signature in ("serving_default", "predict_images"):
        assert entry[signature]["outputs"] == {"probabilities": "float32", "class_id": "int64", "class_name": "string"}
    assert entry["class_names"] == ["normal", "non-covid", "covid"] and entry["kind"] == "cascade"
    assert exported["result"]["binary"]["class_names"] == ["normal", "infected"]  # task from config.json


def test_thresholds_survive_export(exported):
    entry = exported["result"]["strict"]
    assert entry["thresholds"] == pytest.approx([0.5, 0.9])
    # p_infected = p_covid = 0.8: covid at 0.5, but not at a covid threshold of 0.9
    for signature in ("serving_default", "predict_images"):
        assert set(entry[signature]["class_name"]) == {"non-covid"}
        np.testing.assert_allclose(entry[signature]["probabilities"][0], [0.2, 0.16, 0.64], atol=1e-6)
    metadata = savedmodel.read_metadata(exported["exports"]["strict"])
    assert metadata["thresholds"] == {"infected": 0.5, "covid": 0.9}
    assert metadata["kind"] == "cascade" and metadata["version"] == 1
    assert metadata["source"].endswith(os.path.join("models", "strict"))


def test_versions_count_up(tmp_path):
    model = tiny("covid")
    base = tmp_path / "covid"
    first = export_lib.export_model(model, base, task="covid")
    second = export_lib.export_model(model, base, task="covid")
    assert (first, second) == (str(base / "1"), str(base / "2"))
    assert os.path.isfile(os.path.join(second, "saved_model.pb"))
    (base / "notes").mkdir()
    (base / "5").mkdir()  # a version folder being written by someone else
    assert export_lib.next_version(base) == 6
    assert savedmodel.saved_model_dir(base) == second  # the highest complete version
    assert savedmodel.saved_model_dir(first) == first
    assert sorted(os.listdir(base)) == ["1", "2", "5", "notes"]  # no staging folder left behind
    with pytest.raises(export_lib.ExportError, match="a SavedModel version folder; pass its parent"):
        export_lib.export_model(model, first, task="covid")


def test_binary_model_without_config_needs_a_task(tmp_path):
    inputs = keras.Input((150, 150, 1))  # a binary model that does not say its task (made elsewhere)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs))
    keras.Model(inputs, outputs, name="my_model").save(tmp_path / "my.keras")
    with pytest.raises(TaskUnknownError):
        export_lib.export(tmp_path / "my.keras", tmp_path / "out")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "my.keras"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--task infected or --task covid" in result.output
    result = CliRunner().invoke(
        main, ["export", str(tmp_path / "my.keras"), "--out", str(tmp_path / "out"), "--task", "covid"]
    )
    assert result.exit_code == 0, result.output
    assert f"exported binary model to {tmp_path / 'out' / '1'} (classes non-covid, covid" in result.output
    assert "signatures: classify, predict_images, serving_default)" in result.output  # no conv layer: no explain
    assert savedmodel.read_metadata(tmp_path / "out" / "1")["class_names"] == ["non-covid", "covid"]


def test_export_command_records_the_cascade(tmp_path):
    folder = tmp_path / "cascade"
    folder.mkdir()
    build_cascade(tiny("infected"), tiny("covid"), {"infected": 0.4, "covid": 0.6}).save(folder / "model.keras")
    (folder / "cascade.json").write_text(json.dumps({"thresholds": {"infected": 0.4, "covid": 0.6}, "table": [1, 2]}))
    result = CliRunner().invoke(main, ["export", str(folder), "--out", str(tmp_path / "serving"), "--json"])
    assert result.exit_code == 0, result.output
    metadata = json.loads(result.output)
    assert metadata["path"] == str(tmp_path / "serving" / "1")
    assert metadata["cascade"] == {"thresholds": {"infected": 0.4, "covid": 0.6}}
    assert sorted(metadata["signatures"]) == ["classify", "explain", "predict_images", "serving_default"]
    result = CliRunner().invoke(main, ["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "serving")])
    assert result.exit_code == 1 and "nothing: no such file or folder" in result.output


@pytest.mark.parametrize("name", ["cascade", "binary", "three-class"])
def test_explain_is_the_grad_cam_of_the_deciding_stage(exported, name):
    model, entry = exported["models"][name], exported["result"][name]
    explain = entry["explain"]
    np.testing.assert_allclose(explain["probabilities"], entry["serving_default"]["probabilities"], atol=1e-6)
    assert explain["class_id"] == entry["serving_default"]["class_id"]
    kind = model_kind(model)
    for i, (image, prediction) in enumerate(zip(exported["arrays"], explain["class_id"])):
        stage, class_index = explained_model(model, kind, prediction)
        heatmap = np.asarray(explain["heatmap"][i])
        assert heatmap.shape == image.shape[:2] and heatmap.min() >= 0 and heatmap.max() <= 1
        np.testing.assert_allclose(heatmap, grad_cam(stage, image, class_index=class_index), atol=1e-4)
        assert explain["explained_by"][i] == stage.name
    if name == "cascade":  # both stages explain some of these images
        assert set(explain["explained_by"]) == {"infected_classifier", "covid_classifier"}


def test_classify_answers_class_names_and_probabilities(exported):
    for name in ("cascade", "binary"):
        entry = exported["result"][name]
        classify = entry["classify"]
        assert classify["classes"] == [entry["class_names"]] * len(exported["paths"])
        np.testing.assert_allclose(classify["scores"], entry["serving_default"]["probabilities"], atol=1e-6)


def test_our_exports_pass_the_op_check(exported):
    for folder in exported["exports"].values():
        proto = savedmodel.read_proto(folder)
        assert savedmodel.untrusted_ops(proto) == {}
        ops = {}
        for op, where in savedmodel.graph_ops(proto):
            ops.setdefault(op, set()).add(where)
        # the variables are restored by the saver's own functions, and only there
        assert ops["RestoreV2"] and ops["RestoreV2"] <= savedmodel.saver_functions(proto)
        savedmodel.check_ops(folder)


def test_a_crafted_savedmodel_is_refused(tmp_path):
    import tensorflow as tf

    from tiny_models import write_crafted_savedmodel

    marker = tmp_path / "written"
    folder = write_crafted_savedmodel(tmp_path / "crafted" / "1", marker)
    with pytest.raises(savedmodel.UntrustedOpsError, match=r"WriteFile \(in __inference_serve_\d+\).*--trust-model"):
        savedmodel.load(folder)
    assert not marker.exists()
    loaded = savedmodel.load(folder, trust=True)  # what trusting means: the model writes the file
    loaded.signatures["serving_default"](images=tf.constant([b"x"]))
    assert marker.read_text() == "written by a SavedModel"


def test_saver_file_ops_outside_the_saver_are_refused(tmp_path):
    import tensorflow as tf

    module = tf.Module()
    module.v = tf.Variable(1.0)

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def read_checkpoint(prefix):
        return tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=["v"], shape_and_slices=[""], dtypes=[tf.float32])

    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": read_checkpoint})
    found = savedmodel.untrusted_ops(savedmodel.read_proto(tmp_path / "1"))
    assert list(found) == ["RestoreV2"] and all("read_checkpoint" in place for place in found["RestoreV2"])


def test_a_model_grad_cam_cannot_explain_exports_without_explain(tmp_path):
    inputs = keras.Input((150, 150, 1))  # no conv layer: nothing for Grad-CAM to read
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs))
    version = export_lib.export_model(keras.Model(inputs, outputs), tmp_path / "out", task="covid")
    assert sorted(savedmodel.read_metadata(version)["signatures"]) == ["classify", "predict_images", "serving_default"]
    import tensorflow as tf

    assert "explain" not in tf.saved_model.load(version).signatures


def test_a_bf16_trained_classifier_is_exported_computing_in_float32(tmp_path):
    """The SavedModel answers what the float32 function of its weights answers, not bfloat16's rounding."""
    import tensorflow as tf

    from cxrkeras.models import build_model

    mixed, plain = build_model(TINY["infected"], dtype="mixed_bfloat16"), build_model(TINY["infected"])
    kernel, bias = mixed.get_layer("predictions").get_weights()
    mixed.get_layer("predictions").set_weights([kernel * 40, bias])  # outputs spread over (0, 1), not near 0.5
    plain.set_weights(mixed.get_weights())
    x = np.random.default_rng(2).random((4, 150, 150, 1), dtype=np.float32)
    version = export_lib.export_model(mixed, tmp_path / "out", task="infected")
    out = tf.saved_model.load(version).signatures["predict_images"](images=tf.constant(x))["probabilities"].numpy()
    expected = plain.predict(x, verbose=0)[:, 0]
    np.testing.assert_allclose(out[:, 1], expected, atol=1e-5)
