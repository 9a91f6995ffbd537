"""Which validation records can be scored by exact match, and the score.

The embedded Dolly sample (written by `tools/make_dolly_sample.py`) has tasks with one right answer, written by rule: arithmetic
(sums, differences, products, unit conversions), word sorting and reversal, rule-based classification (even
numbers, creature classes by name, fruit/tool/color/instrument, review sentiment by its adjective) and
extraction from a context (years in order, name and birth year, occupation and home town, a pet's name and
kind). A response matches when it equals the reference after trimming surrounding whitespace and collapsing
runs of spaces: every character of the answer, its wording included, must be right.
Open questions, summaries, brainstorming and creative writing have no single right answer and are left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# Task name -> pattern of its instruction. Anchored at the start: the sample writes each task one way.
CHECKABLE_TASKS: dict[str, re.Pattern] = {
    "arithmetic": re.compile(r"^(What is \d+ (plus|minus|times) \d+\?|How many \w+ are there in \d+ \w+\?)$"),
    "sorting": re.compile(r"^(Sort these words in alphabetical order|Reverse the order of these words): "),
    "rule_classification": re.compile(
        r"^(Which of these numbers are even\?|Classify each of these creatures as |Is .+ a fruit, a tool, a color "
        r"or an instrument\?$|Classify the sentiment of this review as positive or negative\.$)"
    ),
    "extraction": re.compile(
        r"^(List every year mentioned in the text|From the text, extract the person's name and birth year"
        r"|Extract the occupation and the home town|What is the name of the pet in this text)"
    ),
}


def task_of(record: Mapping[str, str]) -> str | None:
    """The checkable task `record` belongs to, or None when its answer cannot be checked exactly."""
    instruction = record.get("instruction", "")
    for task, pattern in CHECKABLE_TASKS.items():
        if pattern.search(instruction):
            return task
    return None


def checkable(records: Iterable[Mapping[str, str]], limit: int | None = None) -> list[Mapping[str, str]]:
    """The records whose answers can be checked exactly, in their order, at most `limit` of them."""
    found = [r for r in records if task_of(r) is not None]
    return found if limit is None else found[:limit]


def normalize(text: str) -> str:
    return re.sub(r"[ \t]+", " ", text.strip())


def is_exact_match(generated: str, reference: str) -> bool:
    return normalize(generated) == normalize(reference)


def accuracy_by_task(records: list[Mapping[str, str]], responses: list[str]) -> dict[str, tuple[int, int]]:
    """Task -> (matches, records), plus "all"; `responses[i]` answers `records[i]`."""
    counts: dict[str, list[int]] = {}
    for record, response in zip(records, responses, strict=True):
        hit = int(is_exact_match(response, record["response"]))
        for key in (task_of(record) or "other", "all"):
            tally = counts.setdefault(key, [0, 0])
            tally[0] += hit
            tally[1] += 1
    return {key: (hits, total) for key, (hits, total) in counts.items()}
