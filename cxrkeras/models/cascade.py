"""The study's cascade as one Keras model, and loading and predicting with any saved classifier.

cascade(image) = {"probabilities": [1 - p_i, p_i (1 - p_c), p_i p_c], "class_id": rule}
with p_i = infected_classifier(image), p_c = covid_classifier(image), classes in
the order normal, non-covid, covid, and the study's rule: normal if p_i <= t_i,
else covid if p_c > t_c, else non-covid. The thresholds live in the
`CascadeDecision` layer's config, so they survive `.keras` save/load and export.

Written with keras.ops only (no TensorFlow import), so any backend runs it.
"""

import json
import os

import keras
import numpy as np
from keras import ops

from cxrkeras.config import CLASSES, TASKS, check_task

KINDS = ("binary", "three-class", "cascade")
SUBMODELS = {"infected": "infected_classifier", "covid": "covid_classifier"}


class ModelError(ValueError):
    """A model that cannot be used as given: the message names the path or model and what was expected."""


class TaskUnknownError(ModelError):
    """A binary model whose task (infected or covid) can't be told: the caller must name it."""


# ---------------------------------------------------------------- the model


@keras.saving.register_keras_serializable(package="cxrkeras")
class CascadeDecision(keras.layers.Layer):
    """(p_infected [N, 1], p_covid [N, 1]) -> (probabilities [N, 3] float32, class_id [N] int32)."""

    def __init__(self, t_infected=0.5, t_covid=0.5, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.t_infected = check_threshold("t_infected", t_infected)
        self.t_covid = check_threshold("t_covid", t_covid)

    def call(self, inputs):
        p_i, p_c = (ops.cast(p, "float32")[:, 0] for p in inputs)
        probabilities = ops.stack([1.0 - p_i, p_i * (1.0 - p_c), p_i * p_c], axis=-1)
        infected_id = ops.where(ops.greater(p_c, self.t_covid), 2, 1)
        class_id = ops.where(ops.less_equal(p_i, self.t_infected), 0, infected_id)
        return probabilities, ops.cast(class_id, "int32")

    def get_config(self):
        return {**super().get_config(), "t_infected": self.t_infected, "t_covid": self.t_covid}


def check_threshold(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 <= value <= 1:
        raise ValueError(f"`{name}` must be a number in [0, 1]. Received: {name}={value!r}")
    return float(value)


def build_cascade(infected_model, covid_model, t_infected=0.5, t_covid=0.5):
    """The cascade of two binary classifiers as one model named "cascade".

    Input "image" [N, size, size, 1] in [0, 1]; outputs {"probabilities" [N, 3],
    "class_id" [N]}. The classifiers are nested as "infected_classifier" and
    "covid_classifier" (renamed in place when they are called otherwise).
    """
    for name, model in (("infected_model", infected_model), ("covid_model", covid_model)):
        if model_kind(model) != "binary":
            raise ModelError(
                f"`{name}` must be a binary classifier with one sigmoid output. "
                f"Received: {name}={model.name!r} with output shape {_output_shape(model)}"
            )
    if infected_model is covid_model:
        raise ModelError("`infected_model` and `covid_model` are the same model object.")
    shape = tuple(infected_model.input_shape[1:])
    if tuple(covid_model.input_shape[1:]) != shape:
        raise ModelError(
            f"The classifiers take different inputs: infected {shape}, covid {tuple(covid_model.input_shape[1:])}."
        )
    infected_model.name = SUBMODELS["infected"]
    covid_model.name = SUBMODELS["covid"]
    image = keras.Input(shape, name="image")
    decision = CascadeDecision(t_infected, t_covid, name="decision")
    probabilities, class_id = decision([infected_model(image), covid_model(image)])
    return keras.Model(image, {"probabilities": probabilities, "class_id": class_id}, name="cascade")


def _decision_layer(model):
    for layer in model.layers:
        if isinstance(layer, CascadeDecision):
            return layer
    return None


def cascade_thresholds(model):
    """(t_infected, t_covid) of a cascade model."""
    layer = _decision_layer(model)
    if layer is None:
        raise ModelError(f"Model {model.name!r} is not a cascade (no CascadeDecision layer).")
    return layer.t_infected, layer.t_covid


def _output_shape(model):
    outputs = model.outputs
    if isinstance(model.output, dict) or len(outputs) != 1:
        return None
    return tuple(outputs[0].shape)


def model_kind(model):
    """"cascade", "binary" (one sigmoid output) or "three-class" (three softmax outputs)."""
    if _decision_layer(model) is not None:
        return "cascade"
    shape = _output_shape(model)
    if shape is not None and len(shape) == 2 and shape[-1] in (1, 3):
        return "binary" if shape[-1] == 1 else "three-class"
    raise ModelError(
        f"Model {model.name!r} is not a cxrkeras classifier: expected one output of shape (None, 1) or "
        f"(None, 3), or a cascade. Received outputs: {[tuple(o.shape) for o in model.outputs]}"
    )


# ---------------------------------------------------------------- loading


def model_file(path):
    """The `.keras` file for `path`: the file itself, or DIR/model.keras of a run or cascade dir."""
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".keras"):
        return path
    candidate = os.path.join(path, "model.keras")
    if os.path.isdir(path) and os.path.isfile(candidate):
        return candidate
    if not os.path.exists(path):
        problem = "no such file or folder"
    elif os.path.isdir(path):
        problem = "folder without model.keras"
    else:
        problem = "not a .keras file"
    raise ModelError(
        f"{path}: {problem}; expected a .keras file, or a run or cascade folder holding model.keras."
    )


def load_model(path):
    """A saved classifier or cascade (uncompiled) from a `.keras` file or a folder holding model.keras."""
    filename = model_file(path)
    try:
        return keras.saving.load_model(filename, compile=False)
    except Exception as e:  # a corrupt zip, an unknown layer: keras raises many types
        raise ModelError(f"{filename}: does not load as a Keras model ({type(e).__name__}: {e}).") from e


def run_config(path):
    """The run's config.json as a dict (beside a .keras file or in a run folder), or None."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    candidate = os.path.join(folder, "config.json")
    if not os.path.isfile(candidate):
        return None
    with open(candidate) as f:
        return json.load(f)


def model_task(model, path=None, task=None):
    """The task a model was trained for: "infected", "covid", "three-class" or "cascade".

    From, in order: `task` (given by the user), the run's config.json beside
    `path`, the model's outputs (cascade, three-class), and the name the
    builders give binary models ("infected_classifier", "covid_classifier").
    None when a binary model's task can't be told.
    """
    kind = model_kind(model)
    if task is not None:
        check_task(task)
    if kind == "cascade":
        found = "cascade"
    elif kind == "three-class":
        found = "three-class"
    else:
        config = run_config(path) if path is not None else None
        found = ((config or {}).get("model") or {}).get("task")
        if found is None:
            found = {v: k for k, v in SUBMODELS.items()}.get(model.name)
    if task is not None and found not in (None, task):
        raise ModelError(f"`task` {task!r} does not match the model{_at(path)}, a {found!r} model.")
    return task or found


def class_names(model, path=None, task=None):
    """The model's class names in output order."""
    found = model_task(model, path, task)
    if found is None:
        raise TaskUnknownError(
            f"Can't tell whether the binary model{_at(path)} is the infected or the covid classifier "
            f"(no config.json beside it): pass its task ('infected' or 'covid')."
        )
    return CLASSES if found == "cascade" else TASKS[found]


def _at(path):
    return f" at {os.fspath(path)}" if path is not None else ""


# ---------------------------------------------------------------- predicting


def predict(model, images, batch_size=64):
    """(probabilities [N, K], class ids [N]) for images [N, size, size, 1] in [0, 1].

    A cascade's class ids are its own decisions (its thresholds); a binary
    model's are p > 0.5; a three-class model's the argmax.
    """
    kind = model_kind(model)
    outputs = model.predict(np.asarray(images, dtype="float32"), batch_size=batch_size, verbose=0)
    if kind == "cascade":
        return outputs["probabilities"].astype("float32"), outputs["class_id"].astype("int64")
    probabilities = _as_probabilities(kind, outputs)
    return probabilities, predict_classes(model, probabilities)


def _as_probabilities(kind, outputs):
    outputs = np.asarray(outputs, dtype="float32")
    if kind == "binary":
        p = outputs[:, 0]
        return np.stack([1.0 - p, p], axis=-1)
    return outputs


def predict_probabilities(model, images, batch_size=64):
    """[N, K] class probabilities: binary [1 - p, p]; three-class as is; a cascade's "probabilities"."""
    return predict(model, images, batch_size)[0]


def predict_classes(model, probabilities):
    """Class ids [N] from `predict_probabilities` output, honouring a cascade's thresholds.

    For a cascade p_i = 1 - P(normal), p_c = P(covid) / p_i and the study's
    rule applies; a binary model's class is 1 when p > 0.5; otherwise argmax.
    """
    probabilities = np.asarray(probabilities, dtype="float64")
    kind = model_kind(model)
    if kind == "cascade":
        t_infected, t_covid = cascade_thresholds(model)
        p_i = probabilities[:, 1] + probabilities[:, 2]
        p_c = np.divide(probabilities[:, 2], p_i, out=np.zeros_like(p_i), where=p_i > 0)
        return np.where(p_i <= t_infected, 0, np.where(p_c > t_covid, 2, 1)).astype("int64")
    if kind == "binary":
        return (probabilities[:, 1] > 0.5).astype("int64")
    return np.argmax(probabilities, axis=-1).astype("int64")


# ---------------------------------------------------------------- operating point


def choose_thresholds(infected_probs, covid_probs, labels3, target, grid=None):
    """Thresholds (t_infected, t_covid) that reach a target recall for one class, on validation data.

    `infected_probs`, `covid_probs`: each classifier's p on the same images
    (the covid classifier on all of them, as the cascade runs it); `labels3`:
    class ids in CLASSES order; `target`: {class: recall}, e.g. {"covid": 0.95}.
    Every pair of `grid` thresholds (default 0.05, 0.10, ..., 0.95) is scored;
    among those whose recall reaches the target the most accurate wins (ties:
    closest to the study's 0.5 / 0.5). If none reaches it, the highest recall
    wins. Returns the choice, the study's 0.5 / 0.5 row, and the whole table
    (recall of the class, its false negatives and false positives, accuracy).
    """
    name, recall_target = parse_target(target)
    p_i = np.asarray(infected_probs, dtype="float64").reshape(-1)
    p_c = np.asarray(covid_probs, dtype="float64").reshape(-1)
    labels = np.asarray(labels3).reshape(-1).astype("int64")
    if not len(p_i) == len(p_c) == len(labels) or len(labels) == 0:
        raise ValueError(
            f"`infected_probs`, `covid_probs` and `labels3` must have the same non-zero length. "
            f"Received lengths: {len(p_i)}, {len(p_c)}, {len(labels)}"
        )
    if labels.min() < 0 or labels.max() > 2:
        raise ValueError(f"`labels3` must be class ids 0, 1 or 2. Received values: {sorted(set(labels.tolist()))}")
    k = CLASSES.index(name)
    if not np.any(labels == k):
        raise ValueError(f"No {name!r} images among the labels: its recall is undefined.")
    grid = np.round(np.arange(0.05, 0.951, 0.05), 4) if grid is None else np.asarray(grid, dtype="float64")
    grid = np.unique(np.append(grid, 0.5))
    ti, tc = np.meshgrid(grid, grid, indexing="ij")
    ti, tc = ti.reshape(-1), tc.reshape(-1)
    # decisions [pairs, N] by the study's rule
    pred = np.where(p_i[None] <= ti[:, None], 0, np.where(p_c[None] > tc[:, None], 2, 1))
    is_k, said_k = labels[None] == k, pred == k
    fn = np.sum(is_k & ~said_k, axis=1)
    fp = np.sum(~is_k & said_k, axis=1)
    positives = int(np.sum(labels == k))
    recall = (positives - fn) / positives
    accuracy = np.mean(pred == labels[None], axis=1)
    table = [
        {
            "t_infected": float(a),
            "t_covid": float(b),
            "recall": float(r),
            "fn": int(n),
            "fp": int(p),
            "accuracy": float(c),
        }
        for a, b, r, n, p, c in zip(ti, tc, recall, fn, fp, accuracy)
    ]
    reached = recall >= recall_target - 1e-12
    distance = np.abs(ti - 0.5) + np.abs(tc - 0.5)
    if reached.any():
        order = np.lexsort((distance, -accuracy, ~reached))
    else:
        order = np.lexsort((distance, -accuracy, -recall))
    best = table[int(order[0])]
    default = table[int(np.argmin(distance))]
    return {
        "class": name,
        "target_recall": recall_target,
        "reached": bool(reached.any()),
        "t_infected": best["t_infected"],
        "t_covid": best["t_covid"],
        "chosen": best,
        "default": default,
        "images": int(len(labels)),
        "positives": positives,
        "table": table,
    }


def parse_target(target):
    """("covid", 0.95) from {"covid": 0.95}; ValueError naming the bad part."""
    if not isinstance(target, dict) or len(target) != 1:
        raise ValueError(
            f"`target` must be one {{class: recall}} pair, e.g. {{'covid': 0.95}}. Received: target={target!r}"
        )
    ((name, value),) = target.items()
    if name not in CLASSES:
        raise ValueError(
            f"Unknown class {name!r} in `target`; expected one of {list(CLASSES)}. Received: target={target!r}"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 < value <= 1:
        raise ValueError(f"The target recall must be in (0, 1]. Received: target={target!r}")
    return name, float(value)
