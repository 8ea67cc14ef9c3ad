"""Per-movie software-defined assets."""
