"""Evaluation: per-image correctness over block orders, accuracy over seeded random orders and
choosing the best run (`accuracy`), the orders themselves (`orders`), test-time pruning
(`pruning`), an evaluated model's record (`record`), block-by-slot analysis (`analysis`,
`slot_analysis`), registry gates (`gates`), bootstrap intervals of differences (`intervals`).
"""
