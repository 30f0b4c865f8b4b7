"""The classifier: a pretrained encoder and a small classification head that outputs logits.

Inputs are `token_ids` and `padding_mask` (int32, [batch, max_seq_length]); BERT's segment ids
are all zero for a single text. The `cls` head is transformers' *ForSequenceClassification head, so
that the model folder's `hf/` export (transformers_export.py) is the same network in PyTorch: BERT
reads [CLS] through its pretrained pooler, DistilBERT through a new dense + ReLU layer
(`pre_classifier`), each with the checkpoint's own classifier dropout. `bilstm` is the book's head. The last layer stays float32 under mixed precision so that the
logits and the loss are computed in full precision.
"""

import keras
from review_trainer.hyperparameters import HEADS


def build_classifier(backbone, num_classes, max_seq_length, head="cls", dropout=0.1):
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    # Any length up to max_seq_length: training batches are cut to their length bucket (stream.py);
    # the serving signature takes max_seq_length (export.py).
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    backbone_inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    if "segment_ids" in backbone.input:
        backbone_inputs["segment_ids"] = keras.ops.zeros_like(token_ids)
    encoded = backbone(backbone_inputs)
    # BERT also returns its pretrained pooler (dense + tanh over [CLS]); DistilBERT has none.
    sequence = encoded["sequence_output"] if isinstance(encoded, dict) else encoded
    pooled = encoded["pooled_output"] if isinstance(encoded, dict) else sequence[:, 0, :]

    if head == "cls":
        if not isinstance(encoded, dict):  # DistilBERT: DistilBertForSequenceClassification's pre_classifier
            pooled = keras.layers.Dense(backbone.hidden_dim, activation="relu", name="pre_classifier",
                                        kernel_initializer=keras.initializers.RandomNormal(stddev=0.02))(pooled)
        x = keras.layers.Dropout(dropout, name="cls_dropout")(pooled)
    else:  # the book's head
        if isinstance(encoded, dict):  # the pooler is unused: keep it out of the optimizer
            backbone.get_layer("pooled_dense").trainable = False
        x = keras.layers.Bidirectional(keras.layers.LSTM(50, return_sequences=True), name="bilstm")(sequence)
        x = keras.layers.GlobalMaxPooling1D(name="max_pool")(x)
        x = keras.layers.Dense(50, activation="relu", name="hidden")(x)
        x = keras.layers.Dropout(0.2, name="hidden_dropout")(x)
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, logits, name="review_classifier")
