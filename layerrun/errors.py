"""User-facing errors.

Every problem caused by user input (a path, a flag, a file's contents) is a
:class:`LayerRunError` whose message names the thing and says how to fix it.
The CLI prints the message on one line and exits non-zero; ``--debug`` shows
the traceback.
"""


class LayerRunError(Exception):
    """An error the user can act on; the message is printed as-is."""


class FormatError(LayerRunError):
    """A model folder or file is missing, corrupt, or not what it claims."""


class UnsupportedModelError(LayerRunError):
    """The model's architecture or file type is not supported."""


class FileChangedError(FormatError):
    """A model file changed on disk while the process was using it (truncated, rewritten, replaced)."""
