import json
import os
import shutil

import pytest
from click.testing import CliRunner
from PIL import Image

from cxrkeras.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, prefix + (name,))


@pytest.mark.parametrize("command", sorted(_commands(main)))
def test_every_command_has_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output and len(result.output.splitlines()) > 3


def test_synth_is_deterministic(tmp_path):
    assert run("data", "synth", tmp_path / "a", "--per-class", 5).exit_code == 0
    assert run("data", "synth", tmp_path / "b", "--per-class", 5).exit_code == 0
    a = tmp_path / "a/train/infected/covid/covid-0003.jpg"
    b = tmp_path / "b/train/infected/covid/covid-0003.jpg"
    assert a.read_bytes() == b.read_bytes()
    with Image.open(a) as im:
        assert im.size == (150, 150) and im.mode == "L"
    assert len(os.listdir(tmp_path / "a/train/normal")) == 5


def test_stats_table_json_and_charts(synthetic_dataset, tmp_path):
    result = run("data", "stats", synthetic_dataset, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    train_row = next(line for line in result.output.splitlines() if line.startswith("train"))
    assert train_row.split() == ["train", "10", "10", "10", "30"]
    for name in ("three_class", "infected", "covid"):
        assert (tmp_path / f"distribution_{name}.png").stat().st_size > 5000
    result = run("data", "stats", synthetic_dataset, "--out", tmp_path, "--json")
    assert json.loads(result.output)["counts"]["test"] == {"normal": 3, "non-covid": 3, "covid": 3}


def test_stats_on_a_missing_folder_is_a_usage_error(tmp_path):
    result = run("data", "stats", tmp_path / "nope")
    assert result.exit_code == 2
    assert f"{tmp_path / 'nope'}: no such folder or manifest" in result.output


def test_stats_on_a_bad_layout_names_the_folder(tmp_path):
    (tmp_path / "train/normal").mkdir(parents=True)
    result = run("data", "stats", tmp_path)
    assert result.exit_code == 1
    assert f"Error: {tmp_path / 'train/normal'}: empty class folder" in result.output


def test_check_lists_every_problem(synthetic_dataset, tmp_path):
    assert run("data", "check", synthetic_dataset).exit_code == 0
    root = tmp_path / "ds"
    shutil.copytree(synthetic_dataset, root)
    (root / "val/normal/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nope")
    (root / "test/infected/covid/empty.png").write_bytes(b"")
    result = run("data", "check", root)
    assert result.exit_code == 1
    assert f"{root / 'val/normal/broken.jpg'}: does not decode as JPEG" in result.output
    assert f"{root / 'test/infected/covid/empty.png'}: empty file" in result.output
    assert "48 images decode; 2 problem(s)." in result.output
    report = json.loads(run("data", "check", root, "--json").output)
    assert report["images"] == 48 and len(report["problems"]) == 2


def test_preview_writes_a_grid(synthetic_dataset, tmp_path):
    out = tmp_path / "preview.png"
    result = run("data", "preview", synthetic_dataset, "--out", out, "--images", 2, "--draws", 3)
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        width, height = im.size
    assert width > height  # 4 panels a row, 2 rows


def test_bad_option_value_is_a_usage_error(synthetic_dataset):
    result = run("data", "preview", synthetic_dataset, "--images", 0)
    assert result.exit_code == 2 and "--images" in result.output
