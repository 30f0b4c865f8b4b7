import keras
import numpy as np
import pytest
from review_trainer.model.classifier import build_classifier, build_classifier_parts
from review_trainer.model.pretrained import load_backbone, open_checkpoint


@pytest.mark.parametrize("head", ["cls", "bilstm"])
@pytest.mark.parametrize("checkpoint", ["distilbert_dir", "bert_dir"])
def test_classifier_outputs_float32_logits_for_each_head_and_backbone(request, checkpoint, head):
    backbone = load_backbone(open_checkpoint(request.getfixturevalue(checkpoint)))
    model = build_classifier(backbone, num_classes=5, max_seq_length=12, head=head)
    inputs = {"token_ids": np.full((3, 12), 7, np.int32), "padding_mask": np.ones((3, 12), np.int32)}
    logits = model(inputs)
    assert tuple(logits.shape) == (3, 5) and logits.dtype == "float32"
    assert np.isfinite(keras.ops.convert_to_numpy(logits)).all()
    assert set(model.input) == {"token_ids", "padding_mask"}
    if head == "bilstm":
        assert [layer.name for layer in model.layers[-5:]] == ["bilstm", "max_pool", "hidden", "hidden_dropout", "logits"]


@pytest.mark.parametrize("cudnn_lib_config,use_cudnn", [(None, "auto"), ("FULL", "auto"), ("GRAPH_JIT_ONLY", False)])
def test_bilstm_keeps_off_cudnn_where_the_image_has_no_legacy_rnn_api(distilbert_dir, cudnn_lib_config, use_cudnn):
    # The GPU image sets CUDNN_LIB_CONFIG=GRAPH_JIT_ONLY (the contract reads it: test_environment.py)
    # and leaves out libcudnn_adv (cudnnRNNForward): a cuDNN LSTM would fail there on a GPU, so both
    # directions must take Keras's loop.
    parts = build_classifier_parts(load_backbone(open_checkpoint(distilbert_dir)), num_classes=5, max_seq_length=8,
                                   head="bilstm", cudnn_lib_config=cudnn_lib_config)
    bilstm = parts.model.get_layer("bilstm")
    assert [bilstm.forward_layer.use_cudnn, bilstm.backward_layer.use_cudnn] == [use_cudnn, use_cudnn]


CUDNN_LSTM_REACHED = """
import os, sys
os.environ["KERAS_BACKEND"] = sys.argv[1]
import keras, numpy as np
from review_trainer.model.classifier import lstm_use_cudnn
# As if on a GPU, with cuDNN's RNN kernel replaced by a tripwire: a layer that would call it fails.
import importlib
rnn = importlib.import_module(f"keras.src.backend.{sys.argv[1]}.rnn")  # the module (the package exports a function `rnn`)
class Reached(Exception):  # not an error Keras takes for "no cuDNN here" and falls back from
    pass
def tripwire(*args, **kwargs):
    raise Reached("cuDNN LSTM reached")
if sys.argv[1] == "jax":
    import jax.experimental.rnn
    jax.experimental.rnn.lstm = tripwire
else:
    rnn._cudnn_lstm = tripwire
rnn._is_gpu_available = lambda: True
for config in ("GRAPH_JIT_ONLY", "FULL"):
    layer = keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True, use_cudnn=lstm_use_cudnn(config)))
    try:
        layer(np.ones((2, 3, 5), np.float32))
        print(config, "generic loop")
    except Exception as error:  # Keras adds the layer's call arguments to the message
        print(config, "cuDNN LSTM reached" if "cuDNN LSTM reached" in str(error) else repr(error)[:300])
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_the_lstm_takes_keras_loop_on_a_gpu_with_the_reduced_cudnn(backend):
    # Keras sends a GPU LSTM to cuDNN's legacy RNN API on both backends (TensorFlow's CudnnRNN,
    # jax.experimental.rnn): the reduced configuration has no libcudnn_adv, so it must not go there.
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", CUDNN_LSTM_REACHED, backend], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    results = dict(line.split(" ", 1) for line in run.stdout.strip().splitlines()[-2:])
    # FULL reaching the tripwire shows the tripwire sits where Keras calls cuDNN
    assert results == {"GRAPH_JIT_ONLY": "generic loop", "FULL": "cuDNN LSTM reached"}


def test_logits_stay_float32_under_mixed_precision(distilbert_dir):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        backbone = load_backbone(open_checkpoint(distilbert_dir))
        model = build_classifier(backbone, num_classes=3, max_seq_length=8)
        logits = model({"token_ids": np.ones((2, 8), np.int32), "padding_mask": np.ones((2, 8), np.int32)})
        assert logits.dtype == "float32" and model.get_layer("logits").compute_dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_frozen_backbone_trains_only_the_head(distilbert_dir):
    backbone = load_backbone(open_checkpoint(distilbert_dir))
    backbone.trainable = False
    model = build_classifier(backbone, num_classes=5, max_seq_length=8)
    # DistilBERT's cls head is DistilBertForSequenceClassification's: pre_classifier, then logits
    assert [w.path for w in model.trainable_weights] == [
        "pre_classifier/kernel", "pre_classifier/bias", "logits/kernel", "logits/bias"]
