"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""


class VitfabError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""


class DataError(VitfabError):
    """A dataset folder or image that vitfab cannot use."""


class CheckpointError(VitfabError):
    """A checkpoint or weights file that vitfab cannot load."""
