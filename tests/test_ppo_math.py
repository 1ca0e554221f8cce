"""PPO arithmetic against values computed by hand (see the comments for the derivations)."""

import math

import pytest
import torch

from megatron_qwen.rlhf.ppo import math as ppo_math


def test_gae_full_length_hand_computed():
    # gamma=1, lambda=0.95; deltas from the end: 2-1.5=0.5, 0+1.5-1=0.5, 1+1-0.5=1.5
    # A2=0.5, A1=0.5+0.95*0.5=0.975, A0=1.5+0.95*0.975=2.42625
    rewards = torch.tensor([[1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 1.0, 1.5]])
    mask = torch.ones(1, 3)
    adv, ret = ppo_math.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[2.42625, 0.975, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[2.92625, 1.975, 2.0]]))


def test_gae_stops_at_end_of_response():
    # length 2 of 3: the padded position's reward 9 and value 7 must not leak back.
    # gamma=0.9, lambda=0.5: delta1=3-2=1 -> A1=1; delta0=0+0.9*2-1=0.8 -> A0=0.8+0.45*1=1.25
    rewards = torch.tensor([[0.0, 3.0, 9.0]])
    values = torch.tensor([[1.0, 2.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = ppo_math.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[1.25, 1.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[2.25, 3.0, 0.0]]))


def test_kl_shaped_reward_puts_score_on_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.5, -1.0, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = ppo_math.kl_shaped_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # kl = logp - ref = [0.5, -1, 0]; reward = -0.1 * kl (+ score at the end)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.5, -1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.05, 0.1 - 1.0, 0.0]]))


def test_kl_shaped_reward_rejects_empty_response():
    with pytest.raises(ValueError, match="no tokens"):
        ppo_math.kl_shaped_rewards(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), 0.04)


def test_value_loss_clipping_hand_computed():
    # clip 0.15 around old values 0.5: clipped = [0.65, 0.35]
    # errors unclipped [1, 0], clipped [1.8225, 0.1225]; max -> mean 0.9725; x0.5 = 0.48625
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.0]])
    loss, info = ppo_math.value_loss(values, old, returns, torch.ones(1, 2), value_clip=0.15)
    assert loss.item() == pytest.approx(0.48625)
    assert info["value_clipfrac"].item() == pytest.approx(1.0)
    # inside the clip range the plain squared error is used: 0.5 * (0.6 - 2)^2 = 0.98
    loss, info = ppo_math.value_loss(torch.tensor([[0.6]]), torch.tensor([[0.5]]), torch.tensor([[2.0]]),
                                     torch.ones(1, 1), value_clip=0.15)
    assert loss.item() == pytest.approx(0.98)
    assert info["value_clipfrac"].item() == 0.0


def test_value_loss_gradient_is_zero_when_clipped_side_wins():
    values = torch.tensor([[1.0]], requires_grad=True)
    loss, _ = ppo_math.value_loss(values, torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.ones(1, 1), 0.15)
    loss.backward()
    assert values.grad.item() == 0.0


