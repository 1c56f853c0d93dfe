"""Shared helpers live in tests/support.py; pyproject.toml puts tests/ on the import path."""
