"""File formats exchanged with other tools: track datasets (format v1) and their predictions."""
