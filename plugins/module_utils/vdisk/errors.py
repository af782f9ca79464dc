"""Typed errors of the vdisk engine.

Every failure the engine reports is an :class:`ImageError`.  Its ``str()`` is one
line that names the file and, where there is one, the offending field, so the CLI
and the Ansible modules can show it to users as it is.
"""
from typing import Optional


class ImageError(Exception):
    """Base class: something is wrong with an image or with what was asked of it."""

    def __init__(self, message: str, path: Optional[str] = None, field: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.path = path
        self.field = field

    def __str__(self) -> str:
        text = " ".join(self.message.split())  # always one line
        if self.field and self.field not in text:
            text = "%s: %s" % (self.field, text)
        if self.path:
            text = "%s: %s" % (self.path, text)
        return text


class FormatError(ImageError):
    """The file is not (a valid header of) the format it was opened as."""


class CorruptImage(ImageError):
    """The metadata is inconsistent: reading on could return wrong data."""


class UnsupportedFeature(ImageError):
    """The image or the request uses something this driver does not implement."""


class ImageInUse(ImageError):
    """Another process (a running VM, qemu-img, vdisk) holds a conflicting image lock."""


class PolicyError(ImageError):
    """The image names a file the safety policy does not allow to be opened."""


class InvalidOption(ImageError):
    """A create/amend option or a size the user gave is not valid."""


class ReadOnlyImage(ImageError):
    """A write was attempted on an image opened read-only."""


class HostIOError(ImageError):
    """The host file system failed (ENOSPC, EIO, permission denied...)."""


class MissingPackage(ImageError):
    """An operation needs a Python package that is not installed; the message names it (one line)."""

    def __init__(self, what: str, package: str, path: Optional[str] = None, field: Optional[str] = None):
        super().__init__("%s needs the Python package %s (pip install %s)" % (what, package, package),
                         path=path, field=field)
        self.package = package
