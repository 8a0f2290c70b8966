"""The process around the commands: backend re-exec, a quiet TensorFlow import, OS errors and Ctrl-C as one line.

`Group` turns what any command meets from the operating system (a read-only
folder, a full disk, a name too long) into one line, and Ctrl-C into one line;
`QuietImport` keeps TensorFlow's C++ start-up lines off the terminal.
Nothing here imports TensorFlow or Keras.
"""

import errno
import importlib.abc
import importlib.util
import json
import os
import subprocess
import sys

import click


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
