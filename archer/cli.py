"""The ``archer`` command.

    archer fit --config configs/quickstart.yaml        # LightningCLI: fit | validate
    archer fit --config X.yaml --print_config           # the config as parsed (${...} references unresolved)
    archer fit --config X.yaml --ckpt_path last         # resume from the newest checkpoint
    archer fit --config X.yaml --trainer.default_root_dir runs/other   # every output of the run elsewhere
    archer fit --config X.yaml --trainer.callbacks+=my_callbacks.PrintReward   # one more callback
    archer eval | report | compare | data | export | tiny-model ...   # the tools (archer/cli_tools.py)
    archer --help                                       # every command with a line each
    archer ... --verbose                                # a failure's full traceback

Your own modules import from the working directory, as with ``python -m``: a config's
``class_path: my_rewards.ContainsAnswer`` finds ``./my_rewards.py``. A class path that does not
import, a key that does not exist (or is abbreviated: ``--trainer.max_step``), a bad value, a bad data
row or a missing file is reported in one line (:mod:`archer.cli_errors`), Ctrl-C without a traceback.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import shutil
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

import yaml

# jsonargparse's action for typed settings; private, so tests/test_cli_config.py pins the behaviour built on it.
from jsonargparse._typehints import ActionTypeHint
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from archer.cli_errors import USER_ERRORS, describe
from archer.cli_tools import TOOLS, run_tool
from archer.config_refs import resolve_references
from archer.data import PromptDataModule
from archer.module import FSDP2_HINT, ArcherModule

__all__ = ["ArcherCLI", "COMMANDS", "main"]

log = logging.getLogger(__name__)

COMMANDS = {
    "fit": "train: archer fit --config configs/quickstart.yaml (--ckpt_path last resumes)",
    "validate": "pass@k of a checkpoint on the config's validation sets (--ckpt_path CKPT)",
    **TOOLS,
}
"""Every command of ``archer``, with the line ``archer --help`` prints for it."""

VERBOSE = "ARCHER_VERBOSE"
"""Set (to 1) by ``--verbose``; in the environment, so that the ranks a DDP launch starts inherit it."""


class _ListReplaces(ActionTypeHint):
    """A list given for a setting (a later config file, ``--trainer.callbacks=[...]``) replaces what was
    there: each item starts from its own class's defaults. jsonargparse otherwise merges a new list into
    the earlier value item by item, and keeps the ``init_args`` a new item's class shares with the
    earlier item's class (a ``SampleLogger`` added where the quickstart has ``TokenViewCallback
    {every_n_steps: 50}`` ran with 50; a ``WandbLogger`` listed after the quickstart's single
    ``CSVLogger`` was named ``csv``). Appending (``callbacks+:`` in a file, ``--trainer.callbacks+=``)
    and editing one item (``--trainer.callbacks.init_args.X``) are unchanged."""

    def _check_type(self, value, append=False, cfg=None, mode=None):
        if not append and cfg is not None and cfg.get(self.dest) is not None and _is_list(value):
            cfg = cfg.clone()
            cfg[self.dest] = None
        return super()._check_type(value, append=append, cfg=cfg, mode=mode)


def _is_list(value: object) -> bool:
    """A list, or a command-line string that reads as one (``--trainer.callbacks='[...]'``)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return False
    return isinstance(value, list)


_STARTED_ONLY = {"config.yaml", "hparams.yaml"}
"""What a log folder holds when its run stopped before the first batch."""


