"""The lateness plot: cumulative distribution of ``fired_at - scheduled_at`` at a steady rate,
the daemon against stock APScheduler, one panel per database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

FLOOR_MS = 0.01  # zero lateness drawn at the left edge of the log axis


def plot_lateness(samples: dict[str, dict[str, Any]], path: Path, goal_ms: float = 20.0) -> Path:
    """``samples[db][series] = {"label": str, "lateness_s": [...]}``; writes a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in samples if any("lateness_s" in v for v in samples[k].values())]
    fig, axes = plt.subplots(
        1, max(1, len(kinds)), figsize=(6.5 * max(1, len(kinds)), 4.6), squeeze=False
    )
    styles = {
        "ours": {"color": "tab:blue", "linewidth": 2.0},
        "ours_low": {"color": "tab:cyan", "linewidth": 1.5, "linestyle": "--"},
        "stock": {"color": "tab:red", "linewidth": 2.0},
    }
    for ax, kind in zip(axes[0], kinds, strict=False):
        for key, series in samples[kind].items():
            if "lateness_s" not in series:
                continue  # other series (read latency) are not lateness
            values = sorted(max(FLOOR_MS, v * 1000) for v in series["lateness_s"])
            if not values:
                continue
            n = len(values)
            ys = [(i + 1) / n for i in range(n)]
            ax.step(
                values,
                ys,
                where="post",
                label=f"{series['label']} (n={n:,})",
                **styles.get(key, {}),
            )
        ax.axvline(goal_ms, color="grey", linestyle=":", linewidth=1)
        ax.text(
            goal_ms * 1.08,
            0.5,
            f"goal: p99 ≤ {goal_ms:g} ms",
            color="grey",
            fontsize=8,
            rotation=90,
            va="center",
        )
        ax.axhline(0.99, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("lateness = fired_at - scheduled_at (ms, log scale)")
        ax.set_ylabel("fraction of fires")
        ax.set_title(f"steady firing on {kind}")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("program-timer vs stock APScheduler 3.11: lateness distribution")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
