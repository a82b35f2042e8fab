"""Stage `corrupt`: the corrupted test sets, generated once (seeded) and cached by DVC.

Writes data/corrupted/<corruption>.npz (x: severities x N x H x W x 3 uint8, in the order of
robustness.corruptions.severities) and manifest.json. Reruns only when the test split, the
corruption code or robustness.corruptions change.
"""
from pipeline.stage import CORRUPTED, PREPARED, begin, track, user_errors

from anyorder.data.prepared import load_split
from anyorder.files import atomic_directory, atomic_write_bytes, atomic_write_json, npz_bytes
from anyorder.robustness.corruptions import corrupt_severities


def main() -> None:
    stage = begin(__doc__, "corrupt")
    cfg = stage.settings.robustness.corruptions
    with user_errors():
        images, labels = load_split(PREPARED, "test")
    with track(stage) as mlflow:
        with atomic_directory(CORRUPTED) as out:
            for name in cfg.names:
                stack = corrupt_severities(images, name, cfg.severities, cfg.seed)
                atomic_write_bytes(out / f"{name}.npz", npz_bytes({"x": stack}))
            atomic_write_json(out / "manifest.json", {
                "names": list(cfg.names), "severities": list(cfg.severities), "seed": cfg.seed,
                "split": "test", "num_images": int(len(labels))})
        mlflow.log_metric("num_corrupted_sets", len(cfg.names) * len(cfg.severities))
    print(f"corrupt: {len(cfg.names)} corruptions x {len(cfg.severities)} severities of "
          f"{len(labels)} test images -> {CORRUPTED}")


if __name__ == "__main__":
    main()
