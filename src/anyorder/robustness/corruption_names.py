"""The corruptions `anyorder.robustness.corruptions` applies, by family, and their severities.
Plain names (no torch), so that the settings can check robustness.corruptions without it."""
from __future__ import annotations

SEVERITIES = (1, 2, 3, 4, 5)
FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS = tuple(name for names in FAMILIES.values() for name in names)
FAMILY_OF = {name: family for family, names in FAMILIES.items() for name in names}
