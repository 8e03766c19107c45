"""Prompt templates: fixed instructions wrapped around each problem text.

A template is a string with exactly one ``{prompt}`` placeholder, replaced by the problem text
(plain substitution, not ``str.format``: the braces of ``\\boxed{}`` need no escaping). For a
chat-message prompt the template is applied to the content of the last user message. The R1
recipe (DeepSeek-R1 and its distills, the paper's base model) is :data:`R1_MATH_TEMPLATE`; a
template may also be given by its name in :data:`TEMPLATES` (``r1-math``).
"""

from __future__ import annotations

__all__ = ["PLACEHOLDER", "R1_MATH_TEMPLATE", "TEMPLATES", "apply_prompt_template", "check_template", "resolve_template"]

PLACEHOLDER = "{prompt}"

R1_MATH_TEMPLATE = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{}."
"""DeepSeek-R1's recommended math instruction, after the problem."""

TEMPLATES = {"r1-math": R1_MATH_TEMPLATE}
"""Templates by name."""


def resolve_template(template: str) -> str:
    """The template ``template`` names (a key of :data:`TEMPLATES`), or ``template`` itself."""
    return TEMPLATES.get(template, template)


def check_template(template: str) -> None:
    """Raise ValueError unless ``template`` names a template or holds exactly one ``{prompt}``."""
    if resolve_template(template).count(PLACEHOLDER) != 1:
        raise ValueError(f"a prompt template needs exactly one {PLACEHOLDER!r} (or a name in {list(TEMPLATES)}); "
                         f"got {template!r}")


def apply_prompt_template(
    prompt: str | list[dict[str, str]], template: str | None
) -> str | list[dict[str, str]]:
    """``prompt`` with ``template`` around its text (a new list for messages); as is for None."""
    if template is None:
        return prompt
    check_template(template)
    template = resolve_template(template)
    if isinstance(prompt, str):
        return template.replace(PLACEHOLDER, prompt)
    users = [i for i, message in enumerate(prompt) if message["role"] == "user"]
    if not users:
        raise ValueError("a prompt template needs a user message to wrap; the messages have none")
    messages = [dict(message) for message in prompt]
    messages[users[-1]]["content"] = template.replace(PLACEHOLDER, messages[users[-1]]["content"])
    return messages
