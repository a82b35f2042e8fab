"""The errors the library raises on purpose. InputError means "bad input": a setting, a data set, a
weights file; each message names the key or file at fault and says how to fix it, and entry points
turn it into exit code 2 (nothing was computed), never a traceback. RunFailed means a run began
and cannot give a trustworthy result (exit code 1, nothing saved). Anything else is a bug."""


class InputError(ValueError):
    """Bad input named in the message (see the subclasses in config and data)."""


class RunFailed(RuntimeError):
    """A run stopped because its result would not be what it claims (a diverged loss, a noise
    synthesis that missed epsilon); the message says why and what to change."""
