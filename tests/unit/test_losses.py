"""trainer.loss: each loss scores what it should, and a loss that does not fit the data's targets is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orchestrator.config.compose import compose, to_config
from orchestrator.config.schema import LOSSES_FOR, LossName, SampleKind, TargetKind, TrainerConfig
from orchestrator.data.spec import DataSpec
from orchestrator.errors import UserError
from orchestrator.train.losses import build_loss

TOKENS = DataSpec(kind=SampleKind.tokens, vocab_size=11, seq_len=5)
CLASSES = DataSpec(kind=SampleKind.images, input_shape=(1, 8, 8), num_classes=4)
VALUES = DataSpec(kind=SampleKind.images, input_shape=(10,), targets=TargetKind.values, target_dim=3)
LABELS = DataSpec(kind=SampleKind.images, input_shape=(10,), targets=TargetKind.probabilities, target_dim=3)


def loss_for(name: str, spec: DataSpec, **trainer):
    return build_loss(TrainerConfig(loss=LossName(name), **trainer), spec, data_name="d")


def random(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def test_cross_entropy_scores_tokens_and_classes_and_counts_a_classifiers_hits():
    logits, tokens = random(2, 5, 11), torch.randint(0, 11, (2, 5))
    lm = loss_for("cross_entropy", TOKENS)
    assert torch.allclose(lm(logits, tokens), F.cross_entropy(logits.reshape(10, 11), tokens.reshape(10)))
    assert lm.hits is None  # a language model's eval reports its loss only

    classifier = loss_for("cross_entropy", CLASSES)
    logits, labels = random(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.allclose(classifier(logits, labels, reduction="sum"), F.cross_entropy(logits, labels, reduction="sum"))
    assert classifier.hits(logits, labels).item() == (logits.argmax(1) == labels).sum().item()


@pytest.mark.parametrize(("name", "reference"), [("mse", F.mse_loss), ("l1", F.l1_loss), ("huber", F.huber_loss)])
def test_regression_losses_score_float_targets_without_accuracy(name, reference):
    outputs, targets = random(4, 3), random(4, 3) * 3
    loss = loss_for(name, VALUES)
    assert torch.allclose(loss(outputs, targets), reference(outputs, targets))
    # Eval sums and divides by the number of target elements: the same mean.
    assert torch.allclose(loss(outputs, targets, reduction="sum") / targets.numel(), loss(outputs, targets))
    assert loss.hits is None


def test_huber_delta_is_the_switch_from_quadratic_to_linear():
    outputs, targets = torch.zeros(1, 3), torch.tensor([[0.5, 2.0, 5.0]])
    assert torch.allclose(
        loss_for("huber", VALUES, huber_delta=2.0)(outputs, targets), F.huber_loss(outputs, targets, delta=2.0)
    )
    assert not torch.allclose(loss_for("huber", VALUES)(outputs, targets), F.huber_loss(outputs, targets, delta=2.0))


def test_bce_scores_each_label_with_a_sigmoid_and_counts_label_hits():
    logits, targets = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[1.0, 0.0, 0.0]])
    loss = loss_for("bce", LABELS)
    assert torch.allclose(loss(logits, targets), F.binary_cross_entropy_with_logits(logits, targets))
    assert loss.hits(logits, targets).item() == 2


def test_losses_compute_in_fp32_under_autocast():
    outputs, targets = random(4, 3).bfloat16(), random(4, 3)
    assert loss_for("mse", VALUES)(outputs, targets).dtype == torch.float32


def test_which_loss_fits_which_targets():
    assert LOSSES_FOR[TargetKind.classes] == (LossName.cross_entropy,)
    assert set(LOSSES_FOR[TargetKind.values]) == {LossName.mse, LossName.l1, LossName.huber}
    assert set(LOSSES_FOR[TargetKind.probabilities]) == {LossName.bce, LossName.mse, LossName.l1, LossName.huber}
    for spec, refused in ((TOKENS, "mse"), (CLASSES, "bce"), (VALUES, "cross_entropy"), (VALUES, "bce")):
        with pytest.raises(UserError, match=rf"^trainer\.loss={refused} does not fit data=d"):
            loss_for(refused, spec)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainer.loss=mse"],
            "trainer.loss=mse does not fit data=text, which yields token ids; allowed: cross_entropy",
        ),
        (
            ["job=digits_cnn_cpu", "trainer.loss=bce"],
            "trainer.loss=bce does not fit data=digits, which yields class ids; allowed: cross_entropy (bce needs float "
            "targets in [0, 1], one column per label)",
        ),
        (
            ["job=diabetes_mlp_cpu", "trainer.loss=cross_entropy"],
            "trainer.loss=cross_entropy does not fit data=diabetes, which yields float targets; allowed: mse, l1, huber",
        ),
        (
            ["model=mlp", "data=npz", "data.path=x.npz", "data.targets=values", "trainer.loss=cross_entropy"],
            "trainer.loss=cross_entropy does not fit data=npz, which yields float targets; allowed: mse, l1, huber",
        ),
    ],
)
def test_the_schema_refuses_a_loss_that_does_not_fit_the_data(overrides, message):
    with pytest.raises(UserError) as caught:
        to_config(compose(overrides))
    assert str(caught.value) == message


def test_the_schema_accepts_each_loss_where_it_fits():
    for overrides in (
        ["job=diabetes_mlp_cpu", "trainer.loss=huber", "trainer.huber_delta=0.5"],
        ["model=mlp", "data=npz", "data.path=x.npz", "data.targets=probabilities", "trainer.loss=bce"],
        ["job=digits_mlp_cpu"],
    ):
        to_config(compose(overrides))
    with pytest.raises(UserError, match="trainer.huber_delta must be > 0"):
        to_config(compose(["job=diabetes_mlp_cpu", "trainer.loss=huber", "trainer.huber_delta=0"]))
