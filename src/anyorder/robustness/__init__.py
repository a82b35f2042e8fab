"""Robustness: nullspace noise and its synthesis (`nullspace`), adversarial attacks (`attacks`),
CIFAR-10-C corruptions (`corruptions`), and the evaluation of one model under all of them
(`evaluate`); their settings (`settings`) and the corruption names (`corruption_names`),
which load without torch.
"""
