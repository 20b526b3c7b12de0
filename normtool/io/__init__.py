"""Checkpoint input and output: lazy reading of every supported format, atomic writing."""
