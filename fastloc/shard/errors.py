"""The two ways a conversion can meet bad input.

``SampleError``: one sample cannot be read (corrupt image, missing label map, ...). The
converter reports it with its path and reason and skips the sample (``--strict`` stops).

``ConversionError``: the conversion cannot proceed at all (missing directory, malformed
annotation file, conflicting output). The CLI prints the message and exits with status 2.
Neither is ever shown to the user as a traceback.
"""


class SampleError(Exception):
    """One sample is unreadable; ``path`` names the offending file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # keep (path, reason) across process boundaries
        return type(self), (self.path, self.reason)


class ConversionError(Exception):
    """The whole conversion cannot proceed; the message says what and where."""
