"""`cxrkeras adapt` (AdaBN from unlabeled images), temperature scaling, and both through export, serve and evaluate."""

import json
import os

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from images import write_dicom
from PIL import Image
from serving_helpers import http, start, wait_for
from tiny_models import tiny, write_runs

from cxrkeras import adapt as adapt_lib
from cxrkeras import calibration, data as data_lib, runs, serving
from cxrkeras import export as export_lib
from cxrkeras import savedmodel
from cxrkeras.cli import main
from cxrkeras.config import ModelConfig
from cxrkeras.metrics import expected_calibration_error
from cxrkeras.models import build_model
from cxrkeras.models import cascade as cascade_lib
from cxrkeras.synth import synth_image

SIZE = 48  # the tiny models' input


def bn_classifier(task, arch="plain"):
    """A tiny classifier with BatchNormalization after every conv (and the input's)."""
    return build_model(ModelConfig(task=task, arch=arch, blocks=2 if arch == "plain" else 1, filters=[4, 8],
                                   dense_units=8, batchnorm=True, image_size=SIZE))


def bn_cascade():
    """A cascade whose infected stage is an ensemble of two classifiers and whose covid stage is one."""
    infected = cascade_lib.build_ensemble([bn_classifier("infected"), bn_classifier("infected")], "infected")
    return cascade_lib.build_cascade(infected, bn_classifier("covid", "residual"), {"infected": 0.45, "covid": 0.55})


def write_flat_folder(folder, n, seed=0):
    """`n` unlabeled PNGs of mixed classes and sizes in one folder, plus a DICOM and a file that is not an image."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = synth_image(("normal", "non-covid", "covid")[i % 3], rng, 40 + i % 3)
        Image.fromarray(image).save(folder / f"x{i:03d}.png")
    write_dicom(folder / "scan.dcm", (synth_image("normal", rng, 40).astype("uint16") * 16))
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return write_flat_folder(tmp_path_factory.mktemp("site") / "images", adapt_lib.MIN_IMAGES + 2)


# ---------------------------------------------------------------- AdaBN


def test_adapted_statistics_are_each_layers_input_moments(site, tmp_path):
    source = tmp_path / "cascade"
    source.mkdir()
    bn_cascade().save(source / "model.keras")
    record = adapt_lib.adapt(source, site, tmp_path / "adapted", batch_size=16, log=lambda m: None)

    assert record["images"] == adapt_lib.MIN_IMAGES + 3  # the PNGs and the DICOM, from a folder without classes
    assert [s["path"].endswith("notes.txt") for s in record["skipped"]] == [True]
    assert record["stages"] == ["covid", "infected"]
    model = runs.load_model(tmp_path / "adapted")
    paths = [p for p in adapt_lib.image_paths(site) if not p.endswith(".txt")]
    images = data_lib.load_images(paths, SIZE)
    checked = 0
    for stage in calibration.stage_models(model).values():
        for classifier in cascade_lib.ensemble_members(stage):
            for layer in adapt_lib.batchnorm_layers(classifier):
                x = np.asarray(keras.Model(classifier.inputs[0], layer.input)(images), "float64")
                np.testing.assert_allclose(layer.moving_mean, x.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(layer.moving_variance, x.var(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
                checked += 1
    assert checked == len(record["layers"]) == 2 * 3 + 5  # two plain members (3 BN each), one residual (5)
    assert json.loads((tmp_path / "adapted" / "adapt.json").read_text())["fingerprint"] == record["fingerprint"]
    assert adapt_lib.model_status(model, tmp_path / "adapted")["adapted"]["images"] == record["images"]


def test_one_stage_only_leaves_the_other(site, tmp_path):
    model = bn_cascade()
    before = [np.array(w) for w in model.get_layer("covid_classifier").get_weights()]
    images = data_lib.load_images([str(site / f"x{i:03d}.png") for i in range(8)], SIZE)
    changes = adapt_lib.adapt_batchnorm(model, images, ["infected"])
    assert {c["stage"] for c in changes} == {"infected"}
    for w, b in zip(model.get_layer("covid_classifier").get_weights(), before):
        np.testing.assert_array_equal(w, b)


def test_a_manifest_gives_its_paths_and_nothing_else(site, tmp_path):
    manifest = tmp_path / "site.csv"
    rows = [f"{site / f'x{i:03d}.png'},not-a-class\n" for i in range(6)] + ["missing.png,whatever\n"]
    manifest.write_text("path,label\n" + "".join(rows))  # labels that are no class: never read
    good, problems = adapt_lib.readable_images(manifest, min_images=6)
    assert [s.path for s in good] == [str(site / f"x{i:03d}.png") for i in range(6)]
    assert [os.path.basename(p.path) for p in problems] == ["missing.png"]
    (tmp_path / "no-path.csv").write_text("file,label\nx.png,normal\n")
    with pytest.raises(adapt_lib.AdaptError, match="`path` column"):
        adapt_lib.image_paths(tmp_path / "no-path.csv")


def test_a_site_shift_costs_accuracy_and_adapt_wins_it_back():
    """A tiny classifier trained on synthetic X-rays; the new site's are brighter with less contrast."""
    rng = np.random.default_rng(0)

    def images(n):
        labels = np.arange(n) % 2
        x = np.stack([synth_image("non-covid" if y else "normal", rng, SIZE) for y in labels])
        return x.astype("float32")[..., None] / 255, labels

    x_train, y_train = images(96)
    x_val, y_val = images(64)
    model = bn_classifier("infected")
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    model.fit(x_train, y_train[:, None].astype("float32"), epochs=6, batch_size=16, verbose=0)

    def accuracy(x):
        return float(np.mean((model.predict(x, verbose=0)[:, 0] > 0.5) == y_val))

    shifted = 0.3 + 0.4 * x_val**1.5  # another machine: a gamma and a contrast change
    clean, before = accuracy(x_val), accuracy(shifted)
    adapt_lib.adapt_batchnorm(model, shifted, ["infected"])  # the images only, no labels
    after = accuracy(shifted)
    assert clean >= 0.9 and before <= clean - 0.15
    assert after >= clean - 0.05


