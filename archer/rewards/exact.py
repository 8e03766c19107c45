"""Exact string match against ``row["answer"]`` (the synthetic tasks' reward)."""

from __future__ import annotations


class ExactMatchReward:
    """1.0 iff the response equals ``row["answer"]``, else 0.0.

    Args:
        strip: compare ``response.strip()`` with ``str(row["answer"]).strip()`` (leading and
            trailing whitespace, e.g. a final newline from the tokenizer, does not count).
    """

    def __init__(self, strip: bool = True) -> None:
        self.strip = strip

    def __call__(self, response: str, row: dict) -> float:
        if "answer" not in row:
            raise KeyError(f"ExactMatchReward needs row['answer']; the row has keys {sorted(row)}")
        answer = str(row["answer"])
        if self.strip:
            return float(response.strip() == answer.strip())
        return float(response == answer)
