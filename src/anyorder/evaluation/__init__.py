"""Evaluation: accuracy over seeded random orders and choosing the best run (`accuracy`), the
orders themselves (`orders`), test-time pruning (`pruning`), block-by-slot analysis
(`analysis`), registry gates (`gates`), bootstrap intervals of differences (`intervals`).
"""
