"""The course's designed teaching scenarios: one module per notebook story.

Each module holds the configuration a notebook uses (shown in the notebook, not hidden) and a ``run`` function
that reproduces the notebook's evidence for one seed, so tests can prove over many seeds that the intended
answer holds with a margin.
"""
