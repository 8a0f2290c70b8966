"""The `cxrkeras` command: thin click commands over the library modules.

Misuse of a command -> click.UsageError (exit 2); a failure at run time ->
click.ClickException (exit 1) with a message naming the thing and what was expected.
Nothing heavy is imported at start-up: `cxrkeras --help` and argument errors
never load TensorFlow, and its C++ start-up lines stay off the terminal
unless --verbose.

One module per family of commands: `datasets` (data ...), `fit`, `tune`
(tune, report), `evaluate` (evaluate, compare), `deploy` (cascade, export,
predict), `serve`, `new_site` (adapt, calibrate); `options` holds what they
share and `process` the process around them (backend re-exec, quiet import,
OS errors and Ctrl-C as one line).
"""

import os
import sys

import click

from cxrkeras.cli.datasets import data
from cxrkeras.cli.deploy import cascade, export, predict
from cxrkeras.cli.evaluate import compare, evaluate
from cxrkeras.cli.fit import fit
from cxrkeras.cli.new_site import adapt, calibrate
from cxrkeras.cli.process import Group, QuietImport
from cxrkeras.cli.serve import serve
from cxrkeras.cli.tune import report, tune
from cxrkeras.config import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV


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
        os.environ[MAX_PIXELS_ENV] = str(max_pixels)  # read by cxrkeras.images.max_pixels
    # TensorFlow's C++ log (its errors too: Python exceptions carry what matters) only with --verbose.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else "3"
    quiet = not verbose and "tensorflow" not in sys.modules
    if quiet and not any(isinstance(finder, QuietImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, QuietImport("tensorflow"))



for command in (data, fit, tune, report, evaluate, compare, cascade, export, predict, serve, adapt, calibrate):
    main.add_command(command)
