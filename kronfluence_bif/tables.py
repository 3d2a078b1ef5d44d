"""Plain-text tables for reports printed by the command line (a leaf module: it imports nothing from the package)."""

from __future__ import annotations

import math
from typing import Any, List, Sequence

import numpy as np


def format_value(value: Any) -> str:
    """A table cell: integers as they are, floats to 6 significant digits (`nan` for NaN), anything else as str."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    """Lines of a right-aligned table, two spaces between columns, the header first."""
    cells = [list(header)] + [[format_value(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
