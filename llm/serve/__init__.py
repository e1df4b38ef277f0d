"""The OpenAI-compatible server (`python -m llm.serve`): continuous batching on the KV cache (`engine.py`, on
`llm.model.batching`), the endpoints and the chat page (`app.py`, `static/chat.html`), the request checks
(`protocol.py`) and the command line (`cli.py`)."""
