"""Small pieces the classifiers are built from: initializers, conv and residual blocks.

Every function names its layers from a prefix, so feature maps and Grad-CAM
can address them (`block1_conv`, `res2_add`, ...).
"""

import math

import keras

from cxrkeras.config import INITIALIZERS


@keras.saving.register_keras_serializable(package="cxrkeras")
class TorchUniform(keras.initializers.RandomUniform):
    """PyTorch's default init for Conv and Dense: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    For a kernel, fan_in comes from its shape (kernel_h * kernel_w * in_channels
    for a Conv2D, in_features for a Dense). A bias's shape doesn't carry it, so
    pass `fan_in` explicitly for biases.
    """

    def __init__(self, fan_in=None, seed=None):
        super().__init__(seed=seed)
        self.fan_in = fan_in

    def __call__(self, shape, dtype=None):
        fan_in = self.fan_in
        if fan_in is None:
            if len(shape) < 2:
                raise ValueError(
                    f"TorchUniform needs `fan_in` for a {len(shape)}-D shape (a bias). "
                    f"Received: shape={tuple(shape)}, fan_in=None"
                )
            fan_in = math.prod(shape[:-1])
        bound = 1.0 / math.sqrt(fan_in)
        return keras.random.uniform(shape, minval=-bound, maxval=bound, dtype=dtype, seed=self.seed)

    def get_config(self):
        config = super().get_config()
        config.pop("minval", None)
        config.pop("maxval", None)
        return {**config, "fan_in": self.fan_in}


def layer_initializers(initializer, fan_in):
    """(kernel_initializer, bias_initializer) for a layer with `fan_in` inputs per output."""
    if initializer == "torch":
        return TorchUniform(), TorchUniform(fan_in=fan_in)
    if initializer == "keras":
        return "glorot_uniform", "zeros"
    raise ValueError(
        f"Unknown `initializer`; expected one of {list(INITIALIZERS)}. "
        f"Received: initializer={initializer!r}"
    )


@keras.saving.register_keras_serializable(package="cxrkeras")
class PointwiseConv2D(keras.layers.Conv2D):
    """A 1x1 Conv2D whose stride subsamples first: the same function and weights, without a strided 1x1 kernel.

    TensorFlow's oneDNN filter gradient of a strided 1x1 convolution corrupts
    the heap on AVX-512 CPUs (a SIGABRT or SIGSEGV in any training step or
    Grad-CAM; experiments/onednn_sweep.py). With a 1x1 kernel the stride only
    picks pixels 0, s, 2s, ... ("same" pads nothing), so taking those first and
    convolving with stride 1 gives the same output, a quarter of the work.
    Its config is Conv2D's, strides included.
    """

    def convolution_op(self, inputs, kernel):
        rows, cols = self.strides
        if self.data_format == "channels_last":
            inputs = inputs[:, ::rows, ::cols, :]
        else:
            inputs = inputs[:, :, ::rows, ::cols]
        return keras.ops.conv(inputs, kernel, strides=1, padding=self.padding,
                              dilation_rate=self.dilation_rate, data_format=self.data_format)


def is_strided_pointwise(layer):
    return (type(layer) is keras.layers.Conv2D and tuple(layer.kernel_size) == (1, 1)
            and tuple(layer.strides) != (1, 1) and tuple(layer.dilation_rate) == (1, 1))


def avoid_strided_pointwise(model):
    """`model` with each plain strided 1x1 Conv2D (as saved before PointwiseConv2D) made one; nested models too.

    The layer keeps its config and weights; only how it convolves changes (the same function).
    """
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            avoid_strided_pointwise(layer)
        elif is_strided_pointwise(layer):
            layer.__class__ = PointwiseConv2D
    return model


def compute_in_float32(model):
    """`model` with every layer computing in float32; nested models too. Returns `model`.

    A classifier trained in mixed precision keeps float32 weights: computing in
    float32 gives the answers of the float32 function those weights define on
    any machine (bfloat16 rounds probabilities to 2-3 digits and is slow where
    the CPU lacks it). Cascades and exports are made from such models.
    """
    for layer in [model] + list(model.layers):
        if layer is not model and isinstance(layer, keras.Model):
            compute_in_float32(layer)
        elif layer.dtype_policy.name != "float32":
            layer.dtype_policy = "float32"
    return model


