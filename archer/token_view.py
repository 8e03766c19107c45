"""An HTML view of sampled responses, one ``<span>`` per token, coloured by the token's entropy.

Each token is typed as Archer types it during training (``archer.algorithms.classify_tokens``:
per response, reasoning ⇔ ``H_t > quantile_ρ(H)``, knowledge otherwise), so a reader can see
*which* tokens got the wide clip band and no KL. The page is self-contained: inline CSS, no
scripts, no network, so it opens from a run directory copied anywhere.

A sample is a dict::

    {"prompt": str, "tokens": list[str], "entropy": list[float], "reward": float, "step": int}

with ``entropy[t]`` (nats) the policy's entropy at response token ``tokens[t]``.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from archer.algorithms import classify_tokens

__all__ = ["entropy_colour", "pick_samples", "render_token_view", "validate_samples", "write_token_view"]

REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "prompt": str,
    "tokens": list,
    "entropy": list,
    "reward": (int, float),
    "step": int,
}

# Colour scale endpoints (low → high entropy): pale yellow to saturated red; black text stays
# readable on both ends.
LOW_RGB = (255, 255, 204)
HIGH_RGB = (227, 26, 28)

# Characters that are invisible or ambiguous when printed: each gets a visible glyph; the token's
# exact text is kept in ``data-token``.
VISIBLE_WHITESPACE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}

CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #111; background: #fff; }
.legend { display: flex; align-items: center; gap: 1em; margin-bottom: 1em; font-size: 0.9em; }
.bar { width: 240px; height: 14px; border: 1px solid #888;
       background: linear-gradient(to right, rgb%s, rgb%s); }
.sample { border: 1px solid #ccc; border-radius: 4px; padding: 0.8em; margin-bottom: 1.2em; }
.meta { font-size: 0.85em; color: #444; margin-bottom: 0.4em; }
.prompt { white-space: pre-wrap; font-family: monospace; background: #f4f4f4; padding: 0.4em;
          margin-bottom: 0.6em; }
.response { font-family: monospace; line-height: 1.9; white-space: pre-wrap; word-break: break-all; }
.tok { padding: 0 1px; border-radius: 2px; }
.tok.reasoning { border-bottom: 3px solid #1f3fbf; }
.tok.knowledge { border-bottom: 3px solid transparent; }
.ws { color: #999; }
.key-reasoning { border-bottom: 3px solid #1f3fbf; font-family: monospace; }
""" % (LOW_RGB, HIGH_RGB)


def validate_samples(samples: Sequence[dict[str, Any]]) -> None:
    """Raise a ``ValueError`` naming the sample index and field when a sample is malformed."""
    for index, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise ValueError(f"token view sample {index}: expected a dict, got {type(sample).__name__}")
        for field, expected in REQUIRED_FIELDS.items():
            if field not in sample:
                raise ValueError(f"token view sample {index}: missing field {field!r}")
            if not isinstance(sample[field], expected):
                raise ValueError(
                    f"token view sample {index}: field {field!r} has type {type(sample[field]).__name__}"
                )
        if len(sample["tokens"]) != len(sample["entropy"]):
            raise ValueError(
                f"token view sample {index}: 'tokens' has {len(sample['tokens'])} entries but "
                f"'entropy' has {len(sample['entropy'])}"
            )
        for t, value in enumerate(sample["entropy"]):
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"token view sample {index}: 'entropy'[{t}] = {value!r} is not a finite number")


def entropy_colour(entropy: float, max_entropy: float) -> str:
    """``rgb(...)`` linearly interpolated between LOW_RGB (H = 0) and HIGH_RGB (H ≥ max_entropy)."""
    fraction = 0.0 if max_entropy <= 0 else min(max(entropy / max_entropy, 0.0), 1.0)
    r, g, b = (round(lo + fraction * (hi - lo)) for lo, hi in zip(LOW_RGB, HIGH_RGB))
    return f"rgb({r}, {g}, {b})"


def _token_types(entropy: list[float], rho: float) -> list[str]:
    """"reasoning"/"knowledge" per token, from the training code's own classifier."""
    if not entropy:
        return []
    values = torch.tensor([entropy], dtype=torch.float64)  # [1, T]; float64 holds float32 entropies exactly
    mask = torch.ones_like(values, dtype=torch.long)
    is_reasoning = classify_tokens(values, mask, rho)[0].tolist()
    return ["reasoning" if flag else "knowledge" for flag in is_reasoning]


