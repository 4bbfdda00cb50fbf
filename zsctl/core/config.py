"""Stage options, declared once: each config field carries its default, help text and allowed values.

`zsctl/cli.py` generates every command's flags from these fields, YAML files and `key=value`
overrides become the same flags, and `Options.__post_init__` checks every value, so a bad number
fails as one line before a stage reads or creates anything, whichever way the config was built.

Field metadata (all optional): `help`; `flag` when the flag is not the field's name (`--for` for
`target`); `aliases`, old flag spellings still accepted but hidden from `--help`; `off`, the
negative flag of a boolean (`--lora/--full`; `--no-NAME` keeps working); `positional`, taken as
a command argument (and `--NAME`); `ge`/`gt`/`le`/`lt`, bounds of a number; `choices`.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, field, fields
from typing import Any

from zsctl.core.errors import BadInput
from zsctl.core.models import SMOLLM2_ALIAS

DEFAULT_MODEL = SMOLLM2_ALIAS  # the model every model option falls back to: it ships as a package

_BOUNDS = (
    ("ge", lambda v, b: v >= b, "at least"),
    ("gt", lambda v, b: v > b, "above"),
    ("le", lambda v, b: v <= b, "at most"),
    ("lt", lambda v, b: v < b, "below"),
)


def option(default: Any = MISSING, help: str = "", **meta: Any) -> Any:
    """A config field: its default (none = required), help text, and the metadata described above."""
    return field(default=default, metadata={"help": help, **meta})


def flag_of(f: Field) -> str:
    """The field's command-line flag, e.g. `--batch-size`."""
    return "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))


class Options:
    """Base of every stage config: each field's bounds and choices are checked on construction.
    A config with checks across fields extends `__post_init__` and calls this one first."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            check_value(f, getattr(self, f.name))


def check_value(f: Field, value: Any) -> None:
    m = f.metadata
    if value is None:
        return
    choices = m.get("choices")
    if choices is not None and value not in choices:
        raise BadInput(f"{flag_of(f)} '{value}' is not one of {', '.join(map(str, choices))}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for key, ok, words in _BOUNDS:
        if key in m and not ok(value, m[key]):  # NaN fails every bound
            raise BadInput(f"{flag_of(f)} {value} must be {words} {m[key]}")
