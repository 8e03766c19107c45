"""Same results before and after a refactor: per-step training figures of three fixed-seed runs.

    python benchmarks/same_results.py record   # on the reference commit: writes same_results_baseline.json
    python benchmarks/same_results.py check    # after a change: compares, exit 1 on any difference

The runs (the CPU quickstart's tiny model and synthetic task, ``seed_everything: 0``):

1. ``quickstart``: ``configs/quickstart.yaml``, 30 RL steps.
2. ``dapo_epochs``: the quickstart with ``DAPOLoss`` (token-mean), ``ppo_epochs: 2``,
   ``mini_batch_size: 4``, ``micro_batch_size: 8``, ``dynamic_sampling: {refill: false}``, 12 steps
   (several optimizer steps per RL step, so ratios leave 1 and the clip acts).
3. ``ddp2``: the quickstart on 2 CPU ranks with DDP, 10 steps.

Figures compared per step: ``train/reward_mean`` (exactly), ``train/grad_norm``, ``train/pg_loss``,
``train/entropy``, ``train/approx_kl``, ``train/clipfrac`` (within ``--rtol``, default 1e-4, relative
to the larger magnitude, with an absolute floor of 1e-7 for values near 0). A change meant to alter
the figures says so and re-records the baseline in the same commit.

Each run is ``archer fit`` in a subprocess, in a temporary folder; about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = Path(__file__).with_name("same_results_baseline.json")
KEYS = ["train/reward_mean", "train/grad_norm", "train/pg_loss", "train/entropy", "train/approx_kl", "train/clipfrac"]
EXACT = {"train/reward_mean"}

COMMON = ["--trainer.val_check_interval=1000", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
          "--data.train_size=512"]
RUNS: dict[str, list[str]] = {
    "quickstart": ["--trainer.max_steps=30"],
    "dapo_epochs": [
        "--trainer.max_steps=12", "--model.loss.class_path=archer.losses.DAPOLoss",
        "--model.loss.init_args.loss_agg=token-mean", "--model.update.ppo_epochs=2",
        "--model.update.mini_batch_size=4", "--model.update.micro_batch_size=8",
        "--model.dynamic_sampling.refill=false",
    ],
    "ddp2": ["--trainer.max_steps=10", "--trainer.strategy=ddp", "--trainer.devices=2"],
}


def run(name: str, overrides: list[str], workdir: Path, model_dir: Path) -> dict[str, list[float]]:
    """Train one run in ``workdir``; its per-step figures (one list per key)."""
    import pandas as pd

    command = [sys.executable, "-m", "archer.cli", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
               f"--model.model_path={model_dir}", *COMMON, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if name == "ddp2" else os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    files = sorted(workdir.glob("runs/quickstart/csv/version_*/metrics.csv"))
    frame = pd.read_csv(files[-1]).dropna(subset=["train/reward_mean"])
    return {key: [float(v) for v in frame[key]] for key in KEYS}


def collect() -> dict[str, dict[str, list[float]]]:
    from archer.tiny import write_tiny_model

    results = {}
    with tempfile.TemporaryDirectory(prefix="same-results-") as tmp:
        model_dir = write_tiny_model(Path(tmp) / "tiny-model")
        for name, overrides in RUNS.items():
            workdir = Path(tmp) / name
            workdir.mkdir()
            results[name] = run(name, overrides, workdir, model_dir)
            print(f"{name}: {len(results[name][KEYS[0]])} steps, reward {results[name][KEYS[0]][:5]} ...", flush=True)
    return results


def differences(baseline: dict, current: dict, rtol: float) -> list[str]:
    """One line per figure that differs (exact keys exactly, the others beyond ``rtol``)."""
    found = []
    for name, runs in baseline.items():
        for key, expected in runs.items():
            got = current.get(name, {}).get(key)
            if got is None or len(got) != len(expected):
                found.append(f"{name} {key}: {len(expected)} steps expected, got {None if got is None else len(got)}")
                continue
            for step, (a, b) in enumerate(zip(expected, got)):
                if key in EXACT:
                    same = a == b
                else:
                    same = (math.isnan(a) and math.isnan(b)) or abs(a - b) <= max(rtol * max(abs(a), abs(b)), 1e-7)
                if not same:
                    found.append(f"{name} {key} step {step}: baseline {a!r}, now {b!r}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["record", "check"])
    parser.add_argument("--rtol", type=float, default=1e-4)
    args = parser.parse_args()
    current = collect()
    if args.mode == "record":
        BASELINE.write_text(json.dumps(current, indent=1) + "\n")
        print(f"wrote {BASELINE}")
        return
    found = differences(json.loads(BASELINE.read_text()), current, args.rtol)
    for line in found[:40]:
        print(line)
    baseline = json.loads(BASELINE.read_text())
    for name, runs in current.items():
        gaps = [abs(a - b) / max(abs(a), abs(b), 1e-30) for key in KEYS
                for a, b in zip(baseline[name][key], runs[key]) if a != b]
        print(f"{name}: {len(runs[KEYS[0]])} steps compared, {len(gaps)} figures not bit-identical"
              + (f" (largest relative gap {max(gaps):.2e})" if gaps else ""))
    if found:
        raise SystemExit(f"{len(found)} figures differ from {BASELINE.name}")
    print("same results: every figure of every run matches the baseline")


if __name__ == "__main__":
    main()
