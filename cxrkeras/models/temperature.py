"""Temperature scaling of a binary classifier's probability, as one small layer saved with the model.

p -> sigmoid(logit(p) / T): T > 1 softens over-confident probabilities, T < 1
sharpens them; the order of the probabilities (so every decision at a
threshold moved the same way) is unchanged. `calibrated(model, T)` appends the
layer to a binary classifier or an ensemble, `uncalibrated(model)` takes it
off; `temperature(model)` reads it (None when there is none).
"""

import math

import keras
from keras import ops

TEMPERATURE_LAYER = "temperature"
EPSILON = 1e-7  # probabilities are clipped to [EPSILON, 1 - EPSILON] before the logit (float32: logit ~ +-16)


@keras.saving.register_keras_serializable(package="cxrkeras")
class Temperature(keras.layers.Layer):
    """p [N, 1] in [0, 1] -> sigmoid(logit(p) / temperature) [N, 1] float32."""

    def __init__(self, temperature=1.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"`temperature` must be a positive number. Received: temperature={temperature!r}")
        self.temperature = float(temperature)

    def call(self, p):
        p = ops.clip(ops.cast(p, "float32"), EPSILON, 1.0 - EPSILON)
        return ops.sigmoid((ops.log(p) - ops.log1p(-p)) / self.temperature)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


def temperature(model):
    """The temperature of a calibrated binary classifier or ensemble, else None."""
    last = model.layers[-1] if model.layers else None
    return last.temperature if isinstance(last, Temperature) else None


def uncalibrated(model):
    """`model` without its Temperature layer (the model itself when it has none); same name, shared layers."""
    if temperature(model) is None:
        return model
    return keras.Model(model.inputs, model.layers[-1].input, name=model.name)


def calibrated(model, t):
    """A binary classifier or ensemble whose probability is temperature-scaled by `t` (replacing any earlier one)."""
    base = uncalibrated(model)
    out = Temperature(t, name=TEMPERATURE_LAYER)(base.outputs[0])
    return keras.Model(base.inputs, out, name=base.name)


def scaled_probability(p, t_old, t_new):
    """A probability of a model at temperature `t_old` seen at `t_new` (numbers; 0 and 1 stay put).

    What a threshold on p becomes when the temperature changes: the decisions stay where they were.
    """
    p = float(p)
    if p <= 0.0 or p >= 1.0:
        return p
    z = math.log(p / (1.0 - p)) * t_old / t_new
    return 1.0 / (1.0 + math.exp(-z))
