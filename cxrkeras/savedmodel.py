"""Reading a SavedModel: version folders, cxrkeras' metadata, signatures, and what its graph would run.

The one reader of exports for `cxrkeras predict` and `cxrkeras serve`. It
imports TensorFlow only (never Keras or our model builders): serving needs
none of our Keras code.

A SavedModel is code: its graph can read and write files, run Python
(`PyFunc`) or open sockets. `check_ops` lists every op of the graph and of
every function in its library and refuses ops outside `ALLOWED_OPS` (the
ones our exports use, and the plain math of Keras layers). The saver's file
ops (`RestoreV2`, `SaveV2`, `MergeV2Checkpoints`) are needed to load
variables: they are allowed only in the functions that the SavedModel's
saver (`saver_def`) calls and that no signature or other graph node reaches.
`load(path, trust=False)` checks, then loads; `read_checked` reads and checks
the graph once for a reader that keeps it (the server).
"""

import json
import os

METADATA_FILE = os.path.join("assets.extra", "cxrkeras.json")
SAVED_MODEL_FILE = "saved_model.pb"
DEFAULT_SIGNATURE = "serving_default"
IMAGE_INPUT = "images"  # our exports' encoded-image input
EXAMPLE_IMAGE_FEATURE = "image"  # the tf.Example feature our exports' classify signature decodes

# Ops the saver's own functions need to restore and save variables: file I/O, allowed nowhere else.
SAVER_FILE_OPS = frozenset({"RestoreV2", "SaveV2", "MergeV2Checkpoints"})

# Everything our exports' graphs use (every kind, float32 and mixed_bfloat16), plus the plain math,
# array, control-flow and image ops of Keras layers. No op that touches files, processes, the network,
# Python or arbitrary memory (WriteFile, ReadFile, PrintV2 with a file stream, PyFunc, EagerPyFunc,
# ImmutableConst, datasets, summaries, ...) is here.
ALLOWED_OPS = frozenset(
    """
    Abs Add AddN AddV2 All Any ArgMax ArgMin Assert AssignAddVariableOp AssignSubVariableOp AssignVariableOp
    AvgPool AvgPoolGrad BatchMatMulV2 BatchMatMulV3 BiasAdd BiasAddGrad BroadcastArgs BroadcastGradientArgs
    BroadcastTo Cast Ceil CheckNumerics ConcatV2 Const Conv2D Conv2DBackpropFilter Conv2DBackpropInput Cos
    Cumsum DepthwiseConv2dNative DepthwiseConv2dNativeBackpropInput DecodeBmp DecodeGif DecodeImage DecodeJpeg
    DecodePng DisableCopyOnRead DivNoNan DynamicStitch Einsum Elu EluGrad EmptyTensorList Equal Erf Exp ExpandDims Fill Floor FloorDiv
    FloorMod FusedBatchNormV3 GatherNd GatherV2 Greater GreaterEqual Identity IdentityN If IsFinite L2Loss
    LeakyRelu LeakyReluGrad Less LessEqual Log Log1p LogicalAnd LogicalNot LogicalOr LogSoftmax MatMul Max
    MaxPool MaxPoolGrad Maximum Mean Min Minimum Mod Mul Neg NoOp NotEqual OneHot OnesLike Pack Pad PadV2
    ParseExampleV2 PartitionedCall Placeholder PlaceholderWithDefault Pow Prod RandomUniform Range Rank
    ReadVariableOp RealDiv Reciprocal Relu Relu6 Relu6Grad ReluGrad Reshape ResizeArea ResizeBicubic
    ResizeBilinear ResizeNearestNeighbor ResourceGather Round Rsqrt RsqrtGrad ScaleAndTranslate
    ScaleAndTranslateGrad Select SelectV2 Selu Shape ShapeN ShardedFilename Sigmoid SigmoidGrad Sign Sin Size
    Slice Softmax Softplus Softsign Split SplitV Sqrt Square SquaredDifference Squeeze StatefulPartitionedCall
    StatelessIf StatelessRandomUniformV2 StatelessWhile StaticRegexFullMatch StopGradient StridedSlice
    StridedSliceGrad StringJoin Sub Substr Sum Tanh TanhGrad TensorListElementShape TensorListFromTensor
    TensorListGetItem TensorListLength TensorListPopBack TensorListPushBack TensorListReserve TensorListSetItem
    TensorListStack Tile Transpose Unpack UnsortedSegmentSum VarHandleOp VarIsInitializedOp Where While ZerosLike
    """.split()
)


