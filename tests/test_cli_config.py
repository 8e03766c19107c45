"""How ``archer fit`` reads a config (issue 21, items 1-3 and 8): own modules from the working
directory, class paths checked at start-up with a one-line error, list items that never inherit
another item's settings, unknown or abbreviated keys refused, every output path under one run
directory, and what file data and a missing reward do to the quickstart."""

import re
import textwrap
from pathlib import Path

import pytest
import yaml

from archer.cli import ArcherCLI, main
from archer.data import PromptDataModule
from archer.module import ArcherModule

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")

SAMPLE_LOGGER = '''
import lightning as L


class SampleLogger(L.Callback):
    def __init__(self, every_n_steps: int = 1, num_samples: int = 3):
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
'''


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _resolved(capsys, model_dir: str, *args: str) -> dict:
    """``archer fit --config QUICKSTART ARGS --print_config``, in-process: the resolved config."""
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", QUICKSTART, f"--model.model_path={model_dir}", *args, "--print_config"])
    assert stop.value.code in (0, None), capsys.readouterr().err[-3000:]
    return yaml.safe_load(capsys.readouterr().out)


def _callback(config: dict, name: str) -> dict:
    found = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(name)]
    assert len(found) == 1, config["trainer"]["callbacks"]
    return found[0]


def _error(capsys, *argv: str) -> str:
    """The message ``archer`` stops with (one line, no usage dump on stderr)."""
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    message = str(stop.value.code)
    assert "\n" not in message.strip() and "usage:" not in capsys.readouterr().err, message
    return message


