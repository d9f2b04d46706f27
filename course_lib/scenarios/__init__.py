"""The course's designed teaching scenarios: one module per notebook story.

Each module holds the configuration a notebook uses (shown in the notebook, not hidden) and a ``run`` function
that reproduces the notebook's evidence for one seed, so tests can prove over many seeds that the intended
answer holds with a margin.
"""

__all__ = ["by_mode"]


def by_mode(fast_mode: bool, /, *, fast, full):
    """The setting of the mode a notebook runs in: ``fast`` in fast mode, ``full`` otherwise.

    ``by_mode(fast, fast=20, full=40)``; a table written ``{"fast": 20, "full": 40}`` reads as
    ``by_mode(fast, **table)``. ``fast_mode`` is the notebooks' ``fast`` parameter: a bool (or 0/1).
    """
    if isinstance(fast_mode, str) or fast_mode not in (True, False):
        raise TypeError(f"fast_mode must be a bool (the notebook's fast parameter), got {fast_mode!r}")
    return fast if bool(fast_mode) else full
