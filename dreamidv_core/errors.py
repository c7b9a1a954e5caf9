"""Exceptions raised by dreamidv_core. Every message says which file or input is wrong and what was expected."""
import math
import numbers


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


class NonFiniteError(DreamIDVError):
    """NaN or infinite values appeared in a computation (sampling, training): the message says where (which
    step) and the likely causes."""


def numeric_problems(label, *specs) -> list:
    """``(name, value, kind, low, high)`` -> a message per bad value, naming it ``label(name)``. ``kind``: "int"
    (a whole number), "float" (a finite number), "float>" (finite and strictly above ``low``); a trailing "?"
    also allows None; ``low`` and ``high`` are inclusive bounds (None: unbounded)."""
    out = []
    for name, value, kind, low, high in specs:
        name = label(name)
        optional, kind = kind.endswith("?"), kind.rstrip("?")
        if value is None and optional:
            continue
        if kind == "int":
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            what = "a whole number"
        else:
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            what = "a finite number"
        if not ok:
            out.append(f"{name} must be {what}, got {value!r}")
        elif kind == "float>" and not value > low:
            out.append(f"{name} must be > {low}, got {value!r}")
        elif kind != "float>" and low is not None and value < low:
            out.append(f"{name} must be >= {low}, got {value!r}")
        elif high is not None and value > high:
            out.append(f"{name} must be <= {high}, got {value!r}")
    return out
