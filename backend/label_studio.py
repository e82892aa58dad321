"""Label Studio's API for the jobs that read a whole project: training and batch pre-annotation.

A client from label-studio-sdk (``LabelStudio`` handles both a legacy token and a personal access
token: it exchanges the latter at /api/token/refresh/ and reuses the access token until it expires)
and a project's tasks as plain dicts, in the shape of a JSON export (``data``, ``annotations``,
``predictions``), so the same code reads an export file and a live project.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional

from .errors import BadInput


class LabelStudioUnavailable(BadInput):
    """No URL / key configured, or the server refused or could not be reached."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=502)


def connect(url: str, api_key: str, timeout: float = 60.0):
    """An SDK client for ``url`` (LABEL_STUDIO_URL) with ``api_key`` (LABEL_STUDIO_API_KEY); the
    server is asked for the current user once so that a wrong URL or key fails here, clearly."""
    from label_studio_sdk import LabelStudio

    if not url or not api_key:
        raise LabelStudioUnavailable("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (a legacy token or a personal "
                                     "access token) so the backend can read the project's labels")
    try:
        # The trailing slash keeps a path prefix (http://host/label-studio/) in the SDK's token
        # refresh URL, which it joins with urljoin; its other calls strip it. The client itself
        # raises for an expired personal access token, so it is made inside the try.
        client = LabelStudio(base_url=url.rstrip("/") + "/", api_key=api_key, timeout=timeout)
        client.users.whoami()
    except Exception as e:  # httpx errors, ApiError with a status code, ...
        code = getattr(e, "status_code", None)
        why = f"HTTP {code}: check LABEL_STUDIO_API_KEY" if code else f"{e.__class__.__name__}: {str(e)[:200]}"
        raise LabelStudioUnavailable(f"Label Studio at {url} refused or is unreachable ({why})") from None
    return client


def _plain(obj: Any) -> Dict[str, Any]:
    return obj if isinstance(obj, dict) else obj.model_dump(mode="json")


def project_tasks(client, project: int, view: Optional[int] = None, only_annotated: bool = False,
                  page_size: int = 100) -> Iterator[Dict[str, Any]]:
    """Every task of ``project`` (or of its Data Manager tab ``view``) with its annotations and
    predictions, page by page, in id order. ``only_annotated``: tasks with at least one annotation
    that was not cancelled (filtered here: the API's own flag also lets through tasks that have
    predictions only)."""
    for task in client.tasks.list(project=project, view=view, fields="all", page_size=page_size):
        task = _plain(task)
        if only_annotated and not any(not a.get("was_cancelled") for a in task.get("annotations") or []):
            continue
        yield task
