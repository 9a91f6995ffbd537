"""The one prompt formatter, shared by training, evaluation and generation."""

from __future__ import annotations

from collections.abc import Mapping

from harness.data.config import TemplateConfig

DEFAULT_TEMPLATE = TemplateConfig()


def format_prompt(record: Mapping[str, str], template: TemplateConfig | Mapping[str, str] | None = None) -> str:
    """Everything the model sees before the response: `Instruction [+ Context]` and the response header.

    `record` needs `instruction`; `context` is optional and its section is left out when it is empty or only
    whitespace. `template` is a `TemplateConfig` (or a mapping with its fields, e.g. `cfg.data.template`);
    None is the default template. Training appends the response (and EOS) to exactly this text.
    """
    t = DEFAULT_TEMPLATE if template is None else template
    get = t.get if isinstance(t, Mapping) else lambda key: getattr(t, key)
    context = record.get("context") or ""
    parts = [get("preamble"), get("instruction_header"), record["instruction"]]
    if context.strip():
        parts += [get("context_header"), context]
    parts.append(get("response_header"))
    return "".join(parts)
