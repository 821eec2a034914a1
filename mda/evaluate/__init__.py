"""Did the data cause the unit: effects, the unit-level view, statistics, verdicts, LDS, replication, estimator comparison."""
