"""The RL objectives and rewards against values computed by hand (plain Python floats, no torch ops)."""
import math

import pytest
import torch

from model.rewards import (
    Rewards, Sample, answers_match, chinese_to_number, format_reward, parse_reward_weights, tool_reward,
)
from model.rl import explained_variance, gae, group_advantages, per_token_rewards, policy_loss, value_loss

LOGP = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.5]]
OLD = [[-1.1, -1.5, -0.5], [-0.3, -1.0, -3.0]]
REF = [[-1.2, -2.1, -0.4], [-0.2, -1.1, -2.9]]
MASK = [[1, 1, 0], [1, 1, 1]]
ADV = [0.8, -0.5]


def tensors(*rows):
    return [torch.tensor(r, dtype=torch.float64) for r in rows]


def hand_token_terms(eps: float, eps_high: float, beta: float, cispo: bool = False):
    """Per-token loss terms by hand, row by row (only masked tokens)."""
    rows = []
    for b in range(2):
        terms = []
        for t in range(3):
            if not MASK[b][t]:
                continue
            ratio = math.exp(LOGP[b][t] - OLD[b][t])
            clipped = min(max(ratio, 1 - eps), 1 + eps_high)
            a = ADV[b]
            term = -clipped * a * LOGP[b][t] if cispo else -min(ratio * a, clipped * a)
            d = REF[b][t] - LOGP[b][t]
            terms.append(term + beta * (math.exp(d) - d - 1))
        rows.append(terms)
    return rows


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0])
    std = math.sqrt(0.5)  # unbiased std of (1, 0)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0.0, 0.0]
    torch.testing.assert_close(group_advantages(rewards, 2), torch.tensor(expected))
    torch.testing.assert_close(group_advantages(rewards, 2, scale_by_std=False),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0]))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "cispo"])
def test_policy_losses_by_hand(loss_type):
    logp, old, ref, mask = tensors(LOGP, OLD, REF, MASK)
    eps, eps_high, beta, max_new = 0.2, 0.28, 0.04, 4
    loss, metrics = policy_loss(logp, old, torch.tensor(ADV, dtype=torch.float64), mask, loss_type=loss_type,
                                epsilon=eps, epsilon_high=eps_high, ref_logp=ref, beta=beta, max_new_tokens=max_new)
    rows = hand_token_terms(eps, eps_high, beta, cispo=loss_type == "cispo")
    if loss_type == "grpo":
        expected = sum(sum(r) / len(r) for r in rows) / 2
    elif loss_type == "dr_grpo":
        expected = sum(sum(r) for r in rows) / (2 * max_new)
    else:
        expected = sum(sum(r) for r in rows) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    ratios = [math.exp(LOGP[b][t] - OLD[b][t]) for b in range(2) for t in range(3) if MASK[b][t]]
    assert metrics["ratio"].item() == pytest.approx(sum(ratios) / 5)
    # clipped tokens: row 0 (A > 0) ratio exp(-0.5) is below 1 - eps: not clipped for A > 0; row 1 (A < 0):
    # exp(-0.2) = 0.82 >= 0.8 not clipped, exp(0.5) = 1.65 > 1.28 with A < 0: not clipped either
    assert metrics["clip_fraction"].item() == 0.0


def test_clip_fraction_counts_the_tokens_whose_gradient_is_cut():
    logp = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    old = torch.tensor([[-0.5, 0.5, -0.05, 0.5]])  # ratios 1.65, 0.61, 1.05, 0.61
    loss, metrics = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 4), epsilon=0.2)
    assert metrics["clip_fraction"].item() == pytest.approx(1 / 4)  # only 1.65 with A > 0 is cut


def test_cispo_weight_is_clipped_and_carries_no_gradient():
    """d loss / d logp_t = -clip(rho_t) * A / n_tokens: the weight's own dependence on logp is stopped."""
    logp = torch.tensor([[-1.0, -0.2]], requires_grad=True)
    old = torch.tensor([[-1.5, -0.2]])  # ratios e^0.5 = 1.65 (clipped to 1.28) and 1
    loss, _ = policy_loss(logp, old, torch.tensor([2.0]), torch.ones(1, 2), loss_type="cispo", epsilon=0.2,
                          epsilon_high=0.28)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.28 * 2.0 / 2, -1.0 * 2.0 / 2]]))


def test_first_update_of_a_rollout_is_reinforce_with_ratio_one_and_no_kl():
    """beta = 0, old = current = reference log-probs: ratio 1, KL 0, and the gradient is -A / |o| per token."""
    logp = torch.tensor([[-0.7, -1.3, -2.0]], requires_grad=True)
    loss, metrics = policy_loss(logp, logp.detach(), torch.tensor([0.5]), torch.tensor([[1.0, 1.0, 0.0]]),
                                ref_logp=logp.detach(), beta=0.0)
    loss.backward()
    assert metrics["ratio"].item() == 1.0 and metrics["kl"].item() == 0.0
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, -0.25, 0.0]]))


# ---------------------------------------------------------------------------------------------------------------
# PPO


def test_gae_by_hand():
    gamma, lam = 0.9, 0.8
    rewards = [[0.0, 0.1, 1.0, 0.0], [0.5, -1.0, 0.0, 0.0]]
    values = [[0.5, 0.6, 0.7, 9.0], [0.2, 0.3, 9.0, 9.0]]  # 9.0: padding, must not leak
    mask = [[1, 1, 1, 0], [1, 1, 0, 0]]
    expected_adv = []
    for r, v, m in zip(rewards, values, mask):
        n = sum(m)
        adv = [0.0] * 4
        running = 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * next_v - v[t] + gamma * lam * running
            adv[t] = running
        expected_adv.append(adv)
    advantages, returns = gae(*tensors(rewards, values, mask), gamma=gamma, lam=lam)
    torch.testing.assert_close(advantages, torch.tensor(expected_adv, dtype=torch.float64))
    expected_ret = [[(a + v) * m for a, v, m in zip(*row)] for row in zip(expected_adv, values, mask)]
    torch.testing.assert_close(returns, torch.tensor(expected_ret, dtype=torch.float64))


