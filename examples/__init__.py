"""Worked examples; each is run by the test suite."""
