"""Top-1 and top-2 routing, checked by hand on small logits: capacity, which tokens are dropped, the gate
weights, the load-balancing loss and the refused options (no processes)."""

import pytest
import torch

from zero_pipe import GateConfig, TopKGate, expert_capacity, top1_routing, top2_routing


def logits_for(choices: list[int], experts: int = 2) -> torch.Tensor:
    """Logits whose best expert per token is ``choices[s]`` (log 3 : 0 -> probabilities 0.75 / 0.25)."""
    out = torch.zeros(len(choices), experts)
    out[torch.arange(len(choices)), torch.tensor(choices)] = torch.log(torch.tensor(3.0))
    return out


def test_capacity_is_tokens_per_expert_times_the_factor_at_least_the_minimum() -> None:
    assert expert_capacity(12, 4, 1.0, 0) == 3
    assert expert_capacity(12, 4, 1.25, 0) == 4
    assert expert_capacity(12, 4, 1.0, 8) == 8


def test_top1_drops_the_tokens_past_capacity_in_sequence_order() -> None:
    r = top1_routing(logits_for([0, 0, 0, 1]), capacity_factor=1.0, min_capacity=0, use_rts=False)
    assert r.combine.shape == (4, 2, 2)
    assert r.exp_counts.tolist() == [3, 1]  # counted before dropping
    kept = r.dispatch.sum(dim=(1, 2)).tolist()
    assert kept == [1, 1, 0, 1]  # the third token for expert 0 is past its 2 slots
    # .item(): a 0-d tensor compared with pytest.approx is compared by torch, exactly
    assert r.combine[0, 0, 0].item() == pytest.approx(0.75) and r.combine[1, 0, 1].item() == pytest.approx(0.75)
    assert r.combine[3, 1, 0].item() == pytest.approx(0.75)
    # l_aux = experts * sum(mean prob * fraction routed): (0.625 * 0.75 + 0.375 * 0.25) * 2
    assert r.l_aux.item() == pytest.approx(1.125)


def test_random_token_selection_keeps_capacity_tokens_of_the_chosen_ones() -> None:
    torch.manual_seed(0)
    r = top1_routing(logits_for([0] * 6 + [1] * 2), capacity_factor=1.0, min_capacity=0, use_rts=True)
    per_expert = r.dispatch.any(dim=2).sum(0).tolist()
    assert per_expert == [4, 2]
    slots = r.dispatch[:, 0].nonzero()[:, 1].tolist()
    assert sorted(slots) == [0, 1, 2, 3]  # each kept token has its own slot


def test_without_dropping_every_token_gets_a_slot() -> None:
    r = top1_routing(logits_for([0, 0, 0, 1]), drop_tokens=False)
    assert r.combine.shape[2] == 3 and r.dispatch.sum().item() == 4


def test_top2_weights_sum_to_one_and_second_choices_queue_after_first_choices() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 0.0, 1.0], [1.0, 2.0, 0.0]])
    r = top2_routing(logits, capacity_factor=10.0, min_capacity=0)
    torch.testing.assert_close(r.combine.sum(dim=(1, 2)), torch.ones(3))
    assert r.exp_counts.tolist() == [3, 2, 1]
    # expert 0: first choice of tokens 0 and 1 (slots 0, 1), second choice of token 2 (slot 2)
    assert r.dispatch[0, 0, 0] and r.dispatch[1, 0, 1] and r.dispatch[2, 0, 2]
    tight = top2_routing(logits, capacity_factor=1 / 3, min_capacity=0)  # one slot per expert
    assert tight.dispatch[:, 0].sum().item() == 1 and not tight.dispatch[2, 0].any()
    # a token whose first choice was kept and second dropped puts all its weight on the first
    assert tight.combine[0].sum().item() == pytest.approx(1.0)


def test_unused_tokens_are_not_routed() -> None:
    r = top1_routing(logits_for([0, 1, 0, 1]), used_token=torch.tensor([1, 0, 1, 1]), min_capacity=4)
    assert r.dispatch.sum().item() == 3 and not r.dispatch[1].any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 3}, "top-k gating supports k=1 or k=2, got k=3"),
        ({"noisy_gate_policy": "Gaussian"}, "noisy_gate_policy must be one of"),
        ({"k": 2, "noisy_gate_policy": "RSample"}, "'RSample' is for top-1 gating"),
        ({"capacity_factor": 0}, "capacity_factor must be > 0, got 0"),
    ],
)
def test_refused_gate_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        GateConfig(**kwargs)


def test_eval_uses_the_eval_capacity_factor_and_no_noise() -> None:
    torch.manual_seed(0)
    config = GateConfig(capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0, noisy_gate_policy="Jitter")
    gate = TopKGate(4, 2, config).eval()
    x = torch.randn(8, 4)
    first, second = gate(x), gate(x)
    assert first.combine.shape[2] == 8  # ceil(8 / 2 * 2.0)
    assert torch.equal(first.combine, second.combine)
