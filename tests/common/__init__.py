"""Fixtures and helpers shared by test modules (warehouse keeps its in tests/common/)."""
