"""A tiny, randomly initialised causal LM and a character-level tokenizer, built offline.

Tests and the CPU quickstart use these: nothing is downloaded. The model is a Qwen2 architecture
(the family of the paper's DeepSeek-R1-Distill-Qwen-1.5B) so the same code paths — HF
``generate``, vLLM, FSDP wrapping of decoder layers — run on it. vLLM's CPU attention needs a head
dimension of at least 32, hence ``hidden_size // num_heads >= 32``.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
# Every printable ASCII character is one token; no merges, so digit-level arithmetic is learnable.
CHARACTERS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable-unicode map, which byte-level BPE vocabularies are written in.

    Printable bytes map to themselves; the others (space, newline, ...) to code points from U+0100
    on, so a space is stored as "Ġ" and a newline as "Ċ", exactly as in Qwen's vocabulary.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    shifted = [b for b in range(256) if b not in keep]
    mapping = {b: chr(b) for b in keep}
    mapping.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return mapping


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with Qwen-style chat markers and a chat template.

    It is a byte-level BPE with no merges, the format of Qwen's own tokenizer: ``AutoTokenizer``
    may load the folder as ``Qwen2Tokenizer`` (the model is a Qwen2), which rebuilds the pipeline
    from the vocabulary as byte-level BPE, so any other format would lose spaces and newlines.
    """
    alphabet = _byte_level_alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({alphabet[ord(c)]: len(SPECIAL_TOKENS) + i for i, c in enumerate(CHARACTERS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=PAD_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=None,
        unk_token=PAD_TOKEN,
        additional_special_tokens=[BOS_TOKEN],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    vocab_size: int,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM (float32)."""
    if hidden_size // num_heads < 32:
        raise ValueError(
            f"hidden_size // num_heads = {hidden_size // num_heads}; vLLM's CPU attention needs >= 32"
        )
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def write_tiny_model(out_dir: str | Path, *, seed: int = 0, **model_kwargs) -> Path:
    """Write a tiny model + tokenizer as a Hugging Face folder that ``from_pretrained`` and vLLM load."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_tiny_model(
        len(tokenizer),
        seed=seed,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **model_kwargs,
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
