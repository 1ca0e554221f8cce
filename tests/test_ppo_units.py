"""PPO pieces that need no process group: KV-cached sampling against transformers' generate,
nucleus filtering, per-sequence seeding, prompt and pretraining data, scoring with real models,
recipe validation."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import ppo_tiny  # noqa: E402

from megatron_qwen.config import ConfigError, build_config, load_config, parse_overrides  # noqa: E402
from megatron_qwen.rlhf.ppo import math as ppo_math  # noqa: E402
from megatron_qwen.rlhf.ppo.config import PPOTrainConfig, PPOConfig, RolloutConfig  # noqa: E402
from megatron_qwen.rlhf.ppo.experience import make_experience  # noqa: E402
from megatron_qwen.rlhf.ppo.prompts import PromptError, PromptSampler, load_prompts  # noqa: E402
from megatron_qwen.rlhf.ppo.generator import GenerationRequest, rollout_from_token_lists  # noqa: E402
from megatron_qwen.rlhf.ppo.rollout import generate, sample_inverse_cdf, top_p_filter  # noqa: E402
from megatron_qwen.rlhf.heads import position_ids_from_mask  # noqa: E402
from legacy_rollout import legacy_generate  # noqa: E402

GREEDY = 1e-6


@pytest.fixture(scope="module")
def actor():
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    # a larger init than the default makes greedy choices well separated
    return Qwen2ForCausalLM(ppo_tiny.tiny_qwen2_config(initializer_range=0.2)).eval()


def test_kv_cached_greedy_matches_transformers_generate(actor):
    prompts = [[10, 11, 12, 13, 14], [20, 21], [15, 16, 17]]
    ours = generate(actor, prompts, [0, 1, 2], max_new_tokens=6, stop_token_id=-1,
                    pad_token_id=ppo_tiny.PAD, top_p=GREEDY)
    for i, p in enumerate(prompts):
        ref = actor.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=ppo_tiny.PAD)
        assert ours.responses[i].tolist() == ref[0, len(p):].tolist()
    assert ours.response_mask.sum().item() == 18 and not ours.finished.any()


def test_stop_token_ends_response_and_marks_finished(actor):
    probe = generate(actor, [[10, 11, 12]], [0], max_new_tokens=3, stop_token_id=-1,
                     pad_token_id=ppo_tiny.PAD, top_p=GREEDY)
    stop = int(probe.responses[0, 1])  # greedy emits this as its 2nd token (or earlier)
    out = generate(actor, [[10, 11, 12], [10, 11, 12]], [0, 1], max_new_tokens=3, stop_token_id=stop,
                   pad_token_id=ppo_tiny.PAD, top_p=GREEDY)
    n = out.response_lengths[0].item()
    assert out.finished.all() and n <= 2
    assert out.responses[0, n - 1].item() == stop
    assert out.attention_mask[0, out.prompt_length + n:].sum() == 0  # nothing after the stop token


def test_top_p_filter_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    kept = torch.isfinite(top_p_filter(logits, 0.7))
    assert kept.tolist() == [[True, True, False]]  # 0.5 < 0.7, so the 0.3 token is still needed
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_inverse_cdf_sampling_hand_computed():
    probs = torch.tensor([[0.5, 0.0, 0.25, 0.25]] * 4)  # exact in binary
    # cdf [0.5, 0.5, 0.75, 1.0]: u=0.5 -> 0; 0.5001 -> 2 (never the empty interval of token 1);
    # 0.75 -> 2; 1 -> 3
    picked = sample_inverse_cdf(probs, torch.tensor([0.5, 0.5001, 0.75, 1.0]))
    assert picked.tolist() == [0, 2, 2, 3]
    u = 1.0 - torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.bincount(sample_inverse_cdf(probs[:1].expand(20000, 4), u), minlength=4) / 20000
    torch.testing.assert_close(counts, probs[0], atol=0.015, rtol=0)


def test_samples_depend_only_on_their_own_seed(actor):
    """What makes 1 and N processes roll out the same responses."""
    a = generate(actor, [[10, 11, 12], [20, 21]], [5, 9], max_new_tokens=6, stop_token_id=-1,
                 pad_token_id=ppo_tiny.PAD, top_p=0.9)
    b = generate(actor, [[20, 21]], [9], max_new_tokens=6, stop_token_id=-1, pad_token_id=ppo_tiny.PAD,
                 top_p=0.9)
    assert a.responses[1].tolist() == b.responses[0].tolist()
    c = generate(actor, [[20, 21]] * 4, [10, 11, 12, 13], max_new_tokens=6, stop_token_id=-1,
                 pad_token_id=ppo_tiny.PAD, top_p=1.0)
    assert c.responses.shape == (4, 6)
    # the seed decides the sample: a sampler that ignored it would repeat one response
    assert len({tuple(r) for r in c.responses.tolist()}) == 4


def test_micro_batched_last_logit_sampler_draws_what_the_old_one_did(actor):
    """Same seeds, same token ids as the sampler before the rework (tests/scripts/legacy_rollout.py),
    for any generation micro-batch; only last-position logits are computed; the returned
    log-probs are the actor's; the seam's list-to-rollout builder gives back the same tensors."""
    prompts = [[10, 11, 12], [20, 21], [13, 14, 15, 16, 17], [22], [23, 24], [10, 11, 12]]
    seeds = list(range(100, 106))
    kw = dict(max_new_tokens=10, pad_token_id=ppo_tiny.PAD, top_p=0.9)
    probe = legacy_generate(actor, prompts, seeds, stop_token_id=-1, **kw)
    stop = int(probe.responses[0, 2])  # row 0 stops within 3 tokens; others run on
    old = legacy_generate(actor, prompts, seeds, stop_token_id=stop, **kw)
    assert old.finished[0] and old.response_lengths.tolist() != [old.responses.shape[1]] * 6
    lm_head_widths = []
    hook = actor.lm_head.register_forward_hook(lambda m, i, o: lm_head_widths.append(i[0].shape[1]))
    try:
        for micro in (None, 4, 1):
            new = generate(actor, prompts, seeds, stop_token_id=stop, micro_batch_size=micro, **kw)
            for field in ("sequences", "attention_mask", "response_mask", "finished"):
                assert torch.equal(getattr(new, field), getattr(old, field)), (micro, field)
            assert new.prompt_length == old.prompt_length
    finally:
        hook.remove()
    assert set(lm_head_widths) == {1}, lm_head_widths  # prefill included
    with torch.no_grad():
        logits = actor(input_ids=new.sequences, attention_mask=new.attention_mask,
                       position_ids=position_ids_from_mask(new.attention_mask)).logits
    want = ppo_math.token_logprobs(logits[:, new.prompt_length - 1:-1], new.responses) * new.response_mask
    assert torch.allclose(new.logprobs, want, atol=1e-5), (new.logprobs - want).abs().max()
    request = GenerationRequest(prompts=prompts, seeds=seeds, prompt_index=list(range(6)),
                                stop_token_id=stop, **kw)
    lengths = new.response_lengths.tolist()
    rebuilt = rollout_from_token_lists(
        request, [new.responses[i, :n].tolist() + [5, 5] for i, n in enumerate(lengths)],
        [new.logprobs[i, :n].tolist() for i, n in enumerate(lengths)], width=new.responses.shape[1])
    for field in ("sequences", "attention_mask", "response_mask", "finished", "logprobs"):
        assert torch.equal(getattr(rebuilt, field), getattr(new, field)), field


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 1.0), (1.0, 0.7), (1.4, 0.9)])
def test_rollout_samples_follow_the_filtered_distribution(actor, temperature, top_p):
    """The first response token of 8,000 rows of one prompt (a seed each) against the actor's
    own next-token logits, filtered as the definitions say (tests/sampling_stats.py)."""
    from tests.sampling_stats import assert_sampled_from, filtered_probs

    prompt, n = [10, 11, 12], 8000
    out = generate(actor, [prompt] * n, list(range(n)), max_new_tokens=1, stop_token_id=-1,
                   pad_token_id=ppo_tiny.PAD, top_p=top_p, temperature=temperature)
    with torch.no_grad():
        logits = actor(torch.tensor([prompt])).logits[0, -1].double().numpy()
    want = filtered_probs(logits, temperature, 0, top_p)
    assert_sampled_from(out.responses[:, 0].numpy(), want)
    if (temperature, top_p) != (1.0, 1.0):
        assert abs(want - filtered_probs(logits)).max() > 0.02


def test_make_experience_with_real_models_and_unfinished_penalty(actor, tmp_path):
    from transformers import Qwen2Model

    from megatron_qwen.rlhf.hf_model import QwenWithHead

    torch.manual_seed(1)
    critic, reward = QwenWithHead(Qwen2Model(ppo_tiny.tiny_qwen2_config())), QwenWithHead(
        Qwen2Model(ppo_tiny.tiny_qwen2_config()))
    engines = SimpleNamespace(actor=SimpleNamespace(module=actor), ref=SimpleNamespace(module=actor),
                              critic=SimpleNamespace(module=critic), reward=SimpleNamespace(module=reward))
    probe = generate(actor, [[10, 11, 12]], [0], max_new_tokens=2, stop_token_id=-1,
                     pad_token_id=ppo_tiny.PAD, top_p=GREEDY)
    stop = int(probe.responses[0, 0])
    roll = generate(actor, [[10, 11, 12], [20, 21]], [0, 1], max_new_tokens=3, stop_token_id=stop,
                    pad_token_id=ppo_tiny.PAD, top_p=GREEDY)
    assert roll.finished.tolist()[0] is True
    norm = ppo_math.RunningMeanStd()
    rcfg = RolloutConfig(unfinished_rule="penalty", unfinished_penalty=-3.0)
    exp, metrics = make_experience(roll, engines, norm, PPOConfig(), rcfg, micro_batch=1)
    # the reward model's score at the last real token, read straight from the model
    raw = reward.reward(roll.sequences, roll.attention_mask)
    torch.testing.assert_close(exp.scores_raw, raw)
    assert norm.count == 2
    for i, fin in enumerate(roll.finished.tolist()):
        expected = norm.normalize(raw[i:i + 1])[0] if fin else torch.tensor(-3.0)
        torch.testing.assert_close(exp.scores[i], expected)
    # the actor is its own reference here, so the KL term is exactly 0
    assert exp.kl.abs().max().item() == 0.0 and metrics["kl"] == 0.0
    assert metrics["response/truncated_share"] == pytest.approx(1 - roll.finished.float().mean().item())
    # old log-probs: the actor's log-probabilities of the sampled tokens, one row at a time, unpadded
    for i in range(2):
        keep = roll.attention_mask[i].bool()
        seq = roll.sequences[i][keep].unsqueeze(0)
        n = int(roll.response_mask[i].sum())
        logp = torch.log_softmax(actor(seq).logits[0, -n - 1:-1], -1)
        expected = logp.gather(1, seq[0, -n:].unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(exp.old_logprobs[i, :n], expected, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(exp.advantages).all()


def test_prompt_file_bad_lines_counted_and_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"input_ids": [10, 11]}\nnot json\n{"input_ids": []}\n\xff\xfe\n'
                     b'{"input_ids": [1, 99]}\n{"prompt": "hello"}\n[1]\n'
                     b'{"messages": [{"role": "bot", "content": "x"}]}\n')
    from megatron_qwen.tokenizer import load_tokenizer

    tok = load_tokenizer()
    prompts, report = load_prompts(path, tok, max_prompt_length=512, vocab_size=64)
    assert report["skipped"] == 6 and report["read"] == 2
    assert set(report["reasons"]) == {"malformed JSON", "invalid UTF-8", "not a JSON object", "bad messages",
                                      "input_ids is not a non-empty list of token ids",
                                      "input_ids has a token id >= vocab size 64"}
    assert prompts[0] == [10, 11]
    # ChatML up to the generation prompt, with the default system turn
    assert prompts[1][0] == tok.im_start_id
    assert tok.decode(prompts[1]).endswith("<|im_start|>assistant\n")
    assert "hello" in tok.decode(prompts[1])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n")
    with pytest.raises(PromptError, match="bad.jsonl: no usable prompt"):
        load_prompts(bad)
    with pytest.raises(PromptError, match="no such prompt file"):
        load_prompts(tmp_path / "missing.jsonl")


def test_prompt_truncations_are_counted_and_logged(tmp_path, caplog):
    # before: a prompt over max_prompt_length lost its first tokens without a count or a word
    path = tmp_path / "p.jsonl"
    path.write_text('{"input_ids": [1, 2, 3, 4, 5, 6]}\n{"input_ids": [7, 8]}\n{"input_ids": [9, 10, 11, 12]}\n'
                    '{"input_ids": [13, 14, 15]}\n')
    with caplog.at_level("WARNING", logger="megatron_qwen.rlhf.ppo.prompts"):
        prompts, report = load_prompts(path, max_prompt_length=3)
    assert prompts == [[4, 5, 6], [7, 8], [10, 11, 12], [13, 14, 15]]
    assert report["truncated"] == 2 and report["read"] == 4 and report["skipped"] == 0
    assert "2 prompt(s) longer than max_prompt_length=3 kept their last 3 tokens; lines 1, 3" in caplog.text
    assert load_prompts(path, max_prompt_length=6)[1]["truncated"] == 0


def test_prompt_sampler_is_resumable():
    a = PromptSampler(5, seed=3)
    first = a.next_indices(7)
    b = PromptSampler(5, seed=3, position=4)
    assert b.next_indices(3) == first[4:7]
    assert sorted(first[:5]) == list(range(5))


def test_ptx_batches_read_megatron_indexed_dataset(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_qwen.rlhf.ppo.ptx import PtxBatches, PtxError

    prefix = ppo_tiny.make_ptx(tmp_path / "ptx")
    ds = IndexedDataset(str(prefix))
    docs = {tuple(ds.get(i).tolist()) for i in range(len(ds))}
    one = PtxBatches(prefix, seq_length=64, batch_size=4, seed=0, pad_token_id=0).batch(3, 0, 1)
    halves = [PtxBatches(prefix, seq_length=64, batch_size=4, seed=0, pad_token_id=0).batch(3, r, 2)
              for r in range(2)]
    rows = [tuple(one["input_ids"][i][one["attention_mask"][i].bool()].tolist()) for i in range(4)]
    assert all(r in docs for r in rows)
    two = [tuple(h["input_ids"][i][h["attention_mask"][i].bool()].tolist()) for h in halves for i in range(2)]
    assert two == rows  # the global batch does not depend on the number of ranks
    assert (one["labels"][one["attention_mask"] == 0] == -100).all()
    with pytest.raises(PtxError, match="does not exist"):
        PtxBatches(tmp_path / "nope", 8, 2, 0, 0)
    with pytest.raises(PtxError, match="vocabulary size"):
        PtxBatches(prefix, 64, 2, 0, 0, vocab_size=5).batch(0, 0, 1)


def test_recipe_validation_is_one_line():
    base = ["--actor-path", "a", "--reward-path", "r", "--prompt-data-path", "p"]
    cfg = build_config(PPOTrainConfig, {}, parse_overrides(PPOTrainConfig, base))
    # report numbers are the defaults
    assert (cfg.ppo.kl_coef, cfg.rollout.samples_per_prompt, cfg.rollout.top_p) == (0.04, 2, 0.9)
    assert (cfg.ppo.value_clip, cfg.ppo.value_warmup_steps, cfg.optim.actor_lr, cfg.optim.critic_lr) == (
        0.15, 50, 1e-6, 5e-6)
    assert (cfg.ppo.gamma, cfg.ppo.lam) == (1.0, 0.95)
    for extra, msg in ((["--ref-zero-stage", "2"], "inference engines use 0 or 3"),
                       (["--actor-offload-param"], "needs actor_zero_stage=3"),
                       (["--top-p", "0"], "top_p"),
                       (["--unfinished-rule", "ignore"], "penalty or truncate")):
        with pytest.raises(ConfigError, match=msg):
            build_config(PPOTrainConfig, {}, parse_overrides(PPOTrainConfig, base + extra))
    with pytest.raises(ConfigError, match="not divisible by the 3"):
        cfg.rollout_batch_per_rank(3)
    with pytest.raises(SystemExit, match="models.actor_path is required"):
        load_config(PPOTrainConfig, ["--reward-path", "r", "--prompt-data-path", "p"])


@pytest.mark.parametrize("recipe", ["ppo_7b.yaml", "ppo_14b.yaml", "ppo_tiny_cpu.yaml"])
def test_example_recipes_load(recipe):
    root = Path(__file__).resolve().parents[1] / "examples"
    cfg = load_config(PPOTrainConfig, ["--config", str(root / recipe)])
    if recipe != "ppo_tiny_cpu.yaml":
        assert (cfg.optim.actor_lr, cfg.optim.critic_lr, cfg.ppo.kl_coef) == (1e-6, 5e-6, 0.04)
        assert cfg.ppo.value_warmup_steps == 50 and cfg.ptx.ptx_data_path
