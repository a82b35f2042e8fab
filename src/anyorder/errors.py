"""The errors that mean "bad input": a setting, a data set, a weights file. Each message names the
key or file at fault and says how to fix it; entry points turn them into exit code 2 (nothing was
computed), never a traceback. Anything else raised by the library is a bug."""


class InputError(ValueError):
    """Bad input named in the message (see the subclasses in config and data)."""
