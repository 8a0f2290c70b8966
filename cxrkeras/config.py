"""Settings as dataclasses: data, model and training, with a JSON round trip.

A run directory stores all three (`config.json`), so a run can be rebuilt
and retrained from that file alone.
"""

import copy
import dataclasses
import json
import math
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

# The values each training setting takes (TrainConfig below; checked by TrainConfig.validate).
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "plateau")
CLASS_WEIGHTS = ("none", "balanced")
PRECISIONS = ("float32", "mixed_bfloat16")
# "auto" resolves (at the start of a fit, `cxrkeras.devices.resolve_precision`) to the fastest precision that
# keeps accuracy on the device at hand.
PRECISION_CHOICES = ("auto",) + PRECISIONS
MONITORS = {"val_loss": "min", "val_accuracy": "max"}  # and which way is better
DISTRIBUTES = ("none", "mirrored", "multiworker")
AUGMENT_ON = ("auto", "data", "model")  # where augmentation runs: auto (model if a GPU is visible), tf.data or the model
# What a ModelConfig and DataConfig may name (checked by their `validate`).
ARCHS = ("plain", "residual", "resnet")  # cxrkeras.models.classifiers builds each
INITIALIZERS = ("torch", "keras")  # cxrkeras.models.blocks: PyTorch's default, or Keras' glorot/zeros
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

    def validate(self):
        """Raise ValueError naming the first bad data setting and its value."""
        _require(bool(self.data_dir or self.manifest), "data_dir", self.data_dir, "expected a folder or a manifest")
        _require(_number(self.val_fraction) and 0 < self.val_fraction < 1, "val_fraction", self.val_fraction,
                 "expected a fraction in (0, 1)")
        _require(_number(self.holdout_fraction) and 0 <= self.holdout_fraction < 1, "holdout_fraction",
                 self.holdout_fraction, "expected a fraction in [0, 1)")
        _require(_integer(self.holdout_seed), "holdout_seed", self.holdout_seed, "expected an integer")
        _require(self.augmentation in AUGMENTATIONS, "augmentation", self.augmentation,
                 f"expected one of {list(AUGMENTATIONS)}")
        _require(self.covid_negatives in COVID_NEGATIVES, "covid_negatives", self.covid_negatives,
                 f"expected one of {list(COVID_NEGATIVES)}")
        _require(_number(self.border_erase) and 0 <= self.border_erase < 0.5, "border_erase", self.border_erase,
                 "expected a fraction of the side in [0, 0.5)")


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
    image_size: int = IMAGE_SIZE  # the one image size: the data pipelines and every reader of a model follow it

    def validate(self):
        """Raise ValueError naming the first bad model setting and its value."""
        check_task(self.task)
        _require(self.arch in ARCHS, "arch", self.arch, f"expected one of {list(ARCHS)}", "Unknown")
        _require(self.initializer in INITIALIZERS, "initializer", self.initializer,
                 f"expected one of {list(INITIALIZERS)}", "Unknown")
        _require(_positive_int(self.blocks), "blocks", self.blocks, "expected a positive integer")
        filters = self.filters
        _require(isinstance(filters, (list, tuple)) and filters and all(map(_positive_int, filters)), "filters",
                 filters, "expected a non-empty list of positive integers")
        _require(self.arch != "residual" or len(filters) <= 2, "filters", filters,
                 "the residual arch takes [stem_filters, width] or [width]")
        _require(self.arch != "resnet" or len(filters) >= 2, "filters", filters,
                 "the resnet arch takes [stem_filters, stage1_width, stage2_width, ...]")
        _require(_positive_int(self.dense_units) or self.dense_units == 0 and type(self.dense_units) is int,
                 "dense_units", self.dense_units, "expected a positive integer, or 0 for no hidden Dense layer")
        _require(self.contrast in CONTRASTS, "contrast", self.contrast, f"expected one of {list(CONTRASTS)}",
                 "Unknown")
        for name in ("conv_dropout", "dropout"):
            rate = getattr(self, name)
            _require(isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 <= rate < 1, name, rate,
                     "expected a rate in [0, 1)")
        _require(_positive_int(self.image_size), "image_size", self.image_size, "expected a positive integer")
        if self.final_size() < 1:
            raise ValueError(
                f"Too many `blocks` for `image_size`: the feature map shrinks to nothing. "
                f"Received: blocks={self.blocks!r}, image_size={self.image_size!r}"
            )

    def final_size(self):
        """Height (= width) of the last feature map (0: it shrinks to nothing)."""
        size = self.image_size
        if self.arch == "plain":
            for _ in range(self.blocks):
                size = (size - 2) // 2  # valid 3x3 conv, then 2x2 pool
                if size < 1:
                    return 0
            return size
        if self.arch == "resnet":
            size = math.ceil(math.ceil(size / 2) / 2)  # stem conv and pool, "same" padding
            for _ in self.filters[2:]:
                size = math.ceil(size / 2)
            return size
        size //= 3
        for _ in range(self.blocks):
            size //= 2
        return size


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
    distribute: str = "none"  # none | mirrored | multiworker (JAX only: `cxrkeras.distributed.check_backend`)

    def validate(self):
        """Raise ValueError naming the first bad training setting and its value."""
        _require(_positive_int(self.epochs), "epochs", self.epochs, "expected a positive integer")
        _require(_positive_int(self.batch_size), "batch_size", self.batch_size, "expected a positive integer")
        _require(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"expected one of {list(OPTIMIZERS)}")
        _require(_number(self.learning_rate) and self.learning_rate > 0, "learning_rate", self.learning_rate,
                 "expected a positive number")
        _require(_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay,
                 "expected a number >= 0")
        _require(self.schedule in SCHEDULES, "schedule", self.schedule, f"expected one of {list(SCHEDULES)}")
        _require(_integer(self.warmup_epochs) and self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs,
                 "expected an integer >= 0")
        _require(_number(self.label_smoothing) and 0 <= self.label_smoothing < 1, "label_smoothing",
                 self.label_smoothing, "expected a number in [0, 1)")
        _require(isinstance(self.ema, bool), "ema", self.ema, "expected true or false")
        _require(self.class_weight in CLASS_WEIGHTS, "class_weight", self.class_weight,
                 f"expected one of {list(CLASS_WEIGHTS)}")
        _require(_integer(self.seed), "seed", self.seed, "expected an integer")
        _require(self.precision in PRECISION_CHOICES, "precision", self.precision,
                 f"expected one of {list(PRECISION_CHOICES)}")
        _require(self.monitor in MONITORS, "monitor", self.monitor, f"expected one of {list(MONITORS)}")
        _require(self.distribute in DISTRIBUTES, "distribute", self.distribute, f"expected one of {list(DISTRIBUTES)}")


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

    def validate(self):
        """Raise ValueError naming the first bad setting (data, model or train); return the config. Keras-free."""
        self.data.validate()
        self.model.validate()
        self.train.validate()
        return self

    def setting(self, name):
        """The value of the setting `name` (a key of SETTING_FIELDS)."""
        section, key = _setting_field(name)
        return getattr(getattr(self, section), key)

    def with_settings(self, **settings):
        """A copy with each setting named by SETTING_FIELDS set to its value (None: left as it is)."""
        changed = copy.deepcopy(self)
        for name, value in settings.items():
            section, key = _setting_field(name)
            if value is not None:
                setattr(getattr(changed, section), key, value)
        return changed

    def merged(self, update):
        """A RunConfig of this one's dict with `update` (a partial dict, as in a --config file) laid over it."""
        return RunConfig.from_dict(_merge(self.to_dict(), update))

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """The RunConfig of a dict such as `to_dict` writes; ValueError for an unknown key.

        Files written before the image size was the model's alone carry
        `data.image_size` too: dropped when it equals the model's, refused when not.
        """
        data, model = d.get("data", {}), d.get("model", {})
        if isinstance(data, dict) and "image_size" in data:
            data = {k: v for k, v in data.items() if k != "image_size"}
            size = d["data"]["image_size"]
            model_size = model.get("image_size", IMAGE_SIZE) if isinstance(model, dict) else IMAGE_SIZE
            if size != model_size:
                raise ValueError(f"`data.image_size` {size!r} differs from `model.image_size` {model_size!r}; "
                                 f"the image size is the model's alone: drop data.image_size.")
        return cls(
            data=_fill(DataConfig, data),
            model=_fill(ModelConfig, model),
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


def _merge(base, update):
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _fill(cls, values):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown {cls.__name__} keys {unknown}; expected some of {sorted(known)}.")
    return cls(**values)


def _setting_field(name):
    if name not in SETTING_FIELDS:
        raise ValueError(f"Unknown setting {name!r}; expected one of {sorted(SETTING_FIELDS)}.")
    return SETTING_FIELDS[name]


def _require(ok, name, value, expected, kind="Invalid"):
    if not ok:
        raise ValueError(f"{kind} `{name}`; {expected}. Received: {name}={value!r}")


def _integer(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(v):
    return _integer(v) and v > 0


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
