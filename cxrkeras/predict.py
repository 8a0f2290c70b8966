"""Classify image files with a saved model: a Keras classifier or cascade, or an exported SavedModel.

`open_model(path)` takes a .keras file, a run or cascade folder, or a
SavedModel (a version folder, or a base folder whose highest version is
used); `predict_files` returns one result per file, an error for a file that
does not decode, in the order given.
"""

import os

import numpy as np

from cxrkeras import data as data_lib
from cxrkeras import export as export_lib
from cxrkeras import runs
from cxrkeras.models import cascade as cascade_lib


class KerasPredictor:
    """A .keras classifier or cascade; images are decoded here with `cxrkeras.data.decode_image`."""

    def __init__(self, path, task=None):
        self.path = path
        self.model = runs.load_model(path)
        self.class_names = tuple(runs.class_names(self.model, path, task))
        self.image_size = int(self.model.input_shape[1])

    def predict_bytes(self, contents, batch_size=64):
        import tensorflow as tf

        images = np.stack([data_lib.decode_image(tf.constant(c), self.image_size).numpy() for c in contents])
        return cascade_lib.predict(self.model, images, batch_size)


class SavedModelPredictor:
    """An exported SavedModel, run through its `serving_default` signature (decoding in the graph)."""

    def __init__(self, path):
        import tensorflow as tf

        self.path = path
        self.module = tf.saved_model.load(path)
        if "serving_default" not in self.module.signatures or not hasattr(self.module, "class_names"):
            raise runs.ModelError(
                f"{path}: a SavedModel without cxrkeras' `serving_default` signature and class names; "
                f"expected a folder written by `cxrkeras export`."
            )
        self.signature = self.module.signatures["serving_default"]
        self.class_names = tuple(n.decode() for n in self.module.class_names.numpy())

    def predict_bytes(self, contents, batch_size=64):
        import tensorflow as tf

        probabilities, class_ids = [], []
        for start in range(0, len(contents), batch_size):
            out = self.signature(images=tf.constant(contents[start : start + batch_size], dtype=tf.string))
            probabilities.append(out["probabilities"].numpy())
            class_ids.append(out["class_id"].numpy())
        return np.concatenate(probabilities), np.concatenate(class_ids).astype("int64")


def open_model(path, task=None):
    """A predictor for `path`: a SavedModel folder (or base of versions), else a Keras model or run folder."""
    saved = export_lib.saved_model_dir(path)
    if saved is not None:
        return SavedModelPredictor(saved)
    return KerasPredictor(path, task)


def image_problem(path):
    """None when `path` is an image file that decodes, else why not."""
    if not os.path.exists(path):
        return "no such file"
    if not os.path.isfile(path):
        return "not a file"
    return data_lib.check_image(path)


def predict_files(predictor, paths, batch_size=64):
    """One dict per path, in order: {"path", "class", "class_id", "probabilities": {name: p}} or {"path", "error"}."""
    import tensorflow as tf

    results = [{"path": p, "error": image_problem(p)} for p in paths]
    good = [r for r in results if r["error"] is None]
    contents = []
    for r in good:
        with open(r["path"], "rb") as f:
            contents.append(f.read())
    try:
        outputs = [predictor.predict_bytes(contents, batch_size)] if good else []
        chunks = [good]
    except tf.errors.InvalidArgumentError:
        # One file PIL accepts but TensorFlow doesn't: retry one by one to name it.
        outputs, chunks = [], []
        for r, c in zip(good, contents):
            try:
                outputs.append(predictor.predict_bytes([c], batch_size))
                chunks.append([r])
            except tf.errors.InvalidArgumentError as e:
                r["error"] = f"does not decode in TensorFlow ({e.message.splitlines()[0]})"
    names = predictor.class_names
    for chunk, (probabilities, class_ids) in zip(chunks, outputs):
        for r, p, k in zip(chunk, probabilities, class_ids):
            del r["error"]
            r.update(
                {
                    "class": names[int(k)],
                    "class_id": int(k),
                    "probabilities": {n: float(v) for n, v in zip(names, p)},
                }
            )
    return results
