"""The study's two classifiers (and the three-class variant), built from a `ModelConfig`.

"plain" (the infected classifier): input BatchNorm -> N x [Conv 3x3 valid -> ReLU
-> MaxPool 2] -> Dropout -> Flatten -> Dense ReLU -> Dropout -> Dense.
"residual" (the covid classifier): input BatchNorm -> 2 stem convs -> MaxPool 3
-> N x [residual block -> MaxPool 2] -> Flatten -> Dropout -> Dense ReLU
-> Dropout -> Dense.
"resnet" (not the study's; cheaper and better on validation): input BatchNorm ->
stem Conv 5x5 stride 2 -> MaxPool 3 stride 2 -> stages of basic residual blocks
with BatchNorm (each stage after the first halves the size) -> global average
pooling -> Dropout -> Dense.
The models take raw pixels in [0, 1] and are returned uncompiled. Each carries
its task and class names in a weightless `TaskInfo` layer, so a saved model
says what it is wherever its file goes. `dtype` (a
policy name such as "mixed_bfloat16", or a `keras.DTypePolicy`) goes to every
layer but the output, which stays float32; None means Keras' global policy.
"""

import keras

from cxrkeras.config import TASKS, check_task, study_model_config
from cxrkeras.models import blocks

def build_model(config, dtype=None):
    """An uncompiled classifier for `config` (a `cxrkeras.config.ModelConfig`), its layers in `dtype`."""
    config.validate()
    inputs = keras.Input((config.image_size, config.image_size, 1), name="image")
    x = TaskInfo(config.task, name="task_info")(inputs)
    if config.contrast == "standardize":  # each image to zero mean and unit variance: exposure-blind input
        x = keras.layers.LayerNormalization(axis=(1, 2, 3), epsilon=1e-6, center=False, scale=False,
                                            dtype="float32", name="contrast")(x)
    elif config.contrast == "equalize":  # each image's grey levels to their rank in it: exposure- and gamma-blind
        x = Equalize(name="contrast")(x)
    elif config.contrast == "clahe":  # Keras' contrast-limited adaptive equalisation (8 x 8 tiles)
        x = keras.layers.ContrastLimitedAdaptiveHistogramEqualization(value_range=(0, 1), dtype="float32",
                                                                     name="contrast")(x)
    if config.input_norm:
        x = blocks.batch_norm("input_norm", dtype)(x)
    trunk = {"plain": plain_trunk, "residual": residual_trunk, "resnet": resnet_trunk}[config.arch]
    x = trunk(x, config, dtype)
    outputs = head(x, config, dtype)
    name = config.task.replace("-", "_") + "_classifier"
    return keras.Model(inputs, outputs, name=name)