def test_cli_refuses_too_few_images_and_its_own_input(tmp_path, site):
    source = tmp_path / "run"
    source.mkdir()
    tiny("infected").save(source / "model.keras")
    few = write_flat_folder(tmp_path / "few", 5)
    result = CliRunner().invoke(main, ["adapt", str(source), "--images", str(few), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "6 readable image(s) (1 skipped); adapt needs at least 64 images (one training batch" in result.output
    assert "--images" in CliRunner().invoke(main, ["adapt", "--help"]).output
    result = CliRunner().invoke(main, ["adapt", str(source), "--images", str(few), "--out", "o", "--stages", "lungs"])
    assert result.exit_code == 2 and "'lungs': expected stage names joined by commas" in result.output

    result = CliRunner().invoke(main, ["adapt", str(source), "--images", str(site), "--out", str(source)])
    assert result.exit_code == 1 and "the folder of the input model" in result.output
    out = tmp_path / "out"
    args = ["adapt", str(source / "model.keras"), "--images", str(site), "--out", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert CliRunner().invoke(main, args + ["--overwrite", "--json"]).exit_code == 0


def test_an_adapted_cascade_exports_as_the_next_version_and_serves(tmp_path, site):
    source = tmp_path / "cascade"
    source.mkdir()
    cascade_lib.build_cascade(bn_classifier("infected"), bn_classifier("covid")).save(source / "model.keras")
    base = tmp_path / "serving"
    export_lib.export(source, base)
    app = serving.create_app(base, "cxr", serving.Settings(poll_seconds=0.2))
    url, server, thread = start(app)
    try:
        wait_for(lambda: http(url, "/v2/health/ready")[0] == 200)
        assert http(url, "/ui/model.json")[1]["adapted"] is None
        adapt_lib.adapt(source, site, tmp_path / "adapted", log=lambda m: None)
        version = export_lib.export(tmp_path / "adapted", base)
        assert os.path.basename(version) == "2"
        wait_for(lambda: http(url, "/ui/model.json")[1]["version"] == 2)
        page = http(url, "/ui/model.json")[1]
        assert page["adapted"]["images"] == adapt_lib.MIN_IMAGES + 3 and page["calibrated"] is None
        png = (site / "x000.png").read_bytes()
        import base64

        status, answer, _ = http(url, "/v1/models/cxr:predict", {"instances": [{"b64": base64.b64encode(png).decode()}]})
        assert status == 200
        adapted = runs.load_model(tmp_path / "adapted")
        expected = cascade_lib.predict(adapted, data_lib.load_images([str(site / "x000.png")], SIZE))[0][0]
        np.testing.assert_allclose(answer["predictions"][0]["probabilities"], expected, atol=1e-4)
    finally:
        server.should_exit = True
        thread.join(30)


# ---------------------------------------------------------------- temperature scaling


def test_temperature_lowers_ece_on_over_confident_logits():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)  # calibrated at logit z
    p = 1 / (1 + np.exp(-3 * z))  # over-confident: three times the logit
    t = calibration.fit_temperature(p, y)
    assert 2.7 < t < 3.3
    ece = lambda q: expected_calibration_error(np.stack([1 - q, q], -1), y)  # noqa: E731
    assert ece(calibration.scale(p, t)) < ece(p) / 3
    np.testing.assert_array_equal(calibration.scale(p, t) > 0.5, p > 0.5)


def test_a_calibrated_cascade_keeps_every_decision_and_exports(tmp_path):
    model = cascade_lib.build_cascade(tiny("infected"), tiny("covid"), {"infected": 0.3, "covid": 0.7})
    images = np.random.default_rng(0).random((64, 150, 150, 1), dtype="float32")
    p, decided = cascade_lib.predict(model, images)
    new = calibration.with_temperatures(model, {"infected": 2.5, "covid": 0.6})
    thresholds = cascade_lib.cascade_thresholds(new)
    assert thresholds["infected"] == pytest.approx(1 / (1 + np.exp(-np.log(0.3 / 0.7) / 2.5)))
    assert thresholds["covid"] == pytest.approx(1 / (1 + np.exp(-np.log(0.7 / 0.3) / 0.6)))
    folder = tmp_path / "calibrated"
    folder.mkdir()
    new.save(folder / "model.keras")
    loaded = runs.load_model(folder)
    assert calibration.temperatures(loaded) == {"infected": 2.5, "covid": 0.6}
    p_new, decided_new = cascade_lib.predict(loaded, images)
    np.testing.assert_array_equal(decided_new, decided)
    assert not np.allclose(p_new, p)
    np.testing.assert_allclose(cascade_lib.predict(calibration.uncalibrated_model(loaded), images)[0], p, atol=1e-5)

    import tensorflow as tf

    version = export_lib.export(folder, tmp_path / "serving")
    assert savedmodel.read_metadata(version)["calibrated"] == {"infected": 2.5, "covid": 0.6}
    saved = tf.saved_model.load(version)
    assert "explain" in saved.signatures  # Grad-CAM looks through the temperature to the logits
    out = saved.signatures["predict_images"](images=tf.constant(images[:8]))
    np.testing.assert_allclose(out["probabilities"].numpy(), p_new[:8], atol=1e-5)


def test_calibrate_on_the_holdout_then_predict_and_evaluate(synthetic_dataset, tmp_path, monkeypatch):
    from cxrkeras.thresholds import make_cascade

    folders = write_runs(tmp_path, synthetic_dataset, holdout_fraction=0.3)
    make_cascade(folders["infected"], folders["covid"], tmp_path / "cascade")
    result = CliRunner().invoke(main, ["calibrate", str(tmp_path / "cascade"), "--out", str(tmp_path / "cal"),
                                       "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output[result.output.index("{"):])
    assert record["split"] == "holdout" and record["decisions_changed"] == 0
    assert set(record["temperatures"]) == {"infected", "covid"}
    cascade_json = json.loads((tmp_path / "cal" / "cascade.json").read_text())
    model = runs.load_model(tmp_path / "cal")
    assert cascade_json["thresholds"]["infected"] == cascade_lib.cascade_thresholds(model)["infected"]
    assert calibration.temperatures(model) == record["temperatures"]

    result = CliRunner().invoke(main, ["predict", str(tmp_path / "cal"), os.path.join(
        synthetic_dataset, "test", "normal", sorted(os.listdir(os.path.join(synthetic_dataset, "test", "normal")))[0]),
        "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output[result.output.index("["):])[0]
    assert answer["calibrated"] == record["temperatures"] and answer["adapted"] is None

    # evaluate: ECE before and after the temperatures; --adapt-on the evaluated split, scored with and without
    monkeypatch.setattr(adapt_lib, "MIN_IMAGES", 5)  # the synthetic test split has 9 images
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "cal"), "--data", synthetic_dataset,
                                       "--adapt-on", os.path.join(synthetic_dataset, "test"),
                                       "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "adapted on the evaluated test split itself (9 images, labels unread)" in result.output
    assert "before temperature scaling" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["calibration"]["temperatures"] == record["temperatures"]
    assert (tmp_path / "eval" / "calibration_before.png").exists()
    scores = metrics["adaptation"]["scores"]
    assert set(scores) == {"without", "with"} and scores["without"]["accuracy"] == metrics["accuracy"]
    assert json.loads((tmp_path / "eval" / "adapted" / "metrics.json").read_text())["accuracy"] == scores["with"]["accuracy"]

    no_holdout = write_runs(tmp_path / "plain", synthetic_dataset) if (tmp_path / "plain").mkdir() is None else None
    make_cascade(no_holdout["infected"], no_holdout["covid"], tmp_path / "plain-cascade")
    result = CliRunner().invoke(main, ["calibrate", str(tmp_path / "plain-cascade"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "carved no holdout" in result.output
