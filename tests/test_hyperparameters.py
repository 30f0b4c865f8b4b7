import pytest
from review_trainer.contract.errors import HyperparameterError
from review_trainer.contract.hyperparameters import AUTO, Hyperparameters


def test_sagemaker_strings_are_parsed_by_type():
    hp = Hyperparameters.from_dict({
        "epochs": "2", "learning_rate": "0.00003", "epsilon": "1e-08", "train_batch_size": "128",
        "freeze_bert_layer": "True", "run_test": "0", "use_xla": "false", "use_amp": "auto",
        "train_steps_per_epoch": "50", "classes": "neg, pos", "max_seq_length": "128.0",
    })
    assert (hp.epochs, hp.learning_rate, hp.epsilon, hp.train_batch_size) == (2, 3e-5, 1e-8, 128)
    assert hp.freeze_bert_layer is True and hp.run_test is False
    assert hp.use_xla is False and hp.use_amp == AUTO
    assert hp.train_steps_per_epoch == 50 and hp.validation_steps is None
    assert hp.classes == ("neg", "pos") and hp.max_seq_length == 128


def test_defaults_fix_the_books_defects():
    hp = Hyperparameters.from_dict({})
    assert hp.train_steps_per_epoch is None and hp.validation_steps is None and hp.test_steps is None
    assert hp.classes == ("1", "2", "3", "4", "5") and hp.max_seq_length == 64


@pytest.mark.parametrize("value", ["True", "true", "1", "False", "false", "0"])
def test_booleans_accept_the_spellings_sagemaker_users_write(value):
    assert Hyperparameters.from_dict({"run_validation": value}).run_validation is (value in ("True", "true", "1"))


def test_unknown_names_fail_with_the_list_of_valid_names_and_sagemaker_keys_are_ignored():
    with pytest.raises(HyperparameterError) as error:
        Hyperparameters.from_dict({"lr": "0.1", "sagemaker_program": "train.py", "sagemaker_region": "us-east-1"})
    message = str(error.value)
    assert "unknown hyperparameter(s) lr" in message
    assert "learning_rate" in message and "sagemaker_program" not in message


def test_no_eval_of_values():
    with pytest.raises(HyperparameterError, match="expected a number"):
        Hyperparameters.from_dict({"epochs": "__import__('os').getcwd()"})


def test_every_problem_is_reported_together():
    with pytest.raises(HyperparameterError) as error:
        Hyperparameters.from_dict({"epochs": "two", "use_amp": "maybe", "train_batch_size": "1.5"})
    message = str(error.value)
    assert "epochs='two': expected a number" in message
    assert "use_amp='maybe': expected auto, true or false" in message
    assert "train_batch_size='1.5': expected a whole number" in message


@pytest.mark.parametrize("raw, expected", [
    ({"epochs": "0"}, "epochs must be at least 1"),
    ({"learning_rate": "-1"}, "learning_rate must be between 0 and 1"),
    ({"max_seq_length": "4"}, "max_seq_length must be between 8 and 512"),
    ({"head": "mlp"}, "head must be one of cls, bilstm"),
    ({"classes": "1,1,2"}, "classes must list at least two distinct"),
    ({"test_steps": "0"}, "test_steps must be at least 1"),
    ({"max_bad_row_fraction": "2"}, "max_bad_row_fraction must be between 0 and 1"),
    ({"learning_rate": "nan"}, "expected a finite number"),
    # explanations and bias: wrong settings fail at the start, like the others
    ({"bias_facet": "star_rating"}, "bias_facet must be another column than text_column and label_column"),
    ({"bias_facet": "vine", "bias_group": "vine"}, "bias_group must be another column than text_column, "
                                                     "label_column and bias_facet"),
    ({"bias_facet": "vine", "bias_positive_labels": "5,6"}, r"bias_positive_labels must be among classes"),
    ({"bias_facet": "vine", "bias_positive_labels": "1,2,3,4,5"}, "must leave a class for the negative outcome"),
    ({"bias_facet_values": "Books"}, "need bias_facet"),
    ({"explain_samples": "-1"}, "explain_samples must be 0"),
    ({"explain_max_seconds": "0"}, "explain_max_seconds must be at least 1 or auto"),
])
def test_out_of_range_values_fail_with_the_name_and_the_range(raw, expected):
    with pytest.raises(HyperparameterError, match=expected):
        Hyperparameters.from_dict(raw)


def test_bias_settings_are_parsed_as_lists_and_default_to_the_top_two_classes():
    hp = Hyperparameters.from_dict({"bias_facet": "product_category", "bias_facet_values": "Books, Toys",
                                    "bias_positive_labels": "5", "bias_group": "marketplace", "explain_samples": "30"})
    assert hp.bias_facet_values == ("Books", "Toys") and hp.positive_labels == ("5",) and hp.explain_samples == 30
    assert hp.to_dict()["bias_facet_values"] == ["Books", "Toys"]
    assert Hyperparameters.from_dict({}).explain_max_seconds == AUTO
    assert Hyperparameters.from_dict({"explain_max_seconds": "90"}).explain_max_seconds == 90
    hp = Hyperparameters.from_dict({"bias_facet": "vine", "bias_facet_values": "none"})
    assert hp.bias_facet_values is None and hp.positive_labels == ("4", "5") and hp.to_dict()["bias_facet_values"] is None

