"""Rollouts: sampling responses (transformers' generate or an engine) and batched decoding with grading."""
