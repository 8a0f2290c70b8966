"""TensorFlow Serving's REST protocol: request paths, JSON <-> tensors, tf.Examples, errors.

A port of what TensorFlow Serving does (`model_servers/http_rest_api_util.cc`
for paths, `util/json_tensor.cc` for the JSON mapping, `http_server.cc` for
the status codes), with its messages, so a request TensorFlow Serving accepts
gets the same answer shape here and one it refuses the same kind of error:

- `instances` (row form) -> {"predictions": [...]}: a list of per-instance
  objects when the signature has several outputs, of plain values when one.
- `inputs` (columnar form) -> {"outputs": ...}: an object of outputs, or the
  one output's value.
- A string tensor's element may be {"b64": "<standard base64>"}; output
  strings are written as text unless the output's name ends in `_bytes`.
- `:classify` examples -> serialized tf.Example protos -> {"results":
  [[[label, score], ...], ...]} from a signature with one input `inputs` and
  outputs `classes` and/or `scores`.

Tensors are numpy arrays (strings as object arrays of bytes).
"""

import base64
import binascii
import re

import numpy as np

PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.IGNORECASE
)
STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.IGNORECASE
)
CLASSIFY_OUTPUTS = ("classes", "scores")
# Dimensions of one JSON value at most: numpy stops at 64, and no signature of ours takes more than 4.
MAX_RANK = 32
NUMPY_DTYPES = {
    "DT_FLOAT": np.float32,
    "DT_DOUBLE": np.float64,
    "DT_INT8": np.int8,
    "DT_UINT8": np.uint8,
    "DT_INT16": np.int16,
    "DT_INT32": np.int32,
    "DT_INT64": np.int64,
    "DT_UINT32": np.uint32,
    "DT_UINT64": np.uint64,
    "DT_BOOL": np.bool_,
    "DT_STRING": object,
}
JSON_TYPES = {dict: "Object", list: "Array", str: "String", bool: "Boolean", type(None): "Null"}


class ApiError(Exception):
    """An error answer: HTTP status and message ({"error": message})."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def invalid(message):
    return ApiError(400, message)


def not_found(message):
    return ApiError(404, message)


def object_array(items):
    """A 1-D numpy object array of bytes (a string tensor)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def too_many(count, limit):
    return invalid(
        f"Task size {count} is larger than maximum input batch size {limit}: "
        f"send at most {limit} instances per request (--max-batch-size)."
    )


# ---------------------------------------------------------------- paths


def parse_path(method, path):
    """{"name", "version" (int or None), "label", "verb" (predict/classify/regress or None), "metadata"}.

    Raises 400 "Malformed request" for a path TensorFlow Serving doesn't route. HEAD reads as GET.
    """
    method = "GET" if method == "HEAD" else method
    pattern = PREDICT_PATH if method == "POST" else STATUS_PATH if method == "GET" else None
    match = pattern.fullmatch(path) if pattern else None
    if match is None:
        raise invalid(f"Malformed request: {method} {path}")
    name, version, label, last = match.groups()
    if not name:
        raise invalid("Missing model name in request.")
    if version is not None and (len(version) > 18 or int(version) >= 2**63):
        raise invalid(f"Failed to convert version: {version} to numeric.")
    if label is not None:
        raise invalid(f"Unrecognized servable version label: {label}")
    return {
        "name": name,
        "version": int(version) if version is not None else None,
        "verb": last.lower() if method == "POST" else None,
        "metadata": method == "GET" and last is not None,
    }


def servable(name, version):
    """TensorFlow Serving's name for a request: Latest(name) or Specific(name, version)."""
    return f"Latest({name})" if version is None else f"Specific({name}, {version})"


# ---------------------------------------------------------------- JSON -> tensors


