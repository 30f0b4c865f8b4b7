"""Tiny Hugging Face checkpoints (DistilBERT and BERT) generated for the tests.

The folders look like what `save_pretrained` writes: config.json, model.safetensors with the
Hugging Face weight names (DistilBERT's under the `distilbert.` prefix that KerasHub's converter
expects), vocab.txt and tokenizer_config.json.
"""

import json
import os

import numpy as np
from safetensors.numpy import save_file

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "this is a the it was and but not very so movie film book product story plot acting "
    "great good fine ok okay bad terrible awful excellent wonderful boring love hate loved hated "
    "best worst average nice poor amazing fun dull slow fast money waste buy again would recommend "
    "never ever really quite too much little i you we they my me of to in for on with at as "
    "café naïve résumé 日 本"
).split()
PIECES = ["##s", "##ing", "##ed", "##ly", "##er", "##est", "##n", "##t", "##e", "##a", "##o", "##r"]
PUNCTUATION = list("!?.,'\"-:;()/<>")
VOCAB = SPECIAL_TOKENS + PUNCTUATION + WORDS + PIECES + list("abcdefghijklmnopqrstuvwxyz0123456789")
HIDDEN, LAYERS, HEADS, INTERMEDIATE, POSITIONS = 32, 2, 2, 64, 128


def _write_vocab(path, tokenizer_class, vocab=VOCAB):
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "tokenizer_class": tokenizer_class, "model_max_length": POSITIONS}, f)


def _dense(rng, prefix, out_dim, in_dim):
    return {
        f"{prefix}.weight": rng.normal(0, 0.02, (out_dim, in_dim)).astype(np.float32),
        f"{prefix}.bias": np.zeros(out_dim, np.float32),
    }


def _norm(prefix, hidden=HIDDEN):
    return {f"{prefix}.weight": np.ones(hidden, np.float32), f"{prefix}.bias": np.zeros(hidden, np.float32)}


def make_distilbert(path, seed=0, hidden=HIDDEN, layers=LAYERS, heads=HEADS, intermediate=INTERMEDIATE,
                    vocab_size=None, dropout=0.1):
    """A random DistilBERT; the defaults are tiny, (768, 6, 12, 3072, 30522) is DistilBERT-base's shape.

    dropout=0 (encoder and classifier) makes training deterministic in the data alone: runs that
    split a step's batch differently must then end with the same weights."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    vocab = VOCAB + [f"[unused{i}]" for i in range(max(0, (vocab_size or 0) - len(VOCAB)))]
    config = {
        "model_type": "distilbert", "architectures": ["DistilBertModel"], "vocab_size": len(vocab),
        "dim": hidden, "n_layers": layers, "n_heads": heads, "hidden_dim": intermediate,
        "dropout": dropout, "attention_dropout": dropout, "max_position_embeddings": POSITIONS,
        "activation": "gelu", "pad_token_id": 0, "seq_classif_dropout": dropout,
    }
    weights = {
        "distilbert.embeddings.word_embeddings.weight": rng.normal(0, 0.02, (len(vocab), hidden)).astype(np.float32),
        "distilbert.embeddings.position_embeddings.weight": rng.normal(0, 0.02, (POSITIONS, hidden)).astype(np.float32),
        **_norm("distilbert.embeddings.LayerNorm", hidden),
    }
    for i in range(layers):
        layer = f"distilbert.transformer.layer.{i}"
        for name in ("q_lin", "k_lin", "v_lin", "out_lin"):
            weights.update(_dense(rng, f"{layer}.attention.{name}", hidden, hidden))
        weights.update(_norm(f"{layer}.sa_layer_norm", hidden))
        weights.update(_dense(rng, f"{layer}.ffn.lin1", intermediate, hidden))
        weights.update(_dense(rng, f"{layer}.ffn.lin2", hidden, intermediate))
        weights.update(_norm(f"{layer}.output_layer_norm", hidden))
    _save(path, config, weights, "DistilBertTokenizer", vocab)
    return path


def make_bert(path, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    config = {
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": len(VOCAB),
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "intermediate_size": INTERMEDIATE, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": POSITIONS,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
    }
    weights = {
        "bert.embeddings.word_embeddings.weight": rng.normal(0, 0.02, (len(VOCAB), HIDDEN)).astype(np.float32),
        "bert.embeddings.position_embeddings.weight": rng.normal(0, 0.02, (POSITIONS, HIDDEN)).astype(np.float32),
        "bert.embeddings.token_type_embeddings.weight": rng.normal(0, 0.02, (2, HIDDEN)).astype(np.float32),
        **_norm("bert.embeddings.LayerNorm"),
        **_dense(rng, "bert.pooler.dense", HIDDEN, HIDDEN),
    }
    for i in range(LAYERS):
        layer = f"bert.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            weights.update(_dense(rng, f"{layer}.attention.self.{name}", HIDDEN, HIDDEN))
        weights.update(_dense(rng, f"{layer}.attention.output.dense", HIDDEN, HIDDEN))
        weights.update(_norm(f"{layer}.attention.output.LayerNorm"))
        weights.update(_dense(rng, f"{layer}.intermediate.dense", INTERMEDIATE, HIDDEN))
        weights.update(_dense(rng, f"{layer}.output.dense", HIDDEN, INTERMEDIATE))
        weights.update(_norm(f"{layer}.output.LayerNorm"))
    _save(path, config, weights, "BertTokenizer")
    return path


def _save(path, config, weights, tokenizer_class, vocab=VOCAB):
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    _write_vocab(path, tokenizer_class, vocab)
