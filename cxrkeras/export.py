"""Export a classifier or cascade as a TensorFlow Serving SavedModel: BASE/VERSION/.

Signatures (every input batched on its first axis, every op a standard
TensorFlow op, so TensorFlow Serving runs all of them):

- `serving_default`: `images` tf.string [N], encoded JPEG, PNG, BMP or GIF
  bytes of any size (gray, RGB or RGBA), the REST API's {"b64": "..."}.
  Decoding and resizing (`cxrkeras.images.decode_image`) run inside the graph,
  so a server needs no Python of ours. Answers {"probabilities" [N, K]
  float32, "class_id" [N] int64, "class_name" [N] string}.
- `predict_images`: `images` float32 [N, size, size, 1] in [0, 1]; the same answer.
- `explain`: `images` as `serving_default`; the same answer plus "heatmap"
  [N, size, size] float32 in [0, 1], the Grad-CAM of each image (for the
  cascade: of the stage that decided, as `evaluation.explained_model`), and
  "explained_by" [N] string, that stage's name.
- `classify`: TensorFlow Serving's classify API: `inputs` tf.string [N],
  serialized tf.Example protos whose bytes feature "image" holds the encoded
  image; answers "classes" [N, K] string (the class names) and "scores"
  [N, K] float32 (the probabilities), so `:classify` with
  {"signature_name": "classify", "examples": [{"image": {"b64": ...}}]} works.

The module also carries `class_names`, `thresholds`, `kind` and `image_size`
as variables, and VERSION/assets.extra/cxrkeras.json holds the same metadata
plus where the model came from. Versions are numbered 1, 2, ...; a new export
takes the next free number, so a server watching BASE picks it up, and it is
written under a temporary name first so a server never sees half of it.
"""

import datetime
import json
import os
import shutil

from cxrkeras import runs
from cxrkeras.models import cascade as cascade_lib
from cxrkeras.savedmodel import EXAMPLE_IMAGE_FEATURE, METADATA_FILE, is_saved_model, versions
from cxrkeras.savedmodel import read_metadata  # noqa: F401  (cli.py reads an export's metadata from here)


class ExportError(ValueError):
    """An export that cannot be made or read as asked; the message names the path."""


def next_version(base):
    """One more than the highest version under `base` (1 for a new base)."""
    found = versions(base)
    return found[-1] + 1 if found else 1


# ---------------------------------------------------------------- the module


def describe(model, path=None, task=None):
    """What the export needs to know about `model`: kind, task, class names, thresholds, image size."""
    kind = cascade_lib.model_kind(model)
    names = list(runs.class_names(model, path, task))
    if kind == "cascade":
        t_infected, t_covid = cascade_lib.cascade_thresholds(model)
        thresholds = {"infected": t_infected, "covid": t_covid}
    elif kind == "binary":
        thresholds = {names[1]: 0.5}
    else:
        thresholds = {}
    from cxrkeras.adapt import model_status

    return {
        "kind": kind,
        "task": runs.model_task(model, path, task),
        "class_names": names,
        "thresholds": thresholds,
        "image_size": int(model.input_shape[1]),
        **model_status(model, path),  # "adapted" (to which images) and "calibrated" (the temperatures)
    }


def serving_module(model, info):
    """A tf.Module with the four signature functions around `model` (see the module docstring)."""
    import tensorflow as tf

    from cxrkeras.images import decode_image

    size, kind = info["image_size"], info["kind"]
    module = tf.Module()
    # Track the weights the way keras' own ExportArchive does; the model itself stays untracked.
    module.model_variables = list(model.variables)
    module.class_names = tf.Variable(info["class_names"], dtype=tf.string, trainable=False, name="class_names")
    module.thresholds = tf.Variable(
        list(info["thresholds"].values()), dtype=tf.float32, shape=[None], trainable=False, name="thresholds"
    )
    module.kind = tf.Variable(kind, dtype=tf.string, trainable=False, name="kind")
    module.image_size = tf.Variable(size, dtype=tf.int32, trainable=False, name="image_size")
    explainers = stage_explainers(model, kind)

    def outputs(images):
        out = model(images, training=False)
        if kind == "cascade":
            probabilities, class_id = out["probabilities"], tf.cast(out["class_id"], tf.int64)
        elif kind == "binary":
            p = tf.cast(out[:, 0], tf.float32)
            probabilities = tf.stack([1.0 - p, p], axis=-1)
            class_id = tf.cast(p > 0.5, tf.int64)
        else:
            probabilities = tf.cast(out, tf.float32)
            class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        class_name = tf.gather(module.class_names, class_id)
        return {"probabilities": probabilities, "class_id": class_id, "class_name": class_name}

    def decode(images):
        return tf.map_fn(
            lambda contents: decode_image(contents, size),
            images,
            fn_output_signature=tf.TensorSpec([size, size, 1], tf.float32),
        )

    encoded = tf.TensorSpec([None], tf.string, name="images")

    @tf.function(input_signature=[encoded], autograph=False)
    def serve_bytes(images):
        return outputs(decode(images))

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32, name="images")], autograph=False)
    def predict_images(images):
        return outputs(images)

    @tf.function(input_signature=[encoded], autograph=False)
    def explain(images):
        images = decode(images)
        out = outputs(images)
        heatmap, explained_by = explain_batch(explainers, images, out["class_id"])
        return {**out, "heatmap": heatmap, "explained_by": explained_by}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")], autograph=False)
    def classify(inputs):
        features = tf.io.parse_example(inputs, {EXAMPLE_IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string)})
        out = outputs(decode(features[EXAMPLE_IMAGE_FEATURE]))
        classes = tf.tile(module.class_names[None], [tf.shape(inputs)[0], 1])
        return {"classes": classes, "scores": out["probabilities"]}

    module.serve_bytes = serve_bytes
    module.predict_images = predict_images
    module.explain = explain if explainers else None
    module.classify = classify
    return module


