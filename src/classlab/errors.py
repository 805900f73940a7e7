"""User-facing errors: one clear line, a documented exit code, never a traceback."""


class ClasslabError(Exception):
    """Bad input from the user (config, data, weights, folders). The CLI prints it as one line."""

    exit_code = 2


class RunFailed(ClasslabError):
    """A run could not finish (e.g. non-finite loss); the rest of a study goes on."""

    exit_code = 1


def one_line(text: str) -> str:
    """Collapse whitespace so an error is always a single line."""
    return " ".join(str(text).split())
