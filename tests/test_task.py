"""Per-example losses of the attribution tasks: independent of batching and padding."""

from __future__ import annotations

import pytest
import torch

from harmtrace.attribute.task import ClassificationTask, LMTask, RegressionTask
from harmtrace.errors import ConfigError, InputDataError
from helpers import tiny_lm


def test_lm_loss_of_a_sequence_does_not_depend_on_padding_or_batch():
    model = tiny_lm()
    task = LMTask(pad_id=0)
    short, long = [5, 9, 14, 3, 7], list(range(20, 32))

    alone = [task.train_loss(model, task.collate([s]))[0] for s in (short, long)]
    together = task.train_loss(model, task.collate([short, long]))

    torch.testing.assert_close(together, torch.stack(alone), rtol=1e-5, atol=1e-5)


def test_lm_loss_is_the_sum_over_labelled_tokens_only():
    model = tiny_lm()
    task = LMTask(pad_id=0)
    ids = [5, 9, 14, 3, 7, 11]
    labels = [-100, -100, -100, 3, 7, -100]

    loss = task.train_loss(model, task.collate([{"input_ids": ids, "labels": labels}]))[0]
    logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits, dim=-1)
    expected = -(logp[2, 3] + logp[3, 7])

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_lm_example_with_mismatched_labels_names_the_example():
    with pytest.raises(InputDataError, match="example 1"):
        LMTask().collate([[1, 2], {"input_ids": [1, 2, 3], "labels": [1, 2]}])


def test_sampled_loss_is_seeded():
    model = tiny_lm()
    task = LMTask()
    batch = task.collate([[5, 9, 14, 3, 7]])
    a = task.sampled_loss(model, batch, torch.Generator().manual_seed(3))
    b = task.sampled_loss(model, batch, torch.Generator().manual_seed(3))

    torch.testing.assert_close(a, b)


def test_classification_and_regression_losses_are_per_example():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    xs = torch.randn(5, 4)
    task = ClassificationTask()
    batch = task.collate([(x, i % 3) for i, x in enumerate(xs)])
    expected = torch.nn.functional.cross_entropy(model(xs), batch["y"], reduction="none")

    torch.testing.assert_close(task.train_loss(model, batch), expected)

    head = torch.nn.Linear(4, 1)
    reg = RegressionTask()
    rbatch = reg.collate([(x, 1.0) for x in xs])
    torch.testing.assert_close(reg.train_loss(head, rbatch),
                               0.5 * (head(xs)[:, 0] - 1.0) ** 2)


def test_regression_refuses_a_model_with_several_outputs():
    with pytest.raises(ConfigError, match=r"\(B,\) or \(B, 1\)"):
        RegressionTask().train_loss(torch.nn.Linear(4, 2),
                                    RegressionTask().collate([(torch.zeros(4), 0.0)]))


def test_batches_keep_positions():
    task = ClassificationTask()
    examples = [(torch.zeros(2), 0)] * 5
    rows = [r for r, _ in task.batches(examples, 2)]

    assert rows == [[0, 1], [2, 3], [4]]
    with pytest.raises(ConfigError, match="batch_size"):
        list(task.batches(examples, 0))
