"""The update phase under three micro-batching modes, on a long-tailed length distribution.

    python benchmarks/bench_update.py [--layers 4] [--prompts 8] [--n 4] [--max-new-tokens 384]
                                      [--micro-batch-size 4] [--rounds 1] [--steps 1]

What runs: the real ``archer fit`` (one subprocess per variant and round, so each has its own peak
memory) on a random model with Qwen2.5-0.5B's widths (vocabulary 151,936, hidden 896, MLP 4864,
14 query / 2 KV heads, tied embeddings, float32, sdpa attention) cut to ``--layers`` decoder layers,
with the paper's Archer loss (reference model included), one PPO epoch, one mini-batch. The rollout
engine is :class:`SyntheticLengthEngine`, a real ``RolloutEngine`` in this file: its responses are
random tokens whose lengths are log-normal (median = max/8, ``--sigma``, clipped to
``--max-new-tokens``, the same lengths for every variant); the prompts (a JSONL written here) have
log-normal lengths too. The three variants differ only in ``model.update``:

* ``fixed``: ``micro_batch_size`` rows per micro-batch, in the batch's order (each padded to its own
  longest prompt + longest response);
* ``budget``: ``micro_batch_tokens`` (default ``micro_batch_size`` × the longest possible sequence,
  so no micro-batch computes more positions than the fixed mode's worst case): rows grouped by
  length, longest first;
* ``packed``: the same budget with ``packing: on``: sequences concatenated without padding. On the
  CPU (sdpa) a packed row gets a block-diagonal mask, so attention computes (packed length)² scores.

Measured per variant (from the run's ``metrics.csv``): ``perf/pad_fraction`` and the computed-token
ratio 1 / (1 − pad) (computed positions / real tokens of the update's forward passes),
``time/update_s`` (the last ``--steps`` minus the first when ``--steps`` > 1, else step 1),
``perf/peak_memory_gb`` (the process's peak RSS: weights, AdamW state, reference, plus the largest
micro-batch's activations), and the attention scores computed (from the plan, via
``archer.micro_batches.split_rows``) relative to causal attention over the real tokens. A second
table gives the budget mode's pad fraction for other budgets (planning only, no model).
Variants alternate within each round; medians over rounds. Prints the tables and appends them to
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from archer.rollout import Completion, RolloutEngine, SamplingConfig

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
VARIANTS = ("fixed", "budget", "packed")
TEMPLATE_TOKENS = 19
"""Tokens the chat template adds around a prompt with Archer's tiny character tokenizer."""


