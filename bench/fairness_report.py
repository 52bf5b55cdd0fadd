"""The table and the plot of `python -m bench fairness` (bench/fairness.py) from its record."""
from __future__ import annotations

from pathlib import Path

from bench import swap_copy


def print_table(record: dict) -> str:
    lines = []
    for name, c in record["configs"].items():
        lines.append(f"{name}: total {c['total_tok_s']:.1f} tok/s, Jain {c['jain']:.3f}, preemptions "
                     f"{c['num_preemptions']:.0f} (fairness {c['num_fair_preemptions']:.0f})")
        for client, r in c["clients"].items():
            lines.append(f"  {client:10} {r['streams']:3} streams {r['tok_s']:8.1f} tok/s  share {r['share']:.3f}  "
                         f"TTFT p50 {r['ttft_p50_s']:.2f} s p99 {r['ttft_p99_s']:.2f} s  ({r['requests']} requests)")
    base = record["configs"].get("fcfs")
    for name, c in record["configs"].items():
        if base is not None and name != "fcfs" and base["total_tok_s"]:
            lines.append(f"{name} / fcfs total throughput: {c['total_tok_s'] / base['total_tok_s']:.3f}")
    lines.append("swap copy cost (median of interleaved runs):")
    lines.append(swap_copy.table(record["swap_copy"]))
    return "\n".join(lines)


def section(record: dict) -> str:
    """docs/cluster.md's block: a row per (configuration, client), each configuration's Jain's index and total
    throughput against fcfs, then the swap copy cost."""
    from bench.common import measured_on
    from bench.report import command
    head = ["configuration", "client", "streams", "tok/s", "share", "TTFT p50 s", "TTFT p99 s", "Jain's index",
            "total tok/s (vs fcfs)", "preemptions (for fairness)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = record["configs"].get("fcfs", {}).get("total_tok_s")
    for name, c in record["configs"].items():
        total = f"{c['total_tok_s']:.0f}" + (f" ({c['total_tok_s'] / base:.2f}x)" if base and name != "fcfs" else "")
        per_config = [name, f"{c['jain']:.3f}", total, f"{c['num_preemptions']:.0f} ({c['num_fair_preemptions']:.0f})"]
        for client, r in c["clients"].items():
            cells = [per_config[0], client, str(r["streams"]), f"{r['tok_s']:.1f}", f"{r['share']:.3f}",
                     f"{r['ttft_p50_s']:.2f}", f"{r['ttft_p99_s']:.2f}", *per_config[1:]]
            lines.append("| " + " | ".join(cells) + " |")
            per_config = [""] * 4  # the configuration's own cells on its first row only
    cfg = record["config"]
    return ("### Fair scheduling: one flooding client against light ones\n\n"
            f"{measured_on(record)}; `ferry serve` on {Path(cfg['model']).name}, {cfg['threads']} threads, "
            f"--max-num-seqs {cfg['max_num_seqs']}; one client with {cfg['flood_streams']} closed-loop streams and "
            f"{cfg['light_clients']} with {cfg['light_streams']} each, {cfg['max_tokens']} tokens per request, "
            f"{cfg['duration']:.0f} s measured per configuration. Share: the client's part of the tokens (fair: "
            "equal parts per client).\n\n" + "\n".join(lines)
            + "\n\nA swap's copy cost, block by block against gather/scatter and block groups (median of interleaved "
              "runs):\n\n```\n" + swap_copy.table(record["swap_copy"]) + "\n```"
            + f"\n\nReproduce: `{command(record)}` (results in `bench/results/fairness.json`)."
              "\n\n![](bench/results/fairness.png)")


def plot(record: dict, path: Path) -> None:
    """Left: each client's share of the tokens per configuration (the equal share dashed). Middle: TTFT p50 per
    client. Right: swap copy time per way, per case."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = record["configs"]
    clients = list(next(iter(configs.values()))["clients"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(configs)
    for i, (name, c) in enumerate(configs.items()):
        xs = [j + i * width for j in range(len(clients))]
        axes[0].bar(xs, [c["clients"][k]["share"] for k in clients], width, label=f"{name} (Jain {c['jain']:.2f})")
        axes[1].bar(xs, [c["clients"][k]["ttft_p50_s"] for k in clients], width, label=name)
    for ax in axes[:2]:
        ax.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(clients))], clients, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].axhline(1 / len(clients), ls="--", c="k", lw=0.8)
    axes[0].set_ylabel("share of tokens served")
    axes[1].set_ylabel("TTFT p50, s")
    rows = record["swap_copy"]
    ways = list(rows[0]["seconds"])
    for i, way in enumerate(ways):
        axes[2].bar([j + i * 0.27 for j in range(len(rows))], [1e3 * r["seconds"][way]["median"] for r in rows], 0.27,
                    label=way)
    axes[2].set_xticks([j + 0.27 for j in range(len(rows))],
                       [f"{r['blocks']} {r['layout'][:4]}\n{r['shape']}" for r in rows], fontsize=7)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("swap copy, ms (log)")
    axes[2].legend(fontsize=8)
    cfg = record["config"]
    fig.suptitle(f"fairness: ferry-tiny, {cfg['max_num_seqs']} slots, flood {cfg['flood_streams']} streams + "
                 f"{cfg['light_clients']} light x {cfg['light_streams']}, {cfg['threads']} thread(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
