"""A servable: one loaded version of an export, and the manager of every version under a base folder.

`ModelServer` loads every numeric version under the base folder (each
SavedModel's proto read once, its ops checked by `savedmodel.read_checked`
unless trusted, then handed to the loader), warms each up, serves the
highest by default and polls the folder for new versions (export writes a
staging folder, `.export-N-PID`, then renames it to `N`: only numeric names
count). A request's images are judged by `cxrkeras.images` (its header
only: an image declaring 20000x20000 never reaches the graph's decoder) and
a DICOM is made the 16-bit PNG the graph decodes. It imports TensorFlow,
never Keras or our model builders.
"""

import asyncio
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor

from cxrkeras import images, savedmodel
from cxrkeras.config import IMAGE_SIZE
from cxrkeras.dicom import DicomError
from cxrkeras.savedmodel import EXAMPLE_IMAGE_FEATURE, IMAGE_INPUT
from cxrkeras.serving.batching import Batcher
from cxrkeras.serving.monitoring import Metrics
from cxrkeras.serving.protocol import (
    ApiError,
    check_classify_signature,
    classify_request,
    classify_response,
    invalid,
    not_found,
    object_array,
    predict_request,
    predict_response,
    servable,
    too_many,
)

log = logging.getLogger("cxrkeras.serving")


# ---------------------------------------------------------------- images


def image_problem(contents, max_pixels):
    """(format, None) when `contents` has a header our export's graph reads within `max_pixels`, else (format, why).

    `images.image_problem`, the judge of every file training reads, on the
    header only: so a PNG declaring 20000x20000 is refused before anything
    allocates it; data broken further on (a truncated JPEG) is left to the
    graph's decoder (the same `decode_pixels`), whose error then names that image.
    """
    return images.image_problem(io.BytesIO(contents), max_pixels, limit_option="--max-image-pixels", decode=False)


def converted(contents):
    """`contents` as the graph reads it: a DICOM made a 16-bit PNG (blocking), other images as they are."""
    try:
        return images.encoded_image(contents)
    except DicomError as e:
        raise invalid(str(e)) from None


# ---------------------------------------------------------------- one version


