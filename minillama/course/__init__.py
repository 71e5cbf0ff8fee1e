"""Course material, kept apart from the library: the synthetic corpora (`corpora.py`), the tiny-model
recipe (`recipe.py`), the knowledge-injection experiment (`knowledge.py`) and where the shipped data
lives (`paths.py`)."""
