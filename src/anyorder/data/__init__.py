"""Data: reading sources (`sources`, `images`), splitting (`splits`), the prepare stage's
work (`prepare`), reading what it wrote (`prepared`), and turning stored images into model
inputs (`inputs`: normalisation, random-shift augmentation); the data settings (`settings`).
"""
