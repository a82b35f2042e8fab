"""Stage `corrupt`: the corrupted test sets, generated once (seeded) and cached by DVC.

Writes data/corrupted/<corruption>.npz (x: severities x N x H x W x 3 uint8, in the order of
robustness.corruptions.severities) and manifest.json. Reruns only when the test split, the
corruption code or robustness.corruptions change.
"""
import numpy as np

from _stage import CORRUPTED, PREPARED, begin, track, user_errors

from anyorder.robustness.corruptions import corrupt
from anyorder.data.prepared import load_split
from anyorder.files import atomic_directory, atomic_write_bytes, atomic_write_json, npz_bytes


def main() -> None:
    stage = begin(__doc__, "corrupt")
    cfg = stage.settings.robustness.corruptions
    with user_errors():
        images, labels = load_split(PREPARED, "test")
    with track(stage) as mlflow:
        with atomic_directory(CORRUPTED) as out:
            for name in cfg.names:
                stack = np.stack([corrupt(images, name, s, cfg.seed) for s in cfg.severities])
                atomic_write_bytes(out / f"{name}.npz", npz_bytes({"x": stack}))
            atomic_write_json(out / "manifest.json", {
                "names": list(cfg.names), "severities": list(cfg.severities), "seed": cfg.seed,
                "split": "test", "num_images": int(len(labels))})
        mlflow.log_metric("num_corrupted_sets", len(cfg.names) * len(cfg.severities))
    print(f"corrupt: {len(cfg.names)} corruptions x {len(cfg.severities)} severities of "
          f"{len(labels)} test images -> {CORRUPTED}")


if __name__ == "__main__":
    main()
