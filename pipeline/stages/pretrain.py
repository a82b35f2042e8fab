"""Stage `pretrain`: the sequential baseline every fine-tune starts from (from scratch, or from
timm pre-trained weights when `model.pretrained` names them)."""
from pathlib import Path

from pipeline.outputs import train_and_log
from pipeline.stage import PLOTS, PREPARED, PRETRAINED, WEIGHTS_DIR, begin, fail, user_errors

from anyorder.data.prepared import load_meta
from anyorder.device import resolve_device
from anyorder.model.spec import model_spec
from anyorder.model.vit import build_model
from anyorder.training.loop import train_and_save


def main() -> None:
    stage = begin(__doc__, "pretrain")
    settings = stage.settings
    m, cfg = settings.model, settings.pretrain
    with user_errors():  # every check that needs no training: exit 2, nothing written
        if m.pretrained not in ("none", "timm") and \
                WEIGHTS_DIR.resolve() not in Path(m.pretrained).resolve().parents:
            fail(f"model.pretrained: {m.pretrained!r} is not inside {WEIGHTS_DIR}/; copy the file "
                 f"there (or `dvc import-url` it there) so that DVC reruns this stage when it "
                 f"changes, and set model.pretrained: {WEIGHTS_DIR}/<file>.safetensors")
        resolve_device(cfg.train.device, "pretrain.train.device")
        meta = load_meta(PREPARED)
        spec = model_spec(m, meta["image_size"], meta["class_names"])
        model = build_model(spec, m.pretrained, seed=cfg.seed)
    train_and_log(stage, train_and_save, model, cfg.train, cfg.seed, PRETRAINED,
                  PLOTS / "train" / "pretrain.csv")


if __name__ == "__main__":
    main()
