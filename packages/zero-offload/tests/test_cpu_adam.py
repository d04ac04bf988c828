"""The CPU Adam step is torch.optim.AdamW's (and Adam's) maths, chunk boundaries and dtypes included."""

from __future__ import annotations

import pytest
import torch

from zero_offload import CPUAdam, cpu_adam_step


def _reference(numel: int, steps: int, *, adamw: bool, weight_decay: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(numel, generator=g))
    grads = [torch.randn(numel, generator=g) for _ in range(steps)]
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    opt = cls([p], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, foreach=False)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    return p.detach(), grads, p.detach().clone()


@pytest.mark.parametrize("numel", [1, 1000, 4099])
@pytest.mark.parametrize("adamw", [True, False])
def test_matches_torch_adam_across_chunks(numel: int, adamw: bool):
    g = torch.Generator().manual_seed(0)
    start = torch.randn(numel, generator=g)
    expected, grads, _ = _reference(numel, 3, adamw=adamw, weight_decay=0.1)
    p, m, v = start.clone(), torch.zeros(numel), torch.zeros(numel)
    lowp = torch.empty(numel, dtype=torch.bfloat16)
    for step, grad in enumerate(grads, 1):
        cpu_adam_step(p, grad, m, v, step=step, lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1,
                      decoupled=adamw, lowp_out=lowp, chunk=1024)
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(lowp, p.to(torch.bfloat16))  # the weight copy written in the same pass


def test_grad_scale_and_low_precision_gradients_are_folded_in():
    numel = 3000
    expected, grads, _ = _reference(numel, 2, adamw=True, weight_decay=0.0)
    start = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    p, m, v = start.clone(), torch.zeros(numel), torch.zeros(numel)
    for step, grad in enumerate(grads, 1):
        cpu_adam_step(p, grad * 1024, m, v, step=step, lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6,
                      grad_scale=1 / 1024, chunk=1000)
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7)
    p16, m16, v16 = start.clone(), torch.zeros(numel), torch.zeros(numel)
    p32, m32, v32 = start.clone(), torch.zeros(numel), torch.zeros(numel)
    for step, grad in enumerate(grads, 1):
        g16 = grad.to(torch.bfloat16)
        cpu_adam_step(p16, g16, m16, v16, step=step, lr=1e-2, chunk=1000)
        cpu_adam_step(p32, g16.float(), m32, v32, step=step, lr=1e-2)
    assert torch.equal(p16, p32)


def test_cpu_adam_is_an_update_rule_with_adamw_state():
    rule = CPUAdam(lr=1e-2, weight_decay=0.0)
    assert rule.name == "AdamW" and CPUAdam(adamw_mode=False).name == "Adam"
    assert rule.state_names == ("exp_avg", "exp_avg_sq")
    p, g = torch.ones(8), torch.full((8,), 0.5)
    state = {"exp_avg": torch.zeros(8), "exp_avg_sq": torch.zeros(8)}
    lowp = torch.empty(8, dtype=torch.float16)
    rule.update(p, g, state, step=1, hparams=rule.defaults, grad_scale=1.0, lowp_out=lowp)
    torch.testing.assert_close(p, torch.full((8,), 1 - 1e-2))  # Adam's first step moves by lr
    assert torch.equal(lowp, p.half())


def test_bad_inputs_are_named():
    p = torch.zeros(4)
    with pytest.raises(ValueError, match="step must be >= 1"):
        cpu_adam_step(p, p, p.clone(), p.clone(), step=0, lr=1.0)
    with pytest.raises(ValueError, match="grad has 5 elements"):
        cpu_adam_step(p, torch.zeros(5), p.clone(), p.clone(), step=1, lr=1.0)
    with pytest.raises(ValueError, match="exp_avg must be fp32"):
        cpu_adam_step(p, p, p.half(), p.clone(), step=1, lr=1.0)
