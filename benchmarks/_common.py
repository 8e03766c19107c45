"""Helpers shared by the benchmark scripts: the RESULTS.md section, a Qwen2.5-0.5B-shaped random
model with a tokenizer that covers its vocabulary, and reading a run's per-step metrics.

Not a benchmark itself (and not collected by pytest: benchmarks/ lies outside tests/).
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
import string
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")

QWEN25_05B = dict(
    vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
    max_position_embeddings=32_768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
)
"""Qwen2.5-0.5B's shapes (its 24 layers are chosen per benchmark: ``num_layers``)."""


# ------------------------------------------------------------------------------ RESULTS.md
def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, e.g. ``2.1 / 1.8 / 1.5``."""
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


def machine_line(load_at_start: str | None = None) -> str:
    """``Machine: …`` — CPU, core count, torch version and threads, load averages (1/5/15 min)."""
    import torch

    start = f"at the start {load_at_start}, " if load_at_start else ""
    return (f"Machine: {platform.machine()} CPU-only VM, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); load average (1/5/15 min) {start}at the end {load_average()}.")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A Markdown table; ``align`` holds one ``l`` or ``r`` per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    lines = ["| " + " | ".join(headers) + " |", rule]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def section(title: str, *paragraphs: str) -> str:
    """A RESULTS.md section: ``## title (date)`` then the paragraphs, blank-line separated."""
    return "\n".join([f"\n## {title} ({datetime.date.today().isoformat()})", "", "\n\n".join(paragraphs), ""])


def append_results(text: str, record: bool = True) -> None:
    """Print ``text`` and (``record``) append it to benchmarks/RESULTS.md (sections are never edited afterwards)."""
    print(text)
    if not record:
        return
    with RESULTS.open("a") as results:
        results.write(text + "\n")


# ------------------------------------------------------------------------ model and tokenizer
def _filler_words(count: int) -> list[str]:
    """``count`` distinct vocabulary entries that decode to a space and four letters ("Ġ" is a
    space in a byte-level vocabulary), so random token ids decode to text without digits."""
    letters = itertools.product(string.ascii_lowercase, repeat=4)
    return ["Ġ" + "".join(word) for word in itertools.islice(letters, count)]


def build_wide_tokenizer(vocab_size: int):
    """Archer's tiny character tokenizer (:func:`archer.tiny.build_tokenizer`: same specials, chat
    template, byte-level pipeline) with filler entries up to ``vocab_size`` tokens.

    Every id of a ``vocab_size`` model then decodes (vLLM detokenizes whatever id it samples); text
    still encodes character by character, since the fillers have no merges.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from archer.tiny import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, build_tokenizer

    tiny = build_tokenizer()
    spec = json.loads(tiny.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size {vocab_size} < the character tokenizer's {len(vocab)} tokens")
    vocab.update({word: len(vocab) + i for i, word in enumerate(_filler_words(vocab_size - len(vocab)))})
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
        bos_token=None, unk_token=PAD_TOKEN, additional_special_tokens=[BOS_TOKEN],
    )
    tokenizer.chat_template = tiny.chat_template
    return tokenizer


def write_qwen_shaped_model(out_dir: str | Path, num_layers: int, *, seed: int = 0, **overrides) -> Path:
    """A random Qwen2 with Qwen2.5-0.5B's shapes (:data:`QWEN25_05B`, tied embeddings, float32) and
    ``num_layers`` decoder layers, saved with :func:`build_wide_tokenizer` as a folder that
    transformers and vLLM load. ``overrides`` change any shape (e.g. ``vocab_size``)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shapes = {**QWEN25_05B, **overrides}
    tokenizer = build_wide_tokenizer(shapes["vocab_size"])
    config = Qwen2Config(
        **shapes, num_hidden_layers=num_layers, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def parameter_count(model_dir: str | Path) -> int:
    """Parameters of a saved model (tied weights counted once), from its safetensors headers."""
    total = 0
    for file in Path(model_dir).glob("*.safetensors"):
        with open(file, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for size in entry["shape"]:
                    count *= size
                total += count
    return total


# ------------------------------------------------------------------------------------ metrics
def read_step_metrics(run_dir: str | Path):
    """The per-RL-step rows (those with ``time/rollout_s``) of the newest ``metrics.csv`` under
    ``run_dir`` (Lightning's CSVLogger: ``…/csv/version_*/metrics.csv``), as a DataFrame."""
    import pandas as pd

    files = sorted(Path(run_dir).glob("**/version_*/metrics.csv"), key=lambda path: path.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}")
    frame = pd.read_csv(files[-1])
    return frame.dropna(subset=["time/rollout_s"]).reset_index(drop=True)
