"""The study's cascade as one Keras model, model kinds, and predicting with any classifier.

cascade(image) = {"probabilities": [1 - p_i, p_i (1 - p_c), p_i p_c], "class_id": rule}
with p_i = infected_classifier(image), p_c = covid_classifier(image), classes in
the order normal, non-covid, covid, and the study's rule: normal if p_i <= the
infected threshold, else covid if p_c > the covid threshold, else non-covid. The thresholds live in the
`CascadeDecision` layer's config, so they survive `.keras` save/load and export.
A stage may be an ensemble (`build_ensemble`): one model that averages the
probabilities of several classifiers ("members") of the same task.

Written with keras.ops only (no TensorFlow import), so any backend runs it.
"""

import keras
import numpy as np
from keras import ops

from cxrkeras.config import DECISION_THRESHOLD

KINDS = ("binary", "three-class", "cascade")
SUBMODELS = {"infected": "infected_classifier", "covid": "covid_classifier"}
THRESHOLD_NAMES = ("infected", "covid")  # a cascade's thresholds, by the stage they belong to
# Files written before the thresholds took their stages' names (a .keras layer config, cascade.json,
# metrics.json, operating_points.json) prefix them with "t_": `check_thresholds` reads those names too
# (the one place that does); nothing writes them.
LEGACY_THRESHOLD_NAMES = {f"t_{name}": name for name in THRESHOLD_NAMES}


class ModelError(ValueError):
    """A model that cannot be used as given: the message names the path or model and what was expected."""


# ---------------------------------------------------------------- the model


@keras.saving.register_keras_serializable(package="cxrkeras")
class CascadeDecision(keras.layers.Layer):
    """(p_infected [N, 1], p_covid [N, 1]) -> (probabilities [N, 3] float32, class_id [N] int32)."""

    def __init__(self, infected=DECISION_THRESHOLD, covid=DECISION_THRESHOLD, **kwargs):
        legacy = {name: kwargs.pop(name) for name in LEGACY_THRESHOLD_NAMES if name in kwargs}
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        thresholds = check_thresholds({"infected": infected, "covid": covid, **legacy})
        self.infected, self.covid = thresholds["infected"], thresholds["covid"]

    def call(self, inputs):
        p_i, p_c = (ops.cast(p, "float32")[:, 0] for p in inputs)
        probabilities = ops.stack([1.0 - p_i, p_i * (1.0 - p_c), p_i * p_c], axis=-1)
        infected_id = ops.where(ops.greater(p_c, self.covid), 2, 1)
        class_id = ops.where(ops.less_equal(p_i, self.infected), 0, infected_id)
        return probabilities, ops.cast(class_id, "int32")

    def get_config(self):
        return {**super().get_config(), "infected": self.infected, "covid": self.covid}


