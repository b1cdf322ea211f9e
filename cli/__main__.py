"""``python -m cli``: the ``reconciler`` command (the supervisor starts its children so)."""

from cli import main

main()
