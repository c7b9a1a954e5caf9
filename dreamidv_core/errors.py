"""Exceptions raised by dreamidv_core. Every message says which file or input is wrong and what was expected."""


class DreamIDVError(Exception):
    """Base class of every error this library raises on purpose."""


class CheckpointError(DreamIDVError):
    """A weight file is missing, unsafe, corrupt, or of the wrong layout."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class InputError(DreamIDVError):
    """An input (video, mask, pose, reference image, context) does not meet what the model expects."""


class Cancelled(DreamIDVError):
    """Raised when the caller's cancel hook asks the work to stop."""
