"""Progress bars that leave one line of plain text behind, so that a saved notebook still reads well.

In Jupyter a tqdm bar is a widget whose state a saved notebook does not keep: reopened, each bar reads "Error
displaying widget: model not found". ``Progress`` shows the widget through a display handle and, when the
work ends, replaces it with a one-line summary; outside Jupyter the text bar erases itself and the line is
printed. ``COURSE_PROGRESS=0`` (the regression and grading kernels) turns both off: nothing is printed.
"""
from __future__ import annotations

import os

__all__ = ["progress_enabled", "Progress"]


def progress_enabled(progress: bool | None) -> bool:
    """``progress`` itself, or for None: on unless the environment sets ``COURSE_PROGRESS`` to 0/false/no/off."""
    if progress is None:
        return os.environ.get("COURSE_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")
    return bool(progress)


class Progress:
    """A tqdm bar over ``total`` units (from ``initial``) when ``enabled``; ``close(line)`` leaves ``line``."""

    def __init__(self, enabled: bool, *, total: int, desc: str, unit: str, initial: int = 0):
        self.bar = self.handle = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        kwargs = dict(total=total, initial=initial, desc=desc, unit=unit, leave=False)
        if any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__):
            from tqdm import notebook  # chosen by tqdm.auto only inside a Jupyter kernel: its display is IPython's

            self.bar = tqdm(**kwargs, display=False)
            self.handle = notebook.display(self.bar.container, display_id=True)
        else:
            self.bar = tqdm(**kwargs)

    def update(self, **postfix) -> None:
        """One unit done; ``postfix`` (e.g. ``val_loss="0.123"``) is shown after the bar."""
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(postfix)

    def close(self, line: str) -> None:
        """Remove the bar and leave ``line`` in its place (nothing when disabled)."""
        if self.bar is None:
            return
        self.bar.close()
        if self.handle is not None:
            self.handle.update({"text/plain": line}, raw=True)
        else:
            print(line)