def test_policy_loss_clip_hand_computed():
    # ratio 1.5, clip 0.2: positive advantage -> min(1.5, 1.2) * A = 1.2 (clipped)
    lp, old = torch.tensor([[math.log(1.5)]]), torch.tensor([[0.0]])
    loss, info = ppo_math.policy_loss(lp, old, torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert info["policy_clipfrac"].item() == 1.0
    assert info["approx_kl"].item() == pytest.approx(0.5 * math.log(1.5) ** 2)
    # negative advantage: the pessimistic (unclipped) side 1.5 wins
    loss, info = ppo_math.policy_loss(lp, old, torch.tensor([[-1.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(1.5)
    assert info["policy_clipfrac"].item() == 0.0


def test_running_normaliser_matches_concatenated_stats():
    rms = ppo_math.RunningMeanStd()
    rms.update(torch.tensor([1.0, 2.0, 3.0]))
    assert (rms.mean, rms.count) == (pytest.approx(2.0), 3)
    assert rms.var == pytest.approx(2.0 / 3.0)
    rms.update(torch.tensor([4.0, 5.0]))
    # all five values 1..5: mean 3, population variance 2
    assert rms.mean == pytest.approx(3.0)
    assert rms.var == pytest.approx(2.0)
    out = rms.normalize(torch.tensor([3.0, 5.0]))
    torch.testing.assert_close(out, torch.tensor([0.0, 2.0 / math.sqrt(2.0)]))
    torch.testing.assert_close(rms.normalize(torch.tensor([5.0]), use_std=False), torch.tensor([2.0]))
    restored = ppo_math.RunningMeanStd()
    restored.load_state_dict(rms.state_dict())
    assert restored.state_dict() == rms.state_dict()


def test_running_normaliser_starts_from_saved_stats():
    rms = ppo_math.RunningMeanStd(mean=10.0, var=4.0, count=2)
    rms.update(torch.tensor([10.0, 10.0]))
    # merged: mean 10, M2 = 4*2 + 0 + 0 = 8 over 4 values -> var 2
    assert rms.mean == pytest.approx(10.0) and rms.var == pytest.approx(2.0) and rms.count == 4


def test_value_warmup_switch():
    enabled = [ppo_math.policy_update_enabled(s, 50) for s in range(52)]
    assert enabled[:50] == [False] * 50 and enabled[50:] == [True, True]
    assert ppo_math.policy_update_enabled(0, 0)


def test_whiten_hand_computed_and_masked():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    out = ppo_math.whiten(x, mask)
    std = math.sqrt(5.0 / 3.0)  # unbiased variance of 1..4
    torch.testing.assert_close(out, torch.tensor([[-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std, 0.0]]))


def test_entropy_and_logprobs():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert ppo_math.entropy(logits).item() == pytest.approx(1.5 * math.log(2))
    assert ppo_math.token_logprobs(logits, torch.tensor([1])).item() == pytest.approx(math.log(0.25))


def test_reward_clip():
    torch.testing.assert_close(ppo_math.clip_scores(torch.tensor([-9.0, 0.5, 9.0]), 5.0), torch.tensor([-5.0, 0.5, 5.0]))
    torch.testing.assert_close(ppo_math.clip_scores(torch.tensor([-9.0]), None), torch.tensor([-9.0]))


def test_kl_k3_is_non_negative_and_its_mean_is_the_exact_kl():
    """k3 = exp(ref - logp) - 1 - (ref - logp): >= 0 per token, and its expectation under the
    actor, enumerated exactly over a categorical, is KL(actor || reference); k1 = logp - ref has
    the same expectation but negative values on the tokens the reference prefers."""
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(5, 7), -1)
    ref = torch.log_softmax(torch.randn(5, 7), -1)
    k3 = ppo_math.kl_k3(logp, ref)
    assert (k3 >= 0).all()
    exact = (logp.exp() * (logp - ref)).sum(-1)
    torch.testing.assert_close((logp.exp() * k3).sum(-1), exact)
    torch.testing.assert_close((logp.exp() * (logp - ref)).sum(-1), exact)
    assert ((logp - ref) < 0).any()
    assert ppo_math.kl_k3(logp, logp).abs().max() == 0


def test_arithmetic_reward_reads_the_question_and_the_first_integer():
    from megatron_qwen.rlhf.ppo.rule_reward import ArithmeticReward, expected_answer, score_text
    from megatron_qwen.tokenizer import load_tokenizer, render_chatml_prompt

    assert expected_answer("What is 3+4?") == 7 and expected_answer("Compute 12 - 5.") == 7
    assert expected_answer("6*7=?") == 42 and expected_answer("no question") is None
    assert score_text("What is 3+4?", "7") == 1.0 and score_text("What is 3+4?", " 7 apples") == 1.0
    assert score_text("What is 3+4?", "8, not 7") == 0.0 and score_text("What is 3+4?", "seven") == 0.0
    assert score_text("hello", "7") == 0.0
    tok = load_tokenizer(None)
    prompt = render_chatml_prompt([{"role": "user", "content": "What is 9+8?"}], tok)
    rows = [tok.encode("17") + [tok.im_end_id, tok.eod_id], tok.encode("71") + [tok.im_end_id, tok.eod_id]]
    seqs = torch.tensor([prompt + r for r in rows])
    attn = torch.ones_like(seqs)
    attn[:, -1] = 0  # padding after the stop token is not read
    scores = ArithmeticReward(tok)(seqs, attn, len(prompt))
    assert scores.tolist() == [1.0, 0.0]


def test_arithmetic_format_credit_scores_a_wrong_number_first_answer_only():
    """ppo.arithmetic_format_credit: a wrong answer that starts with a number gets the credit,
    prose or an empty answer none, a right one still 1 (the demo's SFT model rarely answers in
    the format, so without it PPO has almost nothing to learn from)."""
    from megatron_qwen.config import ConfigError
    from megatron_qwen.rlhf.ppo.config import PPOConfig
    from megatron_qwen.rlhf.ppo.rule_reward import ArithmeticReward, score_text
    from megatron_qwen.tokenizer import load_tokenizer, render_chatml_prompt

    q = "How much is 3 + 4?"
    assert [score_text(q, r, 0.5) for r in ("7", " 9", "-2 or so", "the 7", "", "seven")] == [1.0, 0.5, 0.5, 1.0, 0.0, 0.0]
    assert score_text("hello", "7", 0.5) == 0.0  # no question: nothing to answer in a format
    assert score_text(q, " 9") == 0.0  # the default: correctness only
    tok = load_tokenizer(None)
    prompt = render_chatml_prompt([{"role": "user", "content": q}], tok)
    rows = [tok.encode(t) + [tok.im_end_id] for t in ("7", "9", "I")]
    seqs = torch.tensor([prompt + r for r in rows])
    assert ArithmeticReward(tok, 0.25)(seqs, torch.ones_like(seqs), len(prompt)).tolist() == [1.0, 0.25, 0.0]
    PPOConfig(reward="arithmetic", arithmetic_format_credit=0.5).validate()
    with pytest.raises(ConfigError, match="ppo.arithmetic_format_credit=1.0"):
        PPOConfig(reward="arithmetic", arithmetic_format_credit=1.0).validate()


def test_unknown_reward_is_a_config_error_naming_the_field():
    from megatron_qwen.config import ConfigError
    from megatron_qwen.rlhf.ppo.config import PPOConfig

    PPOConfig(reward="arithmetic").validate()
    with pytest.raises(ConfigError, match="ppo.reward='maths'"):
        PPOConfig(reward="maths").validate()
