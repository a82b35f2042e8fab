"""Robustness: nullspace noise and its synthesis (`nullspace`), adversarial attacks (`attacks`),
CIFAR-10-C corruptions (`corruptions`), the evaluation of one model under all of them
(`evaluate`), its record and the robustness page (`record`, `report`); their settings
(`settings`) and the corruption names (`corruption_names`), which load without torch.
"""
