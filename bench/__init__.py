"""The benchmark scripts, each run as a module from the repository root: `python -m bench.<name> ...`
(see bench/README.md)."""
