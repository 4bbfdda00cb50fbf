"""Stage options, declared once: each config field carries its default, help text and allowed values.

`zsctl/cli.py` generates every command's flags from these fields, `to_flags` turns YAML files,
`key=value` overrides and old spellings into the same flags, and `Options.__post_init__` checks
every value, so a bad number fails as one line before a stage reads or creates anything, whichever
way the config was built.

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
SWITCHES = ("--json", "--quiet", "-q", "--help")  # options of every command that take no value

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

    # Checks of this machine rather than of the values (is a tracker's package installed?) run only
    # when this is true: `--dry-run` turns it off, as a GPU recipe is often checked on another box.
    check_environment = True

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            check_value(f, getattr(self, f.name))


def range_of(f: Field) -> str:
    """The field's bounds as click shows a range: `x>=1`, `x>0`, `0<=x<1` ('' when it has none)."""
    m = f.metadata
    low = f"{m['ge']}<=" if "ge" in m else f"{m['gt']}<" if "gt" in m else ""
    high = f"<={m['le']}" if "le" in m else f"<{m['lt']}" if "lt" in m else ""
    if not high and low:  # one-sided: x>=1, x>0
        return "x" + (f">={m['ge']}" if "ge" in m else f">{m['gt']}")
    return f"{low}x{high}" if low or high else ""


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


# --- command lines: YAML files, key=value overrides and old spellings → current flags ---------------


def _flags(cls) -> tuple[dict[str, Field], dict[str, str], set[str]]:
    """(key → field for every spelling of an option, old flag → current flag, flags that take no value)."""
    keys, renames, switches = {}, {}, set(SWITCHES)
    for f in fields(cls) if cls else ():
        flag = flag_of(f)
        for key in (f.name, flag[2:], *f.metadata.get("aliases", ())):
            keys[key] = keys[key.replace("-", "_")] = f
        for alias in f.metadata.get("aliases", ()):
            renames["--" + alias] = flag
        if f.metadata.get("positional"):
            renames[flag] = ""  # `--corpus X` is the argument X
        if f.type in ("bool", bool):
            off = "--" + (f.metadata.get("off") or "no-" + flag[2:])
            switches |= {flag, off, "--no-" + flag[2:]}
            renames["--no-" + flag[2:]] = off
    return keys, renames, switches


_TRUTH = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _as_options(pairs, keys: dict) -> list[str]:
    """(key, value) pairs → options: a field's current flag, `--flag/--no-flag` for booleans."""
    opts = []
    for k, v in pairs:
        f = keys.get(str(k))
        name = flag_of(f) if f else "--" + str(k).replace("_", "-")
        if f and f.type in ("bool", bool) and isinstance(v, str):  # `flag=false` on the command line
            if v.lower() not in _TRUTH:
                raise BadInput(f"{k}={v}: {name} is a switch; pass {k}=true or {k}=false")
            v = _TRUTH[v.lower()]
        if isinstance(v, bool):
            opts.append(name if v else "--" + ((f and f.metadata.get("off")) or "no-" + name[2:]))
        elif v is not None:
            value = ",".join(map(str, v)) if isinstance(v, list) else str(v)
            opts += [value] if f and f.metadata.get("positional") else [name, value]
    return opts


def to_flags(cls, args: list[str]) -> list[str]:
    """A command's arguments with `--config FILE.yaml`, `key=value` and old flag spellings turned into
    its current flags (`cls`: the command's config; None for a command without one).

    The YAML's options come first, the command line's own after them, so explicit flags and
    `key=value` pairs override the file (for options, the last one wins). Keys are field or option
    names with - or _ (`batch_size: 64`); `flag: true/false` → `--flag/--no-flag`. A `k=v` token is
    an override only where an option may stand (not as the value of `--out`) and only when k names
    an option of the command.
    """
    keys, renames, switches = _flags(cls)
    from_file: list[str] = []
    i = next((i for i, a in enumerate(args) if a == "--config" or a.startswith("--config=")), None)
    if i is not None:
        path = args[i][len("--config="):] if args[i] != "--config" else args[i + 1] if i + 1 < len(args) else ""
        if not path:
            raise BadInput("--config needs a YAML file path")
        from_file = _as_options(_read_yaml(path).items(), keys)
        args = args[:i] + args[i + (1 if args[i] != "--config" else 2):]
    out, overrides, takes_value = [], [], False
    for a in args:
        if not takes_value and "=" in a and not a.startswith("-") and a.split("=", 1)[0] in keys:
            overrides.append(a.split("=", 1))
            continue
        if not takes_value and a.startswith("--"):
            flag, eq, value = a.partition("=")
            a = renames.get(flag, flag) + eq + value
            if not a:  # a positional argument given as an option: its value follows
                continue
            if a.startswith("="):
                a = value
        out.append(a)
        takes_value = a.startswith("-") and "=" not in a and a not in switches and not takes_value
    return from_file + out + _as_options(overrides, keys)


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as e:
        raise BadInput(f"--config '{path}' cannot be read as YAML ({' '.join(str(e).split())[:160]})") from e
    if not isinstance(loaded, dict):
        raise BadInput(f"--config '{path}' must hold a mapping of option: value")
    return loaded
