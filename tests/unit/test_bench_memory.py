"""The memory benchmark's arithmetic (the measurements themselves are the benchmark's to run, not the suite's)."""

import pytest

from llm.bench.memory import GIB, estimate_bytes, fit, params_of, summarize


def test_llama_3_2_1b_shape_and_estimates():
    assert params_of(16) == 1_235_814_400  # Llama-3.2-1B, tied embeddings
    assert estimate_bytes("full", 16, 512) > 19 * GIB > 4 * estimate_bytes("lora", 1, 512)


def test_fit_and_summary():
    assert fit([(1, 5.0), (2, 6.0), (4, 8.0)], 16) == pytest.approx(20.0)
    assert fit([(4, 8.0)], 16) is None
    rows = [
        {"mode": "full", "layers": 1, "peak_rss_gib": 5.0, "step_s": 2.0},
        {"mode": "full", "layers": 2, "peak_rss_gib": 6.0, "step_s": 3.0},
        {"mode": "lora", "layers": 1, "peak_rss_gib": 2.0, "step_s": 1.0},
        {"mode": "lora", "layers": 16, "peak_rss_gib": 6.0, "step_s": 9.0},
        {"mode": "full", "layers": 16, "skipped": "needs ~21 GiB"},
    ]
    s = summarize(rows, 16)
    assert s["full_peak_gib"] == pytest.approx(20.0) and s["full_peak_is"] == "extrapolated"
    assert s["lora_peak_gib"] == 6.0 and s["lora_peak_is"] == "measured" and s["lora_over_full"] == pytest.approx(0.3)
    assert s["ratio_by_layers"] == {1: 0.4} and s["step_s_lora_over_full_by_layers"] == {1: 0.5}
