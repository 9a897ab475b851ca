"""``benchmarks/RESULTS.md``: the machine description and the report every benchmark appends to.

``make bench`` starts a fresh report (``python -m benchmarks.results --new``) and then runs every
benchmark, each appending its section; run alone, a benchmark appends to the existing report.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\n"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def append_section(text: str, path: str | Path = RESULTS) -> None:
    """Add one benchmark's section (markdown) to the report, creating it if needed."""
    out = Path(path)
    prev = out.read_text() if out.exists() else HEADER
    out.write_text(prev + text.rstrip("\n") + "\n\n")


def new_report(path: str | Path = RESULTS) -> None:
    Path(path).write_text(
        HEADER + f"Written by `make bench` on {time.strftime('%Y-%m-%d')}; machine: {machine()}. "
        "Every figure is a ratio of two measurements taken side by side in the same run.\n\n"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new", action="store_true", help="start a fresh report")
    ap.add_argument("--out", default=str(RESULTS))
    if ap.parse_args().new:
        new_report(ap.parse_args().out)
