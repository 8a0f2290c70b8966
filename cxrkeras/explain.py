"""Why a model decided: feature maps, Grad-CAM, and which stage of a cascade explains a decision.

`evaluation` draws these, `audit` measures where the Grad-CAM heat lies, and
`export` builds them into the SavedModel's `explain` signature; all three read
this module, so each draws the same heat for the same decision.

Which stage explains a decision (`deciding_stage`, the one rule): a model
that is not a cascade explains itself; a cascade's "normal" decision is the
infected classifier's (its class normal), a non-covid or covid decision the
covid classifier's (its class covid or non-covid). An ensemble stage is
explained by its first member (`models.cascade.explained_classifier`).

Backend-agnostic: Grad-CAM takes its gradients from the backend itself
(TensorFlow's GradientTape, also in the exported graph, or jax.grad).
"""

import functools

import keras
import numpy as np

from cxrkeras.config import DECISION_THRESHOLD
from cxrkeras.models import conv_layer_names
from cxrkeras.models import cascade as cascade_lib
from cxrkeras.models.temperature import Temperature


class ExplainError(cascade_lib.ModelError):
    """A model that Grad-CAM or its feature maps cannot read; the message names the model and the layer."""


# ---------------------------------------------------------------- which model explains a decision


def cascade_stages(model):
    """(infected sub-model, covid sub-model) of a cascade (either may be an ensemble)."""
    return tuple(model.get_layer(cascade_lib.SUBMODELS[stage]) for stage in ("infected", "covid"))


def explained_stages(model, kind):
    """The classifiers that explain `model`'s decisions: a cascade's two stages, else the model itself."""
    stages = cascade_stages(model) if kind == "cascade" else (model,)
    return [cascade_lib.explained_classifier(stage) for stage in stages]  # an ensemble: its first member


def deciding_stage(class_id):
    """(the stage that decided, its class) of cascade decisions `class_id` (ints, arrays or tensors).

    The stage is 0 (infected classifier) for "normal" (0), else 1 (covid
    classifier); its class is normal (0) in the infected classifier, covid
    (1) or non-covid (0) in the covid classifier.
    """
    ops = keras.ops
    return ops.cast(ops.not_equal(class_id, 0), "int32"), ops.cast(ops.equal(class_id, 2), "int32")


def explained_model(model, kind, prediction):
    """(sub-model, class index in it) whose Grad-CAM explains the decision `prediction` (`deciding_stage`)."""
    if kind != "cascade":
        return model, int(prediction)
    stage, class_index = (int(v) for v in deciding_stage(int(prediction)))
    return explained_stages(model, kind)[stage], class_index


def feature_model(model, kind):
    """The model whose feature maps are drawn: a cascade's covid classifier (the study's choice), else the model."""
    return explained_stages(model, kind)[-1] if kind == "cascade" else model


# ---------------------------------------------------------------- feature maps


def _single_input(model):
    """The model's one input tensor (so the extractor is called with a plain array)."""
    inputs = model.inputs
    return inputs[0] if len(inputs) == 1 else inputs


def every_second_conv(model):
    """The 2nd, 4th, ... Conv2D layers of `model` (the study's Figures 3.4.x)."""
    names = conv_layer_names(model)
    return names[1::2] or names


def feature_maps(model, image, layers=None):
    """{layer name: [H, W, C] activations} of `image` ([H, W, 1]) at `layers` (default: every second conv)."""
    layers = list(layers or every_second_conv(model))
    extractor = keras.Model(inputs=_single_input(model), outputs=[model.get_layer(n).output for n in layers])
    outputs = extractor(np.asarray(image, "float32")[None], training=False)
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return {name: keras.ops.convert_to_numpy(out)[0].astype("float32") for name, out in zip(layers, outputs)}


# ---------------------------------------------------------------- Grad-CAM

_PASS_THROUGH = (keras.layers.ReLU, keras.layers.Activation, keras.layers.BatchNormalization, keras.layers.Add)


