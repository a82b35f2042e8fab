"""Stage `pretrain`: the sequential baseline every fine-tune starts from (from scratch, or from
timm pre-trained weights when `model.pretrained` names them)."""
from _stage import PRETRAINED, PREPARED, file_digest, model_spec, parse_args, settings_or_exit, train_and_save

from anyorder.data import load_meta
from anyorder.model import build_model


def main() -> None:
    args = parse_args(__doc__)
    settings = settings_or_exit(args.params)
    meta = load_meta(PREPARED)
    spec = model_spec(settings, meta["class_names"], "sequential")
    cfg = settings.pretrain
    model = build_model(spec, settings.model.pretrained, seed=cfg.seed)
    params = {"model": settings.to_dict()["model"], "pretrain": settings.to_dict()["pretrain"]}
    result = train_and_save("pretrain", settings, args.params, model, cfg, cfg.seed, PRETRAINED,
                            "pretrain", params, fingerprint_extra=file_digest(PREPARED / "train.npz"))
    print(f"pretrain: {result.history[-1]}")


if __name__ == "__main__":
    main()
