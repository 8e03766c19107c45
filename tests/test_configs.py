"""Every shipped YAML parses against the code (``--print_config``), and the CPU ones run a step."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def test_configs_exist():
    names = {c.name for c in CONFIGS}
    assert {"quickstart.yaml", "archer_math_1.5b.yaml", "dapo_math_1.5b.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_print_config_resolves(config, tiny_model_dir):
    out = subprocess.run(
        [sys.executable, "-m", "archer.cli", "fit", "--config", str(config), "--print_config",
         f"--model.model_path={tiny_model_dir}"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    resolved = yaml.safe_load(out.stdout)
    # the link from the model path to the datamodule's tokenizer holds for every config
    assert resolved["model"]["model_path"] == tiny_model_dir
    assert resolved["model"]["loss"]["class_path"].startswith("archer.losses.")
