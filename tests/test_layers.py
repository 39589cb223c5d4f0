"""Hook-based per-example gradients of linear layers equal autograd on each example alone."""

from __future__ import annotations

import pytest
import torch

from harmtrace.attribute.layers import (
    capture_batch,
    per_example_gradients,
    tracked_modules,
)
from harmtrace.attribute.task import ClassificationTask, LMTask
from harmtrace.errors import ConfigError
from helpers import tiny_lm, tiny_tokenizer


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 4, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(4, 3))


def _canonical_grad(module: torch.nn.Module) -> torch.Tensor:
    """``(d_out, d_in')`` gradient from ``.grad`` fields, as the layer module lays it out."""
    weight = module.weight.grad
    if not isinstance(module, torch.nn.Linear):  # Conv1D stores (d_in, d_out)
        weight = weight.T
    if module.bias is None:
        return weight
    return torch.cat([weight, module.bias.grad[:, None]], dim=1)


def _alone(model, task, example, names) -> dict[str, torch.Tensor]:
    model.zero_grad()
    task.train_loss(model, task.collate([example])).sum().backward()
    modules = dict(model.named_modules())
    out = {n: _canonical_grad(modules[n]).double().clone() for n in names}
    model.zero_grad()
    return out


class LeftPadLMTask(LMTask):
    """Left-padded batches with explicit position ids, so padding moves no token."""

    def collate(self, examples):
        right = super().collate(examples)
        mask = right["attention_mask"]
        lengths = mask.sum(dim=1)
        width = mask.shape[1]
        out = {k: torch.empty_like(v) for k, v in right.items()}
        for b, n in enumerate(lengths.tolist()):
            for key, fill in (("input_ids", self.pad_id), ("labels", -100),
                              ("attention_mask", 0)):
                out[key][b] = fill
                out[key][b, width - n:] = right[key][b, :n]
            # the first real token is never a target alone; here a pad would predict it
            out["labels"][b, width - n] = -100
        out["position_ids"] = (out["attention_mask"].cumsum(dim=1) - 1).clamp_min(0)
        return out

    def _logits(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"]).logits


def test_mlp_layer_gradients_equal_autograd_on_each_example_alone():
    model = _mlp()
    task = ClassificationTask()
    gen = torch.Generator().manual_seed(1)
    examples = [(torch.randn(5, generator=gen), i % 3) for i in range(9)]
    names = tracked_modules(model)
    assert names == ["0", "2", "4"]
    for batch_size in (1, 4, 9):
        for rows, batch in task.batches(examples, batch_size):
            grads = per_example_gradients(model, task, batch, names)
            for b, row in enumerate(rows):
                ref = _alone(model, task, examples[row], names)
                for n in names:
                    torch.testing.assert_close(grads[n][b], ref[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", [LMTask(), LeftPadLMTask()], ids=["right-pad", "left-pad"])
def test_gpt2_conv1d_gradients_equal_autograd_alone_under_padding(task):
    model = tiny_lm()
    gen = torch.Generator().manual_seed(0)
    vocab = len(tiny_tokenizer())
    sequences = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in (5, 12, 7)]
    names = tracked_modules(model)
    assert names and all("lm_head" not in n for n in names)  # tied head left out
    grads = per_example_gradients(model, task, task.collate(sequences), names)
    for b, seq in enumerate(sequences):
        ref = _alone(model, LMTask(), seq, names)
        for n in names:
            assert grads[n].shape[1:] == ref[n].shape
            torch.testing.assert_close(grads[n][b], ref[n], rtol=1e-4, atol=1e-6)


def test_capture_mask_marks_padding_and_padding_has_zero_output_gradient():
    model = tiny_lm()
    task = LMTask()
    batch = task.collate([[5, 6, 7], [8, 9, 10, 11, 12, 13]])
    name = tracked_modules(model)[0]
    captured = capture_batch(model, task, batch, [name])[name]
    assert captured.mask.tolist() == batch["attention_mask"].double().tolist()
    assert torch.all(captured.g[0, 3:] == 0)
    assert torch.all(captured.a[..., -1] == 1)  # bias column


def test_capture_restores_train_mode_and_touches_no_grad_field():
    model = _mlp().train()
    model[2].eval()  # a mixed-mode model keeps each flag
    task = ClassificationTask()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    per_example_gradients(model, task, task.collate([(torch.ones(5), 1)]),
                          tracked_modules(model))
    assert model.training and model[0].training and not model[2].training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_naming_frozen_or_tied_modules_is_a_config_error():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    assert tracked_modules(model) == ["2", "4"]
    with pytest.raises(ConfigError, match="frozen"):
        tracked_modules(model, include=["0"])
    with pytest.raises(ConfigError, match="tied"):
        tracked_modules(tiny_lm(), include=["lm_head"])
    with pytest.raises(ConfigError, match="nothing_here"):
        tracked_modules(model, include=["nothing_here"])


def test_shared_module_is_tracked_once_and_sums_its_uses():
    layer = torch.nn.Linear(3, 3)

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = layer
            self.b = layer

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = Twice()
    task = ClassificationTask()
    names = tracked_modules(model)
    assert names == ["a"]
    example = (torch.tensor([0.3, -1.0, 2.0]), 2)
    grads = per_example_gradients(model, task, task.collate([example]), names)
    ref = _alone(model, task, example, names)
    torch.testing.assert_close(grads["a"][0], ref["a"], rtol=1e-5, atol=1e-6)
