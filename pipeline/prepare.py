"""Stage `prepare`: load the configured data source, resize, split (seeded, stratified), write."""
from _stage import PREPARED, mlflow_stage, parse_args, settings_or_exit

from anyorder.data import DataError, prepare_dataset


def main() -> None:
    args = parse_args(__doc__)
    settings = settings_or_exit(args.params)
    d = settings.data
    try:
        meta = prepare_dataset(d.source, d.path, d.image_size, d.val_fraction, d.test_fraction,
                               d.split_seed, PREPARED)
    except DataError as exc:
        raise SystemExit(f"error: {exc}") from None
    with mlflow_stage("prepare", settings, args.params, {"data": settings.to_dict()["data"]}) as mlflow:
        mlflow.log_metrics({f"num_{split}": count for split, count in meta["counts"].items()})
        mlflow.log_dict(meta, "meta.json")
    print(f"prepared {d.source}: {meta['counts']} images, {meta['num_classes']} classes -> {PREPARED}")


if __name__ == "__main__":
    main()
