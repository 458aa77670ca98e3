"""``python -m mirrorsym.cli``: the same as the ``mirrorsym`` command."""

from .main import main

main()
