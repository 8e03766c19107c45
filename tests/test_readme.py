"""README commands do what the README says they do."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _loss(tiny_model_dir, config, *flags):
    out = subprocess.run(
        [sys.executable, "-m", "archer.cli", "fit", "--config", str(ROOT / "configs" / config),
         f"--model.model_path={tiny_model_dir}", *flags, "--print_config"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return yaml.safe_load(out.stdout)["model"]["loss"]


def test_the_readme_loss_swap_gives_the_dapo_settings(tiny_model_dir):
    """The README's "swap the loss" flag gives DAPO's own token-mean and clip-higher on the quickstart
    (its loss names a class only), and on the 1.5B config (which writes out loss_agg) with the extra
    flag the README gives for it."""
    readme = (ROOT / "README.md").read_text()
    swap = re.search(r"Swap the loss with `([^`]+)`", readme).group(1).split()
    extra = re.search(r"there add `([^`]+)` for DAPO", readme).group(1).split()
    for config, flags in (("quickstart.yaml", swap), ("archer_math_1.5b.yaml", swap + extra)):
        loss = _loss(tiny_model_dir, config, *flags)
        assert loss["class_path"] == "archer.losses.DAPOLoss", config
        assert loss["init_args"]["loss_agg"] == "token-mean" and loss["init_args"]["clip"] == [0.2, 0.28], config
    # Without the extra flag the 1.5B config's written-out aggregation is kept, as the README warns.
    assert _loss(tiny_model_dir, "archer_math_1.5b.yaml", *swap)["init_args"]["loss_agg"] == "seq-mean-token-mean"
