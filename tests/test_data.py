import numpy as np
import pytest

from polca_study.tasks.arithmetic_data import PLACES, ArithmeticData, any_carry, encode


def test_encoding_and_labels_by_hand():
    split = encode(np.array([957, 123]), np.array([68, 45]))
    # 957 + 068 = 1025: carries into the 10s, 100s and 1000s places
    assert split.inputs[0].tolist() == [9, 5, 7, 10, 0, 6, 8, 11, 1, 0, 2]
    assert split.targets[0].tolist() == [1, 0, 2, 5]
    rows = split.labels[split.labels.sequence == 0]
    assert list(rows.place) == list(PLACES)
    assert rows.carry.tolist() == [True, True, True, False]
    assert rows.value.tolist() == [1, 0, 2, 5]
    # 123 + 045 = 0168: no carries
    assert split.labels[split.labels.sequence == 1].carry.tolist() == [False] * 4


def test_splits_are_seeded_and_disjoint():
    data = ArithmeticData(eval_size=300, hessian_size=300, seed=3)
    again = ArithmeticData(eval_size=300, hessian_size=300, seed=3)
    assert (data.eval_pairs == again.eval_pairs).all()
    assert not set(data.eval_pairs) & set(data.hessian_pairs)
    inputs, _ = next(data.train_batches(512, seed=0))
    inputs = inputs.numpy()
    pairs = set(inputs[:, :3] @ np.array([100, 10, 1]) * 1000 + inputs[:, 4:7] @ np.array([100, 10, 1]))
    assert not pairs & set(data.eval_pairs)


def test_carry_rate_controls_training_carries():
    data = ArithmeticData(eval_size=10, hessian_size=2000, carry_rate=0.08, seed=0)
    assert abs(any_carry(data.hessian_pairs).mean() - 0.08) < 0.02
    uniform = ArithmeticData(eval_size=10, hessian_size=2000, seed=0)
    assert any_carry(uniform.hessian_pairs).mean() > 0.5
    with pytest.raises(ValueError, match="carry_rate"):
        ArithmeticData(carry_rate=1.5)
