"""Convert an MAE-ST checkpoint between formats: ours, mae_st ('model', separate q/k/v) and SlowFast ('model_state').

    python tools/convert_checkpoint.py VIT_L_16x4_MAE_PT.pyth vit_l_encoder.pth --to mae_st --encoder-only
    python tools/convert_checkpoint.py runs/demo_pt/export/mae_st_pretrain.pth demo.pyth --to slowfast --encoder-only
    python tools/convert_checkpoint.py runs/demo_pt demo_pt.pth --to mae_st      # a run folder: its latest checkpoint

What converts: a fine-tuned model or an encoder, between all three formats. A pretraining model (with its MAE
decoder) whole only to its decoder layout's format or ours: the two official decoders differ in their position
table and cls input (models/config.py), so mae_st's layout (ours, mae_st files) does not fit SlowFast's files and
back; --encoder-only drops the decoder and converts to any format.
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
