"""The model: its settings (`settings`: architecture overrides, variants and their knobs),
the model spec and timm architecture (`spec`), the any-order ViT with its variant parts,
LS-pos slot adapters and the LS-pred position head (`vit`), checkpoints (`checkpoint`),
block-wise merging (`merge`) and a merge as the pipeline runs it (`merge_run`).
"""
