"""FID against total training FLOPs, over several budgets and seeds: the figure of DDM.

``make eval`` trains the same run to 1x, 2x and 4x the demo's budget (resuming, so each budget
continues the last) for each of two seeds, and evaluates each (budget, seed) with ``--role eval``
into ``<out>/seed_<s>/budget_<b>/eval.json``. This module reads those reports and writes:

    budgets.md    per budget and row: FID for each seed, their mean and spread, the held-out FID
                  beside it, and the training FLOPs the row's models cost; then what the gap between
                  the ensemble and the monolith is made of, per budget and seed, as paired differences
                  with their 95 % intervals: the goal itself (top-2, with either router, against the
                  monolith at equal compute), what the router loses (top-1 against the oracle), what
                  the experts give at equal compute (oracle against the monolith) and at equal steps
                  (oracle against monolith@S, the monolith at the experts' step count)
    budgets.json  the same numbers
    fid_flops.png FID (mean over seeds, bars: the seeds' range; one seed's FID if there is one)
                  against total training FLOPs, one line each for top-1, top-2, the full ensemble
                  (with either router: +text is the router that reads the prompt), the oracle and the
                  monolith (and the monolith at the experts' steps, at its own, smaller, FLOPs); with
                  one budget evaluated, each row's FID side by side instead

    python -m evaluation.budgets outputs/eval
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from evaluation.eval_report import EvalReport

# DDM's figure: the routing modes and the baseline; the oracle and the monolith at the experts' step
# count say where the gap comes from (the router, or the experts at equal compute or equal steps).
AT_STEPS = "monolith@S"
# The +xt rows route the same experts with a second router that reads only x_t (the run's own router
# reads the prompt); reports of runs whose own router read only x_t have +text rows instead.
ROWS = (
    "top-1", "top-2", "full", "top-1+xt", "top-2+xt", "full+xt", "top-1+text", "top-2+text", "full+text",
    "oracle", "monolith", AT_STEPS,
)  # fmt: skip
# (what it measures, a, b): Δ = FID(a) − FID(b), paired, from each report's comparisons
GAP = (
    ("the goal: top-2 at equal compute", "top-2", "monolith"),
    ("the goal, with the router that reads the prompt", "top-2+text", "monolith"),
    ("what the router loses", "top-1", "oracle"),
    ("what the router that reads the prompt loses", "top-1+text", "oracle"),
    ("the goal, with the router that reads only x_t", "top-2+xt", "monolith"),
    ("what the router that reads only x_t loses", "top-1+xt", "oracle"),
    ("the experts at equal compute", "oracle", "monolith"),
    ("the experts at equal steps", "oracle", AT_STEPS),
)
_DIR = re.compile(r"seed_(\d+)/budget_(\d+(?:\.\d+)?)$")
_AT = re.compile(r"monolith@\d+$")


def row_kind(name: str) -> str:
    """A report's row name as this summary groups it: ``monolith@8000`` is ``monolith@S``."""
    return AT_STEPS if _AT.match(name) else name


Report = tuple[int, float, EvalReport]  # (seed, budget, eval.json)


def reports(root: Path) -> Iterator[Report]:
    """(seed, budget, eval.json) for every ``seed_S/budget_B`` report under ``root``."""
    for path in sorted(root.glob("seed_*/budget_*/eval.json")):
        if m := _DIR.search(path.parent.as_posix()):
            yield int(m[1]), float(m[2]), EvalReport.from_dict(json.loads(path.read_text()))


def collect(found: list[Report]) -> list[dict]:
    """One entry per (seed, budget, row) of the reports ``found``."""
    out = []
    for seed, budget, report in found:
        flops = report.train_flops or {}
        for row in report.rows:
            if row_kind(row["name"]) not in ROWS:
                continue
            out.append(
                {
                    "seed": seed,
                    "budget": budget,
                    "row": row_kind(row["name"]),
                    "fid": row["fid"],
                    "fid_heldout": row.get("fid_heldout"),
                    "images": report.heldout_images,
                    "reference": report.reference or "holdout",
                    "flops": flops.get(row["name"]),
                }
            )
    return out