class SavedModelError(ValueError):
    """A SavedModel that cannot be read or used as given; the message names the path."""


class UntrustedOpsError(SavedModelError):
    """A SavedModel whose graph runs ops outside `ALLOWED_OPS`."""


# ---------------------------------------------------------------- folders


def versions(base):
    """The numeric version folders under `base`, ascending (staging folders such as `.export-3-123` are not)."""
    if not os.path.isdir(base):
        return []
    return sorted(int(n) for n in os.listdir(base) if n.isdigit() and os.path.isdir(os.path.join(base, n)))


def is_saved_model(path):
    return os.path.isfile(os.path.join(path, SAVED_MODEL_FILE))


def saved_versions(base):
    """The version folders under `base` that hold a SavedModel, ascending."""
    return [v for v in versions(base) if is_saved_model(os.path.join(base, str(v)))]


def saved_model_dir(path):
    """The SavedModel folder for `path` (a version folder, or a base: its highest version), or None."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    if is_saved_model(path):
        return path
    found = saved_versions(path)
    return os.path.join(path, str(found[-1])) if found else None


def read_metadata(version_dir):
    """The cxrkeras.json written beside an export, or None for a SavedModel made elsewhere."""
    path = os.path.join(version_dir, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def probe_image(size):
    """A black PNG of `size` x `size`: what warms up an export, or asks a server for its class names."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (size, size)).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- the graph


def read_proto(path):
    """The `SavedModel` protocol buffer of the version folder `path`."""
    from tensorflow.core.protobuf import saved_model_pb2

    filename = os.path.join(os.fspath(path), SAVED_MODEL_FILE)
    proto = saved_model_pb2.SavedModel()
    try:
        with open(filename, "rb") as f:
            proto.ParseFromString(f.read())
    except OSError as e:
        raise SavedModelError(f"{filename}: cannot be read ({e.strerror}).") from e
    except Exception as e:  # protobuf's DecodeError
        raise SavedModelError(f"{filename}: not a SavedModel ({type(e).__name__}: {e}).") from e
    if len(proto.meta_graphs) != 1:
        raise SavedModelError(f"{filename}: {len(proto.meta_graphs)} meta graphs; expected 1 (tag 'serve').")
    return proto


def _called_functions(node, library):
    """Names of the library functions a NodeDef calls: by op name, or through function-valued attributes."""
    called = {node.op} & library.keys()
    for value in node.attr.values():
        if value.func.name:
            called.add(value.func.name)
        called.update(f.name for f in value.list.func)
    return called


def _reach(roots, library):
    """The functions reachable from `roots` through `library` {name: FunctionDef}."""
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in library:
            continue
        seen.add(name)
        for node in library[name].node_def:
            todo.extend(_called_functions(node, library))
    return seen


def graph_ops(proto):
    """{(op, where)}: every op of the graph's nodes and of every function in its library.

    `where` is "graph" or the function's name. Calls of library functions are
    followed, not listed as ops.
    """
    meta = proto.meta_graphs[0]
    library = {f.signature.name: f for f in meta.graph_def.library.function}
    found = {(n.op, "graph") for n in meta.graph_def.node if n.op not in library}
    for name, function in library.items():
        found.update((n.op, name) for n in function.node_def if n.op not in library)
    return found


def saver_functions(proto):
    """The functions only the saver calls (from its save and restore nodes), which may hold `SAVER_FILE_OPS`."""
    meta = proto.meta_graphs[0]
    library = {f.signature.name: f for f in meta.graph_def.library.function}
    saver = meta.saver_def
    saver_nodes = {saver.restore_op_name.split(":")[0], saver.save_tensor_name.split(":")[0]} - {""}
    saver_roots, other_roots = set(), set()
    for node in meta.graph_def.node:
        (saver_roots if node.name in saver_nodes else other_roots).update(_called_functions(node, library))
    saver_reach = _reach(saver_roots, library)
    other_roots.update(set(library) - saver_reach)  # functions nothing calls count as ordinary code
    return saver_reach - _reach(other_roots, library)


