"""Archer vs TRL's ``GRPOTrainer`` on the same job, runs alternated in one invocation.

    python benchmarks/bench_trl.py --setup            # once: create benchmarks/.venv-trl (below)
    python benchmarks/bench_trl.py [--steps 300] [--rounds 2] [--pair archer|dapo]

The job is the CPU quickstart (``configs/quickstart.yaml``, read by this script): the tiny model
folder ``archer tiny-model`` writes (one folder, used by both), the digit-copy task
(``DigitCopyTask``, its own ``score`` is the reward on both sides), 16 prompts × 8 samples per
step, 4 new tokens at temperature 1, AdamW (lr 5e-4, betas 0.9/0.999, no weight decay, gradient
norm clip 1) with Archer's warmup (factor (step+1)/5 for 5 steps, then 1; TRL gets the same
``LambdaLR``), one optimizer step per RL step, float32, seed 0.

Same prompts: the script draws ``--steps`` batches from Archer's own ``PromptDataModule`` stream
(the order ``archer fit`` trains on), and TRL gets them as a dataset in that order
(``shuffle_dataset=False``) as the rendered (chat-template) text; the TRL side checks that its own
tokenization (``processing_class(text=...)``, what GRPOTrainer does) gives Archer's token ids and the
table reports how many matched. Loss pairs (``--pair``):

* ``archer`` (default): the quickstart's ``ArcherLoss`` (paper defaults, KL 0.001 on knowledge
  tokens) vs TRL ``loss_type="dapo"``, ``beta=0.001``, ε 0.2;
* ``dapo``: Archer's ``DAPOLoss`` (token-mean, clip 0.2/0.28, dual clip 10, no KL) vs TRL
  ``dapo``, ``beta=0``, ε 0.2 / ε_high 0.28, ``delta=10``.

Measured per run: seconds per step (median of the intervals between consecutive step ends, steps 3
onwards; a Lightning callback and a ``TrainerCallback`` take the timestamps, so both count the
whole loop: sampling, scoring, log-probs, update, logging), and the mean reward over the first and
the last 10% of the steps. Validation, checkpoints and progress bars are off on both sides.

Two environments, two processes. TRL (and its accelerate/datasets) must never become an Archer
dependency, so it lives in ``benchmarks/.venv-trl`` (gitignored), made by ``--setup`` as::

    python -m venv benchmarks/.venv-trl
    benchmarks/.venv-trl/bin/pip install torch==2.13.0          # first: the CPU wheel, no CUDA torch
    benchmarks/.venv-trl/bin/pip install trl==1.16.0 transformers==5.19.0 -e .   # Archer for its task/reward

Archer runs from the interpreter that runs this script (Archer's own venv, as ``install.sh`` makes
it: ``python -m archer.cli fit``), TRL from ``.venv-trl`` (this file with ``--trl-worker``); each run
is a fresh process, alternating Archer, TRL, TRL, Archer, ... so neither inherits the other's warm
state and load drifts hit both. The torch and transformers versions of both environments are
printed and must agree. TRL 1.16.0 and transformers 5.19.0 are what docs/measured.md compared by hand.
Prints a table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
TRL_VENV = BENCH_DIR / ".venv-trl"
TRL_PYTHON = TRL_VENV / "bin" / "python"
TRL_PINS = ["trl==1.16.0", "transformers==5.19.0"]
WARMUP_STEPS_SKIPPED = 2


class StepTimer(L.Callback):
    """Writes the wall-clock time at the end of every training batch (RL step) to ``path`` (JSON)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps({"step_ends": self.ends}))


# ------------------------------------------------------------------------------------- setup
def setup_venv() -> None:
    """Create ``benchmarks/.venv-trl``: torch first (the local CPU wheel), then TRL and Archer."""
    pip = [str(TRL_PYTHON), "-m", "pip", "install", "--quiet"]
    for command in ([sys.executable, "-m", "venv", str(TRL_VENV)], pip + ["torch==2.13.0"],
                    pip + TRL_PINS + ["-e", str(ROOT)]):
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)