def gap(found: list[Report]) -> list[dict]:
    """Per (budget, seed): the paired differences of ``GAP`` that its report holds."""
    out = []
    for seed, budget, report in found:
        for what, a, b in GAP:
            for c in report.comparisons or []:
                if c["a"] == a and row_kind(c["b"]) == b:
                    out.append({"budget": budget, "seed": seed, "what": what, **c})
    return sorted(out, key=lambda g: (g["budget"], g["seed"]))


def summarise(entries: list[dict]) -> list[dict]:
    """Per (budget, row): the seeds' FIDs, mean and range, the held-out FIDs' mean, and FLOPs."""
    out = []
    for budget in sorted({e["budget"] for e in entries}):
        for row in ROWS:
            es = sorted((e for e in entries if e["budget"] == budget and e["row"] == row), key=lambda e: e["seed"])
            if not es:
                continue
            fids = [e["fid"] for e in es]
            held = [e["fid_heldout"] for e in es if e["fid_heldout"] is not None]
            flops = [e["flops"] for e in es if e["flops"]]
            out.append(
                {
                    "budget": budget,
                    "row": row,
                    "seeds": [e["seed"] for e in es],
                    "fids": fids,
                    "mean": float(np.mean(fids)),
                    "low": min(fids),
                    "high": max(fids),
                    "heldout_mean": float(np.mean(held)) if held else None,
                    "flops": float(np.mean(flops)) if flops else None,
                    "images": es[0]["images"],
                }
            )
    return out


def markdown(summary: list[dict], gaps: list[dict] = ()) -> str:
    seeds = f"; {seeds_label(summary, ' and their range')}" if summary else ""
    lines = [
        "# FID against training compute",
        "",
        "FID of each row against the training split (paired: one generated image per training caption), the "
        f"same images' FID against the held-out split beside it{seeds}.",
        "",
        "| budget | model | images | FID ↓ per seed | mean [range] | held-out FID | training TFLOPs |",
        "|---:|---|---:|---|---|---:|---:|",
    ]
    for s in summary:
        per_seed = ", ".join(f"{f:.1f}" for f in s["fids"])
        held = "–" if s["heldout_mean"] is None else f"{s['heldout_mean']:.1f}"
        flops = "–" if s["flops"] is None else f"{s['flops'] / 1e12:.1f}"
        lines.append(
            f"| {s['budget']:g}x | {s['row']} | {s['images']} | {per_seed} | {s['mean']:.1f} "
            f"[{s['low']:.1f}, {s['high']:.1f}] | {held} | {flops} |"
        )
    if gaps:
        lines += [
            "",
            "## What the gap is made of",
            "",
            "Paired differences Δ = FID(a) − FID(b) on the same images, 95 % interval from paired resamples; "
            "negative: a is better. monolith@S is the monolith at the experts' step count (equal steps: "
            "equal wall-clock when the K experts train on K machines).",
            "",
            "| budget | seed | what | a − b | Δ [95 % CI] |",
            "|---:|---:|---|---|---|",
        ]
        for g in gaps:
            ci = "" if g["delta_ci95"] is None else f" [{g['delta_ci95'][0]:+.1f}, {g['delta_ci95'][1]:+.1f}]"
            lines.append(
                f"| {g['budget']:g}x | {g['seed']} | {g['what']} | {g['a']} − {g['b']} | {g['delta']:+.1f}{ci} |"
            )
    return "\n".join(lines) + "\n"


def seeds_label(summary: list[dict], spread: str = ", bars: range") -> str:
    """What a row's FID is: one seed's, or the mean over the seeds (then followed by ``spread``,
    how their range is shown)."""
    seeds = sorted({s for e in summary for s in e["seeds"]})
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"mean over seeds {', '.join(map(str, seeds))}{spread}"


STYLES = {  # row → (colour, marker, line): a routing mode keeps its colour with either router
    "top-1": ("tab:blue", "o", "-"),
    "top-2": ("tab:green", "s", "-"),
    "full": ("tab:purple", "^", "-"),
    "top-1+text": ("tab:blue", "o", "-."),
    "top-2+text": ("tab:green", "s", "-."),
    "full+text": ("tab:purple", "^", "-."),
    "top-1+xt": ("tab:blue", "o", ":"),
    "top-2+xt": ("tab:green", "s", ":"),
    "full+xt": ("tab:purple", "^", ":"),
    "oracle": ("tab:gray", "v", "--"),
    "monolith": ("black", "D", "-"),
    AT_STEPS: ("tab:orange", "P", ":"),
}


