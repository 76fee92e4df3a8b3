"""Figure of a bench run: FLOPs, peak memory and throughput against resolution (AFFMAE Fig. 10),
plus step time against token count (log-log, so the slope is the scaling exponent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_results(results: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Write a 2x2 PNG from bench result rows (see ``affmae.bench.cli``); missing values (OOM,
    memory on CPU) are left out of the lines. Returns the path written."""
    import matplotlib.pyplot as plt

    fig = make_figure(results, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_figure(results: list[dict[str, Any]], title: str = ""):
    """The matplotlib figure ``plot_results`` writes."""
    import matplotlib

    matplotlib.use("Agg")  # headless: the bench runs on servers
    import matplotlib.pyplot as plt

    panels = [
        ("gflops", "resolution (px)", "forward GFLOPs (1 sample)", "log"),
        ("peak_mem_gib", "resolution (px)", "peak training memory (GiB)", "linear"),
        ("img_s", "resolution (px)", "training throughput (img/s)", "log"),
        ("step_ms", "tokens per image (patches)", "step time (ms)", "log"),
    ]
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    resolutions = sorted({r["resolution"] for r in results})
    tokens = sorted({r["tokens"] for r in results if r.get("tokens")})
    models = list(dict.fromkeys(r["model"] for r in results))
    for ax, (key, xlabel, ylabel, yscale) in zip(axes.flat, panels):
        xkey = "tokens" if key == "step_ms" else "resolution"
        for m in models:
            pts = sorted((r[xkey], r[key]) for r in results
                         if r["model"] == m and r.get(key) is not None)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=m)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_yscale(yscale)
        if key == "step_ms":
            ax.set_xscale("log")
            # The measured token counts as the ticks: a log axis spanning less than a decade
            # (e.g. 512 and 768 px: 4,096 and 9,216 tokens) has no labelled tick of its own.
            ax.set_xticks(tokens)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_xticks(resolutions)
        ax.grid(True, alpha=0.3)
        if not ax.lines:
            why = ("no values (not measured on CPU)" if key == "peak_mem_gib"
                   else "no successful runs")
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