class Version:
    """One loaded version: its SavedModel, signatures, cxrkeras metadata and batchers."""

    def __init__(self, number, path, settings, executor, on_batch=None, proto=None):
        self.number, self.path, self.settings, self.executor = number, path, settings, executor
        self.on_batch = on_batch  # called with (signature name, instances, seconds) after each model call
        # `proto`: what `savedmodel.read_checked` returned for `path` (`served_versions`); else read here, once.
        self.proto = proto if proto is not None else savedmodel.read_checked(path, trust=settings.trust_model)
        self.signature_defs = savedmodel.signature_defs(self.proto)
        self.metadata = savedmodel.read_metadata(path)
        self.module = savedmodel.load(path, proto=self.proto)
        self.functions = dict(self.module.signatures)
        self.batchers = {}

    def signature(self, name):
        """The SignatureDef called `name` ("" = serving_default), or TensorFlow Serving's 400."""
        name = name or savedmodel.DEFAULT_SIGNATURE
        if name not in self.signature_defs:
            raise invalid(f'Serving signature name: "{name}" not found in signature def')
        return self.signature_defs[name]

    def input_dtypes(self, name):
        from tensorflow.core.framework import types_pb2

        return {k: types_pb2.DataType.Name(v.dtype) for k, v in self.signature(name).inputs.items()}

    def call(self, name, inputs):
        """Run signature `name` on numpy inputs (blocking); numpy outputs."""
        import tensorflow as tf

        function = self.functions[name]
        tensors = {k: tf.constant(v, dtype=function.structured_input_signature[1][k].dtype) for k, v in inputs.items()}
        return {k: v.numpy() for k, v in function(**tensors).items()}

    def check_inputs(self, name, inputs):
        """400 for inputs the signature can't take: shapes, too many instances, image headers (our exports).

        Returns whether an image is a DICOM (`with_dicom_converted` then makes it one the graph reads).
        """
        name = name or savedmodel.DEFAULT_SIGNATURE
        if name not in self.functions:
            raise invalid(f'Signature "{name}" has no function to run (it is the init op).')
        specs = self.functions[name].structured_input_signature[1]
        for key, array in inputs.items():
            if not specs[key].shape.is_compatible_with(array.shape):
                raise invalid(
                    f"Input {key!r} has shape {list(array.shape)}, not compatible with the signature's "
                    f"{specs[key].shape.as_list()}"
                )
        sizes = {len(a) if a.ndim else None for a in inputs.values()}
        count = max((s for s in sizes if s is not None), default=1)
        if count > self.settings.max_batch_size:
            raise too_many(count, self.settings.max_batch_size)
        if self.metadata is None:
            return False
        kinds = set()
        for i, contents in enumerate(self._encoded_images(name, inputs)):
            if contents is None:
                continue
            kind, problem = image_problem(contents, self.settings.max_image_pixels)
            if problem:
                raise invalid(f"Instance {i}: {problem}")
            kinds.add(kind)
        return images.DICOM in kinds

    def _encoded_images(self, name, inputs):
        """The encoded image of each instance: the `images` input, or the `image` feature of serialized tf.Examples."""
        if name == "classify" and "inputs" in inputs:
            from tensorflow.core.example import example_pb2

            for serialized in inputs["inputs"].reshape(-1):
                try:
                    values = example_pb2.Example.FromString(serialized).features.feature[EXAMPLE_IMAGE_FEATURE]
                except Exception as e:  # protobuf's DecodeError
                    raise invalid(f"Not a serialized tf.Example: {e}") from None
                yield values.bytes_list.value[0] if values.bytes_list.value else None
        elif IMAGE_INPUT in inputs and inputs[IMAGE_INPUT].dtype == object:
            yield from inputs[IMAGE_INPUT].reshape(-1)

    def with_dicom_converted(self, name, inputs):
        """`inputs` with each DICOM image (in `images`, or in a tf.Example's `image`) made a PNG; blocking."""
        from tensorflow.core.example import example_pb2

        key = "inputs" if name == "classify" and "inputs" in inputs else IMAGE_INPUT
        items = inputs[key].copy()
        flat = items.reshape(-1)
        for i, item in enumerate(flat):
            try:
                if key == IMAGE_INPUT:
                    flat[i] = converted(item)
                    continue
                example = example_pb2.Example.FromString(item)
                values = example.features.feature[EXAMPLE_IMAGE_FEATURE].bytes_list.value
                if values:
                    values[0] = converted(values[0])
                flat[i] = example.SerializeToString()
            except ApiError as e:
                raise invalid(f"Instance {i}: {e.message}") from None
        return {**inputs, key: items}

    async def run(self, name, inputs):
        """Check, then call signature `name` through its batcher."""
        name = name or savedmodel.DEFAULT_SIGNATURE
        if self.check_inputs(name, inputs):
            inputs = await asyncio.to_thread(self.with_dicom_converted, name, inputs)
        if name not in self.batchers:
            on_batch = (lambda size, seconds: self.on_batch(name, size, seconds)) if self.on_batch else None
            self.batchers[name] = Batcher(lambda batch: self.call(name, batch), self.settings, self.executor, on_batch)
        if any(a.ndim == 0 for a in inputs.values()):  # no batch axis: a call of its own
            return await asyncio.get_running_loop().run_in_executor(self.executor, self.call, name, inputs)
        return await self.batchers[name].submit(inputs)

    def warm_up(self):
        """Calls of each image signature of our export (blocking), so the first requests aren't slow: on one
        image and on a full batch (`max_batch_size`), the two sizes a server under load runs most; the
        first call at a new size sets up its kernels (about a second for the study's cascade on 64 images
        on a 2-core CPU). `explain` (Grad-CAM, a page's one image at a time) is warmed on one image only."""
        from tensorflow.core.example import example_pb2
        from tensorflow.core.framework import types_pb2

        if self.metadata is None:
            return
        image = savedmodel.probe_image(int(self.metadata.get("image_size", IMAGE_SIZE)))
        example = example_pb2.Example()
        example.features.feature[EXAMPLE_IMAGE_FEATURE].bytes_list.value.append(image)
        for name in self.functions:
            inputs = self.signature(name).inputs
            for size in (1,) if name == "explain" else sorted({1, self.settings.max_batch_size}):
                if list(inputs) == [IMAGE_INPUT] and inputs[IMAGE_INPUT].dtype == types_pb2.DT_STRING:
                    self.call(name, {IMAGE_INPUT: object_array([image] * size)})
                elif name == "classify":
                    self.call(name, {"inputs": object_array([example.SerializeToString()] * size)})

    def close(self):
        for batcher in self.batchers.values():
            batcher.close()


