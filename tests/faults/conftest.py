"""The fault suite uses the shared database fixtures (tests/conftest.py)."""
