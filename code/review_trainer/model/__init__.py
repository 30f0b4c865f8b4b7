"""The model: the pretrained checkpoint, the classifier built on it, and what runs it outside training.

    pretrained.py      the Hugging Face folder: checked, its backbone loaded by KerasHub, its tokenizer
    classifier.py      backbone + `cls` or `bilstm` head, float32 logits; views of its encoder and head
    inference.py       the forward pass compiled for the backend (evaluation, explanations, the cache)
    frozen_encoder.py  a frozen encoder's outputs computed once and kept (a stage of the training stream)

Imports only the contract.
"""
