"""The ``mirrorsym`` command line (typer + rich): ``scan``, ``diagnose`` and ``reproduce``.

``main`` holds the app and the global options, one module per command, ``loading`` the one model loader
and input convention every command uses, ``errors`` the error style (one line ``error: ...``, exit 2).
The library layers below never print or exit; this package is the only place that does.
"""

from .main import app, main

__all__ = ["app", "main"]
