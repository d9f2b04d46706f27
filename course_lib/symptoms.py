"""The course's symptom table: what a run shows -> the first move -> why, and where the course shows it.

One table for every notebook's diagnosis (``show_symptom_table()`` renders it). Each row names the bottleneck of
``course_lib.BOTTLENECKS`` its first move belongs to, and the notebook where the course shows the symptom for
real. The first row is the one to check first: an unstable optimizer makes every later reading meaningless.

The strong first recipe, the baseline every row starts from: AdamW at ``lr=1e-3`` with ``weight_decay=1e-4``
(:data:`FIRST_RECIPE`); add warmup + cosine decay and clipping at 1.0 when the run is long or unstable.
"""
from __future__ import annotations

from . import BOTTLENECKS

__all__ = ["SYMPTOMS", "FIRST_RECIPE", "SymptomTable", "symptom_table", "show_symptom_table"]

FIRST_RECIPE = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4}
"""The strong first recipe a baseline starts from (``fit(model, ..., **FIRST_RECIPE)``)."""

SYMPTOMS = (
    {"symptom": "loss oscillates, spikes far above its start, or goes NaN (fit stops with TrainingDiverged)",
     "first move": "lower the LR (10x); then warmup + cosine; clip the gradient norm at 1.0",
     "why": "steps too large for the loss surface: one bad step can kill most ReLU units for good; clipping "
            "alone hides the symptom, the LR is the cause",
     "bottleneck": "optimization", "shown in": "00, 03"},
    {"symptom": "train loss keeps falling (to ~0) while val loss bottoms out early and climbs back",
     "first move": "keep the best checkpoint (best val_loss); then weight decay / dropout / more data",
     "why": "the model memorizes the training set; the best checkpoint is free, a regularizer must beat it",
     "bottleneck": "regularization", "shown in": "01, 04"},
    {"symptom": "slow but stable: train and val loss still falling steadily at the last epoch",
     "first move": "raise the LR (LR range test) or train longer, with a schedule",
     "why": "the optimizer is not done: no other reading is final until the loss stops falling",
     "bottleneck": "optimization", "shown in": "02"},
    {"symptom": "train loss stuck high with val loss right next to it, small trainable part (frozen model)",
     "first move": "train more of the model: unfreeze the top block, or add an adapter (LoRA)",
     "why": "the optimizer converged on what it may change; that part cannot fit the task",
     "bottleneck": "adaptation", "shown in": "04 (diagnosis), 05"},
    {"symptom": "pretrained backbone moves too much: fine-tuning stays far below the frozen/partial runs or falls "
                "after the first epochs, and the source task is forgotten (its accuracy through the old head drops)",
     "first move": "a smaller LR for the backbone than for the head, or freeze it / train an adapter",
     "why": "large updates overwrite the pretrained features the new task needs",
     "bottleneck": "adaptation", "shown in": "05, 09"},
)
"""Rows of the symptom table: ``symptom``, ``first move``, ``why``, ``bottleneck`` (of BOTTLENECKS), ``shown in``."""

assert all(row["bottleneck"] in BOTTLENECKS for row in SYMPTOMS)


def symptom_table(bottleneck: str | None = None):
    """The table as a ``pandas.DataFrame`` (index: ``symptom``); ``bottleneck`` keeps only that bottleneck's rows."""
    import pandas as pd

    if bottleneck is not None and bottleneck not in BOTTLENECKS:
        raise ValueError(f"bottleneck must be None or one of {BOTTLENECKS}, got {bottleneck!r}")
    rows = [r for r in SYMPTOMS if bottleneck is None or r["bottleneck"] == bottleneck]
    return pd.DataFrame(rows).set_index("symptom")


class SymptomTable:
    """The table, shown in full: HTML in a notebook (``_repr_html_``: full text, left-aligned), text elsewhere."""

    def __init__(self, frame):
        self.frame = frame

    def _repr_html_(self) -> str:
        html = self.frame.to_html(justify="left", escape=True)
        return html.replace("<td>", '<td style="text-align:left">')

    def __repr__(self) -> str:
        import pandas as pd

        with pd.option_context("display.max_colwidth", None, "display.width", 200):
            return self.frame.to_string()


def show_symptom_table(bottleneck: str | None = None) -> SymptomTable:
    """:func:`symptom_table` wrapped to display in full: the last expression of a notebook cell shows it as one
    HTML table; ``print(show_symptom_table())`` prints it as text."""
    return SymptomTable(symptom_table(bottleneck))
