#!/usr/bin/env python
"""Reward scoring throughput: our QwenWithHead vs transformers' Qwen2ForSequenceClassification.

Both hold the same weights (a random Qwen2 of the given shape, real 151,936-row vocabulary) and
score the same right-padded batch; the script checks the rewards agree, then times each and
prints tokens/s and the ratio (ours / theirs).

    python bench/rm_score.py [--hidden 512 --layers 4 --batch 8 --seq 512 --repeats 3]
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForSequenceClassification, Qwen2Model  # noqa: E402

from megatron_qwen.rlhf.hf_model import QwenWithHead  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    pad = 151643
    config = Qwen2Config(vocab_size=151936, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=4096,
                         num_labels=1, pad_token_id=pad)
    ours = QwenWithHead(Qwen2Model(config)).eval()
    peer = Qwen2ForSequenceClassification(config).eval()
    peer.model.load_state_dict(ours.backbone.state_dict())
    peer.score.weight.data.copy_(ours.head.proj.weight.data)
    lengths = torch.randint(args.seq // 2, args.seq + 1, (args.batch,))
    ids = torch.randint(0, 150000, (args.batch, args.seq))
    mask = (torch.arange(args.seq) < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad)
    tokens = int(mask.sum())

    def forward_ours():
        return ours.reward(ids, mask)

    def forward_peer():
        return peer(input_ids=ids, attention_mask=mask).logits.squeeze(-1)

    # interleaved, so a busy machine slows both alike
    spent = {forward_ours: 0.0, forward_peer: 0.0}
    with torch.no_grad():
        r_ours, r_peer = forward_ours(), forward_peer()  # warm-up
        for _ in range(args.repeats):
            for fn in (forward_ours, forward_peer) if _ % 2 == 0 else (forward_peer, forward_ours):
                start = time.perf_counter()
                fn()
                spent[fn] += time.perf_counter() - start
    t_ours, t_peer = spent[forward_ours] / args.repeats, spent[forward_peer] / args.repeats
    max_diff = (r_ours - r_peer).abs().max().item()
    print(f"shape: hidden {args.hidden}, layers {args.layers}, batch {args.batch} x seq {args.seq} "
          f"({tokens} real tokens), torch threads {torch.get_num_threads()}")
    print(f"ours   QwenWithHead.reward              {tokens / t_ours:10.1f} tokens/s")
    print(f"peer   Qwen2ForSequenceClassification   {tokens / t_peer:10.1f} tokens/s")
    print(f"ratio  ours / peer = {t_peer / t_ours:.3f}   (max |reward diff| {max_diff:.2e})")
    if max_diff > 1e-3:
        raise SystemExit("rewards disagree: the comparison is void")


if __name__ == "__main__":
    main()
