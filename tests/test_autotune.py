"""Per-machine decisions for CPU optimisations (lazarus.autotune) and fast_cpu_kernels: auto."""

import json
import math

import pytest

from lazarus import autotune
from lazarus.models import fast_cpu as F


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAZARUS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LAZARUS_AUTOTUNE", raising=False)
    return tmp_path / "autotune.json"


def counting(seconds_on, seconds_off):
    calls = []

    def measure():
        calls.append(1)
        return seconds_on, seconds_off

    return measure, calls


def test_a_feature_is_used_only_when_it_wins_and_the_verdict_is_cached(cache):
    win, calls = counting(1.0, 1.5)
    assert autotune.decide("feature_a", win) is True
    assert autotune.decide("feature_a", win) is True and len(calls) == 1  # second time from the cache
    lose, calls = counting(1.0, 1.01)  # within MIN_GAIN: a tie keeps the plain path
    assert autotune.decide("feature_b", lose) is False
    saved = json.loads(cache.read_text())[autotune.machine_key()]
    assert saved["feature_a"]["enabled"] is True and saved["feature_a"]["speedup"] == 1.5
    assert saved["feature_b"]["enabled"] is False


def test_another_mlx_version_or_cpu_is_measured_again(cache, monkeypatch):
    measure, calls = counting(1.0, 2.0)
    autotune.decide("feature", measure)
    monkeypatch.setattr(autotune, "machine_key", lambda: "Other CPU | 2 cores | mlx 9.9 | blas x")
    autotune.decide("feature", measure)
    assert len(calls) == 2 and len(json.loads(cache.read_text())) == 2


def test_switched_off_or_unreadable_cache(cache, monkeypatch):
    measure, calls = counting(1.0, 2.0)
    monkeypatch.setenv("LAZARUS_AUTOTUNE", "off")
    assert autotune.decide("feature", measure) is False and not calls  # safe choice, nothing measured
    monkeypatch.delenv("LAZARUS_AUTOTUNE")
    cache.write_text("{not json")
    assert autotune.decide("feature", measure) is True and len(calls) == 1


def test_an_unwritable_or_malformed_cache_never_stops_a_run(cache, monkeypatch, tmp_path):
    measure, calls = counting(1.0, 2.0)
    cache.write_text(json.dumps({autotune.machine_key(): {"feature": "yes", "other": {"no_enabled": 1}}}))
    assert autotune.decide("feature", measure) is True and len(calls) == 1  # malformed entry = not measured
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LAZARUS_CACHE_DIR", str(tmp_path / "file" / "sub"))  # cannot be created
    assert autotune.decide("feature", measure) is True and len(calls) == 2  # measured, not cached, no error


def test_auto_follows_the_cached_verdict_for_this_machine(cache, tiny):
    model, _ = tiny
    for verdict in (True, False):
        cache.write_text(json.dumps({autotune.machine_key(): {"fast_cpu_kernels": {"enabled": verdict}}}))
        with F.fast_cpu_kernels(model, "auto") as on:
            assert on is verdict


def test_the_kernel_micro_benchmark_runs_both_paths_and_leaves_the_rng_alone():
    import mlx.core as mx

    mx.random.seed(5)
    before = mx.random.state[0].tolist()
    t_on, t_off = F._time_small_llama_step()
    assert all(math.isfinite(t) and t > 0 for t in (t_on, t_off))
    assert mx.random.state[0].tolist() == before  # the run's random numbers do not shift


def test_processes_starting_together_measure_once(cache):
    import threading
    import time

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.3)
        return 1.0, 2.0

    results = []
    threads = [threading.Thread(target=lambda: results.append(autotune.decide("feature", slow))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True, True, True] and len(calls) == 1


def test_config_accepts_auto_and_booleans_only():
    from pydantic import ValidationError

    from lazarus.training import SFTConfig

    assert SFTConfig().fast_cpu_kernels == "auto"
    assert SFTConfig(fast_cpu_kernels=False).fast_cpu_kernels is False
    with pytest.raises(ValidationError, match="fast_cpu_kernels"):
        SFTConfig(fast_cpu_kernels="sometimes")
