"""README commands do what the README says they do."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_loss_swap_gives_the_dapo_settings(tiny_model_dir):
    """The README's "swap the loss" flags, on the quickstart (an Archer config), give DAPO's
    token-mean and clip-higher, not the Archer preset's seq-mean-token-mean (jsonargparse carries
    settings the two classes share across a class_path change)."""
    readme = (ROOT / "README.md").read_text()
    flags = re.search(r"Swap the loss with `([^`]+)`", readme).group(1).split()
    out = subprocess.run(
        [sys.executable, "-m", "archer.cli", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
         f"--model.model_path={tiny_model_dir}", *flags, "--print_config"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    loss = yaml.safe_load(out.stdout)["model"]["loss"]
    assert loss["class_path"] == "archer.losses.DAPOLoss"
    assert loss["init_args"]["loss_agg"] == "token-mean" and loss["init_args"]["clip"] == [0.2, 0.28]