def batch_norm(name, dtype=None):
    # PyTorch's BatchNorm2d defaults (momentum 0.1 there is 0.9 here), as the study used.
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


def conv(x, filters, name, *, padding, initializer, kernel_size=3, strides=1, dtype=None):
    """A Conv2D (3x3 unless `kernel_size`) without activation."""
    kernel_init, bias_init = layer_initializers(initializer, kernel_size * kernel_size * x.shape[-1])
    layer = PointwiseConv2D if kernel_size == 1 and strides != 1 else keras.layers.Conv2D
    return layer(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        kernel_initializer=kernel_init,
        bias_initializer=bias_init,
        dtype=dtype,
        name=name,
    )(x)


def conv_block(x, filters, prefix, suffix="", *, padding, initializer, batchnorm, relu=True, dtype=None):
    """Conv 3x3 [-> BatchNorm] [-> ReLU], named `{prefix}_conv{suffix}`, `_bn`, `_relu`."""
    x = conv(x, filters, f"{prefix}_conv{suffix}", padding=padding, initializer=initializer, dtype=dtype)
    if batchnorm:
        x = batch_norm(f"{prefix}_bn{suffix}", dtype)(x)
    if relu:
        x = keras.layers.ReLU(dtype=dtype, name=f"{prefix}_relu{suffix}")(x)
    return x


def residual_block(x, prefix, *, initializer, batchnorm, skip=True, dtype=None):
    """y = ReLU(Conv(x)); out = ReLU(Conv(y) + x), keeping x's channel count.

    With `skip=False` the addition is left out (a plain two-conv block).
    """
    channels = x.shape[-1]
    options = dict(padding="same", initializer=initializer, batchnorm=batchnorm, dtype=dtype)
    y = conv_block(x, channels, prefix, "1", **options)
    y = conv_block(y, channels, prefix, "2", relu=False, **options)
    if skip:
        y = keras.layers.Add(dtype=dtype, name=f"{prefix}_add")([y, x])
    return keras.layers.ReLU(dtype=dtype, name=f"{prefix}_out")(y)


def basic_block(x, filters, prefix, *, strides=1, initializer, dtype=None):
    """ResNet's basic block with BatchNorm: out = ReLU(BN(Conv(ReLU(BN(Conv(x))))) + shortcut(x)).

    The shortcut is x itself, or a strided 1x1 Conv and BatchNorm when the
    shape changes (`{prefix}_short_conv`, `_short_bn`). Grad-CAM reads the
    block's `{prefix}_out`: it follows the last conv through BatchNorm, Add and ReLU.
    """
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = conv(x, filters, f"{prefix}_short_conv", padding="same", initializer=initializer, kernel_size=1,
                        strides=strides, dtype=dtype)
        shortcut = batch_norm(f"{prefix}_short_bn", dtype)(shortcut)
    y = conv(x, filters, f"{prefix}_conv1", padding="same", initializer=initializer, strides=strides, dtype=dtype)
    y = batch_norm(f"{prefix}_bn1", dtype)(y)
    y = keras.layers.ReLU(dtype=dtype, name=f"{prefix}_relu1")(y)
    y = conv(y, filters, f"{prefix}_conv2", padding="same", initializer=initializer, dtype=dtype)
    y = batch_norm(f"{prefix}_bn2", dtype)(y)
    y = keras.layers.Add(dtype=dtype, name=f"{prefix}_add")([y, shortcut])
    return keras.layers.ReLU(dtype=dtype, name=f"{prefix}_out")(y)


def dense(x, units, name, *, initializer, activation=None, dtype=None):
    kernel_init, bias_init = layer_initializers(initializer, x.shape[-1])
    return keras.layers.Dense(
        units,
        activation=activation,
        kernel_initializer=kernel_init,
        bias_initializer=bias_init,
        dtype=dtype,
        name=name,
    )(x)


def dropout(x, rate, name, dtype=None):
    """Dropout, or nothing when `rate` is 0."""
    return keras.layers.Dropout(rate, dtype=dtype, name=name)(x) if rate else x
