"""Orchestration and the `vlpipe` command line."""
