"""The `pipeline` command line (Typer): one ``cmd_<name>.py`` module per command, registered on
``app.app``; the options several commands share are in ``options``."""
