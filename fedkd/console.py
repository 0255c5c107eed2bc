"""The two terminal consoles every fedkd command prints through (one place, so that a message
printed during a live progress display goes through the display's own console)."""

from rich.console import Console

out = Console()
err = Console(stderr=True, soft_wrap=True)  # one-line messages: a log file gets them whole
