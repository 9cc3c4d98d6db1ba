"""The batched linear-probe trainer: equal to independent torch.optim runs, and it learns separable data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pathssl_cli.evaluate.probe import (
    HeadConfig,
    ProbeSchedule,
    lr_factors,
    selection_metric,
    steps_for_epochs,
    train_probes,
)


def _reference_run(
    x: torch.Tensor, y: torch.Tensor, head: HeadConfig, schedule: ProbeSchedule, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One head trained the plain way: nn.Linear + torch.optim + LambdaLR, the same data order and init."""
    n, dim = x.shape
    gen = torch.Generator().manual_seed(head.seed)
    linear = torch.nn.Linear(dim, num_classes)
    with torch.no_grad():
        linear.weight.copy_((torch.randn(dim, num_classes, generator=gen) * 0.01).T)
        linear.bias.zero_()
    if schedule.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            linear.parameters(), lr=head.lr, momentum=schedule.momentum, weight_decay=head.weight_decay
        )
    else:
        opt = torch.optim.AdamW(
            linear.parameters(),
            lr=head.lr,
            betas=schedule.betas,
            eps=schedule.eps,
            weight_decay=head.weight_decay,
        )
    # Cosine factor written independently of the code under test: torch's CosineAnnealingLR closed form.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / schedule.steps))
    )
    order: list[int] = []
    for _ in range(schedule.steps):
        if len(order) < schedule.batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        idx, order = order[: schedule.batch_size], order[schedule.batch_size :]
        loss = F.cross_entropy(linear(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return linear.weight.detach().T.clone(), linear.bias.detach().clone()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_batched_heads_equal_independent_torch_optim_runs(optimizer: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(50, 6)
    y = torch.randint(0, 3, (50,))
    # Two seeds with two heads each, interleaved, so the seed grouping and the order restoring are exercised.
    heads = [
        HeadConfig(lr=0.1, weight_decay=0.0, seed=1),
        HeadConfig(lr=0.5, weight_decay=1e-3, seed=2),
        HeadConfig(lr=0.03, weight_decay=0.01, seed=1),
        HeadConfig(lr=0.2, weight_decay=0.0, seed=2),
    ]
    # 16 steps of 8 = 128 samples: crosses epoch boundaries (50) mid-batch; eval only at the very end so the
    # kept weights are the final ones.
    schedule = ProbeSchedule(optimizer=optimizer, steps=16, batch_size=8, eval_every=10_000)  # type: ignore[arg-type]
    result = train_probes(x, y, x, y, 3, heads, schedule)
    for g, head in enumerate(heads):
        ref_w, ref_b = _reference_run(x, y, head, schedule, 3)
        torch.testing.assert_close(result.weight[g], ref_w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.bias[g], ref_b, rtol=1e-4, atol=1e-5)


def test_linear_probe_reaches_95_percent_on_linearly_separable_features() -> None:
    rng = np.random.default_rng(0)
    dim, classes = 32, 4
    # Class means far apart relative to the noise: a linear boundary separates them with margin.
    means = rng.normal(size=(classes, dim)) * 3.0

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = rng.integers(0, classes, n)
        feats = means[labels] + rng.normal(size=(n, dim))
        return torch.tensor(feats, dtype=torch.float32), torch.tensor(labels)

    train_x, train_y = sample(400)
    val_x, val_y = sample(200)
    test_x, test_y = sample(400)
    heads = [HeadConfig(lr=lr, weight_decay=0.0, seed=0) for lr in (0.01, 0.1)]
    schedule = ProbeSchedule(
        optimizer="sgd", steps=steps_for_epochs(20, 400, 64), batch_size=64, eval_every=10
    )
    result = train_probes(train_x, train_y, val_x, val_y, classes, heads, schedule)
    best = int(result.best_val.argmax())
    test_acc = (result.scores(test_x)[best].argmax(1) == test_y).float().mean().item()
    assert test_acc >= 0.95


def test_best_checkpoint_is_kept_not_the_last() -> None:
    # A large lr oscillates; the kept weights must be those of the best evaluation, not the last.
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    schedule = ProbeSchedule(optimizer="sgd", steps=40, batch_size=16, eval_every=1)
    result = train_probes(x, y, x, y, 2, [HeadConfig(lr=0.5, weight_decay=0.0, seed=0)], schedule)
    history_scores = [h.val[0] for h in result.history]
    assert result.best_val.item() == pytest.approx(max(history_scores), abs=1e-6)
    kept = (result.scores(x)[0].argmax(1) == y).float().mean().item()
    assert kept == pytest.approx(result.best_val.item(), abs=1e-6)
    assert result.history[int(result.best_step.item()) - 1].val[0] == pytest.approx(kept, abs=1e-6)


def test_selection_metric_balanced_accuracy_by_hand() -> None:
    targets = torch.tensor([0, 0, 0, 1])
    # head 0 predicts all 0: top1 3/4, balanced (1 + 0)/2
    # head 1 predicts [0,1,1,1]: top1 2/4, balanced (1/3 + 1)/2
    logits = torch.zeros(2, 4, 2)
    logits[0, :, 0] = 1
    logits[1, 0, 0] = 1
    logits[1, 1:, 1] = 1
    assert selection_metric(logits, targets, 2, "top1").tolist() == pytest.approx([0.75, 0.5])
    assert selection_metric(logits, targets, 2, "balanced_acc").tolist() == pytest.approx([0.5, 2 / 3])


def test_lr_factors_cosine_and_constant() -> None:
    cos = lr_factors(ProbeSchedule(optimizer="sgd", steps=4, batch_size=1))
    assert cos.tolist() == pytest.approx(
        [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 - 0.5 * math.sqrt(0.5)]
    )
    const = lr_factors(ProbeSchedule(optimizer="sgd", steps=3, batch_size=1, lr_schedule="constant"))
    assert const.tolist() == [1.0, 1.0, 1.0]


def test_thread_setting_is_restored() -> None:
    before = torch.get_num_threads()
    x = torch.randn(20, 3)
    y = (x[:, 0] > 0).long()
    train_probes(
        x,
        y,
        x,
        y,
        2,
        [HeadConfig(lr=0.1, weight_decay=0.0, seed=0)],
        ProbeSchedule(optimizer="sgd", steps=2, batch_size=8),
    )
    assert torch.get_num_threads() == before


def test_sweep_prints_progress_lines_off_a_terminal(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATHSSL_PROGRESS", "0")  # no bar: a line per tenth of the sweep instead
    x, y = torch.randn(40, 4), torch.arange(40) % 2
    schedule = ProbeSchedule(optimizer="sgd", steps=50, batch_size=8, eval_every=1)
    train_probes(x, y, x, y, 2, [HeadConfig(0.1, 0.0, 0)], schedule, desc="sweep")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sweep: step")]
    assert [line.split()[2] for line in lines] == [f"{s}/50," for s in range(5, 51, 5)]
    assert all("best val top1" in line for line in lines)
