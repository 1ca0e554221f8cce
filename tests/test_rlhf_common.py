"""The shared RLHF layer: end-token pooling, the HF model + head, export, DeepSpeed configs."""

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from megatron_qwen.config import ConfigError
from megatron_qwen.rlhf import hf_model
from megatron_qwen.rlhf.deepspeed_config import make_ds_config
from megatron_qwen.rlhf.heads import gather_at, last_index_of, last_token_index

PAD, END = 0, 7


def test_end_token_pooling_hand_made():
    # row 0 right-padded, row 1 left-padded, row 2 truncated (no END: falls back on the mask)
    ids = torch.tensor([[5, 6, END, 9, END, PAD, PAD],
                        [PAD, PAD, 5, END, 8, 9, END],
                        [5, 6, 8, 9, 8, 9, 4]])
    mask = (torch.arange(7) < torch.tensor([[5], [7], [7]])) & ~((ids == PAD))
    mask = mask.long()
    assert last_token_index(mask).tolist() == [4, 6, 6]
    assert last_index_of(ids, END, mask).tolist() == [4, 6, -1]
    # an END token under a padding position is not an end token
    assert last_index_of(torch.tensor([[END, 3, END]]), END, torch.tensor([[1, 1, 0]])).tolist() == [0]
    values = torch.arange(21, dtype=torch.float32).view(3, 7)
    assert gather_at(values, torch.tensor([4, 6, 2])).tolist() == [4.0, 13.0, 16.0]
    with pytest.raises(ValueError, match="out of range"):
        gather_at(values, torch.tensor([4, 7, 0]))
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[0, 0]]))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(str(path))
    return path


def test_reward_matches_transformers_and_ignores_padding(tiny_dir):
    torch.manual_seed(1)
    model = hf_model.load_with_head(tiny_dir).eval()
    reference = Qwen2ForCausalLM.from_pretrained(str(tiny_dir), local_files_only=True).eval()
    seqs = [[11, 12, 13, 14, END], [21, 22, END], [31, END, 33, 34, 35, END, 36]]
    width = 8
    with torch.no_grad():
        expected = []
        for s in seqs:  # transformers' own forward, one unpadded sequence at a time
            hidden = reference(torch.tensor([s]), output_hidden_states=True).hidden_states[-1]
            end = max(i for i, t in enumerate(s) if t == END)
            expected.append(model.head(hidden)[0, end])
        expected = torch.stack(expected)
        for side in ("right", "left"):
            ids = torch.full((3, width), PAD)
            mask = torch.zeros((3, width), dtype=torch.long)
            for i, s in enumerate(seqs):
                sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
                ids[i, sl] = torch.tensor(s)
                mask[i, sl] = 1
            got = model.reward(ids, mask, last_index_of(ids, END, mask))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=side)
        # the critic's reading: one value per token, same head
        values = model(torch.tensor([seqs[0]]))
        assert values.shape == (1, 5) and values.dtype == torch.float32
        torch.testing.assert_close(values[0, -1], expected[0], rtol=1e-5, atol=1e-5)


def test_export_roundtrip(tiny_dir, tmp_path):
    torch.manual_seed(2)
    model = hf_model.load_with_head(tiny_dir).eval()
    ids = torch.randint(1, 300, (3, 9))
    stats = {"mean": 0.25, "std": 1.5, "count": 6}
    out = hf_model.export_with_head(model, tmp_path / "rm", stats, source_dir=tiny_dir)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "reward_stats.json",
        "value_head.safetensors"]
    back = hf_model.load_with_head(out, require_head=True).eval()
    with torch.no_grad():
        assert torch.equal(model.reward(ids), back.reward(ids))
    assert hf_model.load_reward_stats(out) == stats
    # re-export over an existing directory replaces it whole
    hf_model.export_with_head(back, out, None)
    assert hf_model.load_reward_stats(out) is None
    # a plain model directory has no trained head
    with pytest.raises(FileNotFoundError, match="value_head.safetensors"):
        hf_model.load_with_head(tiny_dir, require_head=True)
    (out / "reward_stats.json").write_text(json.dumps({"mean": "x"}))
    with pytest.raises(ValueError, match="'mean'"):
        hf_model.load_reward_stats(out)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf_model.load_with_head(tmp_path)


