"""Values from outside (a request, a task, an export), cut short before a message or a log line
repeats them."""

from __future__ import annotations

SHORT_REPR_CHARS = 100  # how much of a value sent to us is repeated in a message or a log line


def short_repr(value: object, n: int = SHORT_REPR_CHARS) -> str:
    """``repr(value)`` cut to ``n`` characters, for echoing what a client sent: a 1 MB name must
    not come back whole in the answer or the log. Containers are summarised, not walked (a deeply
    nested one would recurse)."""
    if isinstance(value, (list, tuple)) and len(value) <= 20 and all(
            isinstance(v, (str, int, float)) for v in value):  # flat: shown, each item clipped
        text = "[" + ", ".join(short_repr(v, n) for v in value) + "]"
        return text if len(text) <= n else f"{text[:n - 3]}... ({len(value)} items)"
    if isinstance(value, (dict, list, tuple)):
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit integer>"  # repr of a huge int is slow (and capped by Python)
    text = repr(value)
    return text if len(text) <= n else f"{text[:n - 3]}... ({len(text)} characters)"