# ------------------------------------------------------------------------------ 1. own modules
def test_a_class_path_of_a_module_in_the_working_directory_imports(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The README's example: ``class_path: my_rewards.X`` with my_rewards.py beside the command, no PYTHONPATH."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "my_rewards_cwd.py", """
        class ContainsAnswer:
            def __init__(self, case_sensitive: bool = False):
                self.case_sensitive = case_sensitive

            def __call__(self, response: str, row: dict) -> float:
                return float(row["answer"] in response)
    """)
    reward = _write(tmp_path / "reward.yaml", "model:\n  reward:\n    class_path: my_rewards_cwd.ContainsAnswer\n")
    resolved = _resolved(capsys, tiny_model_dir, "--config", str(reward))
    assert resolved["model"]["reward"] == {"class_path": "my_rewards_cwd.ContainsAnswer",
                                           "init_args": {"case_sensitive": False}}


def test_a_class_path_that_does_not_import_stops_in_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reward = _write(tmp_path / "reward.yaml", "model:\n  reward:\n    class_path: no_such_module.Reward\n")
    message = _error(capsys, "fit", "--config", QUICKSTART, "--config", str(reward), f"--model.model_path={tiny_model_dir}")
    assert "model.reward: class_path 'no_such_module.Reward' does not import: No module named 'no_such_module'" in message
    assert str(tmp_path) in message and "PYTHONPATH" in message  # where it looked, and how to look elsewhere


def test_a_misspelt_argument_of_a_class_names_the_class_and_its_arguments(tiny_model_dir, capsys):
    """The class imports; its argument is what is wrong (jsonargparse words it as an import problem)."""
    message = _error(capsys, "fit", "--config", QUICKSTART, "--model.loss.rhoo=0.7", f"--model.model_path={tiny_model_dir}")
    assert "model.loss: archer.losses.ArcherLoss has no argument 'rhoo' (its arguments: rho, knowledge_clip," in message
    assert "does not import" not in message

# -------------------------------------------------------------------------- 2. callbacks per item
def test_a_callback_list_given_again_keeps_each_items_own_defaults(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A second config's list puts SampleLogger (every_n_steps default 1) where the quickstart has
    TokenViewCallback {every_n_steps: 50}: jsonargparse carried the 50 over."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "sample_logger_cb.py", SAMPLE_LOGGER)
    callbacks = _write(tmp_path / "callbacks.yaml", """
        trainer:
          callbacks:
            - class_path: archer.callbacks.RLProgressBar
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {every_n_train_steps: 10}
            - class_path: sample_logger_cb.SampleLogger
    """)
    resolved = _resolved(capsys, tiny_model_dir, "--config", str(callbacks))
    assert _callback(resolved, "SampleLogger")["init_args"] == {"every_n_steps": 1, "num_samples": 3}
    # The list replaces the quickstart's: nothing of its items is kept (dirpath back to its default).
    assert _callback(resolved, "ModelCheckpoint")["init_args"]["dirpath"] is None
    assert len(resolved["trainer"]["callbacks"]) == 3


@pytest.mark.parametrize("how", ["flag", "file"])
def test_appending_a_callback_keeps_the_list_and_its_own_defaults(how, tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The documented ways to add one: ``--trainer.callbacks+=CLASS`` and ``callbacks+:`` in a file."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "sample_logger_cb.py", SAMPLE_LOGGER)
    if how == "flag":
        args = ["--trainer.callbacks+=sample_logger_cb.SampleLogger"]
    else:
        args = ["--config", str(_write(tmp_path / "more.yaml", """
            trainer:
              callbacks+:
                - class_path: sample_logger_cb.SampleLogger
        """))]
    resolved = _resolved(capsys, tiny_model_dir, *args)
    names = [c["class_path"].split(".")[-1] for c in resolved["trainer"]["callbacks"]]
    assert names == ["RLProgressBar", "ModelCheckpoint", "TokenViewCallback", "CompletionLogger", "SampleLogger"]
    assert _callback(resolved, "SampleLogger")["init_args"] == {"every_n_steps": 1, "num_samples": 3}
    assert _callback(resolved, "TokenViewCallback")["init_args"]["every_n_steps"] == 50


def test_a_logger_list_after_a_single_logger_takes_nothing_from_it(tiny_model_dir, capsys):
    """configs/loggers/wandb.yaml on the quickstart: the WandbLogger was named "csv" (the CSVLogger's name)."""
    resolved = _resolved(capsys, tiny_model_dir, "--config", str(ROOT / "configs" / "loggers" / "wandb.yaml"))
    csv, wandb = resolved["trainer"]["logger"]
    assert csv["init_args"]["name"] == "csv" and wandb["init_args"]["name"] is None


# ------------------------------------------------------------------------------- 8. unknown keys
def test_an_abbreviated_or_unknown_key_is_refused(tiny_model_dir, capsys):
    message = _error(capsys, "fit", "--config", QUICKSTART, f"--model.model_path={tiny_model_dir}",
                     "--trainer.max_step", "2")
    assert message == ("archer fit: unrecognized arguments: --trainer.max_step 2; did you mean --trainer.max_step → "
                       "--trainer.max_steps? (`archer fit --help` lists the options)")


def test_an_unknown_command_names_the_commands(capsys):
    message = _error(capsys, "fitt", "--config", QUICKSTART)
    assert message.startswith("archer: no command 'fitt'; did you mean 'fit'? The commands: fit, validate, eval, ")


def test_val_files_null_is_accepted(tiny_model_dir, capsys):
    assert _resolved(capsys, tiny_model_dir, "--data.val_files", "null")["data"]["val_files"] is None


# ---------------------------------------------------------------------------- 3. one run directory
def _cli(tmp_path, model_dir: str, *args: str) -> ArcherCLI:
    return ArcherCLI(ArcherModule, PromptDataModule, run=False,
                     args=["--config", QUICKSTART, f"--model.model_path={model_dir}", *args])


def test_one_flag_moves_every_output_of_the_run(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _cli(tmp_path, tiny_model_dir, "--trainer.default_root_dir", "elsewhere/run1")
    trainer = cli.trainer
    assert Path(trainer.default_root_dir) == Path("elsewhere/run1")
    assert Path(trainer.logger.log_dir) == Path("elsewhere/run1/csv/version_0")  # metrics, token views, completions
    assert Path(trainer.checkpoint_callback.dirpath) == tmp_path / "elsewhere" / "run1" / "checkpoints"
    assert cli.config["trainer"]["logger"]["init_args"]["save_dir"] == "elsewhere/run1"  # what config.yaml keeps


def test_a_reference_to_no_setting_is_an_error_naming_both(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"trainer.logger.init_args.save_dir: \$\{trainer.root\} refers to no setting"):
        _cli(tmp_path, tiny_model_dir, "--trainer.logger.init_args.save_dir=${trainer.root}")


# -------------------------------------------------------------- 8. file data on top of the quickstart
def test_train_files_replace_the_synthetic_task_and_a_missing_reward_says_what_to_set(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "train.jsonl", '{"prompt": "copy 3", "answer": "3"}\n{"prompt": "copy 5", "answer": "5"}\n')
    cli = _cli(tmp_path, tiny_model_dir, "--data.train_files=[train.jsonl]")
    assert cli.datamodule.task is None and cli.datamodule.train_files == ["train.jsonl"]
    message = _error(capsys, "fit", "--config", QUICKSTART, f"--model.model_path={tiny_model_dir}",
                     "--data.train_files=[train.jsonl]")
    assert message.startswith("archer fit: model.reward is not set, and rows read from data.train_files need one: "
                              "e.g. --model.reward=archer.rewards.MathReward")
    assert not (tmp_path / "runs").exists()  # refused before anything was written


# ------------------------------------------------------------------------------- 7. archer --help
def test_archer_help_lists_every_command_with_a_line(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "eval", "report", "compare", "data", "export", "tiny-model"):
        line = next((line for line in out.splitlines() if line.strip().startswith(command + " ")), None)
        assert line is not None and len(line.split()) > 3, (command, out)


def test_tiny_model_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["tiny-model", "--help"])
    out = capsys.readouterr().out
    listed = out.split("positional arguments:", 1)[1]  # after the usage lines
    for option in ("out_dir", "--seed", "--hidden-size", "--num-layers", "--num-heads", "--tie-word-embeddings"):
        # The option's entry: its line and the indented lines under it; beyond the option and its
        # metavar (upper case), some words of help.
        entry = re.search(rf"^  {re.escape(option)}\b.*(\n {{6,}}\S.*)*", listed, re.M).group(0)
        words = [w for w in entry.split() if w != option and not w.isupper()]
        assert len(words) >= 3, (option, entry)


def test_references_are_dotted_keys_latex_is_left_alone_and_double_dollar_escapes():
    from jsonargparse import Namespace

    from archer.config_refs import resolve_references

    config = Namespace(trainer=Namespace(default_root_dir="runs/x"), n=3,
                       template="Let ${n}$ be; see ${trainer.default_root_dir}; $${trainer.default_root_dir}; $${x}^2$$")
    resolve_references(config)
    assert config.template == "Let ${n}$ be; see runs/x; ${trainer.default_root_dir}; $${x}^2$$"
    chain = Namespace(**{f"k{i}": Namespace(v=f"${{k{i + 1}.v}}") for i in range(8)}, k8=Namespace(v="end"))
    resolve_references(chain)  # a chain of 8 references resolves (the limit)
    assert chain.k0.v == "end"
