"""The declared dependency lower bounds cover the APIs the code calls (a bound below them installs a
version that fails at run time, far from the install step)."""

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())

# package -> (the oldest version with every API Archer uses, what needs it)
NEEDED = {
    "torch": ("2.6", "torch.distributed.fsdp.fully_shard / MixedPrecisionPolicy / set_requires_gradient_sync public"),
    "transformers": ("4.56", "from_pretrained(dtype=...) (torch_dtype before)"),
    "lightning": ("2.4", "ModelParallelStrategy (FSDP2)"),
    "vllm": ("0.15", "reload_weights(weights_iterator=..., weights_path=...) in place, logprobs_mode"),
    "jsonargparse": ("4.41", "ActionTypeHint._check_type(..., mode=) (archer.cli's per-item list replacement, private API: "
                     "capped at the tested minor, 4.53)"),
    "peft": ("0.20", "transformers 5's add_adapter (MIN_PEFT_VERSION), ModulesToSaveWrapper.enable_adapters"),
}


def _lower_bound(requirement: str) -> Version:
    bounds = [Version(spec.version) for spec in Requirement(requirement).specifier if spec.operator in (">=", "==")]
    assert bounds, f"{requirement} has no lower bound"
    return min(bounds)


def _requirements() -> dict[str, str]:
    declared = list(PYPROJECT["project"]["dependencies"])
    declared += PYPROJECT["project"]["optional-dependencies"]["vllm"]
    declared += PYPROJECT["project"]["optional-dependencies"]["lora"]
    return {Requirement(r).name: r for r in declared}


@pytest.mark.parametrize("package", list(NEEDED))
def test_lower_bounds_are_the_versions_the_code_needs(package):
    version, reason = NEEDED[package]
    requirement = _requirements()[package]
    assert _lower_bound(requirement) >= Version(version), f"{requirement}: needs >= {version} for {reason}"


def test_the_private_jsonargparse_api_is_capped_at_a_tested_version():
    """archer.cli subclasses jsonargparse's private ActionTypeHint: an untested release must not install."""
    import inspect

    from jsonargparse._typehints import ActionTypeHint

    requirement = Requirement(_requirements()["jsonargparse"])
    assert any(spec.operator == "<" for spec in requirement.specifier), requirement
    assert "mode" in inspect.signature(ActionTypeHint._check_type).parameters
