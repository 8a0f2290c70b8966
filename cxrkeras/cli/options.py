"""What several commands share: parameter types, option bundles, the run config they merge, small helpers.

Nothing here imports TensorFlow or Keras at import time (`--help` stays light).
"""

import json
import os

import click

from cxrkeras import config as settings
from cxrkeras.config import AUGMENT_ON, CLASSES, DECISION_THRESHOLD, IMAGE_SIZE, TASKS, VAL_FRACTION

TASK = click.Choice(list(TASKS))
BINARY_TASKS = [task for task, classes in TASKS.items() if len(classes) == 2]  # also a cascade's stages
BINARY_TASK = click.Choice(BINARY_TASKS)

# What help texts may name as {NAME}, filled in by `with_facts` from cxrkeras.config (written there once).
FACTS = {"IMAGE_SIZE": IMAGE_SIZE, "VAL_FRACTION": VAL_FRACTION, "DECISION_THRESHOLD": DECISION_THRESHOLD}


def with_facts(command):
    """`command` (a click command) with each {NAME} of FACTS in its help text replaced by the value."""
    for name, value in FACTS.items():
        command.help = command.help.replace("{" + name + "}", f"{value:g}")
    return command


def dataset_source(path):
    """A folder or a CSV manifest that exists, or a UsageError naming it."""
    from cxrkeras.data import EXPECTED_LAYOUT

    if not os.path.exists(path):
        raise click.UsageError(f"{path}: no such folder or manifest.\n{EXPECTED_LAYOUT}")
    return path


def echo_json(obj):
    click.echo(json.dumps(obj, indent=2))


def quote(value):
    import shlex

    return shlex.quote(str(value))


def model_errors():
    """The errors that mean "this model or dataset can't be used as given" (-> exit 1)."""
    from cxrkeras.data import DatasetError
    from cxrkeras.export import ExportError
    from cxrkeras.runs import ModelError

    return (ModelError, ExportError, DatasetError)


def task_unknown(error):
    """The UsageError for a binary model whose task neither it nor a config.json says."""
    return click.UsageError(f"{error} Pass --task infected or --task covid.")


def run_list(argument):
    """RUN, or RUN1,RUN2,... (an ensemble), as a list; a path that exists as written is one run."""
    if os.path.exists(argument) or "," not in argument:
        return [argument]
    return [part for part in argument.split(",") if part]


def stage_list(ctx, param, value):
    """"infected,covid" -> ["infected", "covid"] (None: every stage)."""
    if value is None:
        return None
    stages = [s.strip() for s in value.split(",") if s.strip()]
    wrong = [s for s in stages if s not in TASKS]
    if not stages or wrong:
        raise click.BadParameter(f"{value!r}: expected stage names joined by commas, e.g. infected,covid.")
    return stages


class NameValue(click.ParamType):
    """NAME=VALUE -> {NAME: VALUE}, NAME one of `names` and VALUE a number in (low, high] or [low, high]."""

    def __init__(self, key, names, value, low, high, low_open, example):
        self.name, self.key, self.value, self.names = f"{key}={value}", key, value, tuple(names)
        self.low, self.high, self.low_open, self.example = low, high, low_open, example

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        name, sep, number = str(value).partition("=")
        name = name.strip()
        try:
            number = float(number)
        except ValueError:
            number = None
        inside = number is not None and (self.low < number if self.low_open else self.low <= number) \
            and number <= self.high
        if not sep or name not in self.names or not inside:
            interval = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
            self.fail(f"{value!r}: expected {self.name} with {self.key} one of {', '.join(self.names)} "
                      f"and {self.value} in {interval}, e.g. {self.example}.", param, ctx)
        return {name: number}


TARGET_RECALL = NameValue("CLASS", CLASSES, "RECALL", 0, 1, True, "covid=0.95")
THRESHOLD = NameValue("NAME", BINARY_TASKS, "VALUE", 0, 1, False, "covid=0.7")


