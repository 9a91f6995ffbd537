"""The one prompt template: Instruction [+ Context] -> Response."""

from hydra import compose, initialize_config_dir
from pathlib import Path

import harness.schema  # noqa: F401  (registers the data schema the YAML files extend)
from harness.data import DEFAULT_TEMPLATE, TemplateConfig, format_prompt
from harness.data.dataset import template_of

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def test_context_section_only_when_context_is_not_empty():
    with_context = format_prompt({"instruction": "Summarize.", "context": "A long text.", "response": "x"})
    assert with_context == "### Instruction:\nSummarize.\n\n### Context:\nA long text.\n\n### Response:\n"
    for empty in ("", "   \n", None):
        prompt = format_prompt({"instruction": "Say hi.", "context": empty})
        assert prompt == "### Instruction:\nSay hi.\n\n### Response:\n"
    assert format_prompt({"instruction": "Say hi."}) == "### Instruction:\nSay hi.\n\n### Response:\n"


def test_prompt_never_contains_the_response():
    record = {"instruction": "Name a fruit.", "context": "", "response": "UNIQUE-ANSWER"}
    assert "UNIQUE-ANSWER" not in format_prompt(record)


def test_template_strings_come_from_the_config():
    template = TemplateConfig(
        preamble="You are helpful.\n", instruction_header="Q: ", context_header="\nC: ", response_header="\nA:\n"
    )
    record = {"instruction": "Why?", "context": "Because."}
    assert format_prompt(record, template) == "You are helpful.\nQ: Why?\nC: Because.\nA:\n"
    as_mapping = {"preamble": "", "instruction_header": "Q: ", "context_header": "\nC: ", "response_header": "\nA:\n"}
    assert format_prompt(record, as_mapping) == "Q: Why?\nC: Because.\nA:\n"


def test_yaml_templates_compose_and_override():
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        for option in ("dolly", "dolly_sample"):
            cfg = compose("train", overrides=[f"data={option}"])
            assert template_of(cfg.data) == DEFAULT_TEMPLATE
        cfg = compose("train", overrides=["data.template.preamble=Be brief."])
        assert format_prompt({"instruction": "Hi"}, cfg.data.template).startswith("Be brief.### Instruction:\nHi")
