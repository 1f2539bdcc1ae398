"""`dspark calibrate`: fit per-position confidence temperatures and store them in the drafter dir."""
from __future__ import annotations

import argparse

NAME = "calibrate"
HELP = "Sequential temperature scaling of the confidence head on held-out prompts (writes dspark_calibration.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="Hugging Face causal LM directory")
    parser.add_argument("--drafter", required=True, help="DSpark drafter directory (the calibration file goes here)")
    parser.add_argument("--data", help="JSONL prompts (turns / prompt / question / instruction)")
    parser.add_argument("--load-data", help="decoded blocks saved by --save-data (safetensors): skip decoding")
    parser.add_argument("--save-data", help="save the decoded blocks (safetensors) for later fits")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature the survival is calibrated for (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--holdout", type=float, default=0.25,
                        help="fraction of prompts kept out of the fit and used for the report (0: report on the fit set)")
    parser.add_argument("--bins", type=int, default=15, help="ECE bins")
    parser.add_argument("--objective", choices=("ece", "nll"), default="ece",
                        help="what each T_k minimises: binned ECE (the paper) or log loss")
    parser.add_argument("--splits", type=int, default=0,
                        help="cross-validate over N random prompt splits (then fit the written temperatures "
                             "on all prompts and write them only if the mean held-out ECE drops)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true",
                        help="write the temperatures even when they do not lower the held-out ECE")
    parser.add_argument("--dry-run", action="store_true", help="print the report, write nothing")


def _shown(path: str) -> str:
    """A path as written into a file that may be shipped: relative to the working dir when inside it."""
    from pathlib import Path

    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from dspark_plugin.checkpoint.calibration_file import save_confidence_temperatures
    from dspark_plugin.checkpoint.deepspec import load_drafter
    from dspark_plugin.config.dtypes import parse_dtype
    from dspark_plugin.errors import DSparkError
    from dspark_plugin.reference.prompts import encode_prompt, read_prompts
    from dspark_plugin.reference.target import eos_ids, load_target
    from dspark_plugin.train.calibration import collect_calibration_data, cross_validate, fit_sequential_temperatures, \
        load_calibration_data, position_report, save_calibration_data, split_by_request

    if not 0 <= args.holdout < 1:
        raise DSparkError(f"--holdout: must be in [0, 1), got {args.holdout}")
    if args.splits < 0 or (args.splits and args.holdout == 0):
        raise DSparkError("--splits: needs a number >= 0 and --holdout > 0")
    if args.load_data:
        data, meta = load_calibration_data(args.load_data)
        n_prompts = int(torch.unique(data.request).numel())
        if "temperature" in meta:  # the temperature the blocks were decoded at is the one calibrated for
            args.temperature = float(meta["temperature"])
    else:
        if not args.data:
            raise DSparkError("calibrate: give --data (prompts to decode) or --load-data (decoded blocks)")
        texts = read_prompts(args.data, args.limit)
        if not texts:
            raise DSparkError(f"{args.data}: no prompts")
        target, tokenizer = load_target(args.target, parse_dtype(args.dtype))
        drafter = load_drafter(args.drafter, target=target)
        prompts = [encode_prompt(tokenizer, t) for t in texts]
        n_prompts = len(prompts)
        data = collect_calibration_data(target, drafter, prompts, max_new_tokens=args.max_new_tokens,
                                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                        batch_size=args.batch_size, seed=args.seed,
                                        eos_token_ids=eos_ids(target, tokenizer))
        if args.save_data:
            meta = {"temperature": str(args.temperature), "drafter": str(args.drafter), "data": str(args.data),
                    "max_new_tokens": str(args.max_new_tokens)}
            print(f"saved decoded blocks to {save_calibration_data(data, args.save_data, meta)}")
    fit, held = split_by_request(data, args.holdout, args.seed)
    temps = fit_sequential_temperatures(fit.conf_logits, fit.survival_labels, n_bins=args.bins, objective=args.objective)
    report = position_report(held, temps, n_bins=args.bins, seed=args.seed)

    where = "held-out" if held is not fit else "fit (no hold-out)"
    print(f"{len(data.conf_logits)} drafted blocks from {n_prompts} prompts; fit on {len(fit.conf_logits)}, "
          f"report on {len(held.conf_logits)} {where} blocks")
    print("  k      T_k   observed  pred before  pred after   ECE before  ECE after   AUC before  AUC after")
    for r in report:
        print(f"{r['position']:3d} {r['temperature']:8.3f} {r['observed_survival']:10.4f} {r['predicted_before']:12.4f} "
              f"{r['predicted_after']:11.4f} {r['ece_before']:12.4f} {r['ece_after']:10.4f} {r['auc_before']:12.4f} "
              f"{r['auc_after']:10.4f}")
    cv = None
    before = sum(r["ece_before"] for r in report) / len(report)
    after = sum(r["ece_after"] for r in report) / len(report)
    if args.splits:
        cv = cross_validate(data, args.holdout, args.splits, args.seed, args.bins, args.objective)
        print(f"cross-validation over {cv['splits']} prompt splits ({args.holdout:.0%} held out): mean held-out ECE "
              f"{cv['ece_before_mean']:.4f} +- {cv['ece_before_sd']:.4f} -> {cv['ece_after_mean']:.4f} +- "
              f"{cv['ece_after_sd']:.4f}; lower in {cv['splits_improved']} of {cv['splits']} splits")
        before, after = cv["ece_before_mean"], cv["ece_after_mean"]
        # The temperatures written are fitted on every prompt; the splits only judge the procedure.
        temps = fit_sequential_temperatures(data.conf_logits, data.survival_labels, n_bins=args.bins,
                                            objective=args.objective)
        print("temperatures fitted on all prompts: " + ", ".join(f"{t:.3f}" for t in temps))
    if args.dry_run:
        return 0
    if held is not fit and after >= before and not args.force:
        # A confidence head trained with the BCE term is often calibrated already; temperatures
        # that do worse on prompts they were not fitted on would only mislead the scheduler.
        print(f"not written: mean held-out ECE {before:.4f} -> {after:.4f} does not improve "
              f"(--force writes it anyway)")
        return 0
    # JSON has no NaN: an AUC is undefined when a position never (or always) survives.
    report = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in report]
    out = save_confidence_temperatures(
        Path(args.drafter), temps,
        method="sequential_temperature_scaling", sampling_temperature=args.temperature, ece_bins=args.bins,
        target=_shown(args.target), data=_shown(args.load_data or args.data),
        prompts=n_prompts, objective=args.objective,
        blocks_fit=len(data.conf_logits) if cv else len(fit.conf_logits),
        blocks_report=len(held.conf_logits), report_split=where, positions=report,
        **({"cross_validation": {k: v for k, v in cv.items() if k not in ("ece_before", "ece_after")},
            "fitted_on": "all prompts",
            "positions_note": "per-position report of one split (--seed): temperatures fitted on its other half"}
           if cv else {}),
    )
    print(f"wrote {out}")
    return 0