def versions(python: str) -> dict[str, str]:
    code = ("import json, torch, transformers; v = {'torch': torch.__version__, 'transformers': transformers.__version__}\n"
            "try:\n import trl; v['trl'] = trl.__version__\nexcept ImportError: pass\nprint(json.dumps(v))")
    return json.loads(subprocess.run([python, "-c", code], check=True, capture_output=True, text=True).stdout)


# ------------------------------------------------------------------------------------ the job
def prompt_stream(config: dict, model_dir: Path, steps: int) -> list[list[dict]]:
    """The first ``steps`` prompt batches of Archer's train stream for this config (as ``archer fit`` sees them)."""
    from archer.data import PromptDataModule

    data = dict(config["data"])
    task_spec = data.pop("task")
    module, _, name = task_spec["class_path"].rpartition(".")
    task = getattr(importlib.import_module(module), name)(**task_spec.get("init_args", {}))
    datamodule = PromptDataModule(tokenizer_path=str(model_dir), task=task, **data)
    stream = iter(datamodule.train_dataloader())
    return [next(stream) for _ in range(steps)]


def archer_config(base: dict, args: argparse.Namespace, model_dir: Path, out: Path) -> dict:
    """configs/quickstart.yaml with the benchmark's model folder and steps, no validation, checkpoints,
    token view or progress bar, and a step timer; ``--pair dapo`` swaps in ``DAPOLoss``."""
    config = json.loads(json.dumps(base))
    trainer = config["trainer"]
    trainer.update({"max_steps": args.steps, "enable_checkpointing": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "limit_val_batches": 0,
                    "callbacks": [{"class_path": "bench_trl.StepTimer", "init_args": {"path": str(out / "steps.json")}}],
                    "default_root_dir": str(out)})
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "csv"}}
    trainer.pop("plugins", None)  # the atomic checkpoint writer: no checkpoints here
    config["model"]["model_path"] = str(model_dir)
    if args.pair == "dapo":
        config["model"]["loss"] = {"class_path": "archer.losses.DAPOLoss", "init_args": {"loss_agg": "token-mean"}}
    config["data"]["val_size"] = 0
    return config


def run_archer(base: dict, args: argparse.Namespace, model_dir: Path, out: Path) -> dict:
    import yaml

    from _common import read_step_metrics

    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(archer_config(base, args, model_dir, out)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "archer.cli", "fit", "--config", str(out / "config.yaml")],
                          cwd=out, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"archer fit failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    steps = read_step_metrics(out)
    phases = {key: statistics.median(steps[f"time/{key}_s"].iloc[WARMUP_STEPS_SKIPPED:])
              for key in ("rollout", "logprob", "update")}
    return {"step_ends": json.loads((out / "steps.json").read_text())["step_ends"],
            "rewards": steps["train/reward_mean"].tolist(), "phases": phases}


