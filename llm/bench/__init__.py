"""Benchmarks, run by hand: `python -m llm.bench` (throughput and memory against HF transformers: `throughput`) and
`python -m llm.bench.data` (data preparation against the raw `tokenizers` encoder: `data`)."""
