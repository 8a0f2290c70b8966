"""The classifiers: `build_model(config)` for any `ModelConfig`, `build_study_model(task)`.

Importing this package registers `TorchUniform`, `TaskInfo`, `Temperature` and
`CascadeDecision`, so `keras.saving.load_model` reloads saved classifiers;
`CUSTOM_OBJECTS` is there for code that prefers to pass them explicitly.
"""

from cxrkeras.models.blocks import TorchUniform
from cxrkeras.models.classifiers import (
    TaskInfo,
    build_model,
    build_study_model,
    conv_layer_names,
    last_conv_layer_name,
    num_outputs,
    task_info,
)
from cxrkeras.models.cascade import (
    CascadeDecision,
    build_cascade,
    build_ensemble,
    cascade_thresholds,
    ensemble_members,
    explained_classifier,
    model_kind,
)
from cxrkeras.models.temperature import Temperature

CUSTOM_OBJECTS = {
    "TorchUniform": TorchUniform,
    "cxrkeras>TorchUniform": TorchUniform,
    "CascadeDecision": CascadeDecision,
    "cxrkeras>CascadeDecision": CascadeDecision,
    "TaskInfo": TaskInfo,
    "cxrkeras>TaskInfo": TaskInfo,
    "Temperature": Temperature,
    "cxrkeras>Temperature": Temperature,
}

__all__ = [
    "CUSTOM_OBJECTS",
    "CascadeDecision",
    "TaskInfo",
    "Temperature",
    "TorchUniform",
    "build_model",
    "build_cascade",
    "build_ensemble",
    "build_study_model",
    "cascade_thresholds",
    "conv_layer_names",
    "ensemble_members",
    "explained_classifier",
    "last_conv_layer_name",
    "model_kind",
    "num_outputs",
    "task_info",
]
