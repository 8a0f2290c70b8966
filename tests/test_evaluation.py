import keras
import numpy as np
import pytest

from cxrkeras import evaluation, explain, metrics
from cxrkeras.config import CLASSES, ModelConfig
from cxrkeras.models import build_model
from cxrkeras.models.cascade import build_cascade, predict_probabilities
from cxrkeras.runs import TaskUnknownError

# The study's cascade on the test split (reference.md): rows true normal / non-covid / covid.
STUDY_CONFUSION = np.array([[207, 3, 24], [6, 230, 6], [1, 21, 117]])


def arrays_from_confusion(cm):
    labels, preds = [], []
    for i, row in enumerate(cm):
        for j, n in enumerate(row):
            labels += [i] * n
            preds += [j] * n
    return np.array(labels), np.array(preds)


def tiny_model(task, size=48):
    arch = "plain" if task == "infected" else "residual"
    filters = [4, 8] if arch == "plain" else [4, 6]
    config = ModelConfig(
        task=task, arch=arch, blocks=2, filters=filters, dense_units=8, conv_dropout=0.0, image_size=size
    )
    return build_model(config)


# ---------------------------------------------------------------- the study's table


def test_table_matches_a_hand_computed_confusion():
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([0, 1, 0, 1, 2, 2])
    t = metrics.classification_table(labels, preds, CLASSES)
    assert t["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    normal, non_covid, covid = (t["per_class"][c] for c in CLASSES)
    assert (normal["recall"], normal["precision"], normal["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (non_covid["recall"], non_covid["precision"], non_covid["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (covid["recall"], covid["precision"], covid["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert [t["per_class"][c]["support"] for c in CLASSES] == [3, 2, 1]
    assert t["accuracy"] == pytest.approx(4 / 6)


def test_a_class_never_predicted_has_precision_zero_not_nan():
    t = metrics.classification_table([0, 1, 1], [0, 0, 0], ["normal", "infected"])
    assert t["per_class"]["infected"] == {"recall": 0.0, "precision": 0.0, "f1": 0.0, "support": 2}


def test_the_study_confusion_reproduces_the_study_table():
    labels, preds = arrays_from_confusion(STUDY_CONFUSION)
    t = metrics.classification_table(labels, preds, CLASSES)
    assert t["n"] == 615 and t["correct"] == 554
    assert round(t["accuracy"], 4) == 0.9008
    expected = {  # reference.md, recall / precision / F1
        "normal": (0.8846, 0.9673, 0.9241),
        "non-covid": (0.9504, 0.9055, 0.9274),
        "covid": (0.8417, 0.7959, 0.8182),
    }
    for name, values in expected.items():
        c = t["per_class"][name]
        assert tuple(round(c[k], 4) for k in ("recall", "precision", "f1")) == values
    assert round(metrics.stage_accuracies(labels, preds)["normal_vs_infected"], 4) == 0.9447

    printed = evaluation.format_table(t).splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in printed[1:]}
    assert rows["normal"] == ["0.8846", "0.9673", "0.9241", "234"]
    assert rows["covid"] == ["0.8417", "0.7959", "0.8182", "139"]
    assert rows["overall"] == ["615", "0.9008"]


def test_stage_accuracy_of_the_covid_stage_uses_its_own_decisions():
    labels = np.array([0, 1, 1, 2, 2])
    preds = np.array([0, 0, 1, 2, 0])  # two infected images called normal by stage one
    covid_says = np.array([True, False, True, True, False])  # covid stage alone: wrong on image 2 and 4
    s = metrics.stage_accuracies(labels, preds, covid_says)
    assert s["normal_vs_infected"] == pytest.approx(3 / 5)
    assert s["covid_vs_non_covid"] == pytest.approx(2 / 4)
    assert s["infected_images"] == 4
    assert metrics.stage_accuracies(labels, preds)["covid_vs_non_covid"] == pytest.approx(2 / 4)


def test_auc_is_one_for_separating_scores_and_none_for_an_absent_class():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.45, 0.55, 0.0], [0.2, 0.8, 0.0]])
    m = metrics.metrics_from_predictions(probs, probs.argmax(1), labels, CLASSES)
    assert m["auc"]["normal"] == pytest.approx(1.0) and m["auc"]["non-covid"] == pytest.approx(1.0)
    assert m["auc"]["covid"] is None
    assert m["accuracy"] == 1.0


# ---------------------------------------------------------------- calibration


def _binary_probs(confidence, correct):
    """Rows [1 - c, c] (predicting class 1 with confidence c) and labels, correct where `correct`."""
    confidence = np.asarray(confidence, "float64")
    probs = np.stack([1 - confidence, confidence], axis=1)
    return probs, np.where(correct, 1, 0)


def test_ece_is_zero_when_accuracy_matches_confidence_in_every_bin():
    probs_a, labels_a = _binary_probs([0.6] * 5, [1, 1, 1, 0, 0])  # 60% right at 0.6
    probs_b, labels_b = _binary_probs([0.9] * 10, [1] * 9 + [0])  # 90% right at 0.9
    probs, labels = np.concatenate([probs_a, probs_b]), np.concatenate([labels_a, labels_b])
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-9)


