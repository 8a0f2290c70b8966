"""Export a classifier or cascade as a TensorFlow Serving SavedModel: BASE/VERSION/.

Two signatures, both answering {"probabilities" [N, K] float32, "class_id" [N]
int64, "class_name" [N] string}:

- `serving_default`: `images` tf.string [N], encoded JPEG or PNG bytes of any
  size (gray, RGB or RGBA). Decoding and resizing (`cxrkeras.data.decode_image`)
  run inside the graph, so a server needs no Python of ours; the REST form
  sends them as {"b64": "..."}.
- `predict_images`: `images` float32 [N, size, size, 1] in [0, 1].

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

SIGNATURES = ("serving_default", "predict_images")
OUTPUT_KEYS = ("probabilities", "class_id", "class_name")
METADATA_FILE = os.path.join("assets.extra", "cxrkeras.json")


class ExportError(ValueError):
    """An export that cannot be made or read as asked; the message names the path."""


# ---------------------------------------------------------------- versions


def versions(base):
    """The numeric version folders under `base`, ascending."""
    if not os.path.isdir(base):
        return []
    return sorted(int(n) for n in os.listdir(base) if n.isdigit() and os.path.isdir(os.path.join(base, n)))


def next_version(base):
    """One more than the highest version under `base` (1 for a new base)."""
    found = versions(base)
    return found[-1] + 1 if found else 1


def is_saved_model(path):
    return os.path.isfile(os.path.join(path, "saved_model.pb"))


def saved_model_dir(path):
    """The SavedModel folder for `path` (a version folder, or a base: its highest version), or None."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    if is_saved_model(path):
        return path
    for version in reversed(versions(path)):
        candidate = os.path.join(path, str(version))
        if is_saved_model(candidate):
            return candidate
    return None


def read_metadata(version_dir):
    """The cxrkeras.json written beside an export, or None for a SavedModel made elsewhere."""
    path = os.path.join(version_dir, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


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
    return {
        "kind": kind,
        "task": runs.model_task(model, path, task),
        "class_names": names,
        "thresholds": thresholds,
        "image_size": int(model.input_shape[1]),
    }


def serving_module(model, info):
    """A tf.Module with the two signature functions around `model` (see the module docstring)."""
    import tensorflow as tf

    from cxrkeras.data import decode_image

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

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")], autograph=False)
    def serve_bytes(images):
        decoded = tf.map_fn(
            lambda contents: decode_image(contents, size),
            images,
            fn_output_signature=tf.TensorSpec([size, size, 1], tf.float32),
        )
        return outputs(decoded)

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 1], tf.float32, name="images")], autograph=False)
    def predict_images(images):
        return outputs(images)

    module.serve_bytes = serve_bytes
    module.predict_images = predict_images
    return module


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
    signatures = {
        "serving_default": module.serve_bytes.get_concrete_function(),
        "predict_images": module.predict_images.get_concrete_function(),
    }
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
            "signatures": {
                "serving_default": {"inputs": {"images": "string [None]: encoded JPEG or PNG"}},
                "predict_images": {"inputs": {"images": f"float32 [None, {size}, {size}, 1] in [0, 1]"}},
                "outputs": {
                    "probabilities": "float32 [None, K]",
                    "class_id": "int64 [None]",
                    "class_name": "string [None]",
                },
            },
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


def _cascade_record(path):
    """cascade.json of a cascade folder, without its trade-off table, or None."""
    if path is None:
        return None
    folder = path if os.path.isdir(path) else os.path.dirname(os.fspath(path))
    candidate = os.path.join(folder, runs.CASCADE_FILE)
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
