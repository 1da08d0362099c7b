"""`python -m mtkit` runs the command line."""

from mtkit.cli import run

run()
