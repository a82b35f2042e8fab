"""Stage `finetune@<run>`: fine-tune one variant (sequential, ls, ls_pos, ls_pred) with one seed,
starting from the pre-trained sequential model, as in the paper. The run's knobs also make the
paper's pruning baselines: `layerdrop_rate` (LayerDrop: blocks skipped during training, order
kept) and `depth` (a shallower model: the pre-trained model's first `depth` blocks)."""
from pipeline.outputs import train_and_log
from pipeline.stage import PLOTS, PRETRAINED, begin, fail, user_errors

from anyorder.config import FINETUNED
from anyorder.device import resolve_device
from anyorder.evaluation.orders import layerdrop_rates
from anyorder.model.checkpoint import load_model, load_start_weights
from anyorder.model.spec import variant_spec
from anyorder.model.vit import build_model
from anyorder.training.loop import train_and_save


def main() -> None:
    stage = begin(__doc__, "finetune", foreach="run")
    run_name = stage.args.run
    run, cfg = stage.settings.finetune.runs[run_name], stage.settings.finetune
    with user_errors():
        resolve_device(cfg.train.device, "finetune.train.device")
        base = load_model(PRETRAINED).spec
        if run.depth is not None and run.depth > base.depth:
            fail(f"finetune.runs.{run_name}.depth: {run.depth} is deeper than the pre-trained "
                 f"model ({base.depth} blocks); a shallower model keeps its first blocks")
        spec = variant_spec(base, run)
        model = build_model(spec, seed=run.seed)  # seeds the variant's new parts
        # Strict: only the variant's new parts (LS-pos adapters, LS-pred heads) keep their
        # fresh initialisation; a shallower model takes the first `depth` blocks.
        load_start_weights(model, PRETRAINED)
    knobs = {name: value for name in ("order_sampling", "position_loss_weight")
             if (value := run.knob(name)) is not None}  # only the variant's own knobs
    if run.knob("layerdrop_rate"):
        knobs["layerdrop"] = layerdrop_rates(model.depth, run.knob("layerdrop_rate"),
                                             run.knob("layerdrop_schedule"))
    train_and_log(stage, train_and_save, model, run.training(cfg.train), run.seed, FINETUNED / run_name,
                  PLOTS / "train" / f"finetune-{run_name}.csv", **knobs)


if __name__ == "__main__":
    main()
