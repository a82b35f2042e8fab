"""Stage `prepare`: load the configured data source, resize (to data.image_size, or the model's
input size where that is null), split (its own test set kept, or seeded and stratified), write."""
from pipeline.stage import PREPARED, begin, track, user_errors

from anyorder.data.prepare import prepare_dataset
from anyorder.model.spec import resolve_image_size


def main() -> None:
    stage = begin(__doc__, "prepare")
    d = stage.settings.data
    with user_errors():  # reads model.arch and model.overrides; a bad size stops here
        size = resolve_image_size(stage.settings.model, d.image_size)
    with track(stage) as mlflow, user_errors():  # a bad data set fails before anything is written
        meta = prepare_dataset(d.source, d.path, size, d.val_fraction, d.test_fraction,
                               d.split_seed, PREPARED, d.split)
        mlflow.log_metrics({f"num_{split}": count for split, count in meta["counts"].items()})
        mlflow.log_dict(meta, "meta.json")
    print(f"prepared {d.source} {d.path}: {meta['counts']} images, {meta['num_classes']} classes "
          f"-> {PREPARED}")


if __name__ == "__main__":
    main()
