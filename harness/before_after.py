"""The model's answers before fine-tuning beside its answers after: what a run changed, shown, not just scored.

Before the first step (the adapters start as the identity, so this is the base model) and after the last, the
model answers greedily (a) a few fixed validation prompts, shown side by side in the end-of-run summary, and
(b) the validation records whose answers can be checked exactly (`harness.exact_match`), scored per task.
The "before" sheet is saved in the run directory, so a resumed run still shows it.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness import exact_match

BEFORE_FILE = "answers_before.json"
AFTER_FILE = "answers_after.json"
EXTRA_TOKENS = 8  # an exact-match answer may run this many tokens past the reference's length before it is cut


@dataclass
class AnswerSheet:
    shown: list[dict]  # {"instruction", "context", "reference", "response"} for the fixed prompts
    scored: list[dict]  # {"instruction", "reference", "response", "task", "match"} for the exact-match records
    accuracy: dict[str, list[int]] = field(default_factory=dict)  # task -> [matches, records]; "all" included
    seconds: float = 0.0

    def exact_match(self, task: str = "all") -> float | None:
        hits, total = self.accuracy.get(task, (0, 0))
        return hits / total if total else None

    def save(self, path: Path) -> None:
        from models.atomic_files import atomic_write_text

        atomic_write_text(path, json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> "AnswerSheet | None":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as err:
            print(f"warning: {path}: unreadable ({err}); the before/after comparison is left out", file=sys.stderr)
            return None


def showcase_records(records: Sequence[Mapping[str, str]], count: int) -> list[Mapping[str, str]]:
    """The first `count` records of distinct categories (in order), so the shown prompts differ in kind."""
    chosen, seen = [], set()
    for record in records:
        if len(chosen) == count:
            break
        if record.get("category") not in seen:
            chosen.append(record)
            seen.add(record.get("category"))
    return chosen


def answer_sheet(
    model,
    tokenizer,
    shown: Sequence[Mapping[str, str]],
    scored: Sequence[Mapping[str, str]],
    *,
    template,
    max_new_tokens: int,
    progress: bool = True,
    desc: str = "answers",
) -> AnswerSheet:
    """Greedy answers to `shown` (up to `max_new_tokens` each) and to `scored` (each cut a few tokens past its
    reference's length: an exact match cannot be longer)."""
    from harness.generate import complete_batch

    start = time.perf_counter()
    records = [*shown, *scored]
    limits = [max_new_tokens] * len(shown) + [
        len(tokenizer.encode(r["response"], continuation=True)) + EXTRA_TOKENS for r in scored
    ]
    if progress:
        print(f"{desc}: {len(shown)} prompts + {len(scored)} exact-match records", file=sys.stderr)
    responses = complete_batch(model, tokenizer, records, template=template, max_new_tokens=limits)
    sheet = AnswerSheet(shown=[], scored=[])
    for record, response in zip(shown, responses[: len(shown)]):
        sheet.shown.append(
            {
                "instruction": record["instruction"],
                "context": record.get("context", ""),
                "reference": record["response"],
                "response": response,
            }
        )
    for record, response in zip(scored, responses[len(shown) :]):
        sheet.scored.append(
            {
                "instruction": record["instruction"],
                "reference": record["response"],
                "response": response,
                "task": exact_match.task_of(record),
                "match": exact_match.is_exact_match(response, record["response"]),
            }
        )
    accuracy = exact_match.accuracy_by_task(list(scored), [row["response"] for row in sheet.scored])
    sheet.accuracy = {task: list(counts) for task, counts in accuracy.items()}
    sheet.seconds = time.perf_counter() - start
    return sheet


def metrics(sheet: AnswerSheet, prefix: str) -> dict[str, float]:
    """`{prefix}/exact_match` (all) and `{prefix}/exact_match/<task>` for logging."""
    out = {}
    for task, (hits, total) in sorted(sheet.accuracy.items()):
        if total:
            out[f"{prefix}/exact_match" + ("" if task == "all" else f"/{task}")] = hits / total
    return out


def _clip(text: str, width: int, lines: int = 4) -> list[str]:
    wrapped = textwrap.wrap(" ".join(text.split()), width) or [""]
    return wrapped[:lines - 1] + [wrapped[lines - 1][: width - 1] + "…"] if len(wrapped) > lines else wrapped


def format_report(before: AnswerSheet | None, after: AnswerSheet, width: int = 116) -> str:
    """Each shown prompt with the reference, the base's and the fine-tuned model's answers; then exact match."""
    lines = []
    label = 12
    for i, row in enumerate(after.shown):
        lines.append(f"prompt {i + 1}".ljust(label) + _clip(row["instruction"], width - label)[0])
        answers = [("reference", row["reference"])]
        if before is not None and i < len(before.shown):
            answers.append(("before", before.shown[i]["response"]))
        answers.append(("after", row["response"]))
        for name, text in answers:
            for j, piece in enumerate(_clip(text, width - label)):
                lines.append(("  " + name if j == 0 else "").ljust(label) + piece)
    tasks = sorted(t for t in after.accuracy if t != "all") + ["all"]
    if after.accuracy:
        lines.append("exact match (validation records with one right answer; greedy)")
        for task in tasks:
            hits, total = after.accuracy[task]
            was = ""
            if before is not None and task in before.accuracy and before.accuracy[task][1]:
                b_hits, b_total = before.accuracy[task]
                was = f"{b_hits / b_total:6.1%} ({b_hits}/{b_total}) -> "
            lines.append(f"  {task:<20} {was}{hits / total:6.1%} ({hits}/{total})")
    return "\n".join(lines)
