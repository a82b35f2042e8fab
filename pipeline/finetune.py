"""Stage `finetune@<run>`: fine-tune one variant (sequential, ls, ls_pos, ls_pred) with one seed,
starting from the pre-trained sequential model, as in the paper."""
from dataclasses import asdict

from _stage import (FINETUNED, PRETRAINED, file_digest, model_spec, parse_args, run_or_exit, settings_or_exit,
                    train_and_save)

from anyorder.checkpoint import WEIGHTS, load_model, load_model_into
from anyorder.model import build_model


def main() -> None:
    args = parse_args(__doc__, with_run=True)
    settings = settings_or_exit(args.params)
    run = run_or_exit(settings, args.run)
    start = load_model(PRETRAINED)
    spec = model_spec(settings, start.spec.class_names, run.variant)
    model = build_model(spec, seed=run.seed)  # seeds the variant's new parts
    # Variant-only parts (LS-pos adapters, LS-pred heads) keep their fresh initialisation.
    load_model_into(model, PRETRAINED, strict=False)
    cfg = settings.finetune
    params = {"run": {"name": args.run, **asdict(run)},
              "finetune": {k: v for k, v in settings.to_dict()["finetune"].items() if k != "runs"}}
    result = train_and_save(f"finetune@{args.run}", settings, args.params, model, cfg, run.seed,
                            FINETUNED / args.run, f"finetune-{args.run}", params,
                            fingerprint_extra=file_digest(PRETRAINED / WEIGHTS))
    print(f"finetune@{args.run}: {result.history[-1]}")


if __name__ == "__main__":
    main()
