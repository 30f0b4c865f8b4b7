"""The pretrained checkpoint: a Hugging Face folder (config.json, model.safetensors, vocab.txt).

KerasHub converts the weights (`from_preset` on a local folder); the Hugging Face `tokenizers`
library tokenizes with the folder's own WordPiece vocabulary, so token ids are those of
`transformers.AutoTokenizer` for the same folder.
"""

import dataclasses
import json
import os
import shutil

import numpy as np
import tokenizers
from review_trainer.contract.errors import HyperparameterError, PretrainedModelError
from tokenizers.implementations import BertWordPieceTokenizer

REQUIRED_FILES = ("config.json", "model.safetensors", "vocab.txt")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass(frozen=True)
class PretrainedCheckpoint:
    path: str
    model_type: str  # "distilbert" or "bert", from config.json
    config: dict

    @property
    def max_positions(self):
        return int(self.config.get("max_position_embeddings", 512))

    @property
    def classifier_dropout(self):
        """The `cls` head's dropout, as transformers' *ForSequenceClassification reads it from config.json."""
        if self.model_type == "distilbert":
            return float(self.config.get("seq_classif_dropout", 0.2))
        rate = self.config.get("classifier_dropout")
        return float(self.config.get("hidden_dropout_prob", 0.1) if rate is None else rate)


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """What the job starts from: the checkpoint folder and its tokenizer at the job's max_seq_length."""

    checkpoint: PretrainedCheckpoint
    tokenizer: "ReviewTokenizer"


def open_for_job(hp, env):
    """The pretrained stage: the checkpoint named by pretrained_model_dir (else the image's baked
    one), checked before any weights are read, and its tokenizer."""
    checkpoint = open_checkpoint(hp.pretrained_model_dir or env.default_pretrained_model_dir)
    if hp.max_seq_length > checkpoint.max_positions:
        raise HyperparameterError(f"max_seq_length={hp.max_seq_length} exceeds the checkpoint's "
                                  f"max_position_embeddings={checkpoint.max_positions}")
    return Pretrained(checkpoint, ReviewTokenizer(checkpoint, hp.max_seq_length))


def open_checkpoint(path):
    """Checks the folder and says what is missing before any weights are read."""
    if not path:
        raise PretrainedModelError(
            "no pretrained model folder: set the hyperparameter pretrained_model_dir or the "
            "environment variable PRETRAINED_MODEL_DIR (the image sets it to its baked weights)"
        )
    if not os.path.isdir(path):
        raise PretrainedModelError(f"pretrained_model_dir {path} is not a folder")
    missing = [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise PretrainedModelError(
            f"pretrained_model_dir {path} lacks {', '.join(missing)}; expected a Hugging Face "
            f"checkpoint folder with {', '.join(REQUIRED_FILES)}"
        )
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PretrainedModelError(f"{path}/config.json is not valid JSON ({error})") from error
    except OSError as error:
        raise PretrainedModelError(f"{path}/config.json cannot be read ({error})") from error
    model_type = config.get("model_type")
    if model_type not in _BACKBONES:
        raise PretrainedModelError(
            f"{path}/config.json has model_type {model_type!r}; supported: {', '.join(_BACKBONES)}"
        )
    _check_safetensors(os.path.join(path, "model.safetensors"))
    return PretrainedCheckpoint(path=path, model_type=model_type, config=config)


def copy_tokenizer_files(checkpoint_dir, destination):
    """The checkpoint's tokenizer files that exist, into destination."""
    os.makedirs(destination, exist_ok=True)
    for name in TOKENIZER_FILES:
        source = os.path.join(checkpoint_dir, name)
        if os.path.isfile(source):
            shutil.copy2(source, destination)


def _check_safetensors(path):
    """A truncated or unreadable weights file fails here, named, before KerasHub reads it.

    The format: an 8-byte little-endian header length, a JSON header that gives each tensor's
    byte range, then the data; the file must reach the end of the last range."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header_length = int.from_bytes(f.read(8), "little")
            if not 2 <= header_length <= min(size - 8, 100 << 20):
                raise ValueError(f"a header of {header_length} bytes in a file of {size}")
            header = json.loads(f.read(header_length))
        data_end = max((t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"), default=0)
    except OSError as error:
        raise PretrainedModelError(f"{path} cannot be read ({error})") from error
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise PretrainedModelError(f"{path} is not a valid safetensors file ({error})") from error
    if 8 + header_length + data_end > size:
        raise PretrainedModelError(
            f"{path} is truncated: {size:,} bytes, but its header describes {8 + header_length + data_end:,}; "
            "copy the checkpoint again"
        )


def load_backbone(checkpoint):
    import keras_hub

    backbone_class = getattr(keras_hub.models, _BACKBONES[checkpoint.model_type])
    try:
        return backbone_class.from_preset(checkpoint.path)
    except (KeyError, ValueError, OSError) as error:
        raise PretrainedModelError(
            f"could not load the {checkpoint.model_type} weights in {checkpoint.path}: {error}"
        ) from error


_BACKBONES = {"distilbert": "DistilBertBackbone", "bert": "BertBackbone"}


class ReviewTokenizer:
    """WordPiece tokenization to fixed-length `token_ids` and `padding_mask` (int32)."""

    def __init__(self, checkpoint, max_seq_length):
        self.max_seq_length = max_seq_length
        try:
            self._tokenizer = _load_tokenizer(checkpoint.path)
        except Exception as error:  # noqa: BLE001 - tokenizers raises plain Exception for a broken file
            raise PretrainedModelError(
                f"the tokenizer files in {checkpoint.path} cannot be read ({type(error).__name__}: {error}); "
                "copy the checkpoint again") from error
        pad_id = self._tokenizer.token_to_id("[PAD]")
        if pad_id is None:
            pad_id = 0
        self.pad_id = pad_id
        pad_token = self._tokenizer.id_to_token(pad_id)
        # The folder's tokenizer.json may carry its own truncation and padding: ours win.
        self._tokenizer.enable_truncation(max_length=max_seq_length)
        self._tokenizer.enable_padding(length=max_seq_length, pad_id=pad_id, pad_token=pad_token)

    def __call__(self, texts):
        encodings = self._tokenizer.encode_batch(list(texts))
        token_ids = np.array([e.ids for e in encodings], dtype=np.int32).reshape(-1, self.max_seq_length)
        padding_mask = np.array([e.attention_mask for e in encodings], dtype=np.int32).reshape(
            -1, self.max_seq_length
        )
        return token_ids, padding_mask


def _load_tokenizer(path):
    tokenizer_json = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tokenizer_json):
        return tokenizers.Tokenizer.from_file(tokenizer_json)
    # No fast-tokenizer file: build the same BERT WordPiece pipeline that transformers builds
    # from vocab.txt and tokenizer_config.json.
    config_file = os.path.join(path, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_file):
        with open(config_file) as f:
            config = json.load(f)
    lowercase = config.get("do_lower_case", True)
    return BertWordPieceTokenizer(
        os.path.join(path, "vocab.txt"),
        lowercase=lowercase,
        strip_accents=config.get("strip_accents"),
        handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        clean_text=True,
    )._tokenizer
