"""A PNG chart of an http_bench.py run: requests/s and p99 latency per server.

::

    python bench/chart.py                                   # $TMPDIR/http_bench.json
    python bench/chart.py results.json docs/performance-http.png

One column per worker count, one row for requests/s and one for p99 (log scale); in each
panel, one group of bars per scenario (mode and connections), one bar per server. A bar
whose server left some of wrk's connections unserved is hatched and labelled with how many
it served. Needs matplotlib (``pip install -e '.[bench]'``: a benchmark-only dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVERS = ["examples.http", "h11 floor", "gunicorn sync", "gunicorn gthread"]
COLOURS = {"examples.http": "#1f77b4", "h11 floor": "#7f7f7f", "gunicorn sync": "#d62728",
           "gunicorn gthread": "#ff9896"}  # fmt: skip
# For any other server (--base REV, --floor-work-us N), in order: none of the above.
SPARE_COLOURS = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]


def draw(results: dict, out: Path) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    workers = sorted({r["workers"] for r in rows})
    scenarios: list[tuple[str, int]] = []
    for r in rows:
        if (r["mode"], r["connections"]) not in scenarios:
            scenarios.append((r["mode"], r["connections"]))
    servers = [s for s in SERVERS if any(r["server"] == s for r in rows)]
    servers += sorted({r["server"] for r in rows} - set(servers))
    spare = iter(SPARE_COLOURS)
    colours = {s: COLOURS.get(s) or next(spare, None) for s in servers}
    fig, axes = plt.subplots(2, len(workers), figsize=(6.5 * len(workers), 8), squeeze=False)
    width = 0.8 / len(servers)
    for col, w in enumerate(workers):
        cells = {(r["mode"], r["connections"], r["server"]): r for r in rows if r["workers"] == w}
        for row, (field, label, scale) in enumerate(
            [("rps", "requests/s (median)", 1.0), ("p99_us", "p99 latency, ms (median)", 1e-3)]
        ):
            ax = axes[row][col]
            for i, server in enumerate(servers):
                xs, ys, partial = [], [], []
                for j, (mode, conns) in enumerate(scenarios):
                    cell = cells.get((mode, conns, server))
                    if cell is None or cell[field] != cell[field]:  # missing or NaN
                        continue
                    xs.append(j + (i - (len(servers) - 1) / 2) * width)
                    ys.append(cell[field] * scale)
                    partial.append(cell["served"] < conns)
                bars = ax.bar(xs, ys, width, label=server, color=colours[server])
                for bar, short in zip(bars, partial, strict=True):
                    if short:
                        bar.set_hatch("//")
                        bar.set_edgecolor("black")
            for j, (mode, conns) in enumerate(scenarios):
                for i, server in enumerate(servers):
                    cell = cells.get((mode, conns, server))
                    if cell is not None and cell["served"] < conns and row == 0:
                        x = j + (i - (len(servers) - 1) / 2) * width
                        ax.annotate(f"{cell['served']}/{conns}\nserved", (x, cell["rps"]),
                                    ha="center", va="bottom", fontsize=7)  # fmt: skip
            ax.set_xticks(range(len(scenarios)))
            ax.set_xticklabels(
                [f"{'keep-alive' if m == 'keep-alive' else 'close'}\nc={c}" for m, c in scenarios]
            )
            if field == "p99_us":
                ax.set_yscale("log")
            ax.set_ylabel(label)
            ax.set_title(f"{w} workers: {label.split(' (')[0]}")
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("hello-world WSGI app, loopback, wrk -t2; hatched: not every connection served",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    default_in = Path(os.environ.get("TMPDIR", "/tmp")) / "http_bench.json"
    p.add_argument("results", nargs="?", default=str(default_in), help=f"({default_in})")
    p.add_argument("out", nargs="?", default=str(REPO / "docs" / "performance-http.png"),
                   help="the PNG to write (docs/performance-http.png)")  # fmt: skip
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("chart: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    draw(json.loads(Path(args.results).read_text()), Path(args.out))
    print(f"chart: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
