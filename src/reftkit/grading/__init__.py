"""Grading: reading answers off completions, the CoT styles' graders, voting over samples, the reward model."""
