"""The `cxrkeras` command: thin click commands over the library modules.

Misuse of a command -> click.UsageError (exit 2); a failure at run time ->
click.ClickException (exit 1) with a message naming the thing and what was expected.
`Group` turns what any command meets from the operating system (a read-only
folder, a full disk, a name too long) into one line, and Ctrl-C into one line.
Nothing heavy is imported at start-up: `cxrkeras --help` and argument errors
never load TensorFlow, and its C++ start-up lines stay off the terminal
unless --verbose.
"""

import errno
import importlib.abc
import importlib.util
import json
import os
import subprocess
import sys

import click

from cxrkeras.config import CLASSES, DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV


# Commands whose work is TensorFlow's (a SavedModel): under another Keras backend they rerun themselves with
# KERAS_BACKEND=tensorflow, as a .keras file loads the same under any backend; without TensorFlow they say so.
# Every other command runs on the backend at hand (cxrkeras.arrays feeds it where tf.data can't).
TENSORFLOW_COMMANDS = ("export", "serve")


def tensorflow_installed():
    """Whether `import tensorflow` can work here (found, and not blocked), without importing it."""
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def keras_backend():
    """The Keras backend this process has or will have (without importing Keras when it is not loaded yet)."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    config = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "keras.json")
    try:
        with open(config) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


class Group(click.Group):
    """A click group whose commands end in one line on an OSError (exit 1) or Ctrl-C (exit 130)."""

    group_class = type  # subgroups (`data`) are Groups too

    def parse_args(self, ctx, args):
        command = next((a for a in args if a in self.commands), None)
        if ctx.parent is None and command in TENSORFLOW_COMMANDS and not {"-h", "--help"} & set(args) \
                and not tensorflow_installed():
            raise click.ClickException(f"{command} writes or serves a TensorFlow SavedModel and needs TensorFlow, "
                                       f"which is not installed here (pip install tensorflow-cpu).")
        if ctx.parent is None and command in TENSORFLOW_COMMANDS and keras_backend() != "tensorflow" \
                and not {"-h", "--help"} & set(args):
            click.echo(f"{command} runs under TensorFlow: rerunning it with KERAS_BACKEND=tensorflow "
                       f"(a .keras file loads the same under any backend).", err=True)
            code = [sys.executable, "-c", "from cxrkeras.cli import main; main()", *args]
            raise SystemExit(subprocess.call(code, env=dict(os.environ, KERAS_BACKEND="tensorflow")))
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OSError as e:
            if e.errno == errno.EPIPE:  # click quietens a closed pipe (`| head`) itself
                raise
            raise click.ClickException(os_error_message(e)) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            raise SystemExit(130) from None


def os_error_message(error):
    """"PATH: reason" for an OSError (the path as the error names it; both paths of a failed rename)."""
    reason = error.strerror or str(error)
    paths = [p for p in (error.filename, error.filename2) if p is not None]
    from cxrkeras.data import printable

    where = " -> ".join(printable(os.fsdecode(p)) for p in paths)
    return f"{where}: {reason}" if where else reason


class QuietImport(importlib.abc.MetaPathFinder):
    """At the first import of module `name`, send file descriptor 2 to /dev/null until the import is done.

    For TensorFlow: its C++ code prints start-up lines (absl's "All log
    messages before absl::InitializeLog()", CPU instruction and oneDNN
    notices, CUDA plugin registration on GPU builds) straight to fd 2 while it
    loads, and not all of them heed TF_CPP_MIN_LOG_LEVEL. Whichever command
    imports TensorFlow first (through Keras or directly), the import is quiet.
    """

    def __init__(self, name):
        self.name = name

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
            return None
        sys.meta_path.remove(self)  # once: later finders see the real import
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
            self.loader.exec_module(module)
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    def __getattr__(self, name):  # resource readers and the like: the real loader's
        return getattr(self.loader, name)


def _dataset_source(path):
    """A folder or a CSV manifest that exists, or a UsageError naming it."""
    from cxrkeras.data import EXPECTED_LAYOUT

    if not os.path.exists(path):
        raise click.UsageError(f"{path}: no such folder or manifest.\n{EXPECTED_LAYOUT}")
    return path


def _echo_json(obj):
    click.echo(json.dumps(obj, indent=2))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cxrkeras")
@click.option("--verbose", is_flag=True, help="Also show TensorFlow's own start-up and log lines.")
@click.option(
    "--max-pixels",
    type=click.IntRange(1),
    envvar=MAX_PIXELS_ENV,
    help=f"Refuse images whose header declares more pixels than this, before decoding them "
    f"[env {MAX_PIXELS_ENV}; default {DEFAULT_MAX_PIXELS:,}].",
)
def main(verbose, max_pixels):
    """Chest X-ray classification with Keras 3: normal, infected non-COVID, infected COVID.

    The study's cascade of two binary CNNs (normal vs infected, then COVID vs
    non-COVID), as a tool. Start with `cxrkeras data synth DIR` for a small
    synthetic dataset, or point `--data` at a folder in the study's layout.
    """
    if max_pixels is not None:
        os.environ[MAX_PIXELS_ENV] = str(max_pixels)  # read by cxrkeras.data.max_pixels
    # TensorFlow's C++ log (its errors too: Python exceptions carry what matters) only with --verbose.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else "3"
    quiet = not verbose and "tensorflow" not in sys.modules
    if quiet and not any(isinstance(finder, QuietImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, QuietImport("tensorflow"))


# ---------------------------------------------------------------- data


@main.group()
def data():
    """Inspect, check, synthesise and preview datasets."""


@data.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--per-class", type=click.IntRange(1), default=40, show_default=True, help="Train images per class.")
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out_dir, per_class, seed):
    """Write a small synthetic dataset in the study's layout to OUT_DIR (a new or empty folder).

    Train, val and test splits of 150x150 grayscale JPEGs with class-dependent
    structure (clear lungs; one dense consolidation; peripheral patches in
    both lungs) that a CNN learns in a few epochs. Deterministic for a seed.
    """
    from cxrkeras.synth import write_synthetic_dataset

    counts = {"train": per_class, "val": max(1, per_class // 5), "test": max(1, per_class * 3 // 10)}
    try:
        n = write_synthetic_dataset(out_dir, counts, seed=seed)
    except FileExistsError as e:
        raise click.UsageError(str(e))
    click.echo(f"wrote {n} images to {out_dir}")


def _readable_samples(source):
    """(samples training can read, problems) of SOURCE, or a ClickException for an unusable layout."""
    from cxrkeras import data as data_lib

    try:
        return data_lib.check_samples(data_lib.find_samples(source))
    except data_lib.DatasetError as e:
        raise click.ClickException(str(e))


@data.command()
@click.argument("source", callback=lambda c, p, v: _dataset_source(v))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Where the charts go [default: SOURCE/stats or ./stats].")
@click.option("--dedupe", is_flag=True, help="Also count train images after removing byte-identical duplicates.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def stats(source, out_dir, dedupe, as_json):
    """Count images per split and class; draw the study's three distribution charts.

    SOURCE is a folder in the study's layout or a CSV manifest (path,label[,split]).
    Only files that training can read are counted; the others are counted
    apart (`cxrkeras data check` lists them).
    """
    from cxrkeras import data as data_lib
    from cxrkeras import plots

    samples, problems = _readable_samples(source)
    counts = data_lib.class_counts(samples)
    if dedupe:
        train = data_lib.deduplicate([s for s in samples if s.split == "train"])
        counts["train-dedup"] = data_lib.class_counts(train)["train"]
    out_dir = out_dir or "stats"
    os.makedirs(out_dir, exist_ok=True)
    charts = plots.distribution_charts(counts, out_dir)
    if as_json:
        _echo_json({"counts": counts, "not_images": len(problems), "charts": charts})
        return
    click.echo(f"{'split':<12}" + "".join(f"{c:>11}" for c in CLASSES) + f"{'total':>9}")
    for split, c in counts.items():
        click.echo(f"{split:<12}" + "".join(f"{c[k]:>11}" for k in CLASSES) + f"{sum(c.values()):>9}")
    if problems:
        click.echo(f"not counted: {len(problems)} file(s) that are not readable images (see `cxrkeras data check`)")
    click.echo("charts: " + ", ".join(charts))


@data.command()
@click.argument("source", callback=lambda c, p, v: _dataset_source(v))
@click.option("--json", "as_json", is_flag=True, help="Print the problems as JSON.")
def check(source, as_json):
    """List every problem of a dataset; exit 1 when there is any.

    Checks the layout (split and class folders, empty classes) and reads every
    file the way training does: JPEG, PNG, BMP or GIF judged by content, the
    size its header declares against --max-pixels, then TensorFlow's decoder.
    Folders, empty, non-image, truncated or corrupt files and file names that
    are not UTF-8 are listed with the reason; training skips them. Verdicts
    are cached by path, size and modification time, so a second check is quick.
    """
    from cxrkeras import data as data_lib

    good, problems = data_lib.check_dataset(source)
    if as_json:
        listed = [{"path": data_lib.printable(p.path), "reason": p.reason} for p in problems]
        _echo_json({"images": len(good), "problems": listed})
    else:
        for p in problems:
            click.echo(str(p))
        click.echo(f"{len(good)} images decode; {len(problems)} problem(s).")
    if problems:
        raise SystemExit(1)


@data.command()
@click.argument("source", callback=lambda c, p, v: _dataset_source(v))
@click.option("--out", "out_path", default="augmentation_preview.png", show_default=True, type=click.Path(dir_okay=False))
@click.option("--images", "n_images", type=click.IntRange(1, 12), default=4, show_default=True)
@click.option("--draws", type=click.IntRange(1, 8), default=4, show_default=True, help="Augmented versions per image.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--augmentation", "kind", type=click.Choice(["study", "strong"]), default="study", show_default=True,
              help="Which stack (a config's data.augmentation).")
@click.option("--border-erase", type=click.FloatRange(0, 0.5, max_open=True), default=0.0, show_default=True,
              help="Also erase bands up to this fraction of the side at random edges (data.border_erase).")
def preview(source, out_path, n_images, draws, seed, kind, border_erase):
    """Draw train images beside augmented versions of them (PNG), to see what augmentation does."""
    from cxrkeras.augment import preview_figure

    good, _ = _readable_samples(source)
    train = [s for s in good if s.split == "train"]
    if not train:
        raise click.ClickException(f"{source}: no readable train images to preview.")
    preview_figure(train, out_path, n_images, draws, seed, kind, border_erase)
    click.echo(f"wrote {out_path}")


# ---------------------------------------------------------------- fit

# Options that set one RunConfig field: (section, key). Unset options (None) leave the base config alone.
def train_options(command):
    """The training-setting options (each overrides the study's default or --config), for any command that trains."""
    from cxrkeras import config as settings

    options = [
        click.option("--epochs", type=click.IntRange(1), help="Epochs [study: 35; covid 25]."),
        click.option("--batch-size", type=click.IntRange(1), help="Batch size [study: 64]."),
        click.option("--optimizer", type=click.Choice(settings.OPTIMIZERS), help="[study: adam]"),
        click.option("--learning-rate", type=click.FloatRange(0, min_open=True), help="[study: 1e-3]"),
        click.option("--weight-decay", type=click.FloatRange(0), help="Decoupled weight decay [study: 0]."),
        click.option("--schedule", type=click.Choice(settings.SCHEDULES),
                     help="Learning rate: constant, cosine decay over the run, or halved on a plateau of --monitor."),
        click.option("--class-weight", type=click.Choice(settings.CLASS_WEIGHTS),
                     help="balanced: weight each class n / (k * count) [study: none]."),
        click.option("--seed", type=int, help="Seed of init, shuffling, dropout and augmentation [0]."),
        click.option("--precision", type=click.Choice(("auto",) + settings.PRECISIONS),
                     help="auto: mixed_bfloat16 where the device computes bfloat16 natively (GPU compute "
                          "capability >= 8, CPU with AVX-512 BF16 or AMX), else float32 [fit: auto; --config: its own]."),
        click.option("--augment/--no-augment", default=None, help="The study's augmentation of train images [on]."),
        click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     help="Validation fraction carved from train, for model selection [0.15]."),
        click.option("--holdout-fraction", type=click.FloatRange(0, 1, max_open=True),
                     help="Holdout carved from train before validation, for thresholds only [0: none]."),
        click.option("--monitor", type=click.Choice(list(settings.MONITORS)),
                     help="Validation metric that picks the kept epoch [val_loss]."),
        click.option("--distribute", type=click.Choice(settings.DISTRIBUTES),
                     help="mirrored: all local GPUs (else logical CPUs) [none]; multiworker: one run across "
                     "processes or machines, KERAS_BACKEND=jax only (fit: see --coordinator)."),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                     help="A RunConfig JSON (a run's config.json, a tuning result); options given here override it."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _merge(base, update):
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def build_run_config(task, data_path=None, config_file=None, base=None, **options):
    """The RunConfig for TASK: `base` (default: the study's), then --config FILE, then the options given.

    Raises click.UsageError naming --config, the bad key or the bad value.
    """
    from cxrkeras import training
    from cxrkeras.config import (
        SETTING_FIELDS,
        RunConfig,
        study_model_config,
        study_train_config,
    )

    config = base or RunConfig(model=study_model_config(task), train=study_train_config(task))
    source = "options"
    if config_file:
        source = f"--config {config_file}"
        try:
            with open(config_file) as f:
                loaded = json.load(f)
            if not isinstance(loaded, dict):
                raise ValueError("expected a JSON object with data, model and train sections")
            config = RunConfig.from_dict(_merge(config.to_dict(), loaded))
        except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise click.UsageError(f"{source}: {e}")
        if config.model.task != task:
            raise click.UsageError(f"{source} is for task {config.model.task!r}, not {task!r}.")
    for option, value in options.items():
        if value is not None:
            section, key = SETTING_FIELDS[option]
            setattr(getattr(config, section), key, value)
    if data_path is not None:
        path = os.path.abspath(_dataset_source(data_path))
        config.data.data_dir, config.data.manifest = ("", path) if os.path.isfile(path) else (path, "")
    if not (config.data.data_dir or config.data.manifest):
        raise click.UsageError("Missing option '--data' (a dataset folder or CSV manifest).")
    try:
        training.check_run_config(config)
    except ValueError as e:
        raise click.UsageError(f"{source}: {e}")
    return config


@main.command()
@click.argument("task", type=click.Choice(["infected", "covid", "three-class"]), metavar="TASK")
@click.option("--data", "data_path", type=click.Path(), help="Dataset folder (the study's layout) or CSV manifest.")
@train_options
@click.option("--name", help="Run name: the run dir is OUT/TASK/NAME [default: a timestamp].")
@click.option("--out", default="saved_models", show_default=True, type=click.Path(file_okay=False),
              help="Root of the run dirs.")
@click.option("--resume", is_flag=True, help="Continue the run --name (default: the latest unfinished one) "
              "from its last finished epoch, with its own config.json.")
@click.option("--augment-on", type=click.Choice(["auto", "data", "model"]), default="auto", show_default=True,
              help="Where augmentation runs: tf.data on the CPU, or inside the model (auto: model if a GPU is visible).")
@click.option("--tensorboard", is_flag=True, help="Also write TensorBoard logs to RUN_DIR/logs.")
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON (progress goes to stderr).")
@click.option("--coordinator", metavar="HOST:PORT", help="--distribute multiworker: where process 0 listens "
              "[KERAS_DISTRIBUTION_JOB_ADDRESSES]. Every process runs the same command with its own --process-id.")
@click.option("--num-processes", type=click.IntRange(1), help="--distribute multiworker: how many processes train "
              "[KERAS_DISTRIBUTION_NUM_PROCESSES].")
@click.option("--process-id", type=click.IntRange(0), help="--distribute multiworker: this process, 0 to N-1; 0 alone "
              "writes the run dir [KERAS_DISTRIBUTION_PROCESS_ID].")
def fit(task, data_path, config_file, name, out, resume, augment_on, tensorboard, as_json, coordinator, num_processes,
        process_id, **options):
    """Train the study's classifier for TASK: infected, covid or three-class.

    Defaults are the study's: Adam 1e-3, batch 64, binary cross-entropy (sparse
    categorical for three-class), 35 epochs (covid: 25, on infected images
    only), augmentation on. The kept epoch (RUN_DIR/model.keras) is the best on
    a validation split carved from train; test is never looked at. The run dir
    also holds config.json, history.csv and curves.png. A run stopped at any
    point (Ctrl-C, kill) continues with the same command plus --resume.

    --distribute multiworker (KERAS_BACKEND=jax) trains one run across N
    processes: start the same command on each with --coordinator HOST:PORT
    (process 0's), --num-processes N and its own --process-id. Process 0
    writes the run dir; --resume continues on the same N.
    """
    import contextlib
    import sys

    from cxrkeras import distributed, training
    from cxrkeras.config import RunConfig
    from cxrkeras.data import DatasetError

    cluster_flags = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    multiworker = options["distribute"] == "multiworker"
    if multiworker:
        _join_cluster(coordinator, num_processes, process_id)
    elif any(v is not None for v in cluster_flags.values()):
        raise click.UsageError("--coordinator, --num-processes and --process-id go with --distribute multiworker.")

    if resume:
        if config_file:
            raise click.UsageError("--config with --resume: a resumed run uses its own config.json.")

        def find_run():
            run_dir = os.path.join(out, task, name) if name else training.latest_unfinished_run(out, task)
            if not run_dir or not os.path.exists(os.path.join(run_dir, training.CONFIG_FILE)):
                where = run_dir or os.path.join(out, task)
                raise click.UsageError(f"--resume: no run to resume in {where} (no {training.CONFIG_FILE}).")
            try:
                return run_dir, RunConfig.load(os.path.join(run_dir, training.CONFIG_FILE)).to_dict()
            except ValueError as e:
                raise click.ClickException(str(e))

        run_dir, base = _on_chief(find_run)  # process 0 reads the run dir; the others may not see it
        run_config = build_run_config(task, data_path, base=RunConfig.from_dict(base), **options)
    else:
        if options["precision"] is None and not config_file:
            options["precision"] = "auto"  # the study's float32 where bfloat16 would be emulated (slower)
        run_config = build_run_config(task, data_path, config_file, **options)
        run_dir = _on_chief(lambda: training.run_dir_for(out, task, name))  # one timestamp for all processes

    resume_command = " ".join(
        ["cxrkeras", "fit", task]
        + (["--data", _quote(data_path)] if data_path else [])
        + ["--out", _quote(out), "--name", _quote(os.path.basename(os.path.normpath(run_dir))), "--resume"]
        + (["--tensorboard"] if tensorboard else [])
        + (["--distribute", "multiworker"] if multiworker else [])
        + [f"{flag} {_quote(value)}" for flag, value in cluster_flags.items() if value is not None]
    )
    verbose = 1 if sys.stdout.isatty() and not as_json else 2
    progress_to_stderr = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    try:
        with progress_to_stderr:
            result = training.fit(
                run_config, run_dir, resume=resume, verbose=verbose, augment_on=augment_on, tensorboard=tensorboard,
                log=lambda message: click.echo(message, err=as_json),
            )
    except KeyboardInterrupt:
        click.echo(f"\nInterrupted. Nothing finished is lost; continue with:\n  {resume_command}", err=True)
        raise SystemExit(130)
    except distributed.ClusterError as e:
        _cluster_stopped(e)
    except (DatasetError, training.RunDirError) as e:
        raise click.ClickException(str(e))
    except ValueError as e:  # settings that only fail with the data or devices at hand (batch size vs replicas)
        raise click.UsageError(str(e))
    result.run_dir = run_dir  # the other processes trained into a scratch copy; process 0 wrote run_dir
    if as_json:
        _echo_json(result.to_dict())
    else:
        click.echo(result.summary())


def _join_cluster(coordinator, num_processes, process_id):
    """Join the processes of a multiworker fit (flags, else Keras' variables); UsageError for a gap or a bad value."""
    from cxrkeras import distributed

    try:
        distributed.check_backend()
        distributed.initialize(distributed.cluster_from(coordinator, num_processes, process_id))
    except ValueError as e:
        raise click.UsageError(str(e))
    except distributed.ClusterError as e:
        _cluster_stopped(e)


def _cluster_stopped(error):
    """Say why a multiworker run stopped and end the process at once (JAX's own exit would wait for the dead peer)."""
    from cxrkeras import distributed

    click.echo(f"Error: {error}", err=True)
    distributed.exit_now(1)


def _on_chief(find):
    """`find()` run by process 0 of a multiworker fit, its answer (or its click error) returned on every process."""
    from cxrkeras import distributed

    if distributed.process_count() == 1:
        return find()
    answer = None
    if distributed.is_chief():
        try:
            answer = {"value": find()}
        except click.ClickException as e:
            answer = {"error": e.message, "usage": isinstance(e, click.UsageError)}
    try:
        answer = distributed.broadcast_json(answer)
    except distributed.ClusterError as e:
        _cluster_stopped(e)
    if "error" in answer:
        raise (click.UsageError if answer["usage"] else click.ClickException)(answer["error"])
    return answer["value"]


def _quote(value):
    import shlex

    return shlex.quote(str(value))


# ---------------------------------------------------------------- evaluate and compare


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True))
@click.option("--data", "data_path", required=True, type=click.Path(),
              help="Dataset folder (the study's layout) or CSV manifest.")
