"""`python -m server [serve options]`: the HTTP server (`python -m server generate ...` runs the other commands)."""
import sys

from slora_jax.cli import COMMANDS

from .launch import main

argv = sys.argv[1:]
sys.exit(main(argv if argv[:1] and argv[0] in ("serve", *COMMANDS) else ["serve", *argv]))
