"""Timeline of one request: a picture with one row per stage (and the head), busy intervals coloured by step;
and how long the first stage sat idle after each verdict."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["idle_after_verdicts", "plot_timeline"]


def idle_after_verdicts(verdicts: Sequence[float], busy: Sequence[tuple[float, float, int]]) -> list[float]:
    """How long a stage (V1) waited for work after each verdict time t: the start of its first busy interval
    starting after t, less the end of the interval running at t (busy till then, so not waiting) or else t.
    Verdicts after which the stage never works again (the request's end) are left out. `verdicts` and `busy`
    (start, end, step) share one clock; the waits are in its unit."""
    idle = []
    for t in verdicts:
        nxt = min((start for start, _, _ in busy if start > t), default=None)
        if nxt is None:
            continue
        free = max([t] + [end for start, end, _ in busy if start <= t < end])
        idle.append(max(0.0, nxt - free))
    return idle


def plot_timeline(path: str | Path, busy: dict[int, Sequence[tuple[float, float, int]]],
                  head: Sequence[tuple[float, float, str]], t0: float, t1: float, *, dilation: float = 1.0,
                  title: str = "", verdicts: Sequence[float] = ()) -> None:
    """Stage rows V1..VN top to bottom, then D0 (lm_head dark, drafting light, a thin red line at each
    verdict). Times in emulated ms (real ÷ dilation) from the request's start; prefill (step 0) is grey,
    decode steps cycle through a qualitative palette so consecutive segments are told apart and gaps
    (bubbles) stand out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted(busy)
    rows = [f"V{k}" for k in stages] + (["D0"] if head else [])
    fig, ax = plt.subplots(figsize=(12, 0.55 * len(rows) + 1.4))
    cmap = plt.get_cmap("tab20")
    scale = 1e3 / dilation

    def x(t: float) -> float:
        return (t - t0) * scale

    for row, k in enumerate(stages):
        y = len(rows) - 1 - row
        for start, end, step in busy[k]:
            if end < t0 or start > t1:
                continue
            color = "0.75" if step == 0 else cmap((step - 1) % 20)
            ax.broken_barh([(x(start), max(x(end) - x(start), 1e-3))], (y - 0.4, 0.8), facecolors=color,
                           edgecolors="black", linewidth=0.2)
    if head:
        for start, end, kind in head:
            if end < t0 or start > t1:
                continue
            color = "tab:blue" if kind == "lm_head" else "lightsteelblue"
            ax.broken_barh([(x(start), max(x(end) - x(start), 1e-3))], (-0.4, 0.8), facecolors=color,
                           edgecolors="none")
        marks = [x(t) for t in verdicts if t0 <= t <= t1]
        if marks:
            ax.vlines(marks, -0.5, 0.5, colors="crimson", linewidth=1.0, zorder=3)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(list(reversed(rows)))
    ax.set_xlim(0, x(t1))
    unit = "emulated ms" if dilation != 1.0 else "ms"
    ax.set_xlabel(f"{unit} since the request started (grey: prefill; colours: decode steps; "
                  "D0: dark = lm_head, light = drafting, red = verdict)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", linewidth=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
