"""Training: the loop (`loop`), one step's losses and update (`step`), optimiser and schedule
(`optimizer`), on-device epoch sums and when the host reads them (`epoch_sums`), resuming a
killed run (`resume`), several processes under torchrun (`distributed`); the training settings (`settings`).
"""
