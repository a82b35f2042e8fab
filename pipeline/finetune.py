"""Stage `finetune@<run>`: fine-tune one variant (sequential, ls, ls_pos, ls_pred) with one seed,
starting from the pre-trained sequential model, as in the paper."""
from _stage import FINETUNED, PLOTS, PRETRAINED, begin, user_errors
from _training import train_and_log

from anyorder.checkpoint import load_model, load_model_into
from anyorder.model import build_model, variant_spec
from anyorder.tensors import resolve_device


def main() -> None:
    stage = begin(__doc__, "finetune", foreach="run")
    run_name = stage.args.run
    run, cfg = stage.settings.finetune.runs[run_name], stage.settings.finetune
    with user_errors():
        resolve_device(cfg.device, "finetune.device")
        spec = variant_spec(load_model(PRETRAINED).spec, run)
        model = build_model(spec, seed=run.seed)  # seeds the variant's new parts
    # Variant-only parts (LS-pos adapters, LS-pred heads) keep their fresh initialisation.
    load_model_into(model, PRETRAINED, strict=False)
    knobs = {name: value for name in ("order_sampling", "position_loss_weight")
             if (value := run.knob(name)) is not None}  # only the variant's own knobs
    train_and_log(stage, model, cfg.training(), run.seed, FINETUNED / run_name,
                  PLOTS / "train" / f"finetune-{run_name}.csv", **knobs)


if __name__ == "__main__":
    main()
