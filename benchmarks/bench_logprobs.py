"""Peak memory and time: chunked vs naive log-prob + entropy (forward + backward), and policy-loss cost.

Each log-prob variant runs in its own fresh subprocess; its peak extra memory is the growth of the
process's resident high-water mark (``resource.getrusage(...).ru_maxrss``) from just after the
inputs exist to just after the backward, so it counts every temporary torch allocated on the way.

Usage::

    python benchmarks/bench_logprobs.py [--rows 1024] [--hidden 896] [--vocab 151936]

Appends a section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from archer.algorithms import clipped_policy_loss, dual_token_loss, token_logprobs_and_entropy

RESULTS = Path(__file__).with_name("RESULTS.md")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _naive(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a straightforward trainer does: full [rows, V] float32 logits, log_softmax, entropy on detached logits."""
    logits = hidden @ weight.t()
    log_probs = torch.log_softmax(logits, dim=-1)
    logprob = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logprob, entropy


def run_variant(variant: str, rows: int, hidden_size: int, vocab: int, chunk_size: int) -> dict[str, float]:
    """One measurement in this (fresh) process: forward + backward of ℓ and H over ``rows`` rows."""
    torch.manual_seed(0)
    hidden = (torch.randn(1, rows, hidden_size) * 0.1).requires_grad_()
    weight = (torch.randn(vocab, hidden_size) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (1, rows))
    baseline = _maxrss_mib()
    start = time.perf_counter()
    if variant == "naive":
        logprob, entropy = _naive(hidden[0], weight, targets[0])
    else:
        logprob, entropy = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=chunk_size)
    logprob.sum().backward()
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "peak_extra_mib": _maxrss_mib() - baseline, "entropy_mean": float(entropy.mean())}


def time_losses(batch: int, length: int, repeats: int = 10) -> dict[str, float]:
    """Median seconds of forward + backward of each policy loss on [batch, length].

    The losses are warmed up first and then timed interleaved, so a load spike on the shared
    machine hits both alike rather than whichever happens to run first.
    """
    generator = torch.Generator().manual_seed(0)
    old = -torch.rand(batch, length, generator=generator) * 2
    ref = old + 0.1 * torch.randn(batch, length, generator=generator)
    entropy = torch.rand(batch, length, generator=generator) * 3
    advantages = torch.randn(batch, generator=generator)
    mask = torch.rand(batch, length, generator=generator) < 0.9
    calls = {
        "clipped_policy_loss (+KL)": lambda lp: clipped_policy_loss(lp, old, advantages, mask, ref_logprob=ref, kl_coef=0.001, entropy=entropy),
        "dual_token_loss": lambda lp: dual_token_loss(lp, old, ref, advantages, entropy, mask),
    }
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for attempt in range(repeats + 2):  # the first two rounds warm up
        for name, call in calls.items():
            logprob = (old + 0.05 * torch.randn(batch, length, generator=generator)).requires_grad_()
            start = time.perf_counter()
            loss, _ = call(logprob)
            loss.backward()
            if attempt >= 2:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024, help="B*T rows")
    parser.add_argument("--hidden", type=int, default=896, help="hidden size H (896 = Qwen2.5-0.5B)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (Qwen2.5)")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.rows, args.hidden, args.vocab, args.chunk_size)))
        return

    command = f"python benchmarks/bench_logprobs.py --rows {args.rows} --hidden {args.hidden} --vocab {args.vocab} --chunk-size {args.chunk_size}"
    results = {}
    for variant in ("naive", "chunked"):
        child = [sys.executable, __file__, "--variant", variant] + [
            f"--rows={args.rows}", f"--hidden={args.hidden}", f"--vocab={args.vocab}", f"--chunk-size={args.chunk_size}"
        ]
        results[variant] = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
    logits_mib = args.rows * args.vocab * 4 / 2**20
    loss_times = time_losses(64, 1024)

    lines = [
        f"\n## Chunked log-prob + entropy vs naive ({datetime.date.today().isoformat()})\n",
        f"Machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end.  ",
        f"Command: `{command}`  ",
        f"Shape: B*T = {args.rows} rows, H = {args.hidden}, V = {args.vocab} (float32; one [rows, V] "
        f"float32 tensor = {logits_mib:.0f} MiB), chunk_size = {args.chunk_size}. Forward + backward to hidden "
        "and LM-head weight. Peak = growth of ru_maxrss in a fresh subprocess per variant.\n",
        "| variant | time (s) | peak extra memory (MiB) |",
        "|---|---|---|",
    ]
    for variant, figures in results.items():
        lines.append(f"| {variant} | {figures['seconds']:.2f} | {figures['peak_extra_mib']:.0f} |")
    lines += [
        "",
        "Policy losses, forward + backward on [64, 1024] (median of 10, interleaved after warm-up):\n",
        "| loss | time (ms) |",
        "|---|---|",
    ]
    lines += [f"| {name} | {seconds * 1e3:.1f} |" for name, seconds in loss_times.items()]
    section = "\n".join(lines) + "\n"
    print(section)
    with RESULTS.open("a") as results_file:
        results_file.write(section)


if __name__ == "__main__":
    main()
