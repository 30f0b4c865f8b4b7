"""The model folder's `hf/`: the `cls` classifier in Hugging Face transformers' layout, for PyTorch.

    hf/
    ├── config.json         the checkpoint's config + architectures, id2label, label2id
    ├── model.safetensors   float32 weights under transformers' names
    └── vocab.txt, ...      the checkpoint's tokenizer files; tokenizer_config.json's
                            model_max_length is the job's max_seq_length

`transformers.AutoModelForSequenceClassification.from_pretrained("model/hf")` gives the same network
as the SavedModel (the `cls` head is built as transformers' *ForSequenceClassification head: model/classifier.py).

The names and layouts come from KerasHub's own Hugging Face -> Keras converters, run backwards
rather than copied here: the converter is handed a loader that records, for each Keras variable,
the transformers key and the function that reshapes the transformers tensor into the Keras one.
Those functions only transpose and reshape, so running one on an array of element indices says
where each Keras element came from. The `bilstm` head has no transformers architecture: no hf/.
"""

import json
import os

import keras
import numpy as np
import safetensors
from keras_hub.src.utils.transformers import convert_bert, convert_distilbert
from keras_hub.src.utils.transformers.safetensor_utils import SafetensorLoader
from review_trainer.contract.files import write_json
from review_trainer.model.pretrained import copy_tokenizer_files

# model_type -> (KerasHub converter, transformers architecture, the base model's key prefix)
_ARCHITECTURES = {
    "distilbert": (convert_distilbert, "DistilBertForSequenceClassification", "distilbert"),
    "bert": (convert_bert, "BertForSequenceClassification", "bert"),
}
# What KerasHub's backbone computes where it differs from the checkpoint's config: BertBackbone's
# feed-forward GELU is the tanh approximation (keras_utils.gelu_approximate), not the exact "gelu"
# of BERT checkpoints (1e-3 apart in the logits of a fine-tuned all-MiniLM-L6-v2).
_COMPUTED_AS = {"bert": {"hidden_act": "gelu_pytorch_tanh"}}


def export_transformers(model, backbone, checkpoint, classes, max_seq_length, path):
    """Writes hf/ for a `cls` classifier built by model/classifier.py on `checkpoint`."""
    converter, architecture, prefix = _ARCHITECTURES[checkpoint.model_type]
    tensors = {}
    with (SafetensorLoader(checkpoint.path) as source,
          safetensors.safe_open(os.path.join(checkpoint.path, "model.safetensors"), framework="np") as weights):
        recorder = _RecordingLoader(source, weights)
        converter.convert_weights(backbone, recorder, checkpoint.config)
    for variable, key, hf_shape, hook_fn in recorder.ported:
        tensors[_transformers_key(key, prefix)] = _to_transformers(_numpy(variable), hf_shape, hook_fn)

    # The head: a Keras Dense kernel is [in, out], a torch Linear weight [out, in].
    if checkpoint.model_type == "distilbert":
        tensors.update(_linear(model.get_layer("pre_classifier"), "pre_classifier"))
    tensors.update(_linear(model.get_layer("logits"), "classifier"))

    os.makedirs(path, exist_ok=True)
    from safetensors.numpy import save_file

    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config = dict(checkpoint.config)
    config.update(_COMPUTED_AS.get(checkpoint.model_type, {}))
    config.update({
        "architectures": [architecture],
        "id2label": {str(i): str(label) for i, label in enumerate(classes)},
        "label2id": {str(label): i for i, label in enumerate(classes)},
        "problem_type": "single_label_classification",
        "dtype": "float32",
    })
    write_json(config, os.path.join(path, "config.json"))
    copy_tokenizer_files(checkpoint.path, path)
    # tokenizer(texts, padding="max_length", truncation=True) then gives the job's token ids.
    tokenizer_config = {}
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            tokenizer_config = json.load(f)
    tokenizer_config["model_max_length"] = max_seq_length
    write_json(tokenizer_config, os.path.join(path, "tokenizer_config.json"))
    return architecture


class _RecordingLoader:
    """Stands in for KerasHub's SafetensorLoader: records what would be ported, assigns nothing.
    Only the shapes of the checkpoint's tensors are read (from the safetensors header), not the data."""

    def __init__(self, source, weights):
        self._source, self._weights = source, weights  # KerasHub's loader: its key prefix rules
        self.ported = []

    def get_tensor(self, hf_weight_key):  # a converter's probe of the checkpoint's naming
        return self._source.get_tensor(hf_weight_key)

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
        full_key = self._source.get_prefixed_key(hf_weight_key, self._weights)
        hf_shape = tuple(self._weights.get_slice(full_key).get_shape())
        self.ported.append((keras_variable, hf_weight_key, hf_shape, hook_fn))


def _to_transformers(value, hf_shape, hook_fn):
    """The transformers tensor that `hook_fn` would turn into `value`."""
    if hook_fn is None:
        return value.reshape(hf_shape)
    size = int(np.prod(hf_shape))
    source_index = np.asarray(hook_fn(np.arange(size).reshape(hf_shape), list(value.shape))).ravel()
    if source_index.size != size or not np.array_equal(np.sort(source_index), np.arange(size)):
        raise ValueError(f"a converter hook that is not a transpose or reshape (shape {hf_shape})")
    out = np.empty(size, value.dtype)
    out[source_index] = value.ravel()
    return out.reshape(hf_shape)


def _transformers_key(key, prefix):
    """transformers' names: under the base model's prefix, LayerNorm's weight/bias (not TF's gamma/beta)."""
    parts = key.split(".")
    if parts[-2] == "LayerNorm":
        parts[-1] = {"gamma": "weight", "beta": "bias"}.get(parts[-1], parts[-1])
    if parts[0] != prefix:
        parts.insert(0, prefix)
    return ".".join(parts)


def _linear(layer, name):
    return {f"{name}.weight": np.ascontiguousarray(_numpy(layer.kernel).T), f"{name}.bias": _numpy(layer.bias)}


def _numpy(variable):
    return np.ascontiguousarray(keras.ops.convert_to_numpy(variable.value), dtype=np.float32)
