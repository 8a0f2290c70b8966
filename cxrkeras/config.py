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
IMAGE_SIZE = 150  # pixels of the square grayscale input (the model's; the data follows it)
VAL_FRACTION = 0.15  # of train, carved for model selection (after the holdout, when there is one)
DECISION_THRESHOLD = 0.5  # the study's: a stage calls its positive class when p > this
AUDIT_BAND = 22  # the shortcut audit's border band, in pixels of an IMAGE_SIZE image
# The largest image accepted, in pixels declared by its header (cxrkeras.images.max_pixels reads the variable).
MAX_PIXELS_ENV = "CXRKERAS_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 50_000_000  # 7071 x 7071; a chest X-ray is rarely above 3000 x 3000

# The values each training setting takes (TrainConfig below; checked by training.check_train_config).
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "plateau")
CLASS_WEIGHTS = ("none", "balanced")
PRECISIONS = ("float32", "mixed_bfloat16")
MONITORS = {"val_loss": "min", "val_accuracy": "max"}  # and which way is better
DISTRIBUTES = ("none", "mirrored", "multiworker")
# What a ModelConfig and DataConfig may name (checked by models.check_config and training.check_run_config).
# Inside the model: "standardize" each image to zero mean and unit variance; "equalize" its histogram;
# "clahe": Keras' contrast-limited adaptive histogram equalisation.
CONTRASTS = ("none", "standardize", "equalize", "clahe")
AUGMENTATIONS = ("study", "strong")  # cxrkeras.augment.AUGMENTATION_SETTINGS
# What the covid stage learns as "not covid": the study's non-covid infected images, or normal ones too.
COVID_NEGATIVES = ("non-covid", "all")
# Where each setting that a command-line option or a tuning hyperparameter names lives in a RunConfig.
SETTING_FIELDS = {
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "optimizer": ("train", "optimizer"),
    "learning_rate": ("train", "learning_rate"),
    "weight_decay": ("train", "weight_decay"),
    "schedule": ("train", "schedule"),
    "warmup_epochs": ("train", "warmup_epochs"),
    "label_smoothing": ("train", "label_smoothing"),
    "ema": ("train", "ema"),
    "class_weight": ("train", "class_weight"),
    "seed": ("train", "seed"),
    "precision": ("train", "precision"),
    "monitor": ("train", "monitor"),
    "distribute": ("train", "distribute"),
    "augment": ("data", "augment"),
    "augmentation": ("data", "augmentation"),
    "border_erase": ("data", "border_erase"),
    "val_fraction": ("data", "val_fraction"),
    "holdout_fraction": ("data", "holdout_fraction"),
    "depth": ("model", "blocks"),  # conv blocks (plain), residual blocks (residual) or blocks per stage (resnet)
    "dropout": ("model", "dropout"),
    "dense_units": ("model", "dense_units"),
    "batchnorm": ("model", "batchnorm"),
}


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
    val_fraction: float = VAL_FRACTION
    # A holdout carved from train before validation: no training sees it and no epoch is picked on it
    # (`cxrkeras cascade --target-recall` picks thresholds on it). 0: none. val_fraction is then of the rest.
    holdout_fraction: float = 0.0
    holdout_seed: int = 0  # apart from `seed`, so runs of several seeds share one holdout
    seed: int = 0
    augment: bool = True
    augmentation: str = "study"  # study | strong (stronger jitter, rotation and crops; never flips)
    border_erase: float = 0.0  # erase bands up to this fraction of the side at random image edges (0: off)
    # The covid stage's negatives: "non-covid" (the study's: infected images only) or "all" (normal X-rays
    # too, so a normal X-ray that the first stage lets through is not called covid by default).
    covid_negatives: str = "non-covid"
    cache: bool = True


@dataclass
class ModelConfig:
    """What a classifier builder needs; `cxrkeras.models.build_model` reads it."""

    task: str = "infected"
    arch: str = "plain"  # "plain": conv-relu-pool blocks (infected); "residual": the covid trunk; "resnet"
    blocks: int = 5  # plain: conv blocks; residual: residual blocks; resnet: residual blocks per stage
    filters: list = field(default_factory=lambda: [24, 32, 64, 64, 128])  # resnet: [stem, stage 1, stage 2, ...]
    dense_units: int = 128  # 0: no hidden Dense layer
    conv_dropout: float = 0.25
    dropout: float = 0.5
    input_norm: bool = True  # the study's BatchNorm on the input
    batchnorm: bool = False  # BatchNorm after every conv (not in the study)
    residual: bool = True  # residual arch only: skip connections on/off
    initializer: str = "torch"  # "torch" (the study's PyTorch default) or "keras" (glorot/zeros)
    contrast: str = "none"  # none | standardize | equalize | clahe (CONTRASTS), before input_norm
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
    warmup_epochs: int = 0  # cosine only: linear warm-up from 0 over these first epochs
    label_smoothing: float = 0.0
    ema: bool = False  # exponential moving average of the weights: validated, kept and exported
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


def resnet_model_config(task):
    """A small residual network with BatchNorm for `task`: several times cheaper to train than the covid trunk.

    A stride-2 stem and a max-pool (150 -> 37), three stages of one basic
    residual block (32, 64, 128 channels; 37 -> 19 -> 10), global average
    pooling, dropout, the sigmoid (or softmax) output.
    """
    return ModelConfig(
        task=check_task(task), arch="resnet", blocks=1, filters=[32, 32, 64, 128], dense_units=0,
        conv_dropout=0.0, dropout=0.3, batchnorm=True, initializer="keras",
    )


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
        from cxrkeras.files import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path):
        """The RunConfig in a JSON file; ValueError naming the file when it is not one."""
        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
            if not isinstance(loaded, dict):
                raise ValueError("expected a JSON object with data, model and train sections")
            return cls.from_dict(loaded)
        except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{path}: not a run config ({e}).") from None


def _fill(cls, values):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} keys {unknown}; expected some of {sorted(known)}.")
    return cls(**values)
