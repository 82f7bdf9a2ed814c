"""What finished runs are turned into: evaluation metrics, the results tree read back, statistics, comparisons,
the papers' numbers, figures, the report, fingerprints and expected numbers. Imports `core` and `runtime`."""
