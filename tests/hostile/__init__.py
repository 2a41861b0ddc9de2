"""Hostile inputs: a corpus of attacks and malformed inputs, each asserting a typed error or a correct result."""
