"""The ``zero`` command (:mod:`._main`) and what its subcommands run: the launcher (:mod:`._run`, each rank
under :mod:`._rank`), the environment report (:mod:`._report`) and the memory planner (:mod:`._plan`)."""

from ._main import main

__all__ = ["main"]