def _label(row: str) -> str:
    return "monolith at the experts' steps" if row == AT_STEPS else row


def plot(summary: list[dict], path: Path) -> None:
    """Write ``figure(summary)`` to ``path``."""
    fig = figure(summary)  # first: it chooses the Agg backend before pyplot is imported
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(summary: list[dict]):
    """fid_flops.png: FID against training FLOPs, a line per row over the budgets; with a single
    budget, whose points would all sit on one vertical line, the rows side by side instead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    budgets = sorted({s["budget"] for s in summary if s["flops"]})
    if len(budgets) == 1:
        _plot_one_budget(ax, summary, budgets[0])
    else:
        _plot_budgets(ax, summary)
    fig.tight_layout()
    return fig


def _plot_budgets(ax, summary: list[dict]) -> None:
    labelled: set[tuple[bool, float]] = set()
    for row in ROWS:
        pts = [s for s in summary if s["row"] == row and s["flops"]]
        if not pts:
            continue
        x = np.array([s["flops"] for s in pts])
        y = np.array([s["mean"] for s in pts])
        err = np.array([[s["mean"] - s["low"] for s in pts], [s["high"] - s["mean"] for s in pts]])
        color, marker, line = STYLES[row]
        width = 2 if row == "monolith" else 1.5
        ax.errorbar(x, y, yerr=err, color=color, marker=marker, ls=line, capsize=3, label=_label(row), lw=width)
        # Each budget named once (the routed rows and the monolith share its FLOPs, and one label per
        # point overlaps); monolith@S sits at its own, smaller FLOPs, so it names its own.
        for s in pts:
            key = (row == AT_STEPS, s["budget"])
            if key not in labelled:
                labelled.add(key)
                where = (s["flops"], s["mean"])
                ax.annotate(f"{s['budget']:g}x", where, textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(
        xscale="log",
        xlabel="total training FLOPs (experts + router, or the monolith)",
        ylabel="FID against the training split (lower is better)",
        title=f"FID against training compute ({seeds_label(summary)})",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()


def _plot_one_budget(ax, summary: list[dict], budget: float) -> None:
    pts = [s for row in ROWS for s in summary if s["row"] == row and s["budget"] == budget and s["flops"]]
    for i, s in enumerate(pts):
        color, marker, _ = STYLES[s["row"]]
        err = [[s["mean"] - s["low"]], [s["high"] - s["mean"]]]
        ax.errorbar([s["mean"]], [i], xerr=err, color=color, marker=marker, capsize=3, ls="none")
        ax.annotate(
            f"{s['mean']:.1f}  ({s['flops'] / 1e12:.0f} TFLOPs)",
            (s["mean"], i),
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
            fontsize=8,
        )
    ax.set_yticks(range(len(pts)), [_label(s["row"]) for s in pts])
    ax.set_ylim(len(pts) - 0.5, -0.7)  # the first row on top, room for its label
    ax.set(
        xlabel="FID against the training split (lower is better)",
        title=f"FID per row at {budget:g}x the demo's budget\n({seeds_label(summary)})",
    )
    ax.margins(x=0.12)  # room for the labels centred on the outermost points
    ax.grid(alpha=0.3, axis="x")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "outputs/eval")
    found = list(reports(root))  # each eval.json read once, for the table and for the gap
    entries = collect(found)
    if not entries:
        print(f"error: no seed_*/budget_*/eval.json under {root}; run make eval first", file=sys.stderr)
        return 2
    summary, gaps = summarise(entries), gap(found)
    (root / "budgets.json").write_text(json.dumps({"rows": summary, "gap": gaps}, indent=1) + "\n")
    (root / "budgets.md").write_text(markdown(summary, gaps))
    plot(summary, root / "fid_flops.png")
    print(markdown(summary, gaps))
    print(f"wrote {root}/budgets.md, budgets.json, fid_flops.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