def test_ece_of_an_overconfident_model():
    # half the images at 0.95 and half right (gap 0.45); half at 0.65 and all right (gap 0.35)
    probs_a, labels_a = _binary_probs([0.95] * 4, [1, 1, 0, 0])
    probs_b, labels_b = _binary_probs([0.65] * 4, [1, 1, 1, 1])
    probs, labels = np.concatenate([probs_a, probs_b]), np.concatenate([labels_a, labels_b])
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.45 + 0.5 * 0.35)
    bins = metrics.reliability_bins(probs, labels)
    assert bins["count"].sum() == 8 and (bins["count"] > 0).sum() == 2


# ---------------------------------------------------------------- Grad-CAM and feature maps


def region_model():
    """Two channels: A = the pixel, B = 1 - the pixel; the logit is mean(A) - mean(B)."""
    image = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(2, 1, name="conv")(image)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    out = keras.layers.Dense(1, activation="sigmoid", name="predictions")(x)
    model = keras.Model(image, out)
    model.get_layer("conv").set_weights([np.array([1.0, -1.0]).reshape(1, 1, 1, 2), np.array([0.0, 1.0])])
    model.get_layer("predictions").set_weights([np.array([[1.0], [-1.0]]), np.zeros(1)])
    return model


def test_grad_cam_heat_lies_where_the_class_evidence_is():
    model = region_model()
    assert explain.gradcam_layer(model) == "relu"
    image = np.zeros((16, 16, 1), "float32")
    image[2:6, 9:13] = 1.0  # a bright patch: evidence for class 1 there, for class 0 elsewhere
    inside = np.zeros((16, 16), bool)
    inside[2:6, 9:13] = True
    heat1 = explain.grad_cam(model, image, class_index=1)
    heat0 = explain.grad_cam(model, image, class_index=0)
    for heat in (heat1, heat0):
        assert heat.shape == (16, 16) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    assert heat1[inside].mean() > 0.9 and heat1[~inside].max() < 0.1
    assert heat0[~inside].mean() > 0.9 and heat0[inside].max() < 0.1


@pytest.mark.parametrize("task", ["infected", "covid", "three-class"])
def test_grad_cam_of_the_study_architectures_has_the_image_size(task):
    model = tiny_model(task)
    image = np.random.default_rng(0).uniform(0, 1, (48, 48, 1)).astype("float32")
    layer = explain.gradcam_layer(model)
    assert layer == ("block2_relu" if task == "infected" else "res2_out")
    heat = explain.grad_cam(model, image)
    assert heat.shape == (48, 48) and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() <= 1.0


def test_feature_maps_give_one_array_per_layer_with_its_channels():
    model = tiny_model("covid")
    image = np.random.default_rng(1).uniform(0, 1, (48, 48, 1)).astype("float32")
    maps = explain.feature_maps(model, image)
    assert list(maps) == ["stem_conv2", "res1_conv2", "res2_conv2"]  # the 2nd, 4th and 6th conv
    for name, fmap in maps.items():
        assert fmap.ndim == 3 and fmap.shape[-1] == model.get_layer(name).filters
    assert maps["stem_conv2"].shape[:2] == (48, 48) and maps["res1_conv2"].shape[:2] == (16, 16)
    chosen = explain.feature_maps(model, image, ["stem_conv1"])
    assert list(chosen) == ["stem_conv1"] and chosen["stem_conv1"].shape[-1] == 4


# ---------------------------------------------------------------- evaluate() on arrays


def test_evaluate_a_cascade_reports_thresholds_and_both_stages():
    infected, covid = tiny_model("infected"), tiny_model("covid")
    cascade = build_cascade(infected, covid, {"infected": 0.3, "covid": 0.6})
    rng = np.random.default_rng(2)
    images = rng.uniform(0, 1, (9, 48, 48, 1)).astype("float32")
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    m = evaluation.evaluate(cascade, images, labels)
    assert m["kind"] == "cascade" and m["classes"] == list(CLASSES) and m["n"] == 9
    assert m["thresholds"] == pytest.approx({"infected": 0.3, "covid": 0.6})
    p_covid = predict_probabilities(covid, images[3:])[:, 1]
    expected = np.mean((p_covid > 0.6) == (labels[3:] == 2))
    assert m["stage_accuracy"]["covid_vs_non_covid"] == pytest.approx(expected)
    assert sum(m["per_class"][c]["support"] for c in CLASSES) == 9


def test_evaluate_a_binary_model_that_does_not_say_needs_its_task():
    images = np.zeros((2, 48, 48, 1), "float32")
    m = evaluation.evaluate(tiny_model("covid"), images, [0, 1])  # a built model says what it is
    assert m["classes"] == ["non-covid", "covid"] and m["kind"] == "binary"
    inputs = keras.Input((48, 48, 1))
    silent = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs)))
    with pytest.raises(TaskUnknownError, match="pass its task"):
        evaluation.evaluate(silent, images, [0, 1])
    m = evaluation.evaluate(silent, images, [0, 1], task="infected")
    assert m["classes"] == ["normal", "infected"]
