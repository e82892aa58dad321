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
