"""The engine's error taxonomy. Raised at the boundary, mapped to HTTP codes by the server."""


class FerryError(Exception):
    """Base class for every error ferry raises on purpose."""


class InvalidRequest(FerryError, ValueError):
    """A request or its sampling parameters are malformed (HTTP 400)."""


class ContextLengthExceeded(InvalidRequest):
    """The prompt (plus max_tokens) does not fit in the model's context (HTTP 400)."""


class Overloaded(FerryError):
    """The waiting queue is full; retry later (HTTP 429)."""


class ModelLoadError(FerryError):
    """A checkpoint folder is missing, incomplete, unsafe or of an unsupported architecture."""


class RequestFailed(FerryError):
    """A request accepted by the engine ended with an error while running (HTTP 500)."""