def run_trl(args: argparse.Namespace, model_dir: Path, prompts: Path, quickstart: Path, out: Path) -> dict:
    out.mkdir(parents=True)
    command = [str(TRL_PYTHON), str(Path(__file__).resolve()), "--trl-worker", "--model", str(model_dir),
               "--prompts", str(prompts), "--config", str(quickstart), "--out", str(out),
               f"--steps={args.steps}", f"--pair={args.pair}"]
    done = subprocess.run(command, cwd=out, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"TRL failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return json.loads((out / "result.json").read_text())


# --------------------------------------------------------------------------------- TRL worker
def trl_worker(args: argparse.Namespace) -> None:
    """Runs in benchmarks/.venv-trl: GRPOTrainer on the prompts Archer's stream gave, in that order."""
    import torch
    import yaml
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    config = yaml.safe_load(Path(args.config).read_text())
    model_cfg, sampling, optim = config["model"], config["model"]["sampling"], config["model"]["optim"]
    task_spec = config["data"]["task"]
    module, _, name = task_spec["class_path"].rpartition(".")
    task = getattr(importlib.import_module(module), name)(**task_spec.get("init_args", {}))
    rows = [json.loads(line) for line in Path(args.prompts).read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # What GRPOTrainer does with a string prompt (``_tokenize_prompts``), against Archer's ids.
    ids = tokenizer(text=[row["prompt"] for row in rows])["input_ids"]
    matched = sum(list(mine) == row["prompt_ids"] for mine, row in zip(ids, rows))

    def reward(completions: list[str], answer: list[str], **_) -> list[float]:
        return [task.score(completion, {"answer": a}) for completion, a in zip(completions, answer)]

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, train_args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    dapo = args.pair == "dapo"
    n = sampling["n"]
    batch_size = config["data"]["batch_size"]
    training = GRPOConfig(
        output_dir=str(Path(args.out) / "trl"), max_steps=args.steps, per_device_train_batch_size=batch_size * n,
        gradient_accumulation_steps=1, num_generations=n, num_iterations=1, max_completion_length=sampling["max_new_tokens"],
        temperature=sampling["temperature"], top_p=1.0, top_k=0, loss_type="dapo", beta=0.0 if dapo else 0.001,
        epsilon=0.2, epsilon_high=0.28 if dapo else None, delta=10.0 if dapo else None,
        learning_rate=optim["lr"], weight_decay=optim["weight_decay"], max_grad_norm=optim["max_grad_norm"],
        shuffle_dataset=False, seed=config["seed_everything"], use_cpu=True, bf16=False, logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32},
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim["lr"], betas=(0.9, 0.999), weight_decay=optim["weight_decay"])
    warmup = optim["warmup_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / warmup if step < warmup else 1.0)
    timer = Timer()
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=training, processing_class=tokenizer, callbacks=[timer],
        train_dataset=Dataset.from_list([{"prompt": row["prompt"], "answer": row["answer"]} for row in rows]),
        optimizers=(optimizer, scheduler),
    )
    trainer.train()
    rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    result = {"step_ends": timer.ends, "rewards": rewards, "prompts_matched": matched, "prompts": len(rows)}
    (Path(args.out) / "result.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------------------- main
def summary(run: dict) -> dict:
    """Median s/step (steps 3..) and the mean reward over the first and last 10% of the steps."""
    ends, rewards = run["step_ends"], run["rewards"]
    intervals = [b - a for a, b in zip(ends, ends[1:])][WARMUP_STEPS_SKIPPED - 1 :]
    tenth = max(1, len(rewards) // 10)
    return {"s_per_step": statistics.median(intervals), "first": statistics.mean(rewards[:tenth]),
            "last": statistics.mean(rewards[-tenth:]), "steps": len(rewards)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="RL steps per run (= optimizer steps)")
    parser.add_argument("--rounds", type=int, default=2, help="Archer/TRL pairs, alternated")
    parser.add_argument("--pair", choices=["archer", "dapo"], default="archer", help="which losses face each other")
    parser.add_argument("--setup", action="store_true", help="create benchmarks/.venv-trl, then run")
    parser.add_argument("--no-record", action="store_true", help="print the table only (no RESULTS.md append)")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(args)
        return
    if args.setup:
        setup_venv()
    if not TRL_PYTHON.exists():
        raise SystemExit(f"{TRL_VENV} does not exist: run `python benchmarks/bench_trl.py --setup` once (see the docstring)")
    import yaml

    from _common import append_results, load_average, machine_line, markdown_table, section
    from archer.tiny import write_tiny_model

    load_at_start = load_average()
    ours, theirs = versions(sys.executable), versions(str(TRL_PYTHON))
    if (ours["torch"], ours["transformers"]) != (theirs["torch"], theirs["transformers"]):
        print(f"warning: the environments differ: Archer {ours}, TRL {theirs}")
    quickstart = ROOT / "configs" / "quickstart.yaml"
    base = yaml.safe_load(quickstart.read_text())
    runs: dict[str, list[dict]] = {"Archer": [], "TRL": []}
    with tempfile.TemporaryDirectory(prefix="bench_trl-") as tmp:
        work = Path(tmp)
        model_dir = write_tiny_model(work / "tiny-model")
        prompts = work / "prompts.jsonl"
        with prompts.open("w") as f:
            for batch in prompt_stream(base, model_dir, args.steps):
                for item in batch:
                    f.write(json.dumps({"prompt": item["prompt_text"], "prompt_ids": item["prompt_ids"],
                                        "answer": item["row"]["answer"]}) + "\n")
        for round_index in range(args.rounds):
            order = ("Archer", "TRL") if round_index % 2 == 0 else ("TRL", "Archer")
            for name in order:
                out = work / f"{name}-{round_index}"
                start = time.perf_counter()
                run = run_archer(base, args, model_dir, out) if name == "Archer" else run_trl(args, model_dir, prompts, quickstart, out)
                run.update(summary(run), wall_s=time.perf_counter() - start, load=os.getloadavg()[0])
                runs[name].append(run)
                print(f"round {round_index} {name}: {run['s_per_step']:.3f} s/step, reward {run['first']:.3f} -> "
                      f"{run['last']:.3f}, wall {run['wall_s']:.0f} s, load {run['load']:.1f}", flush=True)

    median = {name: statistics.median(run["s_per_step"] for run in r) for name, r in runs.items()}
    labels = {"archer": ("`ArcherLoss` (quickstart), KL 0.001", "`loss_type=dapo`, β 0.001"),
              "dapo": ("`DAPOLoss` token-mean, no KL", "`loss_type=dapo`, β 0, ε_high 0.28, δ 10")}[args.pair]
    rows = []
    for name, label in zip(("Archer", "TRL"), labels):
        r = runs[name]
        rows.append([f"{name}: {label}", " / ".join(f"{run['s_per_step']:.3f}" for run in r), f"{median[name]:.3f}",
                     " / ".join(f"{run['first']:.3f} → {run['last']:.3f}" for run in r),
                     " / ".join(f"{run['wall_s']:.0f}" for run in r)])
    phases = runs["Archer"][-1]["phases"]
    trl = runs["TRL"][0]
    tenth = max(1, args.steps // 10)
    command = "python benchmarks/bench_trl.py " + " ".join(a for a in sys.argv[1:] if a != "--setup")
    text = section(
        "Archer vs TRL GRPOTrainer, the quickstart job",
        machine_line(load_at_start) + "  \n" + f"Command: `{command.strip()}`",
        f"Archer: {sys.executable} (torch {ours['torch']}, transformers {ours['transformers']}); TRL {theirs.get('trl')}: "
        f"benchmarks/.venv-trl (torch {theirs['torch']}, transformers {theirs['transformers']}). Job: configs/quickstart.yaml "
        f"(tiny Qwen2 from `archer tiny-model`, DigitCopyTask, 16 prompts × 8 samples, 4 new tokens, AdamW lr 5e-4 with "
        f"Archer's 5-step warmup on both, float32), {args.steps} steps per run, {args.rounds} run(s) each, alternated; "
        f"TRL got Archer's prompt stream in order ({trl['prompts_matched']}/{trl['prompts']} prompts tokenized to "
        f"Archer's ids). s/step: median interval between step ends, steps {WARMUP_STEPS_SKIPPED + 1}..{args.steps}; "
        f"reward: mean over the first → last {tenth} steps (10%).",
        markdown_table(["run", "s/step per run", "median s/step", "reward first 10% → last 10%", "wall s per run"], rows,
                       align="lrrrr"),
        f"Archer/TRL s/step: **{median['Archer'] / median['TRL']:.2f}** (target ≤ 0.8, issue 22). Archer's phases (last run, "
        f"medians): rollout {phases['rollout']:.3f} s, log-probs {phases['logprob']:.3f} s, update {phases['update']:.3f} s.",
    )
    append_results(text, record=not args.no_record)


if __name__ == "__main__":
    main()
