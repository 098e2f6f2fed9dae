"""Errors whose message is the whole story: every CLI prints them as one line and exits 2.

Its own module, below everything else, so that validation (``names``) and the CLIs can share
it without importing each other.
"""


class UserError(Exception):
    """An error whose message is the whole story: printed as one line, exit code 2."""
