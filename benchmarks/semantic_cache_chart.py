"""The semantic-cache guide's chart: hit rate vs threshold, one panel per guard.

Reads the sweep that ``benchmarks/semantic_cache_eval.py`` writes
(``docs/assets/semantic_cache_thresholds.json``: per guard, per threshold, the hit rate of each
pair kind) and draws ``docs/assets/semantic_cache_thresholds.png``: the paraphrase hit rate
(should be high) against the false-hit rates of the near duplicates (numbers, articles, dates,
codes, entities, negations; should be zero), with each guard's default threshold marked. It also
prints the table of the guide from the same file, so chart and table cannot disagree.

    python benchmarks/semantic_cache_eval.py      # measures, writes the JSON
    python benchmarks/semantic_cache_chart.py     # draws the PNG, prints the table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "assets" / "semantic_cache_thresholds.json"
CHART = ROOT / "docs" / "assets" / "semantic_cache_thresholds.png"
KINDS = ("paraphrase", "number", "article", "date", "code", "entity", "negation")
GUARDS = ("hybrid", "dense", "rerank")


def table(data: dict[str, Any]) -> str:
    """The guide's markdown table (as the eval prints it): hit rate per guard row and kind."""
    lines = [f"| guard | {' | '.join(KINDS)} |", "|---|" + "---:|" * len(KINDS)]
    for name, rates in data["table"].items():
        cells = " | ".join(f"{100 * rates.get(kind, 0):.0f} %" for kind in KINDS)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def default_thresholds(data: dict[str, Any]) -> dict[str, float]:
    """Each guard's default threshold, read from the table's row names (``guard @ t ...``)."""
    found: dict[str, float] = {}
    for name in data["table"]:
        guard, _, rest = name.partition(" @ ")
        if "same paraphrase" in rest:
            continue
        found.setdefault(guard, float(rest.split()[0]))
    return found


def draw(data: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defaults = default_thresholds(data)
    fig, axes = plt.subplots(1, len(GUARDS), figsize=(13, 4), sharey=True)
    for ax, guard in zip(axes, GUARDS, strict=True):
        rows = data["sweep"][guard]
        x = [row["threshold"] for row in rows]
        for kind in KINDS:
            y = [100 * row.get(kind, 0) for row in rows]
            if kind == "paraphrase":
                ax.plot(x, y, color="tab:green", linewidth=2.5, label="paraphrases (should hit)")
            else:
                ax.plot(x, y, linewidth=1.2, linestyle="--", label=f"{kind} (false hits)")
        if guard in defaults:
            ax.axvline(defaults[guard], color="black", linewidth=0.8, linestyle=":")
            ax.annotate(
                f"default {defaults[guard]:g}",
                (defaults[guard], 102),
                ha="center",
                fontsize=8,
            )
        if guard == "dense":
            matched = data.get("dense_matched_threshold")
            if matched is not None:
                ax.axvline(matched, color="tab:red", linewidth=0.8, linestyle=":")
                ax.annotate(
                    f"{matched:g}: hybrid's\nparaphrase hits ",
                    (matched, 40),
                    ha="right",
                    fontsize=8,
                    color="tab:red",
                )
        title = guard + (" (untrained head)" if guard == "rerank" else "")
        ax.set_title(title)
        ax.set_xlabel("threshold")
        ax.set_ylim(-3, 110)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("hit rate (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(KINDS), fontsize=8, frameon=False)
    fig.suptitle("Semantic cache: hit rate vs threshold per guard (all-MiniLM-L6-v2)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--out", default=str(CHART))
    args = parser.parse_args()
    data = json.loads(Path(args.data).read_text(encoding="utf-8"))
    draw(data, Path(args.out))
    print(table(data))
    print(f"chart written to {args.out}")


if __name__ == "__main__":
    main()
