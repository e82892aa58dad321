"""Errors the HTTP layer turns into a 4xx JSON answer with a message (never a traceback)."""

from __future__ import annotations


class BadInput(ValueError):
    """The request cannot be served as sent; ``status`` is the HTTP status to answer with."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class ImageUnavailable(BadInput):
    """The task's image cannot be fetched or decoded (unreachable, not found, not an image)."""

    status = 422


class ImageTooLarge(BadInput):
    """The image is over MAX_IMAGE_PIXELS or MAX_IMAGE_MB."""

    status = 413


class ClientGone(BadInput):
    """The client closed the connection: the rest of its request's work is skipped (nginx's 499;
    nobody reads the answer)."""

    status = 499


ECHO_CHARS = 100  # how much of a value sent to us is repeated in a message or a log line


def clip(value: object, n: int = ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``n`` characters, for echoing what a client sent: a 1 MB name must
    not come back whole in the answer or the log. Containers are summarised, not walked (a deeply
    nested one would recurse)."""
    if isinstance(value, (list, tuple)) and len(value) <= 20 and all(
            isinstance(v, (str, int, float)) for v in value):  # flat: shown, each item clipped
        text = "[" + ", ".join(clip(v, n) for v in value) + "]"
        return text if len(text) <= n else f"{text[:n - 3]}... ({len(value)} items)"
    if isinstance(value, (dict, list, tuple)):
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit integer>"  # repr of a huge int is slow (and capped by Python)
    text = repr(value)
    return text if len(text) <= n else f"{text[:n - 3]}... ({len(text)} characters)"