def debug_string(value, limit=120):
    import json

    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def json_type(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "Number"
    return JSON_TYPES.get(type(value), type(value).__name__)


def type_error(value, dtype):
    return invalid(
        f"JSON Value: {debug_string(value)} Type: {json_type(value)} is not of expected type: "
        f"{dtype[3:].lower()}"
    )


def is_b64(value):
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def decode_b64(value):
    """The bytes of {"b64": "..."}; standard alphabet, padding optional (as absl's Base64Unescape)."""
    if not is_b64(value):
        raise invalid(f"JSON Value: {debug_string(value)} not formatted correctly for base64 data")
    text = value["b64"]
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        hint = (
            " ('-' and '_' are URL-safe base64: send standard base64, with '+' and '/')"
            if re.search(r"[-_]", text)
            else ""
        )
        raise invalid(f"Unable to base64 decode{hint}: {e}") from None


INT_RANGES = {
    "DT_INT8": 32,  # TensorFlow Serving reads 8- and 16-bit integers as int32 (IsInt)
    "DT_UINT8": 32,
    "DT_INT16": 32,
    "DT_INT32": 32,
    "DT_INT64": 64,
    "DT_UINT32": -32,
    "DT_UINT64": -64,
}


def _leaf(value, dtype):
    """One JSON leaf as a value of `dtype` (a TensorFlow dtype name), or TensorFlow Serving's type error."""
    if dtype == "DT_STRING":
        if isinstance(value, str):
            return value.encode()
        if isinstance(value, dict):
            return decode_b64(value)
        raise type_error(value, dtype)
    if dtype in ("DT_FLOAT", "DT_DOUBLE"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif dtype == "DT_BOOL":
        ok = isinstance(value, bool)
    elif dtype in INT_RANGES:
        bits = INT_RANGES[dtype]
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if bits > 0 else (0, 2**-bits)
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value < high
    else:
        raise ApiError(501, f"Conversion of JSON Value: {debug_string(value)} to type: {dtype}")
    if not ok:
        raise type_error(value, dtype)
    return value


def dense_shape(value):
    """The shape a nested JSON list declares by its first elements (TensorFlow Serving's GetDenseTensorShape)."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def to_array(value, dtype):
    """A nested JSON list (or a scalar) as a numpy array of `dtype`, checking it is dense and well typed."""
    shape = dense_shape(value)
    if len(shape) > MAX_RANK:
        raise invalid(f"JSON Value: lists nested {len(shape)} deep; a tensor here has at most {MAX_RANK} dimensions")
    if dtype not in ("DT_STRING", "DT_BOOL") and shape:
        try:  # fast path for dense numeric lists (float images)
            array = np.asarray(value)
            if array.dtype.kind in "iuf" and list(array.shape) == shape:
                if dtype in ("DT_FLOAT", "DT_DOUBLE") or array.dtype.kind != "f":
                    return cast(array, dtype)
        except (ValueError, TypeError, OverflowError):
            pass
    flat = []

    def fill(item, level):
        if not isinstance(item, list):
            if level != len(shape):
                raise invalid(
                    f"JSON Value: {debug_string(item)} found at incorrect level: {level + 1} in the JSON DOM. "
                    f"Expected at level: {len(shape)}"
                )
            flat.append(_leaf(item, dtype))
            return
        if level >= len(shape):
            raise invalid(f"Encountered list at unexpected level: {level} expected < {len(shape)}")
        if len(item) != shape[level]:
            raise invalid(
                f"Encountered list at unexpected size: {len(item)} at level: {level} "
                f"expected size: {shape[level]}"
            )
        for element in item:
            fill(element, level + 1)

    fill(value, 0)
    if dtype == "DT_STRING":
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
    else:
        array = cast(np.array(flat), dtype)
    return array.reshape(shape)


def cast(array, dtype):
    """`array` as `dtype`, or a 400 when a float is NaN or infinite there (1e39 is infinite as a float32)."""
    with np.errstate(over="ignore"):
        array = array.astype(NUMPY_DTYPES[dtype])
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise invalid(f"JSON Value: a number that is NaN or infinite as {array.dtype}; send finite numbers")
    return array


def instances_to_tensors(instances, input_dtypes):
    """The row form: a non-empty list of instances -> {input name: array [N, ...]}."""
    names = sorted(input_dtypes)
    objects = isinstance(instances[0], dict) and not is_b64(instances[0])
    if not objects and len(names) > 1:
        raise invalid(
            "instances is a plain list, but expecting list of objects as multiple input tensors required as "
            f"per tensorinfo_map ({', '.join(names)})"
        )
    columns = {name: [] for name in names}
    for i, item in enumerate(instances):
        is_object = isinstance(item, dict) and not is_b64(item)
        if is_object != objects:
            kind = "object but got list" if objects else "value/list but got object"
            raise invalid(f"Expecting {kind} at item {i} of input list")
        values = item if objects else {names[0]: item}
        for key in values:
            if key not in input_dtypes:
                raise invalid(
                    f"Failed to process element: {i} key: {key} of 'instances' list. "
                    f"Error: JSON object: does not have named input: {key}"
                )
        if set(values) != set(names):
            raise invalid(
                f"Failed to process element: {i} of 'instances' list. JSON object: {debug_string(item)} "
                f"keys must be equal to: {','.join(names)}"
            )
        for name in names:
            try:
                array = to_array(values[name], input_dtypes[name])
            except ApiError as e:
                raise invalid(f"Failed to process element: {i} of 'instances' list. Error: {e.message}") from None
            if columns[name] and array.shape != columns[name][0].shape:
                raise invalid(
                    f"Expecting shape {list(columns[name][0].shape)} but got: {list(array.shape)} "
                    f"(element {i} of 'instances', input {name})"
                )
            columns[name].append(array)
    return {name: np.stack(arrays) for name, arrays in columns.items()}


def inputs_to_tensors(inputs, input_dtypes):
    """The columnar form: one input's value, or {input name: value} -> {input name: array}."""
    names = sorted(input_dtypes)
    if not isinstance(inputs, dict) or is_b64(inputs):
        if len(names) > 1:
            raise invalid(
                "inputs is a plain value/list, but expecting an object as multiple input tensors required as per "
                f"tensorinfo_map ({', '.join(names)})"
            )
        inputs = {names[0]: inputs}
    tensors = {}
    for name in names:
        if name not in inputs:
            raise invalid(f"Missing named input: {name} in 'inputs' object.")
        tensors[name] = to_array(inputs[name], input_dtypes[name])
        if tensors[name].ndim and not len(tensors[name]):
            raise invalid(f"No values in 'inputs' ({name!r} is an empty list): send at least one instance")
    return tensors


def predict_request(body, input_dtypes_of):
    """(signature name, {input: array}, "row" or "columnar") of a parsed :predict body.

    `input_dtypes_of(signature_name)` gives {input name: dtype name} or raises.
    """
    signature = signature_name(body)
    input_dtypes = input_dtypes_of(signature)
    if not input_dtypes:
        raise invalid(f"Failed to get input map for signature: {signature or 'DEFAULT'}")
    if "instances" in body and "inputs" in body:
        raise invalid(
            f"JSON Value: {debug_string(body)} Not formatted correctly expecting only one of 'inputs' or "
            f"'instances' keys to exist"
        )
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list):
            raise invalid(f"JSON Value: {debug_string(body)} Expecting 'instances' to be an list/array")
        if not instances:
            raise invalid(f"JSON Value: {debug_string(body)} No values in 'instances' array")
        return signature, instances_to_tensors(instances, input_dtypes), "row"
    if "inputs" in body:
        return signature, inputs_to_tensors(body["inputs"], input_dtypes), "columnar"
    raise invalid("Missing 'inputs' or 'instances' key")


def signature_name(body):
    if not isinstance(body, dict):
        raise invalid(f"JSON Value: {debug_string(body)} Is not object")
    name = body.get("signature_name", "")
    if not isinstance(name, str):
        raise invalid(
            f"JSON Value: {debug_string(body)} not formatted correctly. 'signature_name' key must be a string value."
        )
    return name


# ---------------------------------------------------------------- tensors -> JSON


def _json_values(array, as_bytes):
    """A numpy array as nested lists of JSON values (strings decoded, or {"b64"} when `as_bytes`)."""
    if array.dtype == object or array.dtype.kind == "S":
        if as_bytes:
            convert = lambda b: {"b64": base64.b64encode(b).decode()}  # noqa: E731
        else:
            convert = lambda b: b.decode("utf-8", "replace")  # noqa: E731
        return np.vectorize(convert, otypes=[object])(array).tolist() if array.size else array.tolist()
    return array.tolist()


def predict_response(outputs, form):
    """{"predictions": ...} (row form) or {"outputs": ...} (columnar) of {output name: array}."""
    values = {name: _json_values(array, name.endswith("_bytes")) for name, array in outputs.items()}
    if form == "columnar":
        return {"outputs": next(iter(values.values())) if len(values) == 1 else values}
    sizes = {name: np.shape(array)[0] if np.ndim(array) else None for name, array in outputs.items()}
    if None in sizes.values() or len(set(sizes.values())) > 1:
        raise invalid(f"Tensors have inconsistent or no batch sizes: {sizes}")
    if len(values) == 1:
        return {"predictions": next(iter(values.values()))}
    count = next(iter(sizes.values()))
    return {"predictions": [{name: column[i] for name, column in values.items()} for i in range(count)]}


# ---------------------------------------------------------------- :classify


def _feature(name, value, feature):
    """Add one JSON value to a tf.train.Feature (TensorFlow Serving's AddValueToFeature)."""
    kinds = {"bytes_list": "bytes", "float_list": "float", "int64_list": "int64"}
    if isinstance(value, bool) or (isinstance(value, int) and not isinstance(value, bool)):
        kind, item = "int64_list", int(value)
        if not -(2**63) <= item < 2**63:
            raise invalid(f"Feature: {name} has uint64_t element. Only int64_t is supported.")
    elif isinstance(value, float):
        kind, item = "float_list", value
        if not abs(value) <= np.finfo(np.float32).max:  # NaN compares false
            raise invalid(f"Feature: {name} has a number that is NaN or infinite as a float32; send finite numbers")
    elif isinstance(value, str):
        kind, item = "bytes_list", value.encode()
    elif is_b64(value):
        kind, item = "bytes_list", decode_b64(value)
    else:
        raise invalid(f"Feature: {name} has element with unexpected JSON type: {json_type(value)}")
    current = feature.WhichOneof("kind")
    if current not in (None, kind):
        raise invalid(f"Unexpected element type in feature: {name} expecting type: {kinds[current]}")
    getattr(feature, kind).value.append(item)


def make_example(obj):
    """A JSON object of features -> tf.train.Example."""
    from tensorflow.core.example import example_pb2

    if not isinstance(obj, dict):
        raise invalid(f"Example must be JSON object but got JSON {json_type(obj)}")
    example = example_pb2.Example()
    for name, content in obj.items():
        feature = example.features.feature[name]
        for value in content if isinstance(content, list) else [content]:
            _feature(name, value, feature)
    return example


def classify_request(body):
    """(signature name, [serialized tf.Example]) of a parsed :classify body; `context` merges into each example."""
    signature = signature_name(body)
    context = make_example(body["context"]) if "context" in body else None
    examples = body.get("examples")
    if examples is None:
        raise invalid(f"JSON Value: {debug_string(body)} When method is classify, key 'examples' is expected and was not found")
    if not isinstance(examples, list):
        raise invalid(f"JSON Value: {debug_string(body)} Expecting 'examples' value to be an list/array")
    if not examples:
        raise invalid(f"JSON Value: {debug_string(body)} 'examples' value is an empty array")
    serialized = []
    for obj in examples:
        example = make_example(obj)
        if context is not None:  # as TensorFlow Serving: the context's features, then the example's over them
            merged = type(example)()
            merged.CopyFrom(context)
            merged.MergeFrom(example)
            example = merged
        serialized.append(example.SerializeToString())
    return signature, serialized


def check_classify_signature(signature):
    """TensorFlow Serving's checks of a classification SignatureDef (PreProcessClassification); returns input name."""
    if len(signature.inputs) != 1:
        raise invalid("Expected one input Tensor.")
    if len(signature.outputs) not in (1, 2):
        raise invalid(f"Expected one or two output Tensors, found {len(signature.outputs)}")
    if "inputs" not in signature.inputs:
        raise invalid("No classification inputs found in SignatureDef (expected an input named 'inputs').")
    if not set(CLASSIFY_OUTPUTS) & set(signature.outputs):
        raise invalid('Expected classification signature outputs to contain at least one of "classes" or "scores".')
    return "inputs"


def classify_response(outputs):
    """{"results": [[[label, score], ...] per example]} of the `classes` and/or `scores` outputs."""
    classes, scores = outputs.get("classes"), outputs.get("scores")
    for name, array in (("classes", classes), ("scores", scores)):
        if array is not None and np.ndim(array) != 2:
            raise invalid(f"Expected Tensor shape: [batch_size num_classes] but got {list(np.shape(array))} ({name})")
    reference = classes if classes is not None else scores
    results = []
    for i in range(reference.shape[0]):
        row = []
        for c in range(reference.shape[1]):
            label = classes[i, c].decode("utf-8", "replace") if classes is not None else ""
            row.append([label, float(scores[i, c]) if scores is not None else 0.0])
        results.append(row)
    return {"results": results}
