"""Where results live: the DuckDB warehouse, S3 objects and atomic local files."""
