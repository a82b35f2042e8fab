"""anyorder: vision transformers whose blocks run in any order (LayerShuffle), as a library.

Modules: config, data, model, orders, train, evaluate, checkpoint, files, summary, errors.
"""