def check_threshold(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 <= value <= 1:
        raise ValueError(f"The `{name}` threshold must be a number in [0, 1]. Received: {name}={value!r}")
    return float(value)


def check_thresholds(thresholds=None):
    """{"infected": t, "covid": t} from a dict naming some of them; a name left out is DECISION_THRESHOLD.

    ValueError naming an unknown name or a value outside [0, 1]. The old names
    (LEGACY_THRESHOLD_NAMES) are read as the new ones.
    """
    given = {LEGACY_THRESHOLD_NAMES.get(name, name): value for name, value in (thresholds or {}).items()}
    unknown = sorted(set(given) - set(THRESHOLD_NAMES))
    if unknown:
        raise ValueError(f"Unknown threshold names {unknown}; expected some of {list(THRESHOLD_NAMES)}.")
    return {name: check_threshold(name, given.get(name, DECISION_THRESHOLD)) for name in THRESHOLD_NAMES}


def thresholds_in(record):
    """`check_thresholds` of the threshold names among a dict's keys (a row of a trade-off table, say)."""
    return check_thresholds({k: v for k, v in record.items() if k in THRESHOLD_NAMES or k in LEGACY_THRESHOLD_NAMES})


def build_cascade(infected_model, covid_model, thresholds=None):
    """The cascade of two binary classifiers as one model named "cascade".

    `thresholds`: {"infected": t, "covid": t}, a name left out at the study's DECISION_THRESHOLD.

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
    thresholds = check_thresholds(thresholds)
    infected_model.name = SUBMODELS["infected"]
    covid_model.name = SUBMODELS["covid"]
    image = keras.Input(shape, name="image")
    decision = CascadeDecision(**thresholds, name="decision")
    probabilities, class_id = decision([infected_model(image), covid_model(image)])
    return keras.Model(image, {"probabilities": probabilities, "class_id": class_id}, name="cascade")


ENSEMBLE_MEAN = "ensemble_mean"  # the Average layer that marks an ensemble


def build_ensemble(members, task):
    """One binary classifier for `task` whose output is the mean of `members`' probabilities.

    The members (binary classifiers, same input) are nested as
    "{task}_member1", "{task}_member2", ...; a `TaskInfo` layer says the
    task, as a single classifier's does. Grad-CAM explains an ensemble
    through its first member (`explained_classifier`).
    """
    from cxrkeras.models.classifiers import TaskInfo

    members = list(members)
    shapes = {tuple(m.input_shape[1:]) for m in members}
    kinds = [model_kind(m) for m in members]
    if len(members) < 2 or len(shapes) != 1 or set(kinds) != {"binary"}:
        raise ModelError(
            f"An ensemble needs two or more binary classifiers with the same input. "
            f"Received: {len(members)} model(s), kinds {kinds}, input shapes {sorted(shapes)}"
        )
    if len({id(m) for m in members}) != len(members):
        raise ModelError("An ensemble was given the same model object twice.")
    for i, member in enumerate(members, start=1):
        member.name = f"{task}_member{i}"
    image = keras.Input(shapes.pop(), name="image")
    x = TaskInfo(task, name="task_info")(image)
    mean = keras.layers.Average(dtype="float32", name=ENSEMBLE_MEAN)([member(x) for member in members])
    return keras.Model(image, mean, name=f"{task}_ensemble")


def ensemble_members(model):
    """The classifiers an ensemble averages, or [model] for a single classifier."""
    if not any(layer.name == ENSEMBLE_MEAN for layer in model.layers):
        return [model]
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def explained_classifier(model):
    """The classifier whose Grad-CAM explains `model`: itself, or an ensemble's first member."""
    return ensemble_members(model)[0]


def _decision_layer(model):
    for layer in model.layers:
        if isinstance(layer, CascadeDecision):
            return layer
    return None


def cascade_thresholds(model):
    """{"infected": t, "covid": t} of a cascade model."""
    layer = _decision_layer(model)
    if layer is None:
        raise ModelError(f"Model {model.name!r} is not a cascade (no CascadeDecision layer).")
    return {"infected": layer.infected, "covid": layer.covid}


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


# ---------------------------------------------------------------- predicting


def predict(model, images, batch_size=64):
    """(probabilities [N, K], class ids [N]) for images [N, size, size, 1] in [0, 1].

    A cascade's class ids are its own decisions (its thresholds); a binary
    model's are p > DECISION_THRESHOLD; a three-class model's the argmax.
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


def cascade_decisions(p_infected, p_covid, thresholds):
    """Class ids by the study's rule: normal unless p_infected > the infected threshold, then covid if
    p_covid > the covid threshold (`thresholds`: {"infected", "covid"}).

    Plain numpy, broadcasting: thresholds may be arrays (a grid of pairs, see thresholds.choose_thresholds).
    """
    return np.where(p_infected <= thresholds["infected"], 0, np.where(p_covid > thresholds["covid"], 2, 1))


def predict_classes(model, probabilities):
    """Class ids [N] from `predict_probabilities` output, honouring a cascade's thresholds.

    For a cascade p_i = 1 - P(normal), p_c = P(covid) / p_i and the study's
    rule applies; a binary model's class is 1 when p > DECISION_THRESHOLD; otherwise argmax.
    """
    probabilities = np.asarray(probabilities, dtype="float64")
    kind = model_kind(model)
    if kind == "cascade":
        p_i = probabilities[:, 1] + probabilities[:, 2]
        p_c = np.divide(probabilities[:, 2], p_i, out=np.zeros_like(p_i), where=p_i > 0)
        return cascade_decisions(p_i, p_c, cascade_thresholds(model)).astype("int64")
    if kind == "binary":
        return (probabilities[:, 1] > DECISION_THRESHOLD).astype("int64")
    return np.argmax(probabilities, axis=-1).astype("int64")