def test_ds_config_per_engine():
    cfg = make_ds_config(micro_batch_size=2, global_batch_size=16, world_size=2, zero_stage=3,
                         offload_param=True, bf16=True, gradient_clipping=0.5)
    assert cfg["train_batch_size"] == 16 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["bf16"]["enabled"] and cfg["gradient_clipping"] == 0.5
    inference = make_ds_config(micro_batch_size=4, global_batch_size=8, world_size=2,
                               zero_stage=3, train=False)
    assert "gradient_clipping" not in inference and inference["gradient_accumulation_steps"] == 1
    with pytest.raises(ConfigError, match="offload_param needs zero_stage 3"):
        make_ds_config(micro_batch_size=1, global_batch_size=2, world_size=1, zero_stage=2,
                       offload_param=True)
    with pytest.raises(ConfigError, match="not a multiple"):
        make_ds_config(micro_batch_size=3, global_batch_size=16, world_size=2)
    with pytest.raises(ConfigError, match="zero_stage=4"):
        make_ds_config(micro_batch_size=1, global_batch_size=1, world_size=1, zero_stage=4)


def test_reward_matches_transformers_sequence_classifier(tiny_dir):
    """transformers' own reward-model class (Qwen2ForSequenceClassification, what TRL trains)
    with our weights pools at the last non-pad token: on right-padded rows it must agree."""
    from transformers import Qwen2ForSequenceClassification

    torch.manual_seed(3)
    model = hf_model.load_with_head(tiny_dir).eval()
    config = Qwen2Config.from_pretrained(str(tiny_dir), num_labels=1, pad_token_id=PAD)
    peer = Qwen2ForSequenceClassification(config).eval()
    peer.model.load_state_dict(model.backbone.state_dict())
    peer.score.weight.data.copy_(model.head.proj.weight.data)
    ids = torch.tensor([[11, 12, 13, END, PAD, PAD], [21, 22, 23, 24, 25, END], [31, END, PAD, PAD, PAD, PAD]])
    mask = (ids != PAD).long()
    with torch.no_grad():
        ours = model.reward(ids, mask, last_index_of(ids, END, mask))
        theirs = peer(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_zero3_engines_hold_one_partition_per_rank(tmp_path):
    """Two gloo processes: a ZeRO-3 training and inference engine built from a partitioned model
    allocate no tensor larger than one rank's partition + the largest parameter (DeepSpeed's
    default 5e8-element reduce bucket is one: 2 GB fp32), and the inference engine no optimizer
    state (tests/scripts/zero3_engine_memory.py)."""
    from tests.dist import REPO, run_torchrun

    out = run_torchrun(REPO / "tests" / "scripts" / "zero3_engine_memory.py", tmp_path,
                       env={"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"})
    assert out.count("ZeRO-3 training engine") == 2 and out.count("ZeRO-3 inference engine") == 2, out


def test_zero3_reduce_bucket_is_at_most_one_partition_and_the_plan_agrees():
    from megatron_qwen.memory_plan.shape import ModelShape
    from megatron_qwen.memory_plan.zero import Engine
    from megatron_qwen.rlhf.deepspeed_config import zero3_buffer_sizes

    assert zero3_buffer_sizes(1001, 2) == {"reduce_bucket_size": 501}
    assert zero3_buffer_sizes(7 * 10**9, 8) == {"reduce_bucket_size": 500_000_000}  # DeepSpeed's size
    shape = ModelShape(layers=2, hidden=64, ffn=128, heads=4, kv_groups=2, vocab=512)
    params = shape.total_params()
    for stage, bucket in ((3, -(-params // 2)), (2, 500_000_000)):
        ds = make_ds_config(micro_batch_size=1, global_batch_size=2, world_size=2, zero_stage=stage)
        planned = {c.name: c.bytes for c in Engine("actor", shape, params, ds, 2, on_gpu=False)
                   .components(train=True)}["actor gradient bucket"]
        assert planned == (1 if stage == 3 else 2) * bucket * 4, (stage, planned)
