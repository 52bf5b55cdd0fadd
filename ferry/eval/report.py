"""Renders eval reports: a text table for the terminal and a PNG heat map of accuracy by length and depth."""

from __future__ import annotations

from pathlib import Path

from ferry.eval.suite import Report


def _label(r: Report) -> str:
    return ", ".join(f"{k}={v}" for k, v in r.options.items()) or "full precision"


def table(reports: list[Report]) -> str:
    lines = []
    cols = [_label(r) for r in reports]
    w = max(22, *(len(c) for c in cols))
    lines.append(f"{'metric':<34}" + "".join(f"{c:>{w + 2}}" for c in cols))

    def row(name: str, vals: list[str]) -> None:
        lines.append(f"{name:<34}" + "".join(f"{v:>{w + 2}}" for v in vals))

    if all(r.perplexity for r in reports):
        row("perplexity (held-out)", [f"{r.perplexity['perplexity']:.2f}" for r in reports])
        row("  unigram baseline", [f"{r.perplexity['unigram_perplexity']:.1f}" for r in reports])
    if any(r.agreement for r in reports):
        row("perplexity vs full precision", [f"{r.agreement['perplexity_change']:+.2%}" if r.agreement else "—"
                                             for r in reports])
        row("greedy top-1 agreement per token", [f"{r.agreement['top1_agreement']:.2%}" if r.agreement else "—"
                                                 for r in reports])
    if all(r.retrieval for r in reports):
        tasks = sorted({c["task"] for c in reports[0].retrieval})
        lengths = sorted({c["length"] for c in reports[0].retrieval})
        for t in tasks:
            for n in lengths:
                row(f"{t} @ {n} tokens", [f"{r.accuracy(t, n):.1%}" for r in reports])
        row("retrieval, all", [f"{r.accuracy():.1%}" for r in reports])
    if all(r.acceptance for r in reports):
        row("draft greedy acceptance", [f"{r.acceptance['acceptance_rate']:.1%}" for r in reports])
    if all(r.moe for r in reports):
        row("MoE least-used expert share", [f"{r.moe['min_share']:.1%}" for r in reports])
        row("MoE next-layer top-4 recall", [
            f"{sum(r.moe['next_layer_top4_recall']) / len(r.moe['next_layer_top4_recall']):.1%}" for r in reports])
        row("  random top-4", [f"{r.moe['random_top4_recall']:.1%}" for r in reports])
    return "\n".join(lines)


def heatmap(reports: list[Report], path: Path) -> None:
    """Accuracy by context length (x) and needle depth (y): one panel per report, all tasks pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [r for r in reports if r.retrieval]
    if not reports:
        return
    lengths = sorted({c["length"] for c in reports[0].retrieval})
    depths = sorted({c["depth"] for c in reports[0].retrieval})
    fig, axes = plt.subplots(1, len(reports), figsize=(1.2 + 1.1 * len(lengths) * len(reports), 3.6), squeeze=False)
    for ax, r in zip(axes[0], reports):
        grid = [[0.0] * len(lengths) for _ in depths]
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                cells = [c for c in r.retrieval if c["depth"] == d and c["length"] == n]
                grid[i][j] = sum(c["correct"] for c in cells) / max(1, sum(c["total"] for c in cells))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{grid[i][j]:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{Path(r.model).name}\n{_label(r)}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
