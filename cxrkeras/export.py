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
  cascade: of the stage that decided, `cxrkeras.explain`), and
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

from cxrkeras import explain, runs
from cxrkeras.config import DECISION_THRESHOLD
from cxrkeras.models import cascade as cascade_lib
from cxrkeras.savedmodel import EXAMPLE_IMAGE_FEATURE, METADATA_FILE, is_saved_model, versions


class ExportError(ValueError):
    """An export that cannot be made or read as asked; the message names the path."""


def next_version(base):
    """One more than the highest version under `base` (1 for a new base)."""
    found = versions(base)
    return found[-1] + 1 if found else 1


# ---------------------------------------------------------------- the module


def describe(model, path=None, task=None):
    """What the export needs to know about `model`: kind, task, class names, thresholds, image size."""
    return _describe(runs.open_model(model, path, task))


def _describe(opened):
    """`describe` of a runs.OpenModel."""
    from cxrkeras.adapt import model_status

    names = list(opened.class_names)
    if opened.kind == "cascade":
        thresholds = cascade_lib.cascade_thresholds(opened.model)
    elif opened.kind == "binary":
        thresholds = {names[1]: DECISION_THRESHOLD}
    else:
        thresholds = {}
    return {
        "kind": opened.kind,
        "task": opened.known_task,
        "class_names": names,
        "thresholds": thresholds,
        "image_size": int(opened.model.input_shape[1]),
        **model_status(opened.model, opened.path),  # "adapted" (to which images) and "calibrated" (the temperatures)
    }


def serving_module(model, info):
    """A tf.Module with the four signature functions around `model` (see the module docstring)."""
    import tensorflow as tf

    module = _module_variables(tf.Module(), model, info)
    outputs = _outputs_function(model, info["kind"], module.class_names)
    decode = _decode_function(info["image_size"])
    explainers = explain.stage_explainers(model, info["kind"])
    encoded = tf.TensorSpec([None], tf.string, name="images")
    size = info["image_size"]

    @tf.function(input_signature=[encoded], autograph=False)
    def serve_bytes(images):
        return outputs(decode(images))

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32, name="images")], autograph=False)
    def predict_images(images):
        return outputs(images)

    @tf.function(input_signature=[encoded], autograph=False)
    def explain_images(images):
        images = decode(images)
        out = outputs(images)
        heatmap, explained_by = explain.explain_batch(explainers, images, out["class_id"])
        return {**out, "heatmap": heatmap, "explained_by": explained_by}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")], autograph=False)
    def classify(inputs):
        features = tf.io.parse_example(inputs, {EXAMPLE_IMAGE_FEATURE: tf.io.FixedLenFeature([], tf.string)})
        out = outputs(decode(features[EXAMPLE_IMAGE_FEATURE]))
        classes = tf.tile(module.class_names[None], [tf.shape(inputs)[0], 1])
        return {"classes": classes, "scores": out["probabilities"]}

    module.serve_bytes = serve_bytes
    module.predict_images = predict_images
    module.explain = explain_images if explainers else None
    module.classify = classify
    return module


def _module_variables(module, model, info):
    """`module` holding the model's weights and the metadata variables (class names, thresholds, kind, size)."""
    import tensorflow as tf

    # Track the weights the way keras' own ExportArchive does; the model itself stays untracked.
    module.model_variables = list(model.variables)
    module.class_names = tf.Variable(info["class_names"], dtype=tf.string, trainable=False, name="class_names")
    module.thresholds = tf.Variable(
        list(info["thresholds"].values()), dtype=tf.float32, shape=[None], trainable=False, name="thresholds"
    )
    module.kind = tf.Variable(info["kind"], dtype=tf.string, trainable=False, name="kind")
    module.image_size = tf.Variable(info["image_size"], dtype=tf.int32, trainable=False, name="image_size")
    return module


def _outputs_function(model, kind, class_names):
    """images -> {"probabilities", "class_id", "class_name"}, the answer every signature shares."""
    import tensorflow as tf

    def outputs(images):
        out = model(images, training=False)
        if kind == "cascade":
            probabilities, class_id = out["probabilities"], tf.cast(out["class_id"], tf.int64)
        elif kind == "binary":
            p = tf.cast(out[:, 0], tf.float32)
            probabilities = tf.stack([1.0 - p, p], axis=-1)
            class_id = tf.cast(p > DECISION_THRESHOLD, tf.int64)
        else:
            probabilities = tf.cast(out, tf.float32)
            class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        return {"probabilities": probabilities, "class_id": class_id, "class_name": tf.gather(class_names, class_id)}

    return outputs


def _decode_function(size):
    """encoded images [N] -> float32 [N, size, size, 1], decoded and resized in the graph."""
    import tensorflow as tf

    from cxrkeras.images import decode_image

    def decode(images):
        return tf.map_fn(
            lambda contents: decode_image(contents, size),
            images,
            fn_output_signature=tf.TensorSpec([size, size, 1], tf.float32),
        )

    return decode


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
    from cxrkeras.models.blocks import compute_in_float32

    opened = runs.open_model(compute_in_float32(model), path, task)  # served in float32 whatever it trained in
    info = _describe(opened)
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
            "cascade": _cascade_summary(opened.cascade),
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


def _cascade_summary(record):
    """A cascade.json record without its trade-off table, or None."""
    if record is None:
        return None
    record = {**record}
    record.pop("table", None)
    if isinstance(record.get("selection"), dict):
        record["selection"] = {k: v for k, v in record["selection"].items() if k != "table"}
    return record


def export(path, base_dir, task=None):
    """Load the model at `path` (.keras file, run or cascade folder) and export it; returns the version folder."""
    model = runs.load_model(path)
    return export_model(model, base_dir, path=path, task=task)
