"""Measuring: the storage tracker, FLOPs and step timing (`measure.py`), the analytic memory model
(`memory.py`) and the grid benchmark that puts both in tables and plots (`bench.py`)."""