@click.option("--split", type=click.Choice(["test", "val", "validation", "holdout"]), default="test", show_default=True,
              help="test: test/; val: the release's small val/; validation: the split carved from train "
              "(the run's val_fraction and seed); holdout: the one carved before it (the run's holdout_fraction).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Where results go [default: MODEL_DIR/eval-SPLIT].")
@click.option("--image", "images", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Image for Grad-CAM (repeatable); the first also for the feature maps "
              "[default: the split's first images].")
@click.option("--task", type=click.Choice(["infected", "covid"]),
              help="A binary model's task, when it does not say (older files) and has no config.json.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="--split validation: fraction carved from train [the run's, else 0.15].")
@click.option("--seed", type=int, help="--split validation: seed of the carve [the run's, else 0].")
@click.option("--holdout-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="--split holdout / validation: the holdout carved from train [the run's].")
@click.option("--band", type=click.IntRange(1, 74), default=22, show_default=True,
              help="Shortcut audit: the border band's width in pixels of a 150-pixel image (scaled to the model's).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--adapt-on", type=click.Path(exists=True),
              help="Also score MODEL adapted (`cxrkeras adapt`) to these unlabeled images, side by side; "
              "they may be the evaluated split's own folder (labels are not read).")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json instead of the table.")
def evaluate(model_path, data_path, split, out_dir, images, task, val_fraction, seed, holdout_fraction, band,
             batch_size, adapt_on, as_json):
    """Evaluate MODEL (a .keras file or run dir: binary, three-class or cascade) on one split.

    Prints the study's table (recall, precision, F1 per class; accuracy) and
    writes metrics.json (also the confusion, per-class AUC, ECE, and for the
    cascade its thresholds and stage accuracies), confusion_matrix.png,
    roc.png, pr.png, calibration.png, grid.png (the release's val/ images,
    the study's Figure 2.8.2), feature_maps.png (every second conv layer of
    the covid classifier) and gradcam_*.png. For the covid task only infected
    images are evaluated. The shortcut audit (metrics.json "audit") scores
    the model on the border band alone and on the centre alone, beside the
    majority-class rate, and gives the share of Grad-CAM heat in the band.
    """
    from cxrkeras import evaluation
    from cxrkeras.runs import TaskUnknownError

    _dataset_source(data_path)
    log = lambda message: click.echo(message, err=True)  # noqa: E731
    from cxrkeras import adapt as adapt_lib

    options = dict(images=list(images) or None, task=task, val_fraction=val_fraction, seed=seed,
                   holdout_fraction=holdout_fraction, audit_band=band)
    try:
        if adapt_on:
            metrics = adapt_lib.evaluate_adapted(model_path, adapt_on, data_path, split, out_dir,
                                                 batch_size=batch_size, log=log, **options)
        else:
            metrics = evaluation.evaluate_run(model_path, data_path, split, out_dir, batch_size=batch_size, log=log,
                                              **options)
    except adapt_lib.AdaptError as e:
        raise click.UsageError(f"--adapt-on: {e}")
    except TaskUnknownError as e:
        raise click.UsageError(f"{e} Pass --task infected or --task covid.")
    except (*_model_errors(), evaluation.EvaluationError) as e:
        raise click.ClickException(str(e))
    if as_json:
        _echo_json(metrics)
        return
    click.echo(f"{metrics['model']} on {split} ({metrics['n']} images, data {metrics['fingerprint']})")
    click.echo(evaluation.format_report(metrics))
    if metrics.get("adaptation"):
        click.echo("\n" + adapt_lib.format_side_by_side(metrics["adaptation"]))
    click.echo(f"wrote {len(metrics['files'])} files to {metrics['out_dir']}")


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--chart", "chart_path", type=click.Path(dir_okay=False), help="Also draw a bar chart (PNG) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def compare(results, chart_path, as_json):
    """Side-by-side table of evaluations: one row per RESULTS (metrics.json or an eval dir).

    Columns: F1 per class (normal, non-covid, covid) and accuracy, as in the study.
    """
    from cxrkeras import evaluation

    try:
        table = evaluation.compare(results)
    except evaluation.EvaluationError as e:
        raise click.ClickException(str(e))
    if chart_path:
        from cxrkeras import plots

        plots.comparison_chart(table, chart_path)
    if as_json:
        _echo_json(table)
        return
    click.echo(evaluation.format_comparison(table))
    if chart_path:
        click.echo(f"wrote {chart_path}")


# ---------------------------------------------------------------- cascade, export, predict


class TargetRecall(click.ParamType):
    """CLASS=RECALL, e.g. covid=0.95 -> {"covid": 0.95}."""

    name = "CLASS=RECALL"

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        name, sep, number = str(value).partition("=")
        name = name.strip()
        try:
            recall = float(number)
        except ValueError:
            recall = None
        if not sep or name not in CLASSES or recall is None or not 0 < recall <= 1:
            self.fail(
                f"{value!r}: expected CLASS=RECALL with CLASS one of {', '.join(CLASSES)} "
                f"and RECALL in (0, 1], e.g. covid=0.95.",
                param,
                ctx,
            )
        return {name: recall}


def _model_errors():
    """The errors that mean "this model or dataset can't be used as given" (-> exit 1)."""
    from cxrkeras.data import DatasetError
    from cxrkeras.export import ExportError
    from cxrkeras.runs import ModelError

    return (ModelError, ExportError, DatasetError)


def _run_list(argument):
    """RUN, or RUN1,RUN2,... (an ensemble), as a list; a path that exists as written is one run."""
    if os.path.exists(argument) or "," not in argument:
        return [argument]
    return [part for part in argument.split(",") if part]


@main.command()
@click.argument("run_infected")
@click.argument("run_covid")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="The cascade folder to write.")
@click.option(
    "--target-recall",
    "target",
    type=TargetRecall(),
    help="Pick thresholds on validation so CLASS reaches RECALL, e.g. covid=0.95.",
)
@click.option("--data", "data_source", help="Dataset to carve the validation split from [default: the runs' dataset].")
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="[default: the runs' setting, else 0.15]",
)
@click.option("--seed", type=int, help="Seed of the validation split [default: the runs' setting, else 0].")
@click.option(
    "--t-infected", type=click.FloatRange(0, 1), help="Infected threshold without --target-recall.  [default: 0.5]"
)
@click.option("--t-covid", type=click.FloatRange(0, 1), help="COVID threshold without --target-recall.  [default: 0.5]")
@click.option("--overwrite", is_flag=True, help="Replace the model already in OUT (refused without it).")
@click.option("--json", "as_json", is_flag=True, help="Print the cascade record as JSON.")
def cascade(
    run_infected, run_covid, out_dir, target, data_source, val_fraction, seed, t_infected, t_covid, overwrite, as_json
):
    """Join two trained classifiers into the study's cascade, saved as OUT/model.keras.

    RUN_INFECTED and RUN_COVID are run folders (or .keras files) of the normal
    vs infected and the COVID vs non-COVID classifiers, in that order; either
    may list several runs joined by commas (RUN1,RUN2,...): that stage is then
    an ensemble averaging their probabilities. The
    cascade says normal if p_infected <= t_infected, else covid if
    p_covid > t_covid, else non-covid. With --target-recall the thresholds are
    picked on the runs' holdout when they carved one (fit --holdout-fraction),
    else on the validation split carved from train (never test): the most
    accurate pair whose recall for CLASS reaches RECALL. OUT/cascade.json holds
    the thresholds, the source runs and the false-negative / false-positive
    trade-off table; OUT/threshold_tradeoff.png draws it. A folder that
    already holds a model (a classifier's run, an older cascade) is refused
    unless --overwrite; every file is written under a temporary name first.
    """
    from cxrkeras.runs import CASCADE_FILE, MODEL_FILE
    from cxrkeras.thresholds import make_cascade

    if target is not None and (t_infected is not None or t_covid is not None):
        raise click.UsageError("--t-infected / --t-covid and --target-recall exclude each other.")
    if target is None and (data_source or val_fraction is not None or seed is not None):
        raise click.UsageError("--data, --val-fraction and --seed only apply with --target-recall.")
    if data_source is not None:
        _dataset_source(data_source)
    try:
        record = make_cascade(
            _run_list(run_infected),
            _run_list(run_covid),
            out_dir,
            target=target,
            data=data_source,
            val_fraction=val_fraction,
            seed=seed,
            thresholds={k: v for k, v in (("infected", t_infected), ("covid", t_covid)) if v is not None},
            overwrite=overwrite,
        )
    except _model_errors() as e:
        raise click.ClickException(str(e))
    except ValueError as e:
        raise click.UsageError(str(e))
    summary = {k: v for k, v in record.items() if k != "table"}
    summary["model"] = os.path.join(out_dir, MODEL_FILE)
    summary["record"] = os.path.join(out_dir, CASCADE_FILE)
    if as_json:
        _echo_json(summary)
        return
    t = record["thresholds"]
    click.echo(f"wrote {summary['model']} (t_infected={t['infected']:.2f}, t_covid={t['covid']:.2f})")
    selection = record.get("selection")
    if selection:
        chosen, default, name = selection["chosen"], selection["default"], selection["class"]
        status = "reached" if selection["reached"] else "NOT reached: closest shown"
        click.echo(
            f"{name} recall on {selection['split']} {chosen['recall']:.3f} "
            f"(target {selection['target_recall']:.3f}, {status}); "
            f"FN {chosen['fn']}, FP {chosen['fp']}, accuracy {chosen['accuracy']:.3f}"
        )
        click.echo(
            f"at 0.5 / 0.5: {name} recall {default['recall']:.3f}; FN {default['fn']}, FP {default['fp']}, "
            f"accuracy {default['accuracy']:.3f}"
        )
        click.echo(f"trade-off: {summary['record']}, {record['plot']}")


@main.command()
@click.argument("model_path", metavar="MODEL")
@click.option(
    "--out",
    "base_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Base folder; the export goes to OUT/VERSION.",
)
@click.option(
    "--task",
    type=click.Choice(["infected", "covid"]),
    help="Which classifier a binary model is, when it does not say (older files) and has no config.json.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the export's metadata as JSON.")
def export(model_path, base_dir, task, as_json):
    """Export MODEL as a TensorFlow Serving SavedModel in OUT/VERSION (1, then 2, 3, ...).

    MODEL is a .keras file, a run folder or a cascade folder. Signatures:
    `serving_default` takes encoded JPEG/PNG bytes (`images`, string [N]; the
    REST API's {"b64": ...}) and decodes them in the graph; `predict_images`
    takes float32 [N, 150, 150, 1] in [0, 1]. Both answer `probabilities`,
    `class_id` and `class_name`; a cascade's thresholds are built in.
    """
    from cxrkeras import export as export_lib
    from cxrkeras.runs import TaskUnknownError

    try:
        version_dir = export_lib.export(model_path, base_dir, task=task)
    except TaskUnknownError as e:
        raise click.UsageError(f"{e} Pass --task infected or --task covid.")
    except _model_errors() as e:
        raise click.ClickException(str(e))
    from cxrkeras import savedmodel

    metadata = export_lib.read_metadata(version_dir)
    signatures = sorted(set(savedmodel.signature_defs(savedmodel.read_proto(version_dir))) - {"__saved_model_init_op"})
    if as_json:
        _echo_json({"path": version_dir, **metadata})
        return
    thresholds = ", ".join(f"{k} {v:g}" for k, v in metadata["thresholds"].items()) or "argmax"
    click.echo(
        f"exported {metadata['kind']} model to {version_dir} (classes {', '.join(metadata['class_names'])}; "
        f"thresholds: {thresholds}; signatures: {', '.join(signatures)})"
    )


@main.command()
@click.argument("model_path", metavar="MODEL")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option(
    "--task",
    type=click.Choice(["infected", "covid"]),
    help="Which classifier a binary model is, when it does not say (older files) and has no config.json.",
)
@click.option(
    "--server",
    metavar="URL",
    help="Ask a TensorFlow Serving REST server (`cxrkeras serve` or TensorFlow Serving) at URL; MODEL is then its model name.",
)
@click.option("--trust-model", is_flag=True, help="Run a SavedModel whose graph uses ops outside the allow-list.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of results.")
def predict(model_path, images, batch_size, task, server, trust_model, as_json):
    """Classify image files with MODEL; one line per image, exit 1 if any failed.

    MODEL is a .keras file, a run or cascade folder, or an exported SavedModel
    (a version folder, or the base folder: its highest version); with
    --server URL, the name of a model served there
    (`cxrkeras predict --server http://127.0.0.1:8501 cxr x.png`). Each line:
    path, class, probabilities. A file that is missing or does not decode gets
    an error line naming it and why; the others are still classified.

    A SavedModel is code: before running one, its graph's ops are checked
    against an allow-list (no file, process, network or Python ops), and one
    that uses others is refused unless --trust-model.
    """
    from cxrkeras import predict as predict_lib
    from cxrkeras.savedmodel import SavedModelError

    if server is not None and (task is not None or trust_model):
        raise click.UsageError("--task and --trust-model apply to a local MODEL, not with --server.")
    try:
        if server is not None:
            predictor = predict_lib.open_server(server, model_path)
        else:
            predictor = _open_local_model(model_path, task, trust_model)
        results = predict_lib.predict_files(predictor, list(images), batch_size)
    except (SavedModelError, predict_lib.ServerError) as e:
        raise click.ClickException(str(e))
    if as_json:
        _echo_json(results)
    else:
        for r in results:
            if "error" in r:
                click.echo(f"{r['path']}\terror: {r['error']}")
            else:
                probabilities = " ".join(f"{n}={p:.4f}" for n, p in r["probabilities"].items())
                click.echo(f"{r['path']}\t{r['class']}\t{probabilities}")
    if any("error" in r for r in results):
        raise SystemExit(1)


def _open_local_model(model_path, task, trust_model):
    """predict_lib.open_model, its errors as click's; Keras is imported only for a Keras model or an error."""
    from cxrkeras import predict as predict_lib

    try:
        return predict_lib.open_model(model_path, task=task, trust=trust_model)
    except Exception as e:
        from cxrkeras.runs import TaskUnknownError

        if isinstance(e, TaskUnknownError):
            raise click.UsageError(f"{e} Pass --task infected or --task covid.")
        if isinstance(e, _model_errors()):
            raise click.ClickException(str(e))
        raise


# ---------------------------------------------------------------- a new site: adapt, calibrate


def _stage_list(ctx, param, value):
    """"infected,covid" -> ["infected", "covid"] (None: every stage)."""
    if value is None:
        return None
    stages = [s.strip() for s in value.split(",") if s.strip()]
    wrong = [s for s in stages if s not in ("infected", "covid", "three-class")]
    if not stages or wrong:
        raise click.BadParameter(f"{value!r}: expected stage names joined by commas, e.g. infected,covid.")
    return stages


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True))
@click.option("--images", "images_source", required=True, type=click.Path(exists=True),
              help="The new site's images: a folder of any layout (DICOM too), or a CSV with a path column.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="The folder for the adapted model.")
@click.option("--stages", callback=_stage_list, metavar="STAGE[,STAGE]",
              help="A cascade's stages to adapt: infected, covid or both [default: every stage].")
@click.option("--overwrite", is_flag=True, help="Replace the model already in OUT (refused without it).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print adapt.json's record.")
def adapt(model_path, images_source, out_dir, stages, overwrite, batch_size, as_json):
    """Adapt MODEL to a new site's unlabeled X-rays: re-estimate its BatchNormalization statistics (AdaBN).

    MODEL is a classifier, an ensemble or a cascade (.keras file, run or
    cascade folder). Every BatchNormalization layer's moving mean and variance
    become the exact mean and variance of its input over the images, layer by
    layer in order. No label is read: files that do not decode are skipped
    and listed. It needs at least 64 images: one training batch, the number
    of images whose statistics BatchNormalization learned to normalise by
    (fewer give noisier statistics than any it met in training). OUT gets a
    model of the same kind (the source's config.json / cascade.json come
    along) and adapt.json: the images' count and fingerprint, the stages and
    layers changed and how far. The input model is never written to.
    `cxrkeras export OUT --out BASE` then makes BASE's next version.
    """
    from cxrkeras import adapt as adapt_lib

    try:
        record = adapt_lib.adapt(model_path, images_source, out_dir, stages, overwrite, batch_size,
                                 log=lambda message: click.echo(message, err=True))
    except adapt_lib.AdaptError as e:
        raise click.UsageError(str(e))
    except _model_errors() as e:
        raise click.ClickException(str(e))
    if as_json:
        _echo_json(record)
        return
    shifts = ", ".join(f"{c['classifier']}/{c['layer']} {c['mean_shift']:.2f}" for c in record["layers"][:4])
    more = f", ... ({len(record['layers'])} layers)" if len(record["layers"]) > 4 else ""
    click.echo(f"adapted {', '.join(record['stages'])} to {record['images']} images (fingerprint "
               f"{record['fingerprint']}, {len(record['skipped'])} skipped); mean shifts in old standard "
               f"deviations: {shifts}{more}")
    click.echo(f"wrote {record['model']}")


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="The folder for the calibrated model.")
@click.option("--data", "data_path", type=click.Path(exists=True), help="The runs' dataset [default: the one their config names].")
@click.option("--overwrite", is_flag=True, help="Replace the model already in OUT (refused without it).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print calibration.json's record.")
def calibrate(model_path, out_dir, data_path, overwrite, batch_size, as_json):
    """Calibrate MODEL's probabilities: one temperature per stage, fitted on the holdout.

    MODEL is a binary classifier, an ensemble or a cascade whose runs carved
    a holdout from train (`fit --holdout-fraction`): no epoch was picked there,
    and test is never read. Each stage's probability p becomes
    sigmoid(logit(p) / T), T minimising the holdout's negative log-likelihood;
    a cascade's thresholds move the same way, so every decision stays. The
    temperatures live in the model (predict, export and serve apply them);
    OUT/calibration.json holds them with the ECE and NLL before and after.
    """
    from cxrkeras import calibration

    try:
        record = calibration.calibrate(model_path, out_dir, data_path, overwrite, batch_size,
                                       log=lambda message: click.echo(message, err=True))
    except calibration.CalibrationError as e:
        raise click.ClickException(str(e))
    except _model_errors() as e:
        raise click.ClickException(str(e))
    if as_json:
        _echo_json(record)
        return
    temps = ", ".join(f"{k} {v:.3f}" for k, v in record["temperatures"].items())
    click.echo(f"temperatures on the holdout ({record['images']} images): {temps}; ECE {record['ece']['before']:.4f} "
               f"-> {record['ece']['after']:.4f}; decisions changed: {record['decisions_changed']}")
    click.echo(f"wrote {record['model']}")


