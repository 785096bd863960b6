"""Convert an MAE-ST checkpoint between formats: ours, mae_st ('model', separate q/k/v) and SlowFast ('model_state').

    python tools/convert_checkpoint.py VIT_L_16x4_MAE_PT.pyth vit_l_mae_st.pth --to mae_st
    python tools/convert_checkpoint.py run/export/mae_st.pth encoder.pth --to slowfast --encoder-only
"""

import argparse
import sys

from models.checkpoints import FORMATS, PRETRAIN_ONLY_PREFIXES, from_ours, infer_options, read_state_dict, to_ours
from trainer.checkpointing import read_weights, write_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="checkpoint file in any of the formats, or a run folder / DeepSpeed checkpoint")
    parser.add_argument("dest", help="output file")
    parser.add_argument("--to", choices=FORMATS, default="mae_st", help="output format (default: mae_st)")
    parser.add_argument("--encoder-only", action="store_true", help="drop the MAE decoder (for fine-tuning)")
    args = parser.parse_args(argv)
    try:
        state, fmt = read_state_dict(read_weights(args.source))
        ours = to_ours(state, fmt)
        if args.encoder_only:
            ours = {k: v for k, v in ours.items() if not k.startswith(PRETRAIN_ONLY_PREFIXES)}
        converted = from_ours(ours, args.to)
        write_checkpoint(converted, args.dest, args.to)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    options = ", ".join(f"{k}={v}" for k, v in infer_options(ours).items())
    print(f"{args.source}: {fmt} format, {len(state)} tensors ({options})")
    print(f"wrote {args.dest}: {args.to} format, {len(converted)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