def gradcam_layer(model):
    """The layer Grad-CAM reads: the last Conv2D, followed through its BatchNorm / Add / ReLU.

    For the covid classifier that is `res4_out` (after the skip and the ReLU);
    for the infected classifier `block5_relu`.
    """
    layers = model.layers
    conv_names = conv_layer_names(model)
    if not conv_names:
        raise ExplainError(f"Model {model.name!r} has no Conv2D layer for Grad-CAM.")
    index = [layer.name for layer in layers].index(conv_names[-1])
    while index + 1 < len(layers) and isinstance(layers[index + 1], _PASS_THROUGH):
        index += 1
    return layers[index].name


def logit_head(model):
    """The final Dense layer when its activation is sigmoid or softmax (Grad-CAM then uses the logits).

    A calibrated classifier's Temperature layer after it is looked through (it rescales the logit only).
    """
    layers = model.layers
    head = layers[-2] if isinstance(layers[-1], Temperature) and len(layers) > 1 else layers[-1]
    if isinstance(head, keras.layers.Dense) and getattr(head.activation, "__name__", "") in ("sigmoid", "softmax"):
        return head
    return None


def grad_cam(model, image, layer_name=None, class_index=None):
    """Grad-CAM heatmap [H, W] in [0, 1] of `image` ([H, W, 1]) for `class_index` (default: the model's decision).

    `grad_cam_batch` on one image, with `layer_name` (default
    `gradcam_layer(model)`) as the feature layer.
    """
    layer_name = layer_name or gradcam_layer(model)
    head = logit_head(model)
    scored = head.input if head is not None else model.outputs[0]
    grad_model = keras.Model(_single_input(model), [model.get_layer(layer_name).output, scored])
    x = np.asarray(image, "float32")[None]
    if class_index is None:
        p = keras.ops.convert_to_numpy(model(x, training=False)).astype("float32")[0]
        class_index = int(p[0] > DECISION_THRESHOLD) if p.shape[-1] == 1 else int(np.argmax(p))
    try:
        heat = grad_cam_batch(grad_model, head, keras.ops.convert_to_tensor(x),
                              keras.ops.convert_to_tensor(np.array([class_index], "int64")))
    except ValueError as e:
        raise ExplainError(f"Layer {layer_name!r} of {model.name!r}: {e}") from e
    return keras.ops.convert_to_numpy(heat)[0].astype("float32")


