"""The part of a response a reward grades: the text after the reasoning block.

Reasoning models (DeepSeek-R1 and its distills, the paper's base model) think first and close
the thinking with a marker (``</think>``) before writing the final answer. The official Archer
reward grades only what follows the marker, so a ``\\boxed{}`` guess or a code draft inside the
thinking is not mistaken for the answer.

When the marker is absent (a response cut at the length limit mid-thought, or a model that does
not think in tags) the whole response is graded, as the official reward does: it splits on the
marker when present and otherwise keeps the full text. A response with several markers is graded
after the LAST one (the official code takes the text after the first, up to the second: the two
agree whenever there is one marker).
"""

from __future__ import annotations

DEFAULT_THINK_END = "</think>"
"""The end-of-thinking marker of DeepSeek-R1 / R1-Distill models."""


def after_thinking(response: str, think_end: str | None) -> str:
    """The text after the last ``think_end`` in ``response``; the whole response when the marker is
    absent or ``think_end`` is None or empty (grading disabled for markers)."""
    if not think_end:
        return response
    position = response.rfind(think_end)
    return response if position < 0 else response[position + len(think_end) :]
