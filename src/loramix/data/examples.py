"""The two kinds of example loramix trains and evaluates on."""

from __future__ import annotations

from dataclasses import dataclass

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # option labels: at most 26 choices per question


@dataclass
class MultipleChoiceExample:
    """A question with answer choices.

    Attributes:
        question: the bare question (no "Question:"/"Answer:" wrapper; templates add those).
        choices: the answer texts, at least two.
        gold: index of the correct choice in ``choices``.
        task: task name ("arc-e", or a user file's stem / its rows' ``task`` field).
        id: a stable identifier, e.g. "arc-e/validation/17".
    """

    question: str
    choices: list[str]
    gold: int
    task: str
    id: str


@dataclass
class InstructionExample:
    """An instruction-following row (alpaca style): loss goes on ``output``."""

    instruction: str
    input: str
    output: str
    task: str
    id: str


Example = MultipleChoiceExample | InstructionExample
