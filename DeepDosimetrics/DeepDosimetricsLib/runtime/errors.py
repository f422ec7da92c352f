"""User-facing errors: one clear message naming the file, node or patient and the problem."""


class DeepDosimetricsError(Exception):
    """An error the user can act on; the CLI and the Slicer module show its message, not a traceback."""


class InputError(DeepDosimetricsError):
    """Bad input data: a missing or unreadable file, a wrong geometry, an empty structure..."""
