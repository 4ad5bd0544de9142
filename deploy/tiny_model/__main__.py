"""CLI: python -m deploy.tiny_model --out DIR [--layout original|hf] [--llm dense|moe] [--vision 6b|300m] [--seed N]"""

import argparse
import time

from deploy.tiny_model.build import LAYOUTS, build
from deploy.tiny_model.configs import LLM_KINDS, VISION_KINDS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.tiny_model",
        description="Build a tiny InternVL3.5-architecture checkpoint: real image geometry (448 px tiles, "
                    "patch 14, pixel shuffle 0.5, 256 tokens per tile, up to 12 tiles + thumbnail), tiny "
                    "widths, random weights and a tokenizer trained locally. Nothing is downloaded. The same "
                    "arguments give byte-identical files; a directory already built with the same arguments "
                    "is left as it is.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True,
                        help="checkpoint directory to create (replaced if it holds another build)")
    parser.add_argument("--layout", choices=LAYOUTS, default="original",
                        help="original: OpenGVLab layout (InternVLChatModel, vision_model.*/mlp1.*/"
                             "language_model.*, config via trust_remote_code); hf: transformers-native "
                             "InternVLForConditionalGeneration with its processor files")
    parser.add_argument("--llm", choices=LLM_KINDS, default="dense",
                        help="language model: Qwen3 dense, or Qwen3-MoE (4 experts, top-2)")
    parser.add_argument("--vision", choices=VISION_KINDS, default="300m",
                        help="InternViT block: 300m (LayerNorm, qkv bias) or 6b (RMSNorm, qk-norm, no qkv bias)")
    parser.add_argument("--seed", type=int, default=0,
                        help="weight seed; the same seed gives the same weights in both layouts")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    out = build(args.out, layout=args.layout, llm=args.llm, vision=args.vision, seed=args.seed)
    print(f"{out} ({args.layout}, {args.llm}, {args.vision}, seed {args.seed}) "
          f"ready in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
