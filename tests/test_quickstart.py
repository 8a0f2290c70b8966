"""The README's first command, as a newcomer runs it: its classifiers learn early and surely on the embedded data."""

import csv
import json
import os
import shlex

import pytest
from click.testing import CliRunner

from cxrkeras.cli import main

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_plan():
    """The `cxrkeras ...` steps of the README's first command, as argument lists."""
    with open(README) as f:
        line = next(line for line in f if "cxrkeras data synth" in line)
    steps = [shlex.split(step) for step in line.split("&&")]
    return [step[1:] for step in steps if step and step[0] == "cxrkeras"]


def run_plan(plan):
    for args in plan:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, f"cxrkeras {shlex.join(args)}\n{result.output}"


def val_accuracy(run_dir):
    with open(os.path.join(run_dir, "history.csv"), newline="") as f:
        return [float(row["val_accuracy"]) for row in csv.DictReader(f)]


def test_the_readme_plan_is_what_this_test_runs():
    commands = [args[:2] for args in readme_plan()]
    assert commands == [["data", "synth"], ["fit", "infected"], ["fit", "covid"], ["cascade", "saved_models/infected/quickstart"],
                        ["evaluate", "saved_models/cascade-quickstart"], ["export", "saved_models/cascade-quickstart"],
                        ["predict", "saved_models/quickstart"]]


def test_the_quickstart_infected_classifier_learns_in_its_first_epochs(tmp_path, monkeypatch):
    """The README's data and infected fit, stopped at epoch 4 of 12: out of the "always infected" plateau.

    (The covid fit is the slower one to run; the whole command, covid included, is the slow test below.)
    """
    monkeypatch.chdir(tmp_path)
    synth, fit_infected = readme_plan()[:2]
    run_plan([synth, fit_infected + ["--epochs", "4"]])  # the last --epochs wins
    infected = val_accuracy("saved_models/infected/quickstart")
    assert len(infected) == 4 and max(infected) >= 0.95, infected  # always "infected" scores 0.67


@pytest.mark.slow  # the whole first command: about 2 minutes on 2 cores
def test_the_readme_first_command_learns_early(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_plan(readme_plan())
    infected = val_accuracy("saved_models/infected/quickstart")
    covid = val_accuracy("saved_models/covid/quickstart")
    assert max(infected[:4]) >= 0.95 and max(covid[:3]) >= 0.95, (infected, covid)
    metrics = json.loads(open("saved_models/cascade-quickstart/eval-test/metrics.json").read())
    assert metrics["accuracy"] >= 0.95, metrics["confusion"]