# ---------------------------------------------------------------- tune

TUNERS = ("grid", "random", "hyperband", "bayesian")  # cxrkeras.tuning.TUNERS (not imported: it loads TensorFlow)


@main.command()
@click.argument("task", type=click.Choice(["infected", "covid", "three-class"]), metavar="TASK")
@click.option("--study", default="joint", show_default=True,
              help="A study in tuning/: depth, batch-size, optimizer, learning-rate, weight-decay, augmentation "
              "(the study's one-factor experiments), joint (all of them); or a TOML file of your own.")
@click.option("--data", "data_path", type=click.Path(), help="Dataset folder or CSV manifest (not with --summary).")
@train_options
@click.option("--tuner", type=click.Choice(TUNERS), help="[the study's: grid for one factor, random for joint]")
@click.option("--max-trials", type=click.IntRange(1), help="Trials to run at most [grid: all; the study's].")
@click.option("--executions-per-trial", type=click.IntRange(1), default=1, show_default=True,
              help="Trainings per trial, each from its own seed; the trial's score is their mean.")
@click.option("--name", help="Project name: the project is OUT/TASK/NAME [default: the study's name].")
@click.option("--out", default=os.path.join("saved_models", "tune"), show_default=True,
              type=click.Path(file_okay=False), help="Root of the tuning projects.")