def test_per_token_rewards_put_the_score_on_the_last_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    kl = torch.full((2, 4), 0.5)
    rewards = per_token_rewards(torch.tensor([2.0, -1.0]), mask, kl=kl, beta=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.05, 1.95, 0.0], [-1.05, 0.0, 0.0, 0.0]]))


def test_value_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    features, returns = torch.randn(4, 6, 8), torch.randn(4, 6)
    mask = torch.ones(4, 6)
    critic = torch.nn.Linear(8, 1)
    optimizer = torch.optim.Adam(critic.parameters(), lr=0.05)
    old_values = critic(features).squeeze(-1).detach()
    losses = []
    for _ in range(30):
        values = critic(features).squeeze(-1)
        loss = value_loss(values, old_values, returns, mask, clip=10.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert explained_variance(critic(features).squeeze(-1).detach(), returns, mask) > 0.2


def test_value_loss_clip_by_hand():
    values, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, -1.0]])
    # token 0: unclipped (1-2)^2 = 1, clipped V = 0.2 -> (0.2-2)^2 = 3.24 -> max 3.24; token 1: 1 and 1 -> 1
    assert value_loss(values, old, ret, torch.ones(1, 2), clip=0.2).item() == pytest.approx(0.5 * (3.24 + 1) / 2)


def test_explained_variance_of_a_perfect_and_a_constant_critic():
    returns, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert explained_variance(returns, returns, mask).item() == 1.0
    assert explained_variance(torch.full((1, 3), 2.0), returns, mask).item() == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------------------------
# Rewards


@pytest.mark.parametrize("text, value", [("四十二", 42), ("一万零五", 10005), ("三点五", 3.5), ("负七", -7),
                                         ("十", 10), ("两百", 200), ("一亿二千万", 120_000_000)])
def test_chinese_numerals(text, value):
    assert chinese_to_number(text) == value


@pytest.mark.parametrize("reply, answer, match", [
    ("<think>6*7</think><answer>42</answer>", "42", True),
    ("The result is 42.0.", "42", True),
    ("答案是四十二", "42", True),
    ("It is 1,234", "1234", True),
    ("<think>maybe 42</think><answer>41</answer>", "42", False),
    ("42 or 43", "42", False),
    ("<answer>Paris</answer>", "Paris", True),
    ("no number", "7", False),
])
def test_exact_match(reply, answer, match):
    assert answers_match(reply, answer) is match


def test_format_tool_and_combined_rewards():
    calc = [{"type": "function", "function": {"name": "calculator"}}]
    sample = lambda reply, answer=None, tools=None: Sample([], reply, reply_tokens=8, answer=answer, tools=tools)  # noqa: E731
    assert format_reward(sample("<think>a</think>\n<answer>b</answer>"), 64) == 1.0
    assert format_reward(sample("<answer>b</answer>"), 64) == 0.0
    good = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
    assert tool_reward(sample(good, tools=calc), 64) == 1.0
    assert tool_reward(sample(good.replace("calculator", "weather"), tools=calc), 64) == 0.0
    assert tool_reward(sample("<tool_call>{oops</tool_call>", tools=calc), 64) == 0.0
    assert tool_reward(sample("no call", tools=calc), 64) == 0.5
    rewards = Rewards(parse_reward_weights("format:0.5,exact,length:2"), max_new_tokens=64)
    total, means = rewards([sample("<think>x</think><answer>7</answer>", "7"), sample("8", "7")])
    torch.testing.assert_close(total, torch.tensor([0.5 + 1 - 2 * 8 / 64, 0 + 0 - 2 * 8 / 64]))
    assert means == {"reward_format": 0.5, "reward_exact": 0.5, "reward_length": -8 / 64}


def test_reward_weights_errors():
    with pytest.raises(ValueError, match="unknown reward 'speed'"):
        parse_reward_weights("exact:1,speed:2")
    with pytest.raises(ValueError, match="weight of 'exact' must be a number"):
        parse_reward_weights("exact:high")
    with pytest.raises(ValueError, match="needs --reward_model"):
        Rewards({"model": 1.0}, 64)


def test_reward_model_scores_the_conversation_with_its_own_tokenizer(tmp_path, tokenizer):
    """A tiny local sequence-classification model as --reward_model: the score of a reply is the model's logit on
    the conversation rendered by the reward model's own chat template."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    from model.rewards import RewardModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    scorer = RewardModel(tmp_path, torch.device("cpu"))
    prompt = [{"role": "user", "content": "1+1=?"}]
    samples = [Sample(prompt, "2", 1), Sample(prompt, "a long and wrong reply", 5)]
    reference = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    expected = []
    for sample in samples:
        text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": sample.reply}], tokenize=False)
        with torch.no_grad():
            expected.append(float(reference(**tokenizer(text, return_tensors="pt")).logits[0, 0]))
    assert scorer.score(samples) == pytest.approx(expected, rel=1e-6)
    assert expected[0] != expected[1]
    total, means = Rewards({"model": 2.0}, 64, scorer)(samples)
    torch.testing.assert_close(total, 2 * torch.tensor(expected, dtype=torch.float32))
