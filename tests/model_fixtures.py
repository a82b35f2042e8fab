"""Tiny models for the merge, pruning and analysis tests: noisy copies of one start, stand-ins
for fine-tunes of the same pretrained model."""
import torch

from conftest import tiny_model


def perturbed(variant="ls", seed=1, scale=0.05, **kw):
    """A tiny model whose weights differ from tiny_model(variant, seed=0) by small noise: a
    stand-in for a fine-tune of the same start."""
    model = tiny_model(variant, seed=0, **kw)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model
