"""`python -m llm.bench.data` runs end to end on a tiny corpus and reports its fields (never its timings): both
sides count the same tokens, the peak RSS of the preparing process tree is measured, and nothing is left behind."""

from __future__ import annotations

import json

import llm.bench.data as bench_data


def test_data_benchmark_reports_throughput_and_peak_rss(tiny_tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_data, "PREPARE_CONTEXT", "fork")  # no fresh interpreter: the suite stays fast
    tiny_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    report = bench_data.main(
        [
            "--sizes-mb",
            "0.4",
            "0.6",
            "--num-proc",
            "2",
            "--work-dir",
            str(tmp_path / "work"),
            "--tokenizer",
            str(tmp_path / "tokenizer"),
            "--json",
            str(tmp_path / "report.json"),
        ]
    )
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [list(p) for p in printed] == [["0.4MB"], ["0.6MB"], ["peak_rss_ratio"]]
    assert json.loads((tmp_path / "report.json").read_text()) == report
    for size, result in report["sizes"].items():
        assert result["same_tokens"] and result["raw"]["tokens"] == result["prepare"]["tokens"] > 10_000, size
        assert result["num_proc"] == 2 and result["prepare_over_raw"] > 0
        for side in ("raw", "prepare"):
            assert result[side]["tokens_per_s"] > 0 and result[side]["seconds"] > 0
        assert result["prepare"]["peak_rss_mb"] >= result["prepare"]["peak_rss_main_mb"] > 0
        assert result["prepare"]["peak_rss_largest_worker_mb"] > 0  # the tokenizer processes were seen
    assert report["peak_rss_ratio"] > 0
    assert list((tmp_path / "work").iterdir()) == []  # corpora, tokenizer and caches removed
