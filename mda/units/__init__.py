"""Units of a model: head and model metrics (one implementation), their probes, and locating the target heads and formation window."""
