"""The token view: every token present, in order, with the training classifier's type; renders in chromium."""

from __future__ import annotations

import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from archer.algorithms import classify_tokens
from archer.token_view import render_token_view, write_token_view

CHROMIUM = Path("/usr/bin/chromium")


class TokenSpans(HTMLParser):
    """Collects (data-token, data-type, title, visible text) of every ``span.tok``."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[dict[str, str]] = []
        self._depth = 0  # >0 while inside a token span (it nests whitespace-glyph spans)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "span" and "tok" in attributes.get("class", "").split():
            self.tokens.append({**attributes, "text": ""})
            self._depth = 1
        elif tag == "span" and self._depth:
            self._depth += 1

    def handle_endtag(self, tag):
        if tag == "span" and self._depth:
            self._depth -= 1

    def handle_data(self, data):
        if self._depth:
            self.tokens[-1]["text"] += data


def make_samples() -> list[dict]:
    # Tokens chosen to stress escaping: HTML specials, quotes, whitespace, a newline, unicode.
    first_tokens = ["<b>", " ", "&amp;", '"q"', "\n", "x", "\t", "é", "'", "1"]
    # Entropies 0.1 … 1.0: the 0.8-quantile of 10 values is 0.1 + 0.8·9·0.1 = 0.82 (linear
    # interpolation between the 8th and 9th smallest, 0.8 and 0.9), so only 0.9 and 1.0 exceed it.
    first_entropy = [0.1 * (i + 1) for i in range(10)]
    second_tokens = ["a", "b", "c"]
    second_entropy = [2.0, 2.0, 2.0]  # all equal: every token is a knowledge token
    return [
        {"prompt": "1 < 2 & 3 > 2?", "tokens": first_tokens, "entropy": first_entropy, "reward": 1.0, "step": 7},
        {"prompt": "abc", "tokens": second_tokens, "entropy": second_entropy, "reward": 0.0, "step": 7},
    ]


def test_every_token_present_in_order_with_its_type() -> None:
    samples = make_samples()
    parser = TokenSpans()
    parser.feed(render_token_view(samples, rho=0.8))
    expected_tokens = [t for s in samples for t in s["tokens"]]
    assert [span["data-token"] for span in parser.tokens] == expected_tokens
    # Hand-computed types (see make_samples): only the last two tokens of sample 0 are reasoning.
    expected_types = ["knowledge"] * 8 + ["reasoning"] * 2 + ["knowledge"] * 3
    assert [span["data-type"] for span in parser.tokens] == expected_types
    # ... and they agree with the training code's classifier.
    for sample, offset in ((samples[0], 0), (samples[1], 10)):
        flags = classify_tokens(torch.tensor([sample["entropy"]]), torch.ones(1, len(sample["entropy"])), 0.8)[0]
        types = ["reasoning" if f else "knowledge" for f in flags.tolist()]
        assert [s["data-type"] for s in parser.tokens[offset : offset + len(types)]] == types
    assert parser.tokens[9]["title"].startswith("H=1.0000")
    # Whitespace is drawn, not lost: space, newline and tab have visible glyphs.
    assert parser.tokens[1]["text"] == "·"
    assert parser.tokens[4]["text"].startswith("↵")
    assert parser.tokens[6]["text"] == "→"
    assert parser.tokens[0]["text"] == "<b>"  # escaped, so shown as text rather than parsed as a tag


def test_self_contained_and_escapes_prompt() -> None:
    page = render_token_view(make_samples(), rho=0.8)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "1 &lt; 2 &amp; 3 &gt; 2?" in page


def test_malformed_sample_names_index_and_field() -> None:
    samples = make_samples()
    samples[1]["entropy"] = [1.0]
    with pytest.raises(ValueError, match=r"sample 1: 'tokens' has 3 entries but 'entropy' has 1"):
        render_token_view(samples, rho=0.8)
    del samples[0]["reward"]
    with pytest.raises(ValueError, match=r"sample 0: missing field 'reward'"):
        render_token_view(samples, rho=0.8)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed (apt-get install chromium)")
def test_renders_in_headless_chromium(tmp_path: Path) -> None:
    page = write_token_view(make_samples(), 0.8, tmp_path / "view.html")
    screenshot = tmp_path / "view.png"
    subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1000,700",
            page.resolve().as_uri(),
        ],
        check=True, capture_output=True, timeout=60,
    )
    assert screenshot.stat().st_size > 1000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
