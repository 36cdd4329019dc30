"""Latency of the live rank/alpha explorer: what one slider move costs.

Drives `RankAlphaExplorer.update` (what a slider move calls: retrain chapter 3's
adapter on the cached statistics, redraw the figure, hand the PNG to the widget)
over a sweep of slider values, then repeats the sweep, which the cache answers.

Usage: python benchmarks/explorer_latency.py

Goals (issue 4), on the 2-core CI machine: median at most 300 ms, worst at most 1 s.
"""

from __future__ import annotations

import statistics
import time

import lora_tutorial as lt
from lora_tutorial.explorer import ALPHA_RANGE

RANKS = [1, 2, 3, 4, 6, 8, 12, 16]
ALPHAS = [ALPHA_RANGE[0], 1.0, 4.0, 16.0, 64.0, ALPHA_RANGE[1]]


def main() -> None:
    start = time.perf_counter()
    explorer = lt.rank_alpha_explorer()
    print(f"explorer ready in {1e3 * (time.perf_counter() - start):.0f} ms (loads the checkpoint, first figure)")
    sweep = [(r, a, rs) for rs in (False, True) for r in RANKS for a in ALPHAS]
    for label in ("new settings (retrain + redraw)", "the same settings again (cache)"):
        times = [1e3 * explorer.update(*setting) for setting in sweep]
        print(f"{label:34s} {len(times)} moves: median {statistics.median(times):7.2f} ms, "
              f"worst {max(times):7.2f} ms")
    print("goals: median <= 300 ms, worst <= 1000 ms")


if __name__ == "__main__":
    main()