def train_options(command):
    """The training-setting options (each overrides the study's default or --config), for any command that trains."""
    study, data, epochs = settings.TrainConfig(), settings.DataConfig(), settings.STUDY_EPOCHS
    options = [
        click.option("--epochs", type=click.IntRange(1),
                     help=f"Epochs [study: {epochs['infected']}; covid {epochs['covid']}]."),
        click.option("--batch-size", type=click.IntRange(1), help=f"Batch size [study: {study.batch_size}]."),
        click.option("--optimizer", type=click.Choice(settings.OPTIMIZERS), help=f"[study: {study.optimizer}]"),
        click.option("--learning-rate", type=click.FloatRange(0, min_open=True),
                     help=f"[study: {study.learning_rate:g}]"),
        click.option("--weight-decay", type=click.FloatRange(0),
                     help=f"Decoupled weight decay [study: {study.weight_decay:g}]."),
        click.option("--schedule", type=click.Choice(settings.SCHEDULES),
                     help="Learning rate: constant, cosine decay over the run, or halved on a plateau of --monitor."),
        click.option("--class-weight", type=click.Choice(settings.CLASS_WEIGHTS),
                     help=f"balanced: weight each class n / (k * count) [study: {study.class_weight}]."),
        click.option("--seed", type=int, help=f"Seed of init, shuffling, dropout and augmentation [{study.seed}]."),
        click.option("--precision", type=click.Choice(("auto",) + settings.PRECISIONS),
                     help="auto: mixed_bfloat16 where the device computes bfloat16 natively (GPU compute "
                          "capability >= 8, CPU with AVX-512 BF16 or AMX), else float32 [fit: auto; --config: its own]."),
        click.option("--augment/--no-augment", default=None, help=f"The study's augmentation of train images [{'on' if data.augment else 'off'}]."),
        click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     help=f"Validation fraction carved from train, for model selection [{VAL_FRACTION}]."),
        click.option("--holdout-fraction", type=click.FloatRange(0, 1, max_open=True),
                     help=f"Holdout carved from train before validation, for thresholds only [{data.holdout_fraction:g}: none]."),
        click.option("--monitor", type=click.Choice(list(settings.MONITORS)),
                     help=f"Validation metric that picks the kept epoch [{study.monitor}]."),
        click.option("--distribute", type=click.Choice(settings.DISTRIBUTES),
                     help=f"mirrored: all local GPUs (else logical CPUs) [{study.distribute}]; multiworker: one run across "
                     "processes or machines, KERAS_BACKEND=jax only (fit: see --coordinator)."),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                     help="A RunConfig JSON (a run's config.json, a tuning result); options given here override it."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


augment_on_option = click.option(
    "--augment-on", type=click.Choice(AUGMENT_ON), default="auto", show_default=True,
    help="Where augmentation runs: tf.data on the CPU, or inside the model (auto: model if a GPU is visible).")

task_option = click.option(
    "--task", type=BINARY_TASK,
    help="Which classifier a binary model is, when it does not say (older files) and has no config.json.")




def build_run_config(task, data_path=None, config_file=None, base=None, **options):
    """The RunConfig for TASK: `base` (default: the study's), then --config FILE, then the options given.

    Raises click.UsageError naming --config, the bad key or the bad value.
    """
    from cxrkeras.config import RunConfig, study_model_config, study_train_config

    config = base or RunConfig(model=study_model_config(task), train=study_train_config(task))
    source = "options"
    if config_file:
        source = f"--config {config_file}"
        try:
            with open(config_file) as f:
                loaded = json.load(f)
            if not isinstance(loaded, dict):
                raise ValueError("expected a JSON object with data, model and train sections")
            config = config.merged(loaded)
        except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise click.UsageError(f"{source}: {e}")
        if config.model.task != task:
            raise click.UsageError(f"{source} is for task {config.model.task!r}, not {task!r}.")
    config = config.with_settings(**options)
    if data_path is not None:
        path = os.path.abspath(dataset_source(data_path))
        config.data.data_dir, config.data.manifest = ("", path) if os.path.isfile(path) else (path, "")
    if not (config.data.data_dir or config.data.manifest):
        raise click.UsageError("Missing option '--data' (a dataset folder or CSV manifest).")
    try:
        config.validate()
    except ValueError as e:
        raise click.UsageError(f"{source}: {e}")
    return config

