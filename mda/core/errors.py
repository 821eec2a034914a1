"""Errors a user can act on. Stages print them as one line and exit non-zero."""


class MdaError(Exception):
    """A problem with the user's inputs or files (exit code 1)."""

    exit_code = 1


class ConfigError(MdaError):
    """A bad `params.yaml` entry: unknown key, wrong type, out-of-range value (exit code 2)."""

    exit_code = 2
