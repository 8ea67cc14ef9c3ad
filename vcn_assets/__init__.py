"""The Dagster layer of the platform: definitions, assets, partitions, sensors, checks, CLI."""
