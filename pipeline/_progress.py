"""The progress bar of extract and predict: tqdm on stderr, with items/s and ETA.

tqdm draws a text line in a terminal and a widget in a Jupyter notebook (when ipywidgets is
installed; otherwise the text line there too).
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(total: int, label: str, enabled: bool | None = None, unit: str = "img") -> tqdm:
    """`with progress(total, "extract") as bar: bar.update(n)`, redrawn at most 10 times a second.

    `enabled`: True or False forces the bar on or off; None shows it only when stderr is a
    terminal (or in a notebook with ipywidgets), so logs and pipes stay clean.
    """
    # tqdm's own disable=None is exactly "off unless the output is a terminal"; its notebook
    # variant turns None into on.
    return tqdm(total=total, desc=label, unit=unit, file=sys.stderr, mininterval=0.1,
                disable=None if enabled is None else not enabled, dynamic_ncols=True)
