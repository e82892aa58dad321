"""Errors the HTTP layer turns into a 4xx JSON answer with a message (never a traceback)."""

from __future__ import annotations

from stable_sam.short_repr import short_repr  # noqa: F401 - re-exported: every backend message echoes with it


class BadInput(ValueError):
    """The request cannot be served as sent; ``status`` is the HTTP status to answer with."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        """The message the client gets."""
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
