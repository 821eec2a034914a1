"""Plumbing every stage uses: the typed params schema, errors, atomic I/O, content identities, compute and distributed context, MLflow tracking, the launcher and the stage runner, plots."""
