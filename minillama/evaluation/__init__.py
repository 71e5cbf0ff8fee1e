"""Evaluation: chunked perplexity per context length and passkey retrieval (`evaluate.py`), the passkey
protocol itself (`passkey.py`), long-context evaluation over variants (`longctx.py`)."""
