"""Training-stream sources and the Parquet stream they are written to."""
