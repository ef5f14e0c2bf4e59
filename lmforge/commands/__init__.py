"""One thin module per ``lmforge`` verb: its config, the call into the library, what the console shows.

Nothing in the library imports from here; ``cli.py`` imports a command module only when it runs."""
