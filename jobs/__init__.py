"""Thin Ray entry points: each runs as ``python -m jobs.<name>`` or under ``ray job submit``."""