@click.option("--augment-on", type=click.Choice(["auto", "data", "model"]), default="auto", show_default=True,
              help="Where augmentation runs: tf.data on the CPU, or inside the model (auto: model if a GPU is visible).")
@click.option("--summary", is_flag=True, help="Print the project's trials, best first, and stop (no search).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (progress goes to stderr).")
def tune(task, study, data_path, config_file, tuner, max_trials, executions_per_trial, name, out, augment_on,
         summary, as_json, **options):
    """Search hyperparameters of TASK's classifier with keras-tuner; rerun the same command to resume.

    The other settings stay at the study's defaults, or at what --config and the
    training options set (e.g. --epochs 5 --precision mixed_bfloat16). Each
    trial trains on the validation split carved from train and is scored by
    --monitor (val_loss by default); test is never looked at. One line per
    trial: its values, score, the best so far, the time left. The project
    (OUT/TASK/NAME) keeps every trial; at the end it holds results.md (the
    table), study.png (loss and accuracy per epoch, one line per value) and
    best_config.json, which `cxrkeras fit TASK --config` trains.

    Distributed: one chief (KERASTUNER_TUNER_ID=chief) and workers (tuner0,
    tuner1, ...) run this same command on a shared --out, with
    KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT set to the chief's address.
    """
    import contextlib
    import sys

    from cxrkeras import tuning
    from cxrkeras.data import DatasetError

    try:
        spec = tuning.load_study(study)
    except tuning.StudyError as e:
        raise click.UsageError(f"--study: {e}")
    project_dir = tuning.project_dir_for(out, task, name or spec.name)
    if summary:
        try:
            result = tuning.summarize(project_dir)
        except tuning.TuneError as e:
            raise click.ClickException(str(e))
        return _echo_tune(result, as_json)
    base = build_run_config(task, data_path, config_file, **options)
    progress_to_stderr = contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()
    try:
        with tuning.hold_project(project_dir), progress_to_stderr:  # one tune per project
            result = tuning.tune(spec, base, project_dir, tuner, max_trials, executions_per_trial, augment_on,
                                 log=lambda message: click.echo(message, err=as_json))
    except KeyboardInterrupt:
        click.echo("\nInterrupted. Finished trials are kept; the same command resumes the search.", err=True)
        raise SystemExit(130)
    except (tuning.TuneError, DatasetError) as e:
        raise click.ClickException(str(e))
    except ValueError as e:  # a study or a value the config refuses, a tuner without --max-trials
        raise click.UsageError(str(e))
    if result is not None:  # a distributed worker leaves the results to the chief
        _echo_tune(result, as_json)


