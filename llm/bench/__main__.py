"""`python -m llm.bench`: the throughput benchmark (llm/bench/throughput.py); `python -m llm.bench moe ...`: mixture
of experts against dense models (llm/bench/moe.py)."""

import sys

if sys.argv[1:2] == ["moe"]:
    from llm.bench.moe import main

    main(sys.argv[2:])
else:
    from llm.bench.throughput import main

    main()
