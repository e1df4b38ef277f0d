"""`python -m llm.serve`: see llm/serve/cli.py."""

import sys

from llm.serve.cli import main

sys.exit(main())
