"""Matplotlib for the stages that draw (report, analysis): headless, and PNG bytes that depend
only on the data (no software tag or time stamp in the file)."""
from __future__ import annotations


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def png(figure) -> bytes:
    import io
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
    pyplot().close(figure)
    return buffer.getvalue()
