"""Reliability tier: fuzzing of every decoder, hostile input, keys and exposure."""
