"""Plot optimizer.step() time against sparsity for each contender, from bench_step.py's CSV.

    python benchmarks/plot.py benchmarks/results/bench_step.csv -o benchmarks/results/bench_step.png
"""
import argparse
import csv
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv")
    parser.add_argument("-o", "--output", default="bench_step.png")
    parser.add_argument("--gpu", help="only rows of this card (default: the card of the last row)")
    args = parser.parse_args()

    with open(args.csv) as f:
        rows = list(csv.DictReader(f))
    gpu = args.gpu or rows[-1]["gpu"]
    rows = [r for r in rows if r["gpu"] == gpu and " K=" not in r["contender"]]  # no sweep variants
    dtypes = sorted({r["dtype"] for r in rows}, key=lambda d: d != "fp32")
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        series = defaultdict(dict)
        floor = {}
        for r in rows:
            if r["dtype"] == dtype:
                series[r["contender"]][float(r["sparsity"])] = float(r["ms"])
                floor[float(r["sparsity"])] = float(r["floor_ms"])
        for name, points in sorted(series.items()):
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=name, linewidth=2.5 if "sparse" in name else 1.2)
        xs = sorted(floor)
        ax.plot(xs, [floor[x] for x in xs], "k--", label="live bytes / copy bandwidth")
        ax.set_yscale("log")
        ax.set_xlabel("fraction of 16x16 blocks pruned")
        ax.set_ylabel("ms per optimizer step")
        ax.set_title(f"{dtype} params, {int(rows[0]['params']) / 1e9:.2f} B, {gpu}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
