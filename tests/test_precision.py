from review_trainer.contract.hyperparameters import AUTO
from review_trainer.training.precision import choose_jit_compile, choose_policy


def test_auto_picks_bfloat16_on_cpus_with_bf16_and_float32_elsewhere():
    assert choose_policy(AUTO, None, has_bf16=True) == "mixed_bfloat16"
    assert choose_policy(AUTO, None, has_bf16=False) == "float32"


def test_auto_on_gpus_takes_float16_where_there_are_tensor_cores():
    assert choose_policy(AUTO, (9, 0), has_bf16=False) == "mixed_float16"
    assert choose_policy(AUTO, (7, 0), has_bf16=False) == "mixed_float16"
    assert choose_policy(AUTO, (6, 1), has_bf16=False) == "float32"
    assert choose_policy(True, (6, 1), has_bf16=False) == "mixed_float16"


def test_explicit_choices_win():
    assert choose_policy(False, (9, 0), has_bf16=True) == "float32"
    assert choose_policy(True, None, has_bf16=False) == "mixed_bfloat16"
    assert choose_jit_compile(AUTO, None) is False and choose_jit_compile(AUTO, (8, 0)) is True
    assert choose_jit_compile(True, None) is True and choose_jit_compile(False, (9, 0)) is False
