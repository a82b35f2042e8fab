"""Stage `prepare`: load the configured data source, resize, split (its own test set kept, or
seeded and stratified), write."""
from pipeline.stage import PREPARED, begin, track, user_errors

from anyorder.data.prepare import prepare_dataset


def main() -> None:
    stage = begin(__doc__, "prepare")
    d = stage.settings.data
    with track(stage) as mlflow, user_errors():  # a bad data set fails before anything is written
        meta = prepare_dataset(d.source, d.path, d.image_size, d.val_fraction, d.test_fraction,
                               d.split_seed, PREPARED, d.split)
        mlflow.log_metrics({f"num_{split}": count for split, count in meta["counts"].items()})
        mlflow.log_dict(meta, "meta.json")
    print(f"prepared {d.source} {d.path}: {meta['counts']} images, {meta['num_classes']} classes "
          f"-> {PREPARED}")


if __name__ == "__main__":
    main()