def signature_label(version, body):
    """The signature a request body names ("serving_default" when none) if `version` has it, else "" (a label)."""
    name = body.get("signature_name") if isinstance(body, dict) else None
    name = (name or savedmodel.DEFAULT_SIGNATURE) if isinstance(name, (str, type(None))) else ""
    return name if name in version.signature_defs else ""


def folder_state(path):
    """(relative path, size, modification time) of every file under `path`, sorted: changes when a copy goes on."""
    files = []
    for root, _, names in os.walk(path):
        for name in names:
            try:
                stat = os.stat(os.path.join(root, name))
            except OSError:  # gone meanwhile
                continue
            files.append((os.path.relpath(os.path.join(root, name), path), stat.st_size, stat.st_mtime_ns))
    return sorted(files)


# ---------------------------------------------------------------- the model's versions


class ModelServer:
    """Every version of one model under a base folder: loading, polling, status, metadata, predict, classify."""

    def __init__(self, base, name, settings, checked=None):
        self.base, self.name, self.settings = os.fspath(base), name, settings
        self.checked = dict(checked or {})  # number -> its proto from `served_versions`, used by its first load
        self.versions = {}  # number -> Version, loaded and warmed up
        self.failed = {}  # number -> (its folder's files when it failed, why it didn't load)
        self.loading = set()
        self.ready = False  # a version serves
        self.stopping = False  # SIGTERM came: answering the requests in flight, then exiting
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.metrics = Metrics(self)

    # ---- loading

    async def sync(self):
        """Load new version folders, drop removed ones; ready once a version serves.

        A version that failed to load is tried again once its folder changes
        (a copy that was not finished, fixed files) and forgotten once it goes.
        """
        found = set(savedmodel.saved_versions(self.base))
        for number in sorted(set(self.versions) - found):
            log.info("version %d of %s removed: unloaded", number, self.name)
            self.versions.pop(number).close()
        for number in sorted(set(self.failed)):
            if number not in found:
                del self.failed[number]
            elif folder_state(self._path(number)) != self.failed[number][0]:
                log.info("version %d of %s changed since it failed: loading it again", number, self.name)
                del self.failed[number]
        for number in sorted(found - set(self.versions) - set(self.failed), reverse=True):
            await self.load(number)
        self.ready = bool(self.versions)

    def _path(self, number):
        return os.path.join(self.base, str(number))

    async def load(self, number):
        path = self._path(number)
        self.loading.add(number)
        try:
            state = await asyncio.to_thread(folder_state, path)
            on_batch = lambda signature, size, seconds: self.metrics.batch(  # noqa: E731
                self.name, str(number), signature, size, seconds
            )
            proto = self.checked.pop(number, None)
            version = await asyncio.to_thread(Version, number, path, self.settings, self.executor, on_batch, proto)
            await asyncio.to_thread(version.warm_up)
        except Exception as e:  # a refused or broken version: reported in the status, the others still serve
            self.failed[number] = (state, str(e))
            log.error("version %d of %s not loaded: %s", number, self.name, e)
            return
        finally:
            self.loading.discard(number)
        self.versions[number] = version
        log.info("serving version %d of %s from %s", number, self.name, path)

    async def poll_forever(self):
        while True:
            try:
                await self.sync()
            except Exception:  # a folder that vanished mid-scan: try again next time
                log.exception("polling %s failed", self.base)
            await asyncio.sleep(self.settings.poll_seconds)

    def close(self):
        for version in self.versions.values():
            version.close()
        self.executor.shutdown(wait=False)

    # ---- answers

    def readiness(self):
        """None when ready to take requests, else why not (the 503 of /v2/health/ready)."""
        if self.stopping:
            return f"Model {self.name} is shutting down."
        if not self.ready:
            return f"Model {self.name} is loading and warming up."
        return None

    def version(self, name, number):
        """The Version a request addresses (highest by default), or TensorFlow Serving's 404 (503 while loading)."""
        missing = not_found(f"Servable not found for request: {servable(name, number)}")
        if name != self.name:
            raise missing
        if not self.ready:
            raise ApiError(503, f"Model {name} is not ready yet: its versions are loading and warming up.")
        if number is None:
            return self.versions[max(self.versions)]
        if number in self.loading:
            raise ApiError(503, f"Version {number} of model {name} is loading.")
        if number not in self.versions:
            raise missing
        return self.versions[number]

    def states(self):
        """{version: (state, error code, message)} of every version loaded, loading or failed."""
        states = {v: ("AVAILABLE", "OK", "") for v in self.versions}
        states.update({v: ("LOADING", "OK", "") for v in self.loading})
        states.update({v: ("END", "FAILED_PRECONDITION", why) for v, (_, why) in self.failed.items()})
        return states

    def status(self, name, number):
        """TensorFlow Serving's model status: every version (highest first), or the one asked for."""
        states = self.states()
        if name != self.name or not states:
            raise not_found(f"Could not find any versions of model {name}")
        if number is not None and number not in states:
            raise not_found(f"Could not find version {number} of model {name}")
        shown = [number] if number is not None else sorted(states, reverse=True)
        return {
            "model_version_status": [
                {
                    "version": str(v),
                    "state": states[v][0],
                    "status": {"error_code": states[v][1], "error_message": states[v][2]},
                }
                for v in shown
            ]
        }

    def metadata(self, name, number):
        version = self.version(name, number)
        return savedmodel.metadata_json(version.proto, name, version.number)

    async def predict(self, name, number, body, labels):
        """TensorFlow Serving's :predict; `labels` gets the version and signature answering (for metrics)."""
        version = self.version(name, number)
        labels["version"], labels["signature"] = str(version.number), signature_label(version, body)
        instances = body.get("instances") if isinstance(body, dict) else None
        if isinstance(instances, list) and len(instances) > self.settings.max_batch_size:
            raise too_many(len(instances), self.settings.max_batch_size)
        signature, inputs, form = predict_request(body, version.input_dtypes)
        outputs = await version.run(signature, inputs)
        return predict_response(outputs, form)

    async def classify(self, name, number, body, labels):
        """TensorFlow Serving's :classify; `labels` as in `predict`."""
        version = self.version(name, number)
        labels["version"], labels["signature"] = str(version.number), signature_label(version, body)
        signature, examples = classify_request(body)
        input_name = check_classify_signature(version.signature(signature))
        if len(examples) > self.settings.max_batch_size:
            raise too_many(len(examples), self.settings.max_batch_size)
        inputs = {input_name: object_array(examples)}
        outputs = await version.run(signature, inputs)
        return classify_response(outputs)

    def page_model(self):
        """What the page shows: name, served version, class names, thresholds, limits."""
        version = self.versions[max(self.versions)] if self.ready else None
        metadata = (version.metadata or {}) if version else {}
        return {
            "name": self.name,
            "ready": self.ready,
            "version": version.number if version else None,
            "versions": sorted(self.versions),
            "kind": metadata.get("kind"),
            "class_names": metadata.get("class_names"),
            "thresholds": metadata.get("thresholds"),
            "image_size": metadata.get("image_size"),
            "adapted": metadata.get("adapted"),
            "calibrated": metadata.get("calibrated"),
            "explain": bool(version and "explain" in version.functions),
            "max_batch_size": self.settings.max_batch_size,
            "max_body_bytes": int(self.settings.max_body_mb * 2**20),
        }


def served_versions(base, trust=False):
    """{version: its SavedModel proto} of the numbered versions under `base`, ascending, each checked unless `trust`.

    Each proto comes from `savedmodel.read_checked`; hand the answer to
    `create_app(checked=...)` and no version's graph is parsed again. Raises
    SavedModelError when `base` is a version folder itself, holds no version,
    or a version uses ops outside the allow-list.
    """
    base = os.fspath(base)
    if savedmodel.is_saved_model(base):
        raise savedmodel.SavedModelError(f"{base}: a SavedModel version folder; pass its parent, the base folder.")
    found = savedmodel.saved_versions(base)
    if not found:
        raise savedmodel.SavedModelError(
            f"{base}: no numbered SavedModel versions (1/, 2/, ...); write one with `cxrkeras export MODEL --out {base}`."
        )
    return {v: savedmodel.read_checked(os.path.join(base, str(v)), trust=trust) for v in found}
