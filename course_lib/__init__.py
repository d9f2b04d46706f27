"""course_lib: the helper library of "Optimization, Regularization and PEFT".

Everything the course teaches, in native PyTorch: data with one honest split, models, a training loop that
records evidence, schedules, checkpoints, freezing, LoRA, 8-bit AdamW, memory accounting and plots.
"""
__version__ = "0.1.0"

BOTTLENECKS = ("optimization", "regularization", "adaptation")
"""The three answers to "which is the smallest change that survives the validation rule?"."""

from .runtime import check_version, get_device, is_fast, seed_everything, setup_threads  # noqa: E402

__all__ = ["__version__", "BOTTLENECKS", "seed_everything", "setup_threads", "get_device", "is_fast",
           "check_version"]