# ---------------------------------------------------------------- Grad-CAM in the graph


def stage_explainers(model, kind):
    """[(classifier name, grad model: image -> (Grad-CAM layer output, logits' input), head)], one per stage.

    A cascade has two (infected, then covid: the order `explain_batch` picks
    from); other models explain themselves. The layer is
    `evaluation.gradcam_layer`'s, the head the final sigmoid or softmax Dense.
    None when a classifier has no conv layer or no such head (a model made
    elsewhere): the export then has no `explain` signature.
    """
    import keras

    from cxrkeras.evaluation import gradcam_layer, logit_head
    from cxrkeras.models import conv_layer_names

    stages = [model.get_layer(cascade_lib.SUBMODELS[s]) for s in ("infected", "covid")] if kind == "cascade" else [model]
    stages = [cascade_lib.explained_classifier(stage) for stage in stages]  # an ensemble: its first member
    explainers = []
    for classifier in stages:
        head = logit_head(classifier)
        if head is None or not conv_layer_names(classifier):
            return None
        features = classifier.get_layer(gradcam_layer(classifier)).output
        grad_model = keras.Model(classifier.inputs, [features, head.input], name=f"{classifier.name}_gradcam")
        explainers.append((classifier.name, grad_model, head))
    return explainers


def explain_batch(explainers, images, class_id):
    """(heatmaps [N, H, W], names [N] of the classifier explained) for decisions `class_id` [N].

    The heatmaps are `evaluation.explain_heatmaps`'; the name is the explained
    stage's (for the cascade: infected for a normal decision, else covid).
    """
    import tensorflow as tf

    from cxrkeras.evaluation import explain_heatmaps

    heatmap = explain_heatmaps(explainers, images, class_id)
    if len(explainers) == 1:
        return heatmap, tf.fill(tf.shape(class_id), explainers[0][0])
    return heatmap, tf.where(tf.equal(class_id, 0), explainers[0][0], explainers[1][0])


def export_model(model, base_dir, path=None, task=None, source=None):
    """Write `model` as BASE_DIR/VERSION (the next free version); returns that folder.

    `path` is where the model was loaded from (its config.json tells a binary
    model's task); `task` names it when there is none; `source` is recorded in
    the metadata (defaults to `path`).
    """
    import keras
    import tensorflow as tf

    base_dir = os.fspath(base_dir)
    if os.path.exists(base_dir) and not os.path.isdir(base_dir):
        raise ExportError(f"{base_dir}: a file; expected a folder to hold numbered versions (1, 2, ...).")
    if is_saved_model(base_dir):
        raise ExportError(f"{base_dir}: a SavedModel version folder; pass its parent, the base folder.")
    info = describe(model, path, task)
    module = serving_module(model, info)
    # The functions themselves, not concrete functions: saving traces them again in its own context anyway.
    signatures = {
        "serving_default": module.serve_bytes,
        "predict_images": module.predict_images,
        "explain": module.explain,
        "classify": module.classify,
    }
    if module.explain is None:
        del signatures["explain"]
    os.makedirs(base_dir, exist_ok=True)
    version = next_version(base_dir)
    final = os.path.join(base_dir, str(version))
    staging = os.path.join(base_dir, f".export-{version}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tf.saved_model.save(module, staging, signatures=signatures)
        size = info["image_size"]
        metadata = {
            **info,
            "version": version,
            "signatures": {k: v for k, v in signature_notes(size).items() if k in signatures},
            "source": os.fspath(source or path) if (source or path) else None,
            "cascade": _cascade_record(path),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"keras": keras.__version__, "tensorflow": tf.__version__},
        }
        os.makedirs(os.path.join(staging, "assets.extra"), exist_ok=True)
        with open(os.path.join(staging, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def signature_notes(size):
    """What each signature takes and answers, for cxrkeras.json (TensorFlow Serving's metadata has the types)."""
    answer = {"probabilities": "float32 [None, K]", "class_id": "int64 [None]", "class_name": "string [None]"}
    encoded = {"images": "string [None]: encoded JPEG, PNG, BMP or GIF"}
    return {
        "serving_default": {"inputs": encoded, "outputs": answer},
        "predict_images": {"inputs": {"images": f"float32 [None, {size}, {size}, 1] in [0, 1]"}, "outputs": answer},
        "explain": {
            "inputs": encoded,
            "outputs": {
                **answer,
                "heatmap": f"float32 [None, {size}, {size}]: Grad-CAM in [0, 1]",
                "explained_by": "string [None]: the classifier explained",
            },
        },
        "classify": {
            "inputs": {"inputs": f"string [None]: serialized tf.Example, bytes feature '{EXAMPLE_IMAGE_FEATURE}'"},
            "outputs": {"classes": "string [None, K]", "scores": "float32 [None, K]"},
        },
    }


def _cascade_record(path):
    """cascade.json of a cascade folder, without its trade-off table, or None."""
    if path is None:
        return None
    candidate = os.path.join(runs.model_folder(path), runs.CASCADE_FILE)
    if not os.path.isfile(candidate):
        return None
    with open(candidate) as f:
        record = json.load(f)
    record.pop("table", None)
    (record.get("selection") or {}).pop("table", None)
    return record


def export(path, base_dir, task=None):
    """Load the model at `path` (.keras file, run or cascade folder) and export it; returns the version folder."""
    model = runs.load_model(path)
    return export_model(model, base_dir, path=path, task=task)
