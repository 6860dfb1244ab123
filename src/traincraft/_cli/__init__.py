"""The parts of the ``traincraft`` command that :mod:`traincraft.cli` assembles: the shipped recipes, the checks
after instantiation, the error messages and exit statuses, and the ``report`` subcommand."""