def untrusted_ops(proto):
    """{op: sorted places} of the ops outside the allow-list (saver file ops outside the saver's functions)."""
    saver_only = saver_functions(proto)
    found = {}
    for op, where in graph_ops(proto):
        if op in ALLOWED_OPS or (op in SAVER_FILE_OPS and where in saver_only):
            continue
        found.setdefault(op, set()).add(where)
    return {op: sorted(places) for op, places in sorted(found.items())}


def check_ops(path, proto=None):
    """Raise `UntrustedOpsError` naming each op outside the allow-list of the SavedModel at `path` (or its `proto`)."""
    found = untrusted_ops(read_proto(path) if proto is None else proto)
    if found:
        listed = "; ".join(f"{op} (in {', '.join(places[:3])})" for op, places in found.items())
        raise UntrustedOpsError(
            f"{path}: the SavedModel's graph runs ops that cxrkeras does not allow: {listed}. "
            f"A SavedModel is code; load it only if you trust who made it (--trust-model)."
        )


def read_checked(path, trust=False):
    """The proto of the SavedModel at `path`, its ops checked (`check_ops`) unless `trust`: read once, handed on."""
    proto = read_proto(path)
    if not trust:
        check_ops(path, proto)
    return proto


def load(path, trust=False, proto=None):
    """The SavedModel at `path` (tf.saved_model.load), after `check_ops` unless `trust`.

    `proto`: what `read_checked(path, trust)` returned, so the graph is not
    read and checked again.
    """
    import tensorflow as tf

    path = os.fspath(path)
    if proto is None and not trust:
        check_ops(path)
    try:
        return tf.saved_model.load(path)
    except Exception as e:  # TensorFlow raises many types for a broken SavedModel
        raise SavedModelError(f"{path}: does not load as a SavedModel ({type(e).__name__}: {e}).") from e


def error_message(error):
    """The line of a TensorFlow error that says what went wrong (not "Graph execution error:" or node names)."""
    lines = [line.strip() for line in getattr(error, "message", str(error)).splitlines()]
    noise = ("Graph execution error", "Detected at node", "<stack traces", "[[", "File ")
    useful = [line for line in lines if line and not line.startswith(noise)] or lines[:1]
    message = useful[0]
    while message.startswith("{{"):  # {{function_node ...}} prefixes of eager errors
        message = message.split("}}", 1)[-1].strip()
    return message.split(" [Op:")[0]


# ---------------------------------------------------------------- signatures


def signature_defs(proto):
    """{name: SignatureDef} of the SavedModel, `__saved_model_init_op` included (TensorFlow Serving lists it)."""
    return dict(proto.meta_graphs[0].signature_def)


def tensor_info_json(info):
    """A TensorInfo as TensorFlow Serving's metadata writes it (proto3 JSON, field names kept)."""
    from tensorflow.core.framework import types_pb2

    shape = info.tensor_shape
    return {
        "dtype": types_pb2.DataType.Name(info.dtype),
        "tensor_shape": {
            "dim": [{"size": str(d.size), "name": d.name} for d in shape.dim],
            "unknown_rank": shape.unknown_rank,
        },
        "name": info.name,
    }


def signature_def_json(signature):
    return {
        "inputs": {k: tensor_info_json(v) for k, v in signature.inputs.items()},
        "outputs": {k: tensor_info_json(v) for k, v in signature.outputs.items()},
        "method_name": signature.method_name,
        "defaults": {},
    }


def metadata_json(proto, name, version):
    """The answer of TensorFlow Serving's `GET /v1/models/NAME[/versions/V]/metadata`."""
    return {
        "model_spec": {"name": name, "signature_name": "", "version": str(version)},
        "metadata": {
            "signature_def": {
                "signature_def": {k: signature_def_json(v) for k, v in signature_defs(proto).items()}
            }
        },
    }
