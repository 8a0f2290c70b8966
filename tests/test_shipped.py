"""The committed cascade, saved_models/cascade: it answers with no training, in a fresh process, as its
members say, and its model card shows exactly the figures of its metrics.json."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scripts import load_script

from cxrkeras.data import load_images
from cxrkeras.models.cascade import predict_probabilities
from cxrkeras.runs import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "saved_models", "cascade")


@pytest.fixture(scope="module")
def ship():
    return load_script("experiments/ship.py")


@pytest.fixture(scope="module")
def metrics():
    with open(os.path.join(SHIPPED, "metrics.json")) as f:
        return json.load(f)


def xray(seed):
    """A 150x150 gray image in [0, 1] with a bright chest-like blob (any image will do: the model must answer)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:150, 0:150] / 150.0
    blob = np.exp(-((xx - 0.5) ** 2 + (yy - 0.55) ** 2) / 0.08)
    return np.clip(0.2 + 0.6 * blob + rng.normal(0, 0.05, (150, 150)), 0, 1).astype("float32")


def test_the_model_card_is_the_committed_metrics_rendered(ship, metrics):
    with open(os.path.join(SHIPPED, "MODEL_CARD.md")) as f:
        card = f.read()
    assert card == ship.render_card(metrics)
    assert metrics["over_seeds"] == ship.spread(metrics["per_seed"])
    for figures in [*metrics["per_seed"], *metrics["ensemble"].values()]:
        confusion = np.array(figures["confusion"])
        assert confusion.sum() == figures["n"]
        assert abs(np.trace(confusion) / figures["n"] - figures["accuracy"]) < 1e-4
    assert [r["seed"] for r in metrics["per_seed"]] == metrics["seeds"] and len(metrics["seeds"]) >= 3


def test_the_shipped_recipe_is_the_rules_verdict_on_its_own_table(metrics):
    """Re-deciding from the committed table gives the committed verdict, and it is the recipe that shipped."""
    seeds = load_script("experiments/seeds.py")
    recipe, reason = seeds.decide(metrics["decision"]["rows"])
    assert {"recipe": recipe, "reason": reason} == metrics["decision"]["decision"]
    assert recipe == metrics["recipe"] and metrics["cascade"] == f"{recipe}-ensemble"
    assert all(isinstance(line, str) and line.startswith("python ") for line in metrics["rebuild"])


def test_a_card_states_the_rule_its_verdict_the_decoder_and_both_fills(ship, metrics, tmp_path):
    """What a cascade shipped by the rule adds to the card: seeds.py's table and verdict, the decoder, both fills."""
    import copy

    m = copy.deepcopy(metrics)
    m["ensemble"]["validation"]["audit"]["mean_fill"] = {"centre_only": 0.8, "border_only": 0.5432}
    rows = [{"recipe": "study", "n": 3, "accuracy": 0.81, "accuracy_range": [0.80, 0.82], "border_only": 0.4,
             "border_only_range": [0.39, 0.41]},
            {"recipe": "study-ensemble", "n": 1, "accuracy": 0.9, "accuracy_range": [0.9, 0.9]}]
    m["decision"] = {"rows": rows, "decision": {"recipe": "study", "reason": "no recipe beats it beyond the spread"}}
    m["decoder"] = "libjpeg's accurate integer IDCT"
    card = ship.render_card(m)
    assert "| study | 3 | 0.8100 (0.8000-0.8200) | - | 0.4000 (0.3900-0.4100) | - |" in card
    assert "study-ensemble |" not in card.split("Verdict:")[0].split("| recipe | seeds |")[1]
    assert "Verdict: **study**: no recipe beats it beyond the spread." in card
    assert "JPEGs are decoded by libjpeg's accurate integer IDCT." in card
    assert "(the centre filled with zeros; 0.5432 with each image's mean grey)" in card
    assert "The shortcut audit decides where accuracy is within noise" not in card  # the old rule is gone


def test_the_committed_savedmodel_answers_in_a_fresh_process_as_the_keras_cascade(tmp_path):
    paths = []
    for seed in range(3):
        paths.append(str(tmp_path / f"x{seed}.png"))
        Image.fromarray((xray(seed) * 255).astype("uint8")).save(paths[-1])
    command = [sys.executable, "-c", "from cxrkeras.cli import main; main()", "predict", SHIPPED, *paths, "--json"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads(done.stdout)
    served = np.array([[a["probabilities"][c] for c in ("normal", "non-covid", "covid")] for a in answers])
    keras_probabilities = predict_probabilities(load_model(SHIPPED), load_images(paths))
    np.testing.assert_allclose(served, keras_probabilities, atol=1e-5)
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)


def test_each_stage_is_the_mean_of_the_committed_members():
    x = np.stack([xray(seed)[..., None] for seed in range(4)])
    cascade = load_model(SHIPPED)
    members = {task: [load_model(os.path.join(SHIPPED, "members", name))
                      for name in sorted(os.listdir(os.path.join(SHIPPED, "members"))) if name.startswith(task)]
               for task in ("infected", "covid")}
    p = {task: np.mean([m.predict(x, verbose=0)[:, 0] for m in ms], axis=0) for task, ms in members.items()}
    expected = np.stack([1 - p["infected"], p["infected"] * (1 - p["covid"]), p["infected"] * p["covid"]], axis=1)
    np.testing.assert_allclose(predict_probabilities(cascade, x), expected, atol=1e-6)
    assert min(len(ms) for ms in members.values()) >= 3
