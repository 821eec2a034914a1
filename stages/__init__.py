"""DVC stage entry points: `python -m stages.<name>` (or through `python -m mda.core.launch`)."""
