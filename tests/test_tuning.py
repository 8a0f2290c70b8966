"""cxrkeras.tuning and `cxrkeras tune`: study files, the HyperModel, search, resume after kills, distributed mode."""

import configparser
import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import keras
import keras_tuner
import pytest
from click.testing import CliRunner

from cxrkeras import cli, rundir, search_spaces, training, tuning, tuning_project
from cxrkeras.cli.options import build_run_config
from cxrkeras.config import (
    SETTING_FIELDS,
    RunConfig,
    study_model_config,
    study_train_config,
)
from cxrkeras.models import conv_layer_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A classifier small enough that a trial is mostly Keras' start-up: 48x48 inputs, two conv blocks.
TINY = {"model": {"blocks": 2, "filters": [4, 8], "dense_units": 8, "image_size": 48},
        "train": {"epochs": 2, "batch_size": 16}}
STUDY = "[hyperparameters]\nlearning_rate = [1e-3, 1e-2]\n"


def study_config(task):
    return RunConfig(model=study_model_config(task), train=study_train_config(task))


def fake_data(n=10):
    return training.TaskData([f"{i}.png" for i in range(n)], [i % 2 for i in range(n)], [], [], "", [])


# ---------------------------------------------------------------- study files and search spaces


@pytest.mark.parametrize("task", ["infected", "covid"])
@pytest.mark.parametrize("name", search_spaces.study_names())
def test_every_study_declares_its_values_with_the_study_defaults(name, task):
    study = search_spaces.load_study(name)
    base = study_config(task)
    hp = keras_tuner.HyperParameters()
    config = tuning.declare(hp, study, base)
    assert set(hp.values) == set(study.space) == set(study.factors)
    for factor, values in study.space.items():
        section, key = SETTING_FIELDS[factor]
        default = getattr(getattr(base, section), key)
        registered = {p.name: p for p in hp.space}[factor]
        assert list(registered.values) == values, factor
        assert hp.values[factor] == default, factor  # the grid starts at the study's settings
    assert config.to_dict() == base.to_dict()


def test_depth_means_conv_blocks_for_infected_and_residual_blocks_for_covid():
    study = search_spaces.load_study("depth")
    assert study.space == {"depth": [3, 4, 5]}
    for task, default, conv_layers in (("infected", 5, 5), ("covid", 4, 2 + 2 * 4)):
        model = tuning.StudyHyperModel(study, study_config(task), fake_data()).build(keras_tuner.HyperParameters())
        assert len(conv_layer_names(model)) == conv_layers, task
        assert model.count_params() == {"infected": 202_261, "covid": 378_917}[task]  # the study's exact models
    hp = keras_tuner.HyperParameters()
    hp.Fixed("depth", 3)
    model = tuning.StudyHyperModel(study, study_config("covid"), fake_data()).build(hp)
    assert [layer.name for layer in model.layers if layer.name.endswith("_add")] == ["res1_add", "res2_add", "res3_add"]


def test_hypermodel_compiles_with_the_trial_values_and_fixed_overrides():
    study = search_spaces.load_study("joint")
    hypermodel = tuning.StudyHyperModel(study, study_config("infected"), fake_data())
    model = hypermodel.build(keras_tuner.HyperParameters())
    assert type(model.optimizer).__name__ == "Adam" and float(model.optimizer.learning_rate) == pytest.approx(1e-3)
    hp = keras_tuner.HyperParameters()
    hp.Fixed("optimizer", "sgd")
    hp.Fixed("learning_rate", 0.1)
    hp.Fixed("weight_decay", 1e-2)
    model = hypermodel.build(hp)
    assert type(model.optimizer).__name__ == "SGD" and float(model.optimizer.learning_rate) == pytest.approx(0.1)
    assert model.optimizer.weight_decay == pytest.approx(1e-2)
    config = hypermodel.config(hp)
    assert (config.train.optimizer, config.train.learning_rate, config.model.blocks) == ("sgd", 0.1, 5)


