"""Subcommands of the ``halo-embed`` CLI; each module has ``HELP``, ``add_arguments`` and ``run``."""
