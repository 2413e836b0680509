"""Exceptions the command line turns into a one-line reason and a non-zero exit."""


class DefectclsError(Exception):
    """A failure the user can act on; its message is shown as is."""


class ImageLoadError(DefectclsError):
    """An input file is not a usable image (the message says why)."""


class ModelLoadError(DefectclsError):
    """A model directory or weights file cannot be used."""