def _echo_tune(result, as_json):
    from cxrkeras import tuning

    if as_json:
        return _echo_json(result)
    click.echo(f"{result['task']} / {result['study']} ({result['tuner']}): {len(result['trials'])} trial(s) in "
               f"{result['project']}, best first by {result['objective']}")
    click.echo(tuning.format_table(result))
    if result["best_config"]:
        click.echo(f"best config: {result['best_config']} (train it: cxrkeras fit {result['task']} --data DIR "
                   f"--config {_quote(result['best_config'])})")
    if result.get("figure"):
        click.echo(f"figure: {result['figure']}")


# ---------------------------------------------------------------- report


@main.command()
@click.option("--data", "data_path", required=True, type=click.Path(), help="Dataset folder (the study's layout).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="The report folder, e.g. reports/NAME.")
@click.option("--quick", is_flag=True, help="The same plan with 1-epoch trainings and 2 values per study, for a look.")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Stop every training after this many epochs (default: the study's 35 / 25 / 35).")
@click.option("--fraction", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Share of each train class used (a seeded subset).")
def report(data_path, out_dir, quick, epochs, fraction):
    """Run the study's whole plan and write OUT/README.md with every figure and table in the study's order.

    Stages: data summary, augmentation preview, the infected, covid and
    three-class fits, the cascade evaluated with the three-class classifier on
    the validation split carved from train (test is never read), and the
    one-factor studies. A line per stage and per training epoch says where it
    is and about how long the plan has left. A stage already finished in OUT
    with the same settings is reused, so an interrupted report resumes with
    the same command. The study's full plan is many CPU-hours (its timing
    section shows each epoch's cost): `--epochs 2` or `--quick` for a look.
    """
    from cxrkeras import evaluation, training, tuning
    from cxrkeras import report as report_lib

    source = _dataset_source(data_path)
    try:
        report_lib.report(source, out_dir, quick, fraction, log=click.echo, epochs=epochs)
    except KeyboardInterrupt:
        click.echo("\nInterrupted. Finished stages are kept; the same command resumes the report.", err=True)
        raise SystemExit(130)
    except (*_model_errors(), training.RunDirError, tuning.TuneError, evaluation.EvaluationError) as e:
        raise click.ClickException(str(e))
    click.echo(f"wrote {os.path.join(out_dir, 'README.md')}")


# ---------------------------------------------------------------- serve


@main.command()
@click.argument("base_dir", metavar="BASE", type=click.Path(exists=True, file_okay=False))
@click.option("--model-name", default="cxr", show_default=True, help="The name in /v1/models/NAME.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8501, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(1), default=64, show_default=True, help="Instances per model call, and per request.")
@click.option("--batch-timeout-ms", type=click.FloatRange(0), default=10.0, show_default=True, help="How long a batch waits at most for as many instances as were waiting at once during the last one.")
@click.option("--max-enqueued-batches", type=click.IntRange(1), default=16, show_default=True, help="Queue length (in batches) before answering 429.")
@click.option("--max-body-mb", type=click.FloatRange(0, min_open=True), default=32.0, show_default=True, help="Larger request bodies get 413.")
@click.option("--max-image-pixels", type=click.IntRange(1), default=4096 * 4096, show_default=True, help="Images declaring more get 400.")
@click.option("--read-timeout-s", type=click.FloatRange(0, min_open=True), default=30.0, show_default=True, help="A request's headers, then its body, must each arrive within it (else the connection closes, or 408).")
@click.option("--poll-seconds", type=click.FloatRange(0.05), default=1.0, show_default=True, help="How often BASE is checked for new versions.")
@click.option("--cors", is_flag=True, help="Allow browser pages of any origin to call the API.")
@click.option("--trust-model", is_flag=True, help="Serve SavedModels whose graphs use ops outside the allow-list.")
def serve(base_dir, model_name, host, port, cors, trust_model, **limits):
    """Serve the exported versions under BASE over TensorFlow Serving's REST API, with a page to try them.

    BASE holds numbered SavedModel versions (`cxrkeras export MODEL --out
    BASE`); every one is loaded, the highest answers by default, and a new
    version folder is picked up while serving. Endpoints: GET
    /v1/models/NAME[/versions/V][/metadata], POST
    /v1/models/NAME[/versions/V]:predict and :classify (TensorFlow Serving's
    requests and answers), /v2/health/live, /v2/health/ready (after warm-up,
    until SIGTERM), /monitoring/prometheus/metrics (Prometheus) and GET / (the
    page). Concurrent requests are batched into one model call.
    SIGTERM or Ctrl-C stops it after answering the requests in flight.
    """
    from cxrkeras import serving
    from cxrkeras.savedmodel import SavedModelError

    try:
        found = serving.served_versions(base_dir, trust=trust_model)
    except SavedModelError as e:
        raise click.ClickException(str(e))
    app = serving.create_app(base_dir, model_name, serving.Settings(cors=cors, trust_model=trust_model, **limits))
    click.echo(
        f"serving {model_name} (versions {', '.join(map(str, found))}) from {base_dir} at http://{host}:{port}/ "
        f"(REST: /v1/models/{model_name}); ready after warm-up"
    )
    if not serving.run(app, host, port):
        raise click.ClickException(f"could not serve on {host}:{port} (see above).")
    click.echo("stopped")


if __name__ == "__main__":
    main()
