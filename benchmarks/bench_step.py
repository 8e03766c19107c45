"""Time one RL step of the quickstart by phase: rollout, log-probs (old + reference), update
(and, with vLLM, the weight sync).

    python benchmarks/bench_step.py [--steps 12] [--rollout hf|vllm]

Runs the real ``archer fit`` on configs/quickstart.yaml in a temporary directory, reads the
per-step timings the module logs (``time/rollout_s``, ``time/logprob_s``, ``time/update_s``,
``perf/tokens_per_s``), skips the first two steps (warm-up), prints a table and appends it to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["time/rollout_s", "time/logprob_s", "time/update_s", "perf/tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rollout", choices=["hf", "vllm"], default="hf")
    args = parser.parse_args()

    from archer.cli import main as archer_main
    from archer.tiny import write_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / "tiny-model")
        config = ROOT / "configs" / ("quickstart.yaml" if args.rollout == "hf" else "quickstart_vllm.yaml")
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            archer_main(["fit", "--config", str(config), f"--model.model_path={model_dir}",
                         f"--trainer.max_steps={args.steps}", "--trainer.val_check_interval=100000"])
        finally:
            os.chdir(cwd)
        df = pd.read_csv(sorted(Path(tmp).glob("runs/quickstart*/csv/version_*/metrics.csv"))[-1])
    df = df.dropna(subset=["time/rollout_s"]).iloc[2:]
    # vLLM runs also push the weights into the engine after each step (WeightSyncCallback).
    timed = PHASES[:3] + (["time/weight_sync_s"] if "time/weight_sync_s" in df else [])
    medians = {phase: statistics.median(df[phase]) for phase in timed + PHASES[3:]}
    step_s = sum(medians[phase] for phase in timed)

    lines = [
        f"\n## One RL step of the quickstart by phase, {args.rollout} rollouts "
        f"({datetime.date.today().isoformat()})\n",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads).  ",
        f"Command: `python benchmarks/bench_step.py --steps {args.steps} --rollout {args.rollout}`  ",
        "Quickstart: tiny Qwen2 (hidden 128, 2 layers), 16 prompts x n=8, max 4 new tokens, Archer loss "
        f"with reference model; medians over steps 3..{args.steps}.\n",
        "| phase | median s | share |",
        "|---|---:|---:|",
    ]
    for phase in timed:
        lines.append(f"| {phase.removeprefix('time/').removesuffix('_s')} | {medians[phase]:.3f} | "
                     f"{medians[phase] / step_s:.0%} |")
    lines.append(f"| **step** | **{step_s:.3f}** | |")
    lines.append(f"\nThroughput: {medians['perf/tokens_per_s']:.0f} tokens/s (prompt + response tokens per step time).\n")
    text = "\n".join(lines)
    print(text)
    with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
