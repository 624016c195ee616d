"""Measuring an arm: the timing protocol, answer parsing and scoring, local metric modules."""