def test_ranges_and_fixed_values_in_a_study_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('tuner = "random"\nmax_trials = 3\n[hyperparameters]\n'
                    'learning_rate = { min = 1e-4, max = 1e-2, sampling = "log" }\n'
                    'depth = { min = 3, max = 5 }\noptimizer = "sgd"\n')
    study = search_spaces.load_study(str(path))
    assert (study.name, study.tuner, study.max_trials, study.factors) == ("mine", "random", 3, ["learning_rate", "depth"])
    assert search_spaces.grid_size(study) is None
    hp = keras_tuner.HyperParameters()
    config = tuning.declare(hp, study, study_config("infected"))
    assert type({p.name: p for p in hp.space}["learning_rate"]).__name__ == "Float"
    assert (config.train.learning_rate, config.model.blocks, config.train.optimizer) == (1e-3, 5, "sgd")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[hyperparameters]\nlearning_rat = [1e-3]\n", "unknown hyperparameter 'learning_rat'"),
        ('tuner = "annealing"\n[hyperparameters]\ndepth = [3]\n', "Received: tuner='annealing'"),
        ("[hyperparameters]\ndepth = []\n", "`depth` needs a non-empty list"),
        ('[hyperparameters]\noptimizer = ["sgd", 1]\n', "`optimizer` needs a non-empty list of values of one type"),
        ("[hyperparameters]\nlearning_rate = { min = 1, max = 0.1 }\n", "needs numbers min < max"),
        ("max_trials = 0\n[hyperparameters]\ndepth = [3]\n", "Received: max_trials=0"),
        ("[space]\ndepth = [3]\n", "unknown keys ['space']"),
        ("[hyperparameters\n", "not a readable TOML file"),
        ('[hyperparameters]\ndepth = [3, 4]\n[published]\nchoice = 5\nfinding = "x"\n', "[published] needs"),
        ("[hyperparameters]\ndepth = [3, 4]\n[published]\nchoice = 3\n", "[published] needs"),
    ],
)
def test_bad_study_files_name_the_file_and_the_value(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(search_spaces.StudyError, match=str(path)) as error:
        search_spaces.load_study(str(path))
    assert message in str(error.value)


def test_a_study_value_the_model_refuses_is_named_before_any_training(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("[hyperparameters]\ndepth = [5, 6]\n")
    with pytest.raises(search_spaces.StudyError, match=r"depth=6 does not work here: Too many `blocks`"):
        tuning.check_values(search_spaces.load_study(str(path)), study_config("infected"))


def test_best_epoch_metrics_follow_the_objective():
    history = {"loss": [0.9, 0.5, 0.4], "val_loss": [0.8, 0.6, 0.7], "val_accuracy": [0.5, 0.7, 0.9],
               "learning_rate": [1e-3] * 3}
    assert tuning_project.best_epoch_metrics(history, "val_loss") == {"loss": 0.5, "val_loss": 0.6, "val_accuracy": 0.7}
    assert tuning_project.best_epoch_metrics(history, "val_accuracy")["val_accuracy"] == 0.9


# ---------------------------------------------------------------- a search, killed twice and resumed


@pytest.fixture(scope="module")
def killed_and_resumed(synthetic_dataset, tmp_path_factory):
    """A 2-trial search of 2 epochs: killed after trial 1, then in trial 2, then trial 1's trial.json cut short;
    the third run (in this process) finishes it. Returns (run outputs, project dir, config file, study file)."""
    root = tmp_path_factory.mktemp("tune")
    config, study = root / "tiny.json", root / "lr.toml"
    config.write_text(json.dumps(TINY))
    study.write_text(STUDY)
    out = str(root / "projects")
    command = [sys.executable, "-m", "cxrkeras.cli", "tune", "infected", "--data", synthetic_dataset,
               "--config", str(config), "--study", str(study), "--out", out]
    runs = []
    for kill in ("after-trial:0", "in-trial:1"):
        env = {**os.environ, tuning.KILL_ENV: kill}
        runs.append(subprocess.run(command, env=env, capture_output=True, text=True, timeout=300))
    project = os.path.join(out, "infected", "lr")
    trial_json = os.path.join(project, "trial_0000", "trial.json")
    runs.append(json.load(open(trial_json)))  # trial 1 as its second run found it
    with open(trial_json, "r+") as f:  # a half-written file, as a kill during keras-tuner's own write leaves
        f.truncate(os.path.getsize(trial_json) // 2)
    legs = os.path.join(project, "trial_0001", tuning_project.TRIAL_LEGS_FILE)
    runs.append(json.load(open(legs))["seconds"])  # what trial 2's first run spent on it before its kill
    with open(legs, "w") as f:  # as if that run had spent longer on it
        json.dump({"seconds": 1000.0}, f)
    base = build_run_config("infected", synthetic_dataset, str(config))
    lines, trained = [], []
    began = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: trained.append(epoch))
    summary = tuning.tune(search_spaces.load_study(str(study)), base, project, log=lines.append, callbacks=[began])
    return runs + [(lines, trained), summary], project, str(config), str(study)


def test_a_search_resumes_after_kills_without_redoing_finished_trials_or_epochs(killed_and_resumed):
    (first, second, first_trial, before_kill, (third, trained), summary), project, _, _ = killed_and_resumed
    assert first.returncode == -9, first.stderr[-2000:]
    assert [line.split(":")[0] for line in first.stdout.splitlines() if line.startswith("trial")] == ["trial 1/2 [learning_rate=0.001]"]
    assert second.returncode == -9, second.stderr[-2000:]
    assert "trial 1/2" not in second.stdout and "resuming" in second.stdout  # killed inside trial 2
    assert first_trial["status"] == "COMPLETED"
    assert f"{project}/trial_0000/trial.json: unreadable (cut short); restored from trial.copy.json" in third
    assert [line.split(" [")[0] for line in third if line.startswith("trial")] == ["trial 2/2"]  # trial 1 kept
    assert json.load(open(os.path.join(project, "trial_0000", "trial.json"))) == first_trial
    assert [t["status"] for t in summary["trials"]] == ["COMPLETED", "COMPLETED"]
    # trial 2 was killed once its first epoch was backed up: the third run trained only its second epoch,
    # its history holds both, and no backup outlives a finished trial
    assert trained == [1]
    assert rundir.read_history(os.path.join(project, "trial_0001", "execution0.csv"))["epoch"] == [0, 1]
    assert not glob.glob(os.path.join(project, "trial_*", "execution*.backup"))
    # its time counts both runs: what the run before the kill recorded (set to 1000 s) and the third run's
    assert before_kill > 0
    assert 1000 < json.load(open(os.path.join(project, "trial_0001", "run.json")))["seconds"] < 1300
    assert not os.path.exists(os.path.join(project, "trial_0001", tuning_project.TRIAL_LEGS_FILE))
    assert {t["values"]["learning_rate"] for t in summary["trials"]} == {1e-3, 1e-2}


def test_a_killed_execution_keeps_its_backed_up_epochs_and_their_best(tmp_path):
    from keras_tuner.src.engine import tuner_utils

    from cxrkeras.callbacks import AtomicBackupAndRestore

    history, backup = tmp_path / "execution0.csv", AtomicBackupAndRestore(str(tmp_path / "execution0.backup"))
    checkpoint = tuner_utils.SaveBestEpoch(keras_tuner.Objective("val_loss", "min"), str(tmp_path / "best.h5"))
    history.write_text("epoch,loss,val_loss\n0,0.9,0.7\n1,0.8,0.4\n2,0.7,0.3\n")  # epoch 2 written, not backed up
    os.makedirs(backup.backup_dir)
    with open(backup._training_metadata_path, "w") as f:
        json.dump({"epoch": 2, "batch": -1}, f)
    assert tuning.resume_execution(str(history), backup, checkpoint) == 2
    assert rundir.read_history(str(history))["epoch"] == [0, 1] and checkpoint.best_value == 0.4
    shutil.rmtree(backup.backup_dir)  # no backup: the execution starts over
    assert tuning.resume_execution(str(history), backup, checkpoint) == 0 and not history.exists()


def test_the_search_writes_its_table_figure_and_best_config(killed_and_resumed):
    (*_, summary), project, _, _ = killed_and_resumed
    best, other = summary["trials"]
    assert best["score"] <= other["score"]  # val_loss: lowest first
    assert best["best_val_loss"] == pytest.approx(best["score"])
    assert summary["factors"] == ["learning_rate"] and summary["objective"] == "val_loss"
    for name in ("results.md", "results.json", "study.png", "best_config.json"):
        assert os.path.getsize(os.path.join(project, name)) > 0, name
    table = open(os.path.join(project, "results.md")).read().splitlines()
    assert table[0].split("|")[1:4] == [" trial ", " learning_rate ", " val_loss "] and len(table) == 4
    exported = RunConfig.load(os.path.join(project, "best_config.json"))
    assert exported.train.learning_rate == best["values"]["learning_rate"] and exported.model.blocks == 2


def test_a_trials_config_trains_with_fit_and_reproduces_the_trial_score(killed_and_resumed, synthetic_dataset, tmp_path):
    """Trial 1 ran unbroken (trial 2's resume saw its second epoch in another shuffle order); best_config.json is
    written the same way from the best trial."""
    (*_, summary), project, _, _ = killed_and_resumed
    best = next(t for t in summary["trials"] if t["trial_id"] == "0000")
    config = os.path.join(project, "trial_0000", tuning_project.TRIAL_CONFIG_FILE)
    args = ["fit", "infected", "--data", synthetic_dataset, "--config", config,
            "--out", str(tmp_path), "--name", "best", "--json"]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    fitted = json.loads(result.stdout)
    # Same data, seed and code path: the same training; the tolerance leaves room for thread-order noise only.
    assert fitted["best_metric"] == pytest.approx(best["score"], abs=1e-4)
    assert fitted["history"]["val_loss"] == pytest.approx(
        rundir.read_history(os.path.join(project, f"trial_{best['trial_id']}", "execution0.csv"))["val_loss"],
        abs=1e-4)


def test_rerunning_a_finished_search_trains_nothing(killed_and_resumed, synthetic_dataset):
    (*_, summary), project, config, study = killed_and_resumed
    lines = []
    again = tuning.tune(search_spaces.load_study(study), build_run_config("infected", synthetic_dataset, config),
                        project, log=lines.append)
    assert lines == [f"resuming {project}: 2 trial(s) already ran"]
    assert [t["score"] for t in again["trials"]] == [t["score"] for t in summary["trials"]]


def test_a_trial_another_project_trained_already_is_copied_not_trained(killed_and_resumed, synthetic_dataset,
                                                                       tmp_path):
    """The report's studies share the study's default config: a second study copies that trial from the first."""
    (*_, summary), donor, config, _ = killed_and_resumed
    study = tmp_path / "lr2.toml"
    study.write_text("[hyperparameters]\nlearning_rate = [1e-3, 3e-3]\n")  # 1e-3: the donor's trial 1
    project, trained = str(tmp_path / "lr2"), []
    counted = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: trained.append(epoch))
    again = tuning.tune(search_spaces.load_study(str(study)), build_run_config("infected", synthetic_dataset, config),
                        project, log=lambda line: None, callbacks=[counted], reuse=[donor, project])
    assert trained == [0, 1]  # only the 3e-3 trial trained; the donor's 1e-2 trial matched nothing
    copied = next(t for t in again["trials"] if t["values"]["learning_rate"] == 1e-3)
    original = next(t for t in summary["trials"] if t["values"]["learning_rate"] == 1e-3)
    assert copied["score"] == original["score"] and copied["reused"] == "infected/lr, trial 1"
    trial_dir = os.path.join(project, f"trial_{copied['trial_id']}")
    for name in ("execution0.csv", "checkpoint.weights.h5"):
        assert open(os.path.join(trial_dir, name), "rb").read() == open(
            os.path.join(donor, "trial_0000", name), "rb").read(), name
    assert "completed (reused: infected/lr, trial 1)" in open(os.path.join(project, "results.md")).read()
    other = next(t for t in again["trials"] if t["values"]["learning_rate"] == 3e-3)
    assert other["reused"] == "" and other["status"] == "COMPLETED"


def test_a_trial_file_without_a_readable_copy_becomes_a_failed_trial(killed_and_resumed, tmp_path):
    _, project, _, _ = killed_and_resumed
    damaged = str(tmp_path / "lr")
    shutil.copytree(project, damaged)
    with open(os.path.join(damaged, "trial_0001", "trial.json"), "w") as f:
        f.write('{"trial_id": "0001", "hyper')
    os.remove(os.path.join(damaged, "trial_0001", "trial.copy.json"))
    lines = []
    tuning_project.repair_project(damaged, log=lines.append)
    assert lines == [f"{damaged}/trial_0001/trial.json: unreadable and no readable copy; that trial counts as failed"]
    trial = json.load(open(os.path.join(damaged, "trial_0001", "trial.json")))
    assert trial["status"] == "FAILED" and "result is lost" in trial["message"]
    oracle = tuning.make_oracle("grid", "val_loss", None, 2, 0)
    oracle._set_project_dir(str(tmp_path), "lr")
    oracle.reload()  # keras-tuner reads the project again
    assert sorted(oracle.trials) == ["0000", "0001"] and oracle.trials["0001"].status == "FAILED"


# ---------------------------------------------------------------- the command


def test_tune_summary_prints_the_best_trials(killed_and_resumed):
    (*_, summary), project, _, study = killed_and_resumed
    out = os.path.dirname(os.path.dirname(project))
    result = CliRunner().invoke(cli.main, ["tune", "infected", "--study", study, "--out", out, "--summary"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"infected / lr (grid): 2 trial(s) in {project}, best first by val_loss"
    assert lines[3].split("|")[1].strip() == str(int(summary["trials"][0]["trial_id"]) + 1)
    assert f"best config: {project}/best_config.json" in result.output
    as_json = CliRunner().invoke(cli.main, ["tune", "infected", "--study", study, "--out", out, "--summary", "--json"])
    assert json.loads(as_json.output)["trials"][0]["score"] == summary["trials"][0]["score"]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--study", "learning_rate", "--summary"], 2, "--study: Unknown study 'learning_rate'; expected one of"),
        (["--study", "depth", "--summary"], 1, "no search there (no tune.json)"),
        (["--study", "{study}", "--data", "{data}", "--config", "{config}", "--epochs", "3"], 1,
         "the search was started with other settings (base.train.epochs)"),
        (["--study", "{study}", "--data", "{data}", "--distribute", "mirrored"], 2, "Invalid `distribute` for tune"),
        (["--study", "joint", "--data", "{data}", "--config", "{config}", "--name", "j"], 2,
         "joint.toml: depth=5 does not work here: Too many `blocks` for `image_size`"),
        (["--study", "{study}", "--data", "{data}", "--tuner", "random", "--name", "r"], 2,
         "`max_trials` is needed for random search"),
    ],
)
def test_tune_errors_are_one_line(killed_and_resumed, synthetic_dataset, args, code, message, monkeypatch):
    _, project, config, study = killed_and_resumed
    monkeypatch.setattr(tuning.StudyTuner, "search", lambda self: None)  # nothing here needs training
    names = {"study": study, "data": synthetic_dataset, "config": config}
    out = os.path.dirname(os.path.dirname(project))
    result = CliRunner().invoke(cli.main, ["tune", "infected", "--out", out] + [a.format(**names) for a in args])
    assert result.exit_code == code, result.output
    assert message in result.output


def test_a_second_tune_on_a_project_in_use_is_refused_and_a_killed_one_leaves_no_lock(
    killed_and_resumed, synthetic_dataset, monkeypatch
):
    _, project, config, study = killed_and_resumed
    monkeypatch.setattr(tuning.StudyTuner, "search", lambda self: None)  # nothing here needs training
    holding = "import sys, time; from cxrkeras.files import hold; f = hold(sys.argv[1]); print('held', flush=True); time.sleep(300)"
    holder = subprocess.Popen([sys.executable, "-c", holding, os.path.join(project, ".tune.lock")], stdout=subprocess.PIPE, text=True)
    out = os.path.dirname(os.path.dirname(project))
    args = ["tune", "infected", "--out", out, "--study", study, "--data", synthetic_dataset, "--config", config]
    try:
        assert holder.stdout.readline() == "held\n"
        result = CliRunner().invoke(cli.main, args)
        assert result.exit_code == 1, result.output
        assert f"another `cxrkeras tune` runs on this project (pid {holder.pid} on {socket.gethostname()}, started " in result.output
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output


def test_tune_help_names_every_study_and_tuner():
    result = CliRunner().invoke(cli.main, ["tune", "--help"])
    assert result.exit_code == 0
    help_text = " ".join(result.output.split())
    for name in search_spaces.study_names():
        assert name in help_text, name
    for name in search_spaces.TUNERS:
        assert name in help_text, name


def test_setup_cfg_installs_every_package_and_the_study_files():
    setup = configparser.ConfigParser()
    setup.read(os.path.join(ROOT, "setup.cfg"))
    listed = {p.strip() for p in setup["options"]["packages"].split(",")}
    found = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(ROOT, "cxrkeras"))
             if "__init__.py" in files}
    assert found | {"cxrkeras.studies"} == listed
    assert "cxrkeras.studies = tuning" in setup["options"]["package_dir"]
    shipped = {f[: -len(".toml")] for f in os.listdir(os.path.join(ROOT, "tuning")) if f.endswith(".toml")}
    assert set(search_spaces.study_names()) == shipped == {"depth", "batch-size", "optimizer", "learning-rate",
                                                      "weight-decay", "augmentation", "joint"}


