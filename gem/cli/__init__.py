"""`gem`: the command line of GEM knowledge serving.

Each command is a thin layer over a library function; errors the user can fix (a bad
schema, bad data, a corrupt checkpoint) are printed as one line, without a traceback,
and exit with status 2. One module per command group; `app` wires them together.
"""

from gem.cli.app import app

__all__ = ["app"]
