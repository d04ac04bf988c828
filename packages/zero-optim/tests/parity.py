"""The single-process reference every ZeRO stage is held to, and how results are compared."""

import torch
import zero_models

STEPS, BATCH, LR, WD = 20, 8, 1e-3, 0.1
EVAL_EVERY = 5  # steps between no-grad evaluations of a fixed batch


def reference(name: str, accum: int, clip: float | None,
              steps: int = STEPS) -> tuple[list[float], dict[str, torch.Tensor], list[float]]:
    """A plain torch.optim.AdamW loop on the whole global batch: losses, final weights, eval losses."""
    model = zero_models.make_model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    losses, evals = [], []
    for step in range(steps):
        zero_models.before_step(model, step)
        x, y = zero_models.batch(name, step, BATCH)
        total = 0.0
        for xm, ym in zip(x.chunk(accum), y.chunk(accum)):
            loss = model(xm, ym) / accum
            loss.backward()
            total += loss.item()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(total)
        if step % EVAL_EVERY == EVAL_EVERY - 1:
            with torch.no_grad():
                evals.append(model(*zero_models.batch(name, -1, BATCH)).item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, evals


def train(model, opt, comm, name: str, accum: int, steps: int = STEPS) -> tuple[list[float], list[float]]:
    """The distributed side of the parity: each rank its slice of the same global batches, ``accum``
    micro-steps through ``opt.backward`` then ``opt.step``; the mean loss of every step and the no-grad
    evaluations the reference makes too."""
    per_rank = BATCH // comm.world_size
    mine = slice(comm.rank * per_rank, (comm.rank + 1) * per_rank)
    losses, evals = [], []
    for step in range(steps):
        zero_models.before_step(model, step)
        x, y = zero_models.batch(name, step, BATCH)
        total = torch.zeros(())
        for xm, ym in zip(x[mine].chunk(accum), y[mine].chunk(accum)):
            loss = model(xm, ym)
            opt.backward(loss)
            total += loss.detach().float() / accum
        assert opt.step(), f"step {step} was skipped"
        losses.append(comm.all_reduce(total, "avg").item())
        if step % EVAL_EVERY == EVAL_EVERY - 1:
            with torch.no_grad():
                evals.append(model(*zero_models.batch(name, -1, BATCH)).item())
    return losses, evals


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative difference of a whole tensor, ||a - b|| / ||b||.

    Element-wise, a few Adam updates are ill-conditioned: where a gradient element is
    near zero, m / sqrt(v) turns a 1e-7 change in summation order into a different
    sign. Those elements move a whole learning rate apart without anything being
    wrong, so weights are compared as tensors."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def max_rel(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want), (len(got), len(want))
    return max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))
