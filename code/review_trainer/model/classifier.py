"""The classifier: a pretrained encoder and a small classification head that outputs logits.

Inputs are `token_ids` and `padding_mask` (int32, [batch, max_seq_length]); BERT's segment ids
are all zero for a single text. The `cls` head is transformers' *ForSequenceClassification head, so
that the model folder's `hf/` export (outputs/transformers_export.py) is the same network in PyTorch: BERT
reads [CLS] through its pretrained pooler, DistilBERT through a new dense + ReLU layer
(`pre_classifier`), each with the checkpoint's own classifier dropout. `bilstm` is the book's head. The last layer stays float32 under mixed precision so that the
logits and the loss are computed in full precision.

The classifier is one flat Keras model (what is trained, checkpointed, evaluated and exported); its
`encoder` (token ids -> what the head reads: the [CLS] or pooled vector for `cls`, the sequence
output for `bilstm`) and `head` (that -> logits) are views of the same layers, for the frozen
encoder's cache (frozen_encoder.py). A frozen encoder (backbone.trainable False) runs in inference
mode, dropout off, even in a training step: it is a fixed function of the token ids, so its
outputs can be computed once and kept.
"""

import dataclasses

import keras
from review_trainer.contract.hyperparameters import HEADS

ENCODER_OUTPUT = "encoder_output"  # the head's input: a batch's key when it holds cached encoder outputs


@dataclasses.dataclass(frozen=True)
class Classifier:
    model: keras.Model  # {token_ids, padding_mask} -> logits
    encoder: keras.Model  # {token_ids, padding_mask} -> the head's input (shares the model's layers)
    head: keras.Model  # {encoder_output} -> logits (shares the model's layers)
    frozen: bool  # the encoder is frozen, so it runs in inference mode


class InferenceMode(keras.layers.Layer):
    """Calls a layer with training=False whatever the enclosing call says.

    Keras 3 passes the outer call's `training` to every layer of a functional model, overriding a
    `training=False` given when the graph was built; a layer whose `call` takes no `training`
    argument is left out of that, so this one decides for the layer it wraps."""

    def __init__(self, layer, **kwargs):
        super().__init__(**kwargs)
        self.layer = layer

    def call(self, inputs):
        return self.layer(inputs, training=False)

    def compute_output_spec(self, inputs):
        # The wrapped layer's own: on JAX, Keras would otherwise trace `call` with symbolic shapes,
        # which KerasHub's position embedding cannot compare with its maximum length.
        return self.layer.compute_output_spec(inputs)


def build_classifier(backbone, num_classes, max_seq_length, head="cls", dropout=0.1):
    """The classifier as one Keras model (see build_classifier_parts)."""
    return build_classifier_parts(backbone, num_classes, max_seq_length, head, dropout).model


def build_classifier_parts(backbone, num_classes, max_seq_length, head="cls", dropout=0.1, cudnn_lib_config=None):
    """cudnn_lib_config: the image's CUDNN_LIB_CONFIG, as the contract read it (see lstm_use_cudnn)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    # Any length up to max_seq_length: training batches are cut to their length bucket (data/stream.py);
    # the serving signature takes max_seq_length (outputs/export.py).
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    backbone_inputs = dict(inputs)
    if "segment_ids" in backbone.input:
        backbone_inputs["segment_ids"] = keras.ops.zeros_like(token_ids)
    frozen = not backbone.trainable
    encoded = InferenceMode(backbone, name="frozen_encoder")(backbone_inputs) if frozen else backbone(backbone_inputs)
    # BERT also returns its pretrained pooler (dense + tanh over [CLS]); DistilBERT has none.
    sequence = encoded["sequence_output"] if isinstance(encoded, dict) else encoded
    pooled = encoded["pooled_output"] if isinstance(encoded, dict) else sequence[:, 0, :]

    if head == "cls":
        encoder_output = pooled
        layers = []
        if not isinstance(encoded, dict):  # DistilBERT: DistilBertForSequenceClassification's pre_classifier
            layers.append(keras.layers.Dense(backbone.hidden_dim, activation="relu", name="pre_classifier",
                                             kernel_initializer=keras.initializers.RandomNormal(stddev=0.02)))
        layers.append(keras.layers.Dropout(dropout, name="cls_dropout"))
    else:  # the book's head
        if isinstance(encoded, dict):  # the pooler is unused: keep it out of the optimizer
            backbone.get_layer("pooled_dense").trainable = False
        encoder_output = sequence
        layers = [keras.layers.Bidirectional(keras.layers.LSTM(50, return_sequences=True, use_cudnn=lstm_use_cudnn(cudnn_lib_config)),
                                             name="bilstm"),
                  keras.layers.GlobalMaxPooling1D(name="max_pool"),
                  keras.layers.Dense(50, activation="relu", name="hidden"),
                  keras.layers.Dropout(0.2, name="hidden_dropout")]
    layers.append(keras.layers.Dense(num_classes, dtype="float32", name="logits"))

    def apply_head(x):
        for layer in layers:
            x = layer(x)
        return x

    model = keras.Model(inputs, apply_head(encoder_output), name="review_classifier")
    encoder = keras.Model(inputs, encoder_output, name="review_encoder")
    # The head's layers called again on an input of their own: the same weights, a second graph.
    head_input = keras.Input(encoder_output.shape[1:], dtype=encoder_output.dtype, name=ENCODER_OUTPUT)
    head_model = keras.Model({ENCODER_OUTPUT: head_input}, apply_head(head_input), name="review_head")
    return Classifier(model, encoder, head_model, frozen)


def lstm_use_cudnn(cudnn_lib_config) -> bool | str:
    """Keras's LSTM takes cuDNN's RNN kernel on a GPU (TensorFlow's CudnnRNN, jax.experimental.rnn)
    unless cuDNN is in its reduced configuration, as in the GPU image (CUDNN_LIB_CONFIG=GRAPH_JIT_ONLY,
    Dockerfile): that has no legacy RNN API, so the LSTM runs Keras's own loop instead."""
    return False if cudnn_lib_config == "GRAPH_JIT_ONLY" else "auto"
