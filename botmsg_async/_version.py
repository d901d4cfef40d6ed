"""The installed distribution's version, in a module of its own.

Kept apart from the package ``__init__`` so that internal modules (the client's
User-Agent, the CLI's ``--version``) can import it at the top level without an
import cycle through the public API.
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("botmsg-async")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"
