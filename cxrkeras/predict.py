"""Classify image files with a saved model (a Keras classifier or cascade, an exported SavedModel) or a server.

`open_model(path)` takes a .keras file, a run or cascade folder, or a
SavedModel (a version folder, or a base folder whose highest version is
used; its ops are checked first unless `trust`); `open_server(url, name)` a
model served over TensorFlow Serving's REST API (`cxrkeras serve`, or
TensorFlow Serving itself). `predict_files` returns one result per file, an
error for a file that does not decode, in the order given. Every predictor
gets the same bytes: the file's, or for a DICOM the 16-bit PNG of its pixels
(`images.encoded_image`), which an exported graph (or a server) decodes as it
decodes any PNG, so a Keras model and its export see the same pixels.

Importing this module imports neither Keras nor TensorFlow: a SavedModel needs
TensorFlow only (`cxrkeras.savedmodel`), a server neither.
"""

import base64
import json
import os
import urllib.error
import urllib.request

import numpy as np

from cxrkeras import images as images_lib
from cxrkeras import savedmodel


class ImageRejected(Exception):
    """The model could not read one of the images given; the message says why."""


class ServerError(Exception):
    """A server that can't be reached or answers otherwise than TensorFlow Serving's REST API does."""


class KerasPredictor:
    """A .keras classifier or cascade; images are decoded here with `cxrkeras.images.decode_image`."""

    def __init__(self, path, task=None):
        from cxrkeras import runs

        self.path = path
        self.model = runs.load_model(path)
        self.class_names = tuple(runs.class_names(self.model, path, task))
        self.image_size = int(self.model.input_shape[1])
        from cxrkeras.adapt import model_status

        self.status = model_status(self.model, path)

    def predict_bytes(self, contents, batch_size=64):
        import tensorflow as tf

        from cxrkeras.models import cascade as cascade_lib

        try:
            images = np.stack([images_lib.decode_image(tf.constant(c), self.image_size).numpy() for c in contents])
        except tf.errors.InvalidArgumentError as e:
            raise ImageRejected(f"does not decode in TensorFlow ({savedmodel.error_message(e)})") from e
        return cascade_lib.predict(self.model, images, batch_size)


class SavedModelPredictor:
    """An exported SavedModel, run through its `serving_default` signature (decoding in the graph)."""

    def __init__(self, path, trust=False):
        self.path = path
        self.module = savedmodel.load(path, trust=trust)
        if savedmodel.DEFAULT_SIGNATURE not in self.module.signatures or not hasattr(self.module, "class_names"):
            raise savedmodel.SavedModelError(
                f"{path}: a SavedModel without cxrkeras' `serving_default` signature and class names; "
                f"expected a folder written by `cxrkeras export`."
            )
        self.signature = self.module.signatures[savedmodel.DEFAULT_SIGNATURE]
        self.class_names = tuple(n.decode() for n in self.module.class_names.numpy())
        metadata = savedmodel.read_metadata(path) or {}
        self.status = {"adapted": metadata.get("adapted"), "calibrated": metadata.get("calibrated")}

    def predict_bytes(self, contents, batch_size=64):
        import tensorflow as tf

        probabilities, class_ids = [], []
        for start in range(0, len(contents), batch_size):
            try:
                out = self.signature(images=tf.constant(contents[start : start + batch_size], dtype=tf.string))
            except tf.errors.InvalidArgumentError as e:
                raise ImageRejected(f"does not decode in TensorFlow ({savedmodel.error_message(e)})") from e
            probabilities.append(out["probabilities"].numpy())
            class_ids.append(out["class_id"].numpy())
        return np.concatenate(probabilities), np.concatenate(class_ids).astype("int64")


class RemotePredictor:
    """Model `name` on a TensorFlow Serving REST server at `url`: `:predict` on `serving_default`.

    The class names come from the export's `classify` signature (its
    `classes` output), asked once with a tiny image.
    """

    def __init__(self, url, name, timeout=60):
        self.url = f"{url.rstrip('/')}/v1/models/{name}"
        self.timeout = timeout
        self.status = self._call("")
        example = {savedmodel.EXAMPLE_IMAGE_FEATURE: _b64(savedmodel.probe_image(8))}
        probe = {"signature_name": "classify", "examples": [example]}
        results = self._call(":classify", probe)["results"][0]
        self.class_names = tuple(label for label, _ in results)
        self.status = {}  # the REST API does not say whether the served model is adapted or calibrated

    def _call(self, suffix, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + suffix, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as e:
            message = _error_message(e)
            if e.code == 400 and suffix == ":predict":
                raise ImageRejected(message) from None
            raise ServerError(f"{self.url}{suffix}: HTTP {e.code}: {message}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ServerError(f"{self.url}{suffix}: {getattr(e, 'reason', e)}") from None

    def predict_bytes(self, contents, batch_size=64):
        probabilities, class_ids = [], []
        for start in range(0, len(contents), batch_size):
            chunk = contents[start : start + batch_size]
            answer = self._call(":predict", {"instances": [_b64(c) for c in chunk]})
            for row in answer["predictions"]:
                probabilities.append(row["probabilities"])
                class_ids.append(row["class_id"])
        return np.asarray(probabilities, dtype="float32"), np.asarray(class_ids, dtype="int64")


def _b64(contents):
    return {"b64": base64.b64encode(contents).decode()}


def _error_message(error):
    try:
        return json.loads(error.read())["error"]
    except (ValueError, KeyError, TypeError):
        return error.reason


def open_model(path, task=None, trust=False):
    """A predictor for `path`: a SavedModel folder (or base of versions), else a Keras model or run folder."""
    saved = savedmodel.saved_model_dir(path)
    if saved is not None:
        return SavedModelPredictor(saved, trust=trust)
    return KerasPredictor(path, task)


def open_server(url, name):
    """A predictor for model `name` served at `url` (e.g. http://127.0.0.1:8501)."""
    return RemotePredictor(url, name)


def image_problem(path):
    """None when `path` is an image (or DICOM) file that decodes, else why not."""
    if not os.path.exists(path):
        return "no such file"
    if not os.path.isfile(path):
        return "not a file"
    return images_lib.check_image(path)


def predict_files(predictor, paths, batch_size=64):
    """One dict per path, in order: {"path", "class", "class_id", "probabilities": {name: p}} or {"path", "error"}.

    A local model's results also say whether it is "adapted" (to which images) and "calibrated" (its temperatures).
    """
    results = [{"path": p, "error": image_problem(p)} for p in paths]
    good = [r for r in results if r["error"] is None]
    contents = []
    for r in good:
        with open(r["path"], "rb") as f:
            contents.append(images_lib.encoded_image(f.read(), name=r["path"]))
    try:
        outputs = [predictor.predict_bytes(contents, batch_size)] if good else []
        chunks = [good]
    except ImageRejected:
        # One file the checks accept but the model doesn't: retry one by one to name it.
        outputs, chunks = [], []
        for r, c in zip(good, contents):
            try:
                outputs.append(predictor.predict_bytes([c], batch_size))
                chunks.append([r])
            except ImageRejected as e:
                r["error"] = str(e)
    names = predictor.class_names
    for chunk, (probabilities, class_ids) in zip(chunks, outputs):
        for r, p, k in zip(chunk, probabilities, class_ids):
            del r["error"]
            r.update(
                {
                    "class": names[int(k)],
                    "class_id": int(k),
                    "probabilities": {n: float(v) for n, v in zip(names, p)},
                    **getattr(predictor, "status", {}),
                }
            )
    return results
