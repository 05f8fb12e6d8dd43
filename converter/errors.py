"""The one exception type that means "the user can fix this"; tasks print it without a traceback."""


class UserError(Exception):
    """Bad input or environment: the message names the problem and the fix."""