@keras.saving.register_keras_serializable(package="cxrkeras")
class TaskInfo(keras.layers.Identity):
    """Passes the image through unchanged; its config holds the model's task and class names.

    No weights (parameter counts stay the study's) and no computation: it is
    there so `.keras` save/load, and so exports, carry what the model is.
    """

    def __init__(self, task, class_names=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.task = check_task(task)
        self.class_names = tuple(class_names or TASKS[task])
        if len(self.class_names) != len(TASKS[task]):
            raise ValueError(
                f"`class_names` must name the {len(TASKS[task])} classes of task {task!r}. "
                f"Received: class_names={list(self.class_names)}"
            )

    def get_config(self):
        return {**super().get_config(), "task": self.task, "class_names": list(self.class_names)}


@keras.saving.register_keras_serializable(package="cxrkeras")
class Equalize(keras.layers.Layer):
    """Histogram equalisation of each image: a grey level becomes the share of its image below it (ties half).

    The input is [0, 1] pixels, read as 256 grey levels; the output lies in
    (0, 1). Any increasing change of brightness, contrast or gamma leaves it
    unchanged. Keras' own `Equalization` layer passes tensors through unchanged
    inside a functional model (Keras 3.15), hence this one. The 256-bin
    histogram is the product of one-hot codes of the level's high and low 4
    bits (a batched matmul), so it compiles under XLA and exports with the
    SavedModel's plain ops.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, images):
        ops = keras.ops
        shape = ops.shape(images)
        levels = ops.cast(ops.clip(ops.round(images * 255.0), 0, 255), "int32")
        levels = ops.reshape(levels, (shape[0], -1))  # [batch, pixels]
        high = ops.one_hot(levels // 16, 16, dtype=self.compute_dtype)
        low = ops.one_hot(levels % 16, 16, dtype=self.compute_dtype)
        counts = ops.reshape(ops.matmul(ops.transpose(high, (0, 2, 1)), low), (shape[0], 256))
        below = ops.cumsum(counts, axis=1) - counts / 2.0  # pixels below each level, ties counted half
        ranks = ops.take_along_axis(below, levels, axis=1) / ops.cast(ops.shape(levels)[1], self.compute_dtype)
        return ops.reshape(ranks, shape)


def task_info(model):
    """The `TaskInfo` layer of a classifier built here, or None (models saved before it existed)."""
    for layer in model.layers:
        if isinstance(layer, TaskInfo):
            return layer
    return None


def build_study_model(task):
    """The study's classifier for `task`: "infected", "covid" or "three-class"."""
    return build_model(study_model_config(task))


def plain_trunk(x, config, dtype=None):
    for i, filters in enumerate(block_filters(config), start=1):
        x = blocks.conv_block(
            x,
            filters,
            f"block{i}",
            padding="valid",
            initializer=config.initializer,
            batchnorm=config.batchnorm,
            dtype=dtype,
        )
        x = keras.layers.MaxPooling2D(2, dtype=dtype, name=f"block{i}_pool")(x)
    return x


def residual_trunk(x, config, dtype=None):
    stem_filters = [config.filters[0], config.filters[-1]]
    for i, filters in enumerate(stem_filters, start=1):
        x = blocks.conv_block(
            x,
            filters,
            "stem",
            str(i),
            padding="same",
            initializer=config.initializer,
            batchnorm=config.batchnorm,
            dtype=dtype,
        )
    x = keras.layers.MaxPooling2D(3, dtype=dtype, name="stem_pool")(x)
    for i in range(1, config.blocks + 1):
        x = blocks.residual_block(
            x,
            f"res{i}",
            initializer=config.initializer,
            batchnorm=config.batchnorm,
            skip=config.residual,
            dtype=dtype,
        )
        x = keras.layers.MaxPooling2D(2, dtype=dtype, name=f"res{i}_pool")(x)
    return x


def resnet_trunk(x, config, dtype=None):
    """Stem (Conv 5x5 stride 2, BatchNorm, ReLU, MaxPool 3 stride 2), then one stage per `filters[1:]`."""
    x = blocks.conv(x, config.filters[0], "stem_conv", padding="same", initializer=config.initializer,
                    kernel_size=5, strides=2, dtype=dtype)
    x = blocks.batch_norm("stem_bn", dtype)(x)
    x = keras.layers.ReLU(dtype=dtype, name="stem_relu")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", dtype=dtype, name="stem_pool")(x)
    for i, filters in enumerate(config.filters[1:], start=1):
        for j in range(1, config.blocks + 1):
            strides = 2 if i > 1 and j == 1 else 1
            x = blocks.basic_block(x, filters, f"stage{i}_block{j}", strides=strides,
                                   initializer=config.initializer, dtype=dtype)
    return x


def head(x, config, dtype=None):
    """[Dropout] -> Flatten (resnet: global average pooling) [-> Dropout] [-> Dense ReLU] -> Dropout -> predictions."""
    x = blocks.dropout(x, config.conv_dropout, "conv_dropout", dtype)
    if config.arch == "resnet":
        x = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="avg_pool")(x)
    else:
        x = keras.layers.Flatten(dtype=dtype, name="flatten")(x)
    if config.arch == "residual":
        x = blocks.dropout(x, config.dropout, "flatten_dropout", dtype)
    if config.dense_units:
        x = blocks.dense(
            x, config.dense_units, "fc", initializer=config.initializer, activation="relu", dtype=dtype
        )
    x = blocks.dropout(x, config.dropout, "fc_dropout", dtype)
    outputs, activation = num_outputs(config.task), "sigmoid"
    if outputs > 1:
        activation = "softmax"
    # float32 output keeps the loss numerically safe under mixed_bfloat16.
    return blocks.dense(
        x,
        outputs,
        "predictions",
        initializer=config.initializer,
        activation=activation,
        dtype="float32",
    )


def num_outputs(task):
    """1 (a sigmoid) for a binary task, else one softmax unit per class."""
    n = len(TASKS[check_task(task)])
    return 1 if n == 2 else n


def block_filters(config):
    """The plain arch's filters per block: `filters` cut to `blocks`, or its last repeated."""
    filters = list(config.filters)
    return (filters + filters[-1:] * config.blocks)[: config.blocks]


def conv_layer_names(model):
    """Names of the model's Conv2D layers, input to output."""
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def last_conv_layer_name(model):
    """The last Conv2D layer's name (for Grad-CAM)."""
    names = conv_layer_names(model)
    if not names:
        raise ValueError(f"Model {model.name!r} has no Conv2D layer.")
    return names[-1]
