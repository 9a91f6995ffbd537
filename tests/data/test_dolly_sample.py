"""The embedded sample: reproduced byte for byte by its generator, Dolly-shaped, and its answers are right."""

import re
from collections import Counter

from harness.data.records import embedded_sample_path, load_local_file
from tools.make_dolly_sample import CATEGORY_COUNTS, SEED, generate_records, sample_bytes
from harness.data import encode_example

DOLLY_CATEGORIES = {
    "open_qa", "general_qa", "classification", "closed_qa", "brainstorming", "information_extraction",
    "summarization", "creative_writing",
}


def test_generator_reproduces_the_committed_file_exactly():
    assert sample_bytes(SEED) == embedded_sample_path().read_bytes()


def test_other_seeds_give_other_records():
    assert generate_records(SEED + 1)[:50] != generate_records(SEED)[:50]


def test_sample_covers_dolly_categories_with_and_without_context():
    records = load_local_file(embedded_sample_path()).records  # validates every record
    counts = Counter(r["category"] for r in records)
    assert set(counts) == DOLLY_CATEGORIES and counts == CATEGORY_COUNTS
    with_context = Counter(r["category"] for r in records if r["context"])
    assert {"closed_qa", "information_extraction", "summarization", "classification"} <= set(with_context)
    assert 0.2 < sum(with_context.values()) / len(records) < 0.6
    assert len({(r["instruction"], r["context"]) for r in records}) > 0.8 * len(records)  # few duplicates


def test_most_records_fit_in_256_tokens(tokenizer):
    records = load_local_file(embedded_sample_path()).records[::10]
    lengths = [len(encode_example(r, tokenizer, 100_000)["input_ids"]) for r in records]
    assert sum(n <= 256 for n in lengths) / len(lengths) > 0.95


def test_rule_based_answers_are_correct():
    checked = Counter()
    for r in generate_records():
        instruction, response = r["instruction"], r["response"]
        if m := re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", instruction):
            a, op, b = int(m[1]), m[2], int(m[3])
            value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
            assert response == f"{a} {op} {b} equals {value}."
            checked["arithmetic"] += 1
        elif instruction.startswith("Reverse the order of these words: "):
            assert response.split() == instruction.split(": ", 1)[1].split()[::-1]
            checked["reverse"] += 1
        elif instruction.startswith("Sort these words in alphabetical order: "):
            assert response.split(", ") == sorted(instruction.split(": ", 1)[1].split(", "))
            checked["sort"] += 1
        elif instruction.startswith("Which of these numbers are even? "):
            numbers = [int(n) for n in instruction.split("? ")[1].split(", ")]
            assert all(str(n) in response for n in numbers if n % 2 == 0)
            checked["even"] += 1
        elif r["category"] == "summarization":
            assert r["context"].startswith(response)
            checked["summary"] += 1
    assert min(checked.values()) > 50 and len(checked) == 5
