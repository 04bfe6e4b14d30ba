"""Command-line tools that need no accelerator (e.g. ``memory_plan``)."""
