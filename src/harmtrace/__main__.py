"""``python -m harmtrace``: the command line."""

from harmtrace.cli import main

main()