def _visible_text(token: str) -> str:
    """HTML for a token's text: escaped, with whitespace drawn as grey glyphs (newline also breaks)."""
    parts = []
    for char in token:
        if char in VISIBLE_WHITESPACE:
            parts.append(f'<span class="ws">{VISIBLE_WHITESPACE[char]}</span>')
            if char == "\n":
                parts.append("\n")
        else:
            parts.append(html.escape(char))
    return "".join(parts) if parts else '<span class="ws">∅</span>'


def _attribute(value: str) -> str:
    """Escape for a double-quoted attribute; newlines/tabs as character references so they survive."""
    return html.escape(value, quote=True).replace("\n", "&#10;").replace("\t", "&#9;").replace("\r", "&#13;")


def render_token_view(samples: Sequence[dict[str, Any]], rho: float) -> str:
    """A self-contained HTML page showing every sample's response tokens coloured by entropy.

    Args:
        samples: sample dicts (see the module docstring).
        rho: the run's token-typing quantile ρ: a token is a reasoning token when its entropy is
            strictly above its response's ρ-quantile.

    Each token is ``<span class="tok TYPE" data-type="TYPE" data-token="TEXT" title="H=...">``
    with TYPE ∈ {reasoning, knowledge}; the colour scale runs from 0 to the largest entropy
    over all samples.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    validate_samples(samples)
    max_entropy = max((max(s["entropy"]) for s in samples if s["entropy"]), default=0.0)
    body = []
    for index, sample in enumerate(samples):
        types = _token_types(sample["entropy"], rho)
        spans = []
        for token, entropy, token_type in zip(sample["tokens"], sample["entropy"], types):
            spans.append(
                f'<span class="tok {token_type}" data-type="{token_type}" data-token="{_attribute(token)}" '
                f'title="H={entropy:.4f} nats, {token_type}" '
                f'style="background: {entropy_colour(entropy, max_entropy)}">{_visible_text(token)}</span>'
            )
        num_reasoning = types.count("reasoning")
        body.append(
            f'<div class="sample" data-index="{index}">'
            f'<div class="meta">sample {index} · step {sample["step"]} · reward {sample["reward"]:g} · '
            f"{len(types)} tokens, {num_reasoning} reasoning</div>"
            f'<div class="prompt">{html.escape(sample["prompt"])}</div>'
            f'<div class="response">{"".join(spans)}</div></div>'
        )
    legend = (
        '<div class="legend"><span>entropy 0</span><div class="bar"></div>'
        f"<span>{max_entropy:.3f} nats</span>"
        f'<span><span class="key-reasoning">underlined</span> = reasoning token '
        f"(H &gt; per-response {rho:g}-quantile); others knowledge</span>"
        "<span>· space, ↵ newline, → tab; hover a token for its entropy</span></div>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Archer token view (rho={rho:g})</title><style>{CSS}</style></head>"
        f"<body><h1>Token entropy view</h1>{legend}{''.join(body)}</body></html>\n"
    )


def write_token_view(samples: Sequence[dict[str, Any]], rho: float, path: str | Path) -> Path:
    """Render :func:`render_token_view` to ``path`` (UTF-8), creating parent folders; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_token_view(samples, rho), encoding="utf-8")
    return out


def pick_samples(rollout, scores: Tensor, entropy: Tensor, rows: Tensor, tokenizer, *, group_size: int,
                 count: int, step: int) -> list[dict[str, Any]]:
    """Up to ``count`` samples (the dicts of the module docstring) from the rows ``rows`` ``[B]`` of
    ``rollout`` (an :class:`~archer.rollout.batch.RolloutBatch`) whose training-forward entropies are
    ``entropy`` ``[B, R]``, spread over prompts: the first response of each group, then the second, ..."""
    rows = rows.tolist()
    seen: dict[int, int] = defaultdict(int)
    order = []
    for j, row in enumerate(rows):
        order.append((seen[row // group_size], j))
        seen[row // group_size] += 1
    samples = []
    for _, j in sorted(order)[:count]:
        row = rows[j]
        length = int(rollout.response_mask[row].sum().item())
        ids = rollout.response_ids[row, :length].tolist()
        prompt_ids = rollout.input_ids[row, : rollout.prompt_len][rollout.attention_mask[row, : rollout.prompt_len] > 0]
        samples.append({
            "prompt": tokenizer.decode(prompt_ids.tolist()),
            "tokens": [tokenizer.decode([t]) for t in ids],
            "entropy": entropy[j, :length].float().tolist(),
            "reward": float(scores[row]),
            "step": step,
        })
    return samples
