"""The `pipeline` command line (Typer): one module per group of commands, registered on
``app.app``."""