def grad_cam_batch(grad_model, head, images, class_index):
    """Grad-CAM [N, H, W] in [0, 1] of each image for its `class_index` [N] (what `export`'s explain runs).

    `grad_model` maps images to (feature layer output, the head's input; or
    the output itself when `head` is None). The score is the class logit
    (pre-sigmoid / pre-softmax; for one sigmoid unit class 0 scores minus the
    logit); the gradients with respect to the features, averaged over space,
    weight its channels; the ReLU of the weighted sum is resized to the image
    and divided by its maximum. Images are independent in inference mode, so
    the gradient of the summed scores gives each image its own gradients.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        features, grads = _tensorflow_feature_gradients(grad_model, head, images, class_index)
    elif backend == "jax":
        features, grads = _jax_feature_gradients(grad_model, head, images, class_index)
    else:
        raise ExplainError(f"Grad-CAM runs under the TensorFlow or JAX backend, not {backend!r}.")
    if grads is None:
        raise ValueError("the feature layer does not affect the output")
    ops = keras.ops
    weights = ops.mean(ops.cast(grads, "float32"), axis=(1, 2))
    cam = ops.relu(ops.sum(ops.cast(features, "float32") * weights[:, None, None, :], axis=-1))
    cam = ops.image.resize(cam[..., None], tuple(images.shape[1:3]), interpolation="bilinear", antialias=False)[..., 0]
    peak = ops.max(cam, axis=(1, 2), keepdims=True)
    return ops.where(peak > 0, cam / ops.where(peak > 0, peak, 1.0), 0.0)


def _class_score(logits, head, class_index):
    """The summed score of each row's `class_index`: its logit (from the head's input when `head`)."""
    ops = keras.ops
    logits = ops.cast(logits, "float32")
    if head is not None:
        logits = ops.matmul(logits, ops.cast(head.kernel, "float32")) + ops.cast(head.bias, "float32")
    if logits.shape[-1] == 1:
        score = ops.where(class_index == 1, logits[:, 0], -logits[:, 0])
    else:
        score = ops.take_along_axis(logits, ops.cast(class_index, "int32")[:, None], axis=1)[:, 0]
    return ops.sum(score)


def _tensorflow_feature_gradients(grad_model, head, images, class_index):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        features, logits = grad_model(images, training=False)
        total = _class_score(logits, head, class_index)
    return features, tape.gradient(total, features)


def _jax_feature_gradients(grad_model, head, images, class_index):
    """(features, d score / d features) by jax.grad through the part of `grad_model` after its feature layer."""
    import jax

    front, tail = _jax_parts(grad_model)
    features = front(images, training=False)
    if tail is None:
        return features, None
    grads = jax.grad(lambda f: _class_score(tail(f, training=False), head, class_index))(features)
    return features, grads


@functools.lru_cache(maxsize=8)
def _jax_parts(grad_model):
    """(images -> features, features -> scored output or None) of `grad_model`, built once per model."""
    features_out, scored_out = grad_model.outputs
    front = keras.Model(grad_model.inputs, features_out)
    try:
        return front, keras.Model(features_out, scored_out)
    except ValueError:  # the score also reads an earlier layer: no gradient through the feature layer alone
        return front, None


# ---------------------------------------------------------------- a batch of decisions (audit, export)


def stage_explainers(model, kind):
    """[(classifier name, grad model: image -> (Grad-CAM layer output, logits' input), head)], one per stage.

    A cascade has two (infected, then covid: `deciding_stage`'s order);
    other models explain themselves. The layer is `gradcam_layer`'s, the head
    the final sigmoid or softmax Dense. None when a classifier has no conv
    layer or no such head (a model made elsewhere): the export then has no
    `explain` signature and the audit no Grad-CAM.
    """
    explainers = []
    for classifier in explained_stages(model, kind):
        head = logit_head(classifier)
        if head is None or not conv_layer_names(classifier):
            return None
        features = classifier.get_layer(gradcam_layer(classifier)).output
        grad_model = keras.Model(classifier.inputs, [features, head.input], name=f"{classifier.name}_gradcam")
        explainers.append((classifier.name, grad_model, head))
    return explainers


def explain_heatmaps(explainers, images, class_id):
    """Grad-CAM [N, H, W] of decisions `class_id` [N], from `stage_explainers`' explainers.

    For the cascade (two explainers), the stage that decided (`deciding_stage`).
    keras.ops on any backend, so the exported graph and `audit` under JAX compute the same.
    """
    ops = keras.ops
    if len(explainers) == 1:
        _, grad_model, head = explainers[0]
        return grad_cam_batch(grad_model, head, images, class_id)
    (_, infected, infected_head), (_, covid, covid_head) = explainers
    stage, stage_class = deciding_stage(class_id)
    infected_heat = grad_cam_batch(infected, infected_head, images, ops.zeros_like(class_id))
    covid_heat = grad_cam_batch(covid, covid_head, images, ops.cast(stage_class, class_id.dtype))
    return ops.where(ops.equal(stage, 1)[:, None, None], covid_heat, infected_heat)


def explain_batch(explainers, images, class_id):
    """(heatmaps [N, H, W], names [N] of the classifier explained) for decisions `class_id` [N], in TensorFlow.

    The heatmaps are `explain_heatmaps`'; the name is the deciding stage's.
    """
    import tensorflow as tf

    heatmap = explain_heatmaps(explainers, images, class_id)
    if len(explainers) == 1:
        return heatmap, tf.fill(tf.shape(class_id), explainers[0][0])
    stage, _ = deciding_stage(class_id)
    return heatmap, tf.where(tf.equal(stage, 1), explainers[1][0], explainers[0][0])
