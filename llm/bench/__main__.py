"""`python -m llm.bench`: the throughput benchmark (llm/bench/throughput.py)."""

from llm.bench.throughput import main

main()
