"""Settings as dataclasses: data, model and training, with a JSON round trip.

A run directory stores all three (`config.json`), so a run can be rebuilt
and retrained from that file alone.
"""

import dataclasses
import json
from dataclasses import dataclass, field

CLASSES = ("normal", "non-covid", "covid")
TASKS = {
    "infected": ("normal", "infected"),
    "covid": ("non-covid", "covid"),
    "three-class": CLASSES,
}
IMAGE_SIZE = 150


def check_task(task):
    if task not in TASKS:
        raise ValueError(f"Unknown `task` {task!r}; expected one of {sorted(TASKS)}.")
    return task


@dataclass
class DataConfig:
    """Where the images are and how the validation split is carved from train."""

    data_dir: str = ""
    manifest: str = ""  # CSV `path,label[,split]`; used instead of the folder layout when set
    image_size: int = IMAGE_SIZE
    val_fraction: float = 0.15
    seed: int = 0
    augment: bool = True
    cache: bool = True


@dataclass
class ModelConfig:
    """What a classifier builder needs; `cxrkeras.models.build_model` reads it."""

    task: str = "infected"
    arch: str = "plain"  # "plain": conv-relu-pool blocks (infected); "residual": the covid trunk
    blocks: int = 5  # plain: conv blocks; residual: residual blocks
    filters: list = field(default_factory=lambda: [24, 32, 64, 64, 128])
    dense_units: int = 128
    conv_dropout: float = 0.25
    dropout: float = 0.5
    input_norm: bool = True  # the study's BatchNorm on the input
    batchnorm: bool = False  # BatchNorm after every conv (not in the study)
    residual: bool = True  # residual arch only: skip connections on/off
    initializer: str = "torch"  # "torch" (the study's PyTorch default) or "keras" (glorot/zeros)
    image_size: int = IMAGE_SIZE


@dataclass
class TrainConfig:
    """How a classifier is trained; defaults are the study's."""

    epochs: int = 35
    batch_size: int = 64
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine | plateau
    class_weight: str = "none"  # none | balanced
    seed: int = 0
    precision: str = "float32"  # float32 | mixed_bfloat16
    monitor: str = "val_loss"  # val_loss | val_accuracy: which epoch is kept
    distribute: str = "none"  # none | mirrored | multiworker


STUDY_EPOCHS = {"infected": 35, "covid": 25, "three-class": 35}


def study_model_config(task):
    """The study's architecture for `task` (the three-class model uses the covid trunk)."""
    check_task(task)
    if task == "infected":
        return ModelConfig(task=task)
    return ModelConfig(
        task=task, arch="residual", blocks=4, filters=[24, 64], dense_units=120, conv_dropout=0.0
    )


def study_train_config(task):
    return TrainConfig(epochs=STUDY_EPOCHS[check_task(task)])


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fingerprint: str = ""  # of the files the run was trained on (`cxrkeras.data.fingerprint`)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(
            data=_fill(DataConfig, d.get("data", {})),
            model=_fill(ModelConfig, d.get("model", {})),
            train=_fill(TrainConfig, d.get("train", {})),
            fingerprint=d.get("fingerprint", ""),
        )

    def save(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f))


def _fill(cls, values):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} keys {unknown}; expected some of {sorted(known)}.")
    return cls(**values)