class _SaveConfig(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback`` (``config.yaml`` in the log folder), which also removes the log
    folder of a run that failed before its first batch: it holds only ``config.yaml`` / ``hparams.yaml``,
    and ``archer report`` and ``archer compare`` would take it for a version of the run."""

    _batch_done = False

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self._batch_done = True

    def on_validation_batch_end(self, *args, **kwargs) -> None:
        self._batch_done = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self._batch_done or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:  # the loggers' own folders: trainer.log_dir would be a collective
            folder = Path(logger.log_dir) if getattr(logger, "log_dir", None) else None
            if folder is not None and folder.is_dir() and {p.name for p in folder.iterdir()} <= _STARTED_ONLY:
                shutil.rmtree(folder)


class ArcherCLI(LightningCLI):
    """LightningCLI over :class:`ArcherModule` and :class:`PromptDataModule`, with ``fit`` and ``validate``."""

    def __init__(self, *args, **kwargs) -> None:
        # main() passes the words it read from sys.argv (without --verbose) explicitly, as tests do.
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended to run from within")
        strict = {"exit_on_error": False, "allow_abbrev": False}  # errors raised (one line in main); no abbreviations
        kwargs["parser_kwargs"] = {**strict, "fit": strict, "validate": strict, **kwargs.get("parser_kwargs", {})}
        kwargs.setdefault("save_config_callback", _SaveConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # ArcherModule has no test or predict step.
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        # The datamodule tokenizes prompts with the actor's own tokenizer.
        parser.link_arguments("model.model_path", "data.tokenizer_path")
        for action in parser._actions:
            if type(action) is ActionTypeHint:
                action.__class__ = _ListReplaces

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            subcommand = next((a for a in args or [] if a in self.subcommands()), None)
            options = getattr(self, "_subcommand_parsers", {}).get(subcommand, parser)
            raise ArgumentError(None, _suggest(str(error), options)) from error

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        resolve_references(config)
        # Refuse FSDP1 before the Trainer exists: on a CPU Lightning's own error would only say
        # "requires a GPU", and on a GPU the module refuses it later, after the models are built.
        strategy = config.get("trainer", {}).get("strategy")
        name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", "") or ""
        if name.split(".")[-1] == "FSDPStrategy" or name.startswith("fsdp"):
            raise ValueError(f"trainer.strategy={name!r}: Lightning's FSDP1 is not supported; {FSDP2_HINT}")
        data = config.get("data")
        if data is not None and data.get("train_files") and data.get("task") is not None:
            # Files on top of a config with a synthetic task (the quickstart's): the files are the data.
            log.warning("data.train_files given: the synthetic task %s is not used",
                        data.task.class_path.split(".")[-1])
            data.task = None

    def before_fit(self) -> None:
        self._check_reward()
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path is None:
            _refuse_used_checkpoint_dirs(self.trainer)

    def before_validate(self) -> None:
        self._check_reward()

    def _check_reward(self) -> None:
        if self.model.reward is None and getattr(self.datamodule, "task", None) is None:
            raise ValueError(
                "model.reward is not set, and rows read from data.train_files need one: e.g. "
                "--model.reward=archer.rewards.MathReward (math answers), archer.rewards.ExactMatchReward, "
                "archer.rewards.CodeReward (tests) or your own class (README: Your own reward)"
            )


def _suggest(message: str, parser) -> str:
    """``message`` with, for each unrecognized option, the option it most likely meant."""
    given = re.findall(r"(--[\w.]+)", message.partition("unrecognized arguments:")[2])
    known = [option for action in parser._actions for option in action.option_strings]
    guesses = [f"{option} → {match[0]}" for option in given
               if (match := difflib.get_close_matches(option, known, n=1, cutoff=0.8))]
    return message + (f"; did you mean {', '.join(guesses)}?" if guesses else "")


def _refuse_used_checkpoint_dirs(trainer) -> None:
    """A new run (no ``--ckpt_path``) must not write into another run's checkpoint folder: Lightning would
    write ``last-v1.ckpt`` beside its ``last.ckpt``, and ``--ckpt_path last`` later resumes whichever is newer."""
    for callback in trainer.checkpoint_callbacks:
        folder = Path(callback.dirpath) if isinstance(callback, ModelCheckpoint) and callback.dirpath else None
        if folder is not None and folder.is_dir() and (found := sorted(p.name for p in folder.glob("*.ckpt"))):
            raise FileExistsError(
                f"{folder} holds checkpoints of an earlier run ({', '.join(found[:3])}"
                f"{', ...' if len(found) > 3 else ''}): resume it with --ckpt_path last, or start a new run in "
                "another folder with --trainer.default_root_dir DIR (or delete the old one)"
            )


def _print_commands() -> None:
    width = max(map(len, COMMANDS))
    print("usage: archer COMMAND [options]   (archer COMMAND --help for a command's options)\n\ncommands:")
    for name, line in COMMANDS.items():
        print(f"  {name:<{width}}  {line}")
    print("\noptions of every command:\n  --verbose  on a failure, the full traceback (not one line)")


def _fit(words: list[str]) -> None:
    # Both are by design here: the frozen reference stays in eval mode, and a checkpoint holds the
    # weights after the step's update (resume continues from them, with the matching data state).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    # Lightning's own use of a deprecated torch API; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Our IterableDatasets (the prompt stream, the val shards) yield whole batches in the main process.
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    ArcherCLI(ArcherModule, PromptDataModule, args=words)


def main(argv: list[str] | None = None) -> None:
    """Entry point; ``argv`` is for calling from Python (tests), the console script reads ``sys.argv``.

    A user's mistake ends in ``SystemExit`` with its one-line message (:mod:`archer.cli_errors`),
    Ctrl-C in ``SystemExit(130)``; with ``--verbose`` (or ``ARCHER_VERBOSE=1``) exceptions propagate.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    verbose_before = os.environ.get(VERBOSE)
    if "--verbose" in words:
        words.remove("--verbose")
        os.environ[VERBOSE] = "1"  # for the ranks a DDP launch starts during the run
    verbose = os.environ.get(VERBOSE) == "1"
    command = words[0] if words and not words[0].startswith("-") else ""
    if command and command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        raise SystemExit(f"archer: no command {command!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                         + f" The commands: {', '.join(COMMANDS)} (`archer --help`)")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # own modules import from the working directory, as with `python -m`
        sys.path.insert(0, cwd)
    try:
        if not words or words[0] in ("-h", "--help"):
            _print_commands()
        elif command in TOOLS:
            run_tool(words)
        else:
            _fit(words)
    except KeyboardInterrupt:
        if verbose:
            raise
        resume = " (run the same command again to resume)" if command == "eval" else ""
        print(f"\narcher {command}: interrupted{resume}".replace("archer : ", "archer: "), file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as error:
        if verbose:
            raise
        traceback_hint = "" if isinstance(error, ArgumentError) else _traceback_hint(error)
        raise SystemExit(describe(error, command) + traceback_hint) from error
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
        if verbose_before is None:
            os.environ.pop(VERBOSE, None)


def _traceback_hint(error: BaseException) -> str:
    """Write ``error``'s traceback to a file and name it: the one-line message stays short, and an error
    raised hours into a run (which may be a bug, not a mistake) keeps its traceback without a rerun with
    ``--verbose``. Where the file cannot be written (the error may be a full disk), say how to see it."""
    import tempfile
    import traceback

    try:
        with tempfile.NamedTemporaryFile("w", prefix="archer-error-", suffix=".log", delete=False) as file:
            file.write("".join(traceback.format_exception(error)))
    except OSError:
        return "  (--verbose shows the traceback)"
    return f"  (traceback: {file.name})"


if __name__ == "__main__":
    main()
