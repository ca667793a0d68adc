"""Fault-injection suite: ``.venv/bin/python -m tests.faults --flows N --seed S [--postgres URL]``."""
