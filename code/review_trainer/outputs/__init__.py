"""Outputs: what a finished job leaves, on the chief host.

    evaluation.py           the test set's metrics in SageMaker's model-quality shape, sample predictions
    export.py               the model folder: SavedModel, tokenizer, label map; written aside, then published
    transformers_export.py  hf/: the `cls` classifier in transformers' layout, for PyTorch
    manifest.py             manifest.json: what made the model (settings, data, versions, outcome)

Imports the contract, model and telemetry; the data and the training stage's results are handed in.
"""