# ---------------------------------------------------------------- distributed mode


@pytest.mark.slow
def test_a_chief_and_two_workers_run_every_trial_once(synthetic_dataset, tmp_path):
    """keras-tuner's distributed mode on localhost: the chief serves the oracle, two workers train (about 2 min)."""
    config, study = tmp_path / "tiny.json", tmp_path / "lr.toml"
    config.write_text(json.dumps({**TINY, "train": {"epochs": 1, "batch_size": 16}}))
    study.write_text("[hyperparameters]\nlearning_rate = [1e-4, 1e-3, 1e-2, 1e-1]\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "cxrkeras.cli", "tune", "infected", "--data", synthetic_dataset,
               "--config", str(config), "--study", str(study), "--out", str(tmp_path / "out")]
    processes = {}
    for tuner_id in ("chief", "tuner0", "tuner1"):
        env = {**os.environ, "KERASTUNER_TUNER_ID": tuner_id, "KERASTUNER_ORACLE_IP": "127.0.0.1",
               "KERASTUNER_ORACLE_PORT": str(port)}
        processes[tuner_id] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                               text=True)
    outputs = {}
    try:
        for tuner_id, process in processes.items():
            outputs[tuner_id] = process.communicate(timeout=400)
            assert process.returncode == 0, (tuner_id, outputs[tuner_id][1][-3000:])
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
    ran = [line.split(" [")[0] for w in ("tuner0", "tuner1") for line in outputs[w][0].splitlines()
           if line.startswith("trial ")]
    assert sorted(ran) == ["trial 1/4", "trial 2/4", "trial 3/4", "trial 4/4"]  # each trial once, by some worker
    assert not [line for line in outputs["chief"][0].splitlines() if line.startswith("trial ")]  # trains nothing
    project = tmp_path / "out" / "infected" / "lr"
    summary = tuning_project.summarize(str(project))
    assert [t["status"] for t in summary["trials"]] == ["COMPLETED"] * 4  # every result reached the chief
    assert {json.load(open(project / f"trial_{t['trial_id']}" / "run.json"))["tuner_id"]
            for t in summary["trials"]} <= {"tuner0", "tuner1"}
    assert "4 trial(s)" in outputs["chief"][0] and (project / "best_config.json").exists()
