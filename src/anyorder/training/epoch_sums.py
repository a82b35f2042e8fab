"""An epoch's running figures (loss sums, correct count, divergence flag), kept on the device, and
when the host reads them: every step on CPU, only at the epoch's last step on a GPU."""
from __future__ import annotations

import torch

from anyorder.errors import RunFailed
from anyorder.training.step import StepLosses

SUMMED = ("loss", "position_loss", "noisy_loss", "correct")  # an epoch's per-step sums


class TrainingDiverged(RunFailed):
    """The loss became NaN or infinite: the run stops instead of saving a broken model."""


def host_reads_sums_at(step: int, steps_per_epoch: int, device: torch.device) -> bool:
    """Whether the host reads the epoch's sums and divergence flag after `step`: every step on
    CPU, where it costs nothing (a diverged loss is caught at its own step); on a GPU once, at
    the epoch's last step, so that no step waits for the host."""
    return device.type == "cpu" or step == steps_per_epoch - 1


class EpochSums:
    """The epoch's sums on the device (float64: the same arithmetic as Python floats), the count
    of images seen, and the first step whose loss was not finite (-1: none), a device flag."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(SUMMED), dtype=torch.float64, device=device)
        self.seen = 0
        self.nonfinite_step = torch.full((), -1, dtype=torch.long, device=device)

    def flag_nonfinite(self, step: int, total: torch.Tensor) -> None:
        """Record `step` as the first non-finite one if its loss is not finite (on the device)."""
        self.nonfinite_step = torch.where((self.nonfinite_step < 0) & ~torch.isfinite(total),
                                          step, self.nonfinite_step)

    def add(self, losses: StepLosses, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a step's losses (weighted by its images) and correct predictions."""
        seen = len(targets)
        self.sums += torch.stack([losses.clean.mean.detach().double() * seen,
                                  losses.position.mean.detach().double() * seen,
                                  losses.noisy.mean.detach().double() * seen,
                                  (logits.argmax(1) == targets).sum().double()])
        self.seen += seen

    def totals(self) -> dict:
        """The epoch's sums (on the device) as Python numbers, with the count of images seen."""
        values = self.sums.tolist()
        totals = dict(zip(SUMMED, values), seen=self.seen)
        totals["correct"] = int(round(totals["correct"]))
        return totals

    def stop_if_diverged(self, total: torch.Tensor, epoch: int, scheduler) -> None:
        """Raise TrainingDiverged if a step of this epoch had a non-finite loss (its first)."""
        step = int(self.nonfinite_step)
        if step >= 0:
            raise TrainingDiverged(
                f"the training loss became non-finite ({float(total.detach())} at the last step checked) at "
                f"epoch {epoch + 1}, step {step + 1} (lr {scheduler.get_last_lr()[0]:.3g}); lower "
                f"the learning rate or set grad_clip. No model was saved.")
