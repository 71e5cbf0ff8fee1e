"""Evaluation: chunked perplexity per context length and passkey retrieval (`evaluate.py`)."""