class SyntheticLengthEngine(RolloutEngine):
    """Responses of random character tokens with log-normal lengths: ``exp(N(log median, sigma²))``
    rounded and clipped to ``[1, max_new_tokens]``; a response shorter than the maximum ends with
    EOS (``stop``), one at the maximum is ``length``. Seeded by ``sampling.seed``, so every variant
    of the benchmark gets the same lengths. No engine log-probs (like ``HFEngine``)."""

    logprobs_match_trainer = True

    def __init__(self, median: float = 48.0, sigma: float = 1.0, first_token: int = 3, last_token: int = 100,
                 record: str | None = None) -> None:
        self.median, self.sigma = median, sigma
        self.first_token, self.last_token = first_token, last_token
        self.record = record
        """A JSONL file to which each ``generate`` call appends its ``[prompt length, response length]`` rows."""
        self.eos_token_id: int | None = None

    def setup(self, actor: nn.Module | None, tokenizer, model_path: str) -> None:
        self.eos_token_id = tokenizer.eos_token_id

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        pass

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> list[list[Completion]]:
        generator = torch.Generator().manual_seed(sampling.seed or 0)
        lengths = response_lengths(len(prompt_token_ids) * sampling.n, self.median, self.sigma,
                                   sampling.max_new_tokens, generator)
        groups = []
        for p in range(len(prompt_token_ids)):
            group = []
            for length in lengths[p * sampling.n : (p + 1) * sampling.n].tolist():
                ids = torch.randint(self.first_token, self.last_token, (length,), generator=generator).tolist()
                finish = "length" if length == sampling.max_new_tokens else "stop"
                if finish == "stop":
                    ids[-1] = self.eos_token_id
                group.append(Completion(token_ids=ids, logprobs=None, finish_reason=finish))
            groups.append(group)
        if self.record:
            with open(self.record, "a") as f:
                f.write(json.dumps([[len(prompt_token_ids[i // sampling.n]), length]
                                    for i, length in enumerate(lengths.tolist())]) + "\n")
        return groups


class ParityReward:
    """1 for a response of odd length in characters, else 0: random but non-constant rewards, so
    advantages (and the policy-gradient term) are not all zero."""

    def __call__(self, response: str, row: dict) -> float:
        return float(len(response) % 2)


def response_lengths(count: int, median: float, sigma: float, maximum: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` log-normal lengths, rounded and clipped to ``[1, maximum]``."""
    draws = torch.exp(math.log(median) + sigma * torch.randn(count, generator=generator))
    return draws.round().clamp(1, maximum).long()


def write_prompts(path: Path, rows: int, median: float, maximum: int, seed: int) -> None:
    """JSONL of ``rows`` prompts of random letters with log-normal lengths (σ 0.5), clipped to [4, maximum]."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(median) + 0.5 * torch.randn(rows, generator=generator)).round().clamp(4, maximum)
    letters = "abcdefghijklmnopqrstuvwxyz "
    with path.open("w") as f:
        for length in lengths.long().tolist():
            text = "".join(letters[i] for i in torch.randint(0, len(letters), (length,), generator=generator).tolist())
            f.write(json.dumps({"prompt": text, "answer": "0"}) + "\n")


def variant_config(variant: str, args: argparse.Namespace, model_dir: Path, prompts: Path, out: Path) -> dict:
    """The ``archer fit`` config of one variant (they differ only in ``model.update``)."""
    update = {"ppo_epochs": 1, "mini_batch_size": 0, "micro_batch_size": args.micro_batch_size,
              "micro_batch_tokens": 0 if variant == "fixed" else args.micro_batch_tokens,
              "packing": "on" if variant == "packed" else "off", "logprob_chunk_size": 1024}
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": args.steps, "log_every_n_steps": 1,
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "csv"}},
        },
        "model": {
            "model_path": str(model_dir),
            "loss": {"class_path": "archer.losses.ArcherLoss"},  # the paper's defaults (KL to the reference)
            "reward": {"class_path": "bench_update.ParityReward"},
            "rollout": {"class_path": "bench_update.SyntheticLengthEngine",
                        "init_args": {"median": args.max_new_tokens / 8, "sigma": args.sigma,
                                      "record": str(out / "lengths.jsonl")}},
            "sampling": {"n": args.n, "temperature": 1.0, "max_new_tokens": args.max_new_tokens, "seed": 0},
            "optim": {"lr": 1.0e-6, "warmup_steps": 1},
            "update": update,
            "attn_implementation": "sdpa",
            "reward_workers": 1,
        },
        "data": {"train_files": [str(prompts)], "batch_size": args.prompts, "max_prompt_length": 4096, "seed": 0},
    }


def run_variant(variant: str, args: argparse.Namespace, model_dir: Path, prompts: Path, work: Path, tag: str) -> dict:
    """One ``archer fit`` of ``variant`` in a fresh process; its figures from ``metrics.csv``."""
    import yaml

    from _common import read_step_metrics

    out = work / f"{variant}-{tag}"
    config = out / "config.yaml"
    out.mkdir(parents=True)
    config.write_text(yaml.safe_dump(variant_config(variant, args, model_dir, prompts, out)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "archer.cli", "fit", "--config", str(config)], env=env, cwd=work,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    steps = read_step_metrics(out)
    timed = steps.iloc[1:] if len(steps) > 1 else steps
    pad = float(timed["perf/pad_fraction"].mean())
    return {
        "update_s": float(timed["time/update_s"].median()),
        "logprob_s": float(timed["time/logprob_s"].median()),
        "pad_fraction": pad,
        "peak_gb": float(steps["perf/peak_memory_gb"].max()),
        "update_tokens_per_s": float(timed["perf/update_tokens_per_s"].median()),
        "wall_s": wall,
        "load": os.getloadavg()[0],
    }


def planned_cost(lengths: torch.Tensor, micro_batches: list[torch.Tensor], packed: bool) -> tuple[int, int]:
    """(computed positions, attention scores) of the micro-batches over rows of ``lengths`` ``[N, 2]``:
    padded, rows × (longest prompt + longest response) positions and rows × that² scores; packed,
    Σ lengths positions and (Σ lengths)² scores (sdpa with a block-diagonal mask computes every score)."""
    positions = scores = 0
    for rows in micro_batches:
        part = lengths[rows]
        width = int(part.sum()) if packed else int(part[:, 0].max() + part[:, 1].max())
        count = 1 if packed else len(rows)
        positions, scores = positions + count * width, scores + count * width * width
    return positions, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (Qwen2.5-0.5B has 24)")
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (Qwen2.5: 151,936)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per RL step")
    parser.add_argument("--n", type=int, default=4, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=384, help="response cap; the median is a 1/8 of it")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of the response lengths")
    parser.add_argument("--prompt-median", type=int, default=32, help="median prompt length (characters = tokens)")
    parser.add_argument("--prompt-max", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rows per micro-batch of the fixed mode")
    parser.add_argument("--micro-batch-tokens", type=int, default=0,
                        help="the token budget; 0: micro-batch-size x (longest prompt + max new tokens)")
    parser.add_argument("--steps", type=int, default=1, help="RL steps per run (above 1, step 1 is a warm-up)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the three variants, alternated")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no-record", action="store_true", help="print the tables only (no RESULTS.md append)")
    args = parser.parse_args()
    sys.path.insert(0, str(BENCH_DIR))
    from _common import (append_results, load_average, machine_line, markdown_table, parameter_count, section,
                         write_qwen_shaped_model)
    from archer.micro_batches import split_rows

    load_at_start = load_average()
    longest = args.prompt_max + TEMPLATE_TOKENS + args.max_new_tokens
    args.micro_batch_tokens = args.micro_batch_tokens or args.micro_batch_size * longest
    results: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    with tempfile.TemporaryDirectory(prefix="bench_update-") as tmp:
        work = Path(tmp)
        model_dir = write_qwen_shaped_model(work / "model", args.layers, vocab_size=args.vocab)
        params = parameter_count(model_dir)
        prompts = work / "prompts.jsonl"
        write_prompts(prompts, args.prompts * args.steps * 4, args.prompt_median, args.prompt_max, seed=0)
        for round_index in range(args.rounds):
            order = args.variants if round_index % 2 == 0 else args.variants[::-1]
            for variant in order:
                figures = run_variant(variant, args, model_dir, prompts, work, f"r{round_index}")
                results[variant].append(figures)
                print(f"round {round_index} {variant}: {figures}", flush=True)
        # The timed steps' (prompt, response) lengths, as the engine saw them (the same in every run).
        recorded = (work / f"{args.variants[0]}-r0" / "lengths.jsonl").read_text().splitlines()
        steps = [torch.tensor(json.loads(line)) for line in recorded]
        steps = steps[1:] if len(steps) > 1 else steps

    def plan(lengths: torch.Tensor, **options) -> list[torch.Tensor]:
        return split_rows(torch.arange(len(lengths)), lengths, max_sequences=args.micro_batch_size, **options)

    def planned(**options) -> tuple[int, int, int]:
        """(micro-batches, computed positions, attention scores) summed over the timed steps."""
        totals = [0, 0, 0]
        for lengths in steps:
            micro_batches = plan(lengths, **options)
            positions, scores = planned_cost(lengths, micro_batches, options.get("packed", False))
            totals = [totals[0] + len(micro_batches), totals[1] + positions, totals[2] + scores]
        return tuple(totals)

    real = sum(int(lengths.sum()) for lengths in steps)
    causal_scores = sum(int((lengths.sum(-1) ** 2).sum()) for lengths in steps)
    plans = {
        "fixed": planned(),
        "budget": planned(max_tokens=args.micro_batch_tokens),
        "packed": planned(max_tokens=args.micro_batch_tokens, packed=True),
    }
    median = {v: {key: statistics.median(run[key] for run in runs) for key in runs[0]} for v, runs in results.items()}
    base = median.get("fixed")
    table_rows = []
    for variant in args.variants:
        m = median[variant]
        count, positions, scores = plans[variant]
        ratio = 1 / (1 - m["pad_fraction"])
        if abs(ratio - positions / real) > 0.01:
            print(f"warning: {variant}: measured computed/real {ratio:.3f} != planned {positions / real:.3f}")
        table_rows.append([
            f"{variant}" + ("" if variant == "fixed" else f" ({args.micro_batch_tokens} tokens)"),
            count,
            f"{m['pad_fraction']:.3f}",
            f"{ratio:.2f}",
            f"{scores / causal_scores:.2f}",
            f"{m['update_s']:.1f}",
            f"{base['update_s'] / m['update_s']:.2f}×" if base else "",
            f"{m['peak_gb']:.2f}",
            f"{m['peak_gb'] / base['peak_gb']:.2f}" if base else "",
            " / ".join(f"{run['update_s']:.1f}" for run in results[variant]),
        ])
    headers = ["variant", "micro-batches", "pad fraction", "computed / real tokens", "attention scores / Σ len²",
               "update s (median)", "speed-up vs fixed", "peak RSS GB", "peak vs fixed", "update s per round"]

    budget_rows = []
    for factor in (1, 2, 4, 8):
        budget = factor * longest
        count, positions, _ = planned(max_tokens=budget)
        budget_rows.append([f"{factor} × {longest} = {budget}", count, f"{1 - real / positions:.3f}"])

    command = "python benchmarks/bench_update.py " + " ".join(sys.argv[1:])
    lengths = torch.cat(steps)
    response = lengths[:, 1].float()
    text = section(
        "Update phase: fixed micro-batches vs token budget vs packing",
        machine_line(load_at_start) + "  \n" + f"Command: `{command.strip()}`",
        f"Model: random Qwen2 with Qwen2.5-0.5B widths (vocab {args.vocab}, hidden 896, MLP 4864, 14/2 heads, tied "
        f"embeddings) and {args.layers} layers ({params / 1e6:.0f}M parameters), float32, sdpa; Archer loss with "
        f"reference, 1 PPO epoch × 1 mini-batch, `archer fit` per variant (fresh process), "
        f"{args.rounds} round(s) alternated, {args.steps} RL step(s) per run"
        + (" (step 1 = warm-up, not timed)" if args.steps > 1 else "") + ". "
        f"Batch: {args.prompts} prompts × n={args.n} = {len(lengths)} sequences, {real} real tokens; responses "
        f"log-normal, median {args.max_new_tokens // 8} (max/8), σ {args.sigma}, clipped to {args.max_new_tokens} "
        f"(measured: mean {response.mean():.0f}, median {response.median():.0f}, max {response.max():.0f}, "
        f"{int((lengths[:, 1] == args.max_new_tokens).sum())} clipped); prompts {int(lengths[:, 0].min())}–"
        f"{int(lengths[:, 0].max())} tokens with the chat template. Fixed: {args.micro_batch_size} rows per "
        f"micro-batch; budget: {args.micro_batch_tokens} tokens ({args.micro_batch_tokens / longest:g} × the longest "
        f"possible sequence, {longest}). Peak RSS: the whole process (weights, grads, AdamW, reference, activations).",
        markdown_table(headers, table_rows),
        "Budget mode's pad fraction at other budgets (planning only, same lengths, `split_rows`):",
        markdown_table(["budget (tokens)", "micro-batches", "pad fraction"], budget_rows),
    )
    append_results(text, record=not args.no_record)


if __name__ == "__main__":
    main()
