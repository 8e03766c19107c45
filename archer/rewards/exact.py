"""Exact string match against ``row["answer"]`` (the synthetic tasks' reward)."""

from __future__ import annotations

from archer.rewards.reasoning import DEFAULT_THINK_END, after_thinking


class ExactMatchReward:
    """1.0 iff the response (after the reasoning block) equals ``row["answer"]``, else 0.0.

    Args:
        strip: compare ``response.strip()`` with ``str(row["answer"]).strip()`` (leading and
            trailing whitespace, e.g. a final newline from the tokenizer, does not count).
        think_end: end-of-thinking marker: only the text after its last occurrence is compared
            (the whole response when it is absent); None: always the whole response.
    """

    def __init__(self, strip: bool = True, think_end: str | None = DEFAULT_THINK_END) -> None:
        self.strip = strip
        self.think_end = think_end

    def __call__(self, response: str, row: dict) -> float:
        if "answer" not in row:
            raise KeyError(f"ExactMatchReward needs row['answer']; the row has keys {sorted(row)}")
        answer, response = str(row["answer"]), after_thinking(response, self.think_end)
        if self.strip:
            return float(response.strip() == answer.strip())
        return float(response == answer)

    def extract_answer(self, response: str, row: dict) -> str | None:
        """The compared text (stripped when ``strip``), for majority voting."""
        response = after_thinking(response, self.think_end)
        return response.strip() if self.strip else response
