"""Credentials in shard locations: never written into a manifest, a log or TensorBoard.

A location is recorded as the user gave it, so a credential in it would be stored. Instead, a URL
names credentials as `${VARIABLE}`s, expanded from the environment only when a shard is opened
(`https://${HF_USER}:${HF_TOKEN}@host/{00000..00099}.tar`); a `pipe:` command's shell expands its own
(`pipe:curl -s -H "Authorization: Bearer $TOKEN" …`); HTTP basic credentials may also come from
~/.netrc (core.remote). A literal secret — a password in `user:password@`, a query parameter such as
X-Amz-Signature, sig or token (S3, GCS and Azure signed URLs), an Authorization header, a TOKEN=…
assignment — is refused before anything is written, and `redact` masks any that reaches a message.
"""

from __future__ import annotations

import os
import re

from plumbing.errors import LocalError

_PLACEHOLDER = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
# Query parameters that carry a secret in signed URLs: AWS SigV4 (X-Amz-Signature, -Credential,
# -Security-Token), GCS V4 (X-Goog-Signature, -Credential), Azure SAS (sig), CloudFront (Signature),
# and the usual token/key names.
_SECRET_PARAM = (
    r"[\w.-]*(?:sig|token|secret|passw|pwd|credential|auth|api[_-]?key|access[_-]?key)[\w.-]*|key|code"
)
_PATTERNS = (
    (
        "a password in user:password@",
        re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]*:)([^@\s/'\"]+)(?=@)"),
    ),
    ("a signature or token in the query", re.compile(rf"(?i)([?&;](?:{_SECRET_PARAM})=)([^&#\s'\"]+)")),
    ("an Authorization header", re.compile(r"(?i)(authorization:\s*(?:bearer|basic|token)?\s*)([^\s'\"]+)")),
    ("a bearer token", re.compile(r"(?i)(\bbearer\s+)([^\s'\"]+)")),
    (
        "a secret in an assignment",
        re.compile(r"(?i)(\b[a-z0-9_]*(?:token|secret|passw|api_key|access_key)[a-z0-9_]*=)([^\s'\"]+)"),
    ),
    ("a secret option", re.compile(r"(?i)(--?(?:password|passwd|token|secret|api-key)[= ])([^\s'\"]+)")),
)


def _literal(value: str) -> bool:
    return not _PLACEHOLDER.fullmatch(value.strip("'\""))


def redact(text: str) -> str:
    """`text` with every literal credential replaced by `***` (placeholders stay as written)."""
    for _, pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + ("***" if _literal(m.group(2)) else m.group(2)), text)
    return text


def secret_problem(location: str) -> str | None:
    """Why `location` cannot be recorded (it holds a literal credential), or None."""
    for what, pattern in _PATTERNS:
        if any(_literal(m.group(2)) for m in pattern.finditer(location)):
            return (
                f"{redact(location)} holds {what}, which would be written into the manifest and the logs: "
                "write it as ${VARIABLE} (read from the environment when a shard is opened; a pipe: "
                "command's shell expands its own), or put HTTP credentials in ~/.netrc"
            )
    return None


def expand(location: str) -> str:
    """The location with its ${VARIABLE}s (or $VARIABLEs) taken from the environment, only when
    opening it."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in os.environ:
            raise LocalError(f"shard {location}: ${{{name}}} is not set in the environment")
        return os.environ[name]

    return _VARIABLE.sub(value, location)
