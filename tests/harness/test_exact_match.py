"""Which sample records can be scored exactly, the score, and the before/after report."""

import json

from harness import before_after, exact_match
from tools.make_dolly_sample import generate_records


def test_every_rule_task_of_the_sample_is_found_and_open_tasks_are_not():
    records = generate_records()
    tasks = {}
    for record in records:
        tasks.setdefault(exact_match.task_of(record), set()).add(record["category"])
    assert set(tasks) == {None, "arithmetic", "sorting", "rule_classification", "extraction"}
    assert tasks["arithmetic"] == {"general_qa"} and tasks["extraction"] == {"information_extraction"}
    assert tasks["rule_classification"] == {"classification"}
    # Open-ended categories are never scored.
    for category in ("creative_writing", "brainstorming", "summarization", "open_qa"):
        assert not any(exact_match.task_of(r) for r in records if r["category"] == category)
    # Words to sort or reverse are in the instruction, so the reference is checkable by rule.
    for record in records:
        if record["instruction"].startswith("Sort these words"):
            words = record["instruction"].split(": ", 1)[1].split(", ")
            assert record["response"] == ", ".join(sorted(words))


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match.is_exact_match("  7 times 9 equals 63.\n", "7 times 9 equals 63.")
    assert exact_match.is_exact_match("a  b", "a b")
    assert not exact_match.is_exact_match("7 times 9 equals 63", "7 times 9 equals 63.")
    assert not exact_match.is_exact_match("7 times 9 equals 63.\nAnd more", "7 times 9 equals 63.")
    assert not exact_match.is_exact_match("frostfin: fish glimmerwing: bird", "frostfin: fish\nglimmerwing: bird")


def test_accuracy_by_task_counts_each_task_and_all():
    records = [
        {"instruction": "What is 2 plus 3?", "response": "2 plus 3 equals 5."},
        {"instruction": "What is 4 times 3?", "response": "4 times 3 equals 12."},
        {"instruction": "Sort these words in alphabetical order: b, a", "response": "a, b"},
    ]
    counts = exact_match.accuracy_by_task(records, ["2 plus 3 equals 5.", "wrong", "a, b"])
    assert counts == {"arithmetic": (1, 2), "sorting": (1, 1), "all": (2, 3)}
    assert exact_match.checkable(records + [{"instruction": "Write a poem.", "response": "x"}], limit=2) == records[:2]


def test_showcase_prompts_differ_in_kind():
    records = [{"category": c, "instruction": str(i)} for i, c in enumerate("aabcb")]
    assert [r["instruction"] for r in before_after.showcase_records(records, 3)] == ["0", "2", "3"]


def test_report_puts_base_and_tuned_answers_side_by_side(tmp_path):
    shown = [{"instruction": "What is 2 plus 3?", "context": "", "reference": "2 plus 3 equals 5."}]
    before = before_after.AnswerSheet(shown=[{**shown[0], "response": "Five, I think"}], scored=[],
                                      accuracy={"arithmetic": [0, 4], "all": [1, 8]})
    after = before_after.AnswerSheet(shown=[{**shown[0], "response": "2 plus 3 equals 5."}], scored=[],
                                     accuracy={"arithmetic": [3, 4], "all": [6, 8]})
    text = before_after.format_report(before, after)
    assert "Five, I think" in text and "before" in text and "after" in text
    assert "0.0% (0/4) ->  75.0% (3/4)" in text and "12.5% (1/8) ->  75.0% (6/8)" in text
    assert before_after.metrics(after, "eval") == {"eval/exact_match": 0.75, "eval/exact_match/arithmetic": 0.75}
    before.save(tmp_path / "b.json")
    assert before_after.AnswerSheet.load(tmp_path / "b.json") == before
    (tmp_path / "bad.json").write_text("{not json")
    assert before_after.AnswerSheet.load(tmp_path / "bad.json") is None
    assert json.loads((tmp_path / "b.json").read_text())["accuracy"]["all"] == [1, 8]
