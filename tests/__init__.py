"""mda test suite (a regular package: kronfluence's wheel installs a top-level `tests` package that would shadow a namespace one)."""
