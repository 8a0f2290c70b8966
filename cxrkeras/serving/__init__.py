"""`cxrkeras serve`: an exported base folder over TensorFlow Serving's REST API, with a page to try it.

Split as TensorFlow Serving splits it:

    settings.py    the server's limits (the `serve` options), importable without TensorFlow
    protocol.py    TensorFlow Serving's REST protocol: paths, JSON <-> tensors, tf.Examples, errors
    batching.py    concurrent requests of a signature gathered into one model call
    servable.py    one loaded version (its proto read and checked once) and the manager of every version
    monitoring.py  Prometheus metrics at TensorFlow Serving's path
    app.py         HTTP: the Starlette app and uvicorn

Path of a request: Starlette route (`app`) -> `protocol.parse_path` -> the
body read under `--max-body-mb` -> `protocol.predict_request` /
`protocol.classify_request` (TensorFlow Serving's JSON mapping) -> image
headers checked in Python by the judge training uses
(`images.image_problem`: an image declaring 20000x20000 never reaches the
graph's decoder) -> DICOM images made the 16-bit PNG the graph decodes
(`images.encoded_image`, off the event loop: the graph reads image formats
only) -> the signature's `batching.Batcher`, which gathers concurrent
requests into one model call (as many instances as the last batch had,
waiting at most `--batch-timeout-ms`, at most `--max-batch-size`) run on one
inference thread, off the event loop -> `protocol.predict_response`.

It imports TensorFlow, never Keras, our model builders or `cxrkeras.data`.
"""

import importlib

# What `from cxrkeras import serving` offers (the `serve` command's needs), imported when first used, so
# that `cxrkeras.serving.settings` alone (the CLI's option defaults) imports nothing else.
EXPORTS = {"Settings": "settings", "create_app": "app", "run": "app", "uvicorn_server": "app", "served_versions": "servable"}
__all__ = sorted(EXPORTS)


def __getattr__(name):
    if name not in EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{EXPORTS[name]}"), name)
