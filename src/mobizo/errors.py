"""The one exception type the CLI turns into a clean one-line error."""


class MobizoError(Exception):
    """A user-facing problem (bad input, mismatched files). Printed as one line, exit code 2."""
