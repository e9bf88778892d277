"""The errors that stop a run, with a message that says why and what to do."""


class RunError(ValueError):
    """A run cannot start, continue or save as asked; the message says why and what to do."""


class NonFiniteError(RunError):
    """A non-finite loss, gradient or weight; the run stopped and saved nothing non-finite."""
