"""The two failure kinds the CLI maps to exit codes, and the one way secrets are kept out of messages."""

import re


class BadInput(Exception):
    """Bad usage or bad input: exit code 2, one line naming the thing and what to do."""


class RunFailure(Exception):
    """A runtime failure (engine died mid-run, training diverged): exit code 1."""


# Credentials in a spec (`http://user:KEY@host/…`, `…?api_key=KEY`) are hidden before the spec is
# stored (manifests, rows, ledgers) or printed (error lines, summaries). Names are matched by whole
# words, so counts such as max_new_tokens or topk stay readable.
_SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "pwd", "auth", "credential",
                 "credentials", "signature", "sig"}
_USERINFO = re.compile(r"(://)([^/@\s:?#]*)(:[^/@\s?#]*)?@")
_PARAM = re.compile(r"([?&;])([^=&#;\s]+)=([^&#;\s'\"]*)")


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_WORDS & set(re.split(r"[_\-\s.]+", str(name).lower())))


def redact(text: str) -> str:
    """`text` with URL passwords and key-like query values replaced by ***."""
    if "@" in text:
        text = _USERINFO.sub(lambda m: f"{m[1]}{m[2]}:***@" if m[3] else f"{m[1]}***@", text)
    if "=" in text:
        text = _PARAM.sub(lambda m: f"{m[1]}{m[2]}=***" if m[3] and is_secret_name(m[2]) else m[0], text)
    return text
