"""Timing shared by the benchmark scripts; no dependencies, so the PyTorch worker can use it too."""

import time


def best_of_each(fns: dict, repeats: int) -> dict:
    """The best time of each function, the functions taking turns (so that a slow spell of this
    noisy machine hits them all alike), after two warm-up rounds."""
    times: dict = {name: [] for name in fns}
    for r in range(repeats + 2):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    return {name: min(ts) for name, ts in times.items()}
