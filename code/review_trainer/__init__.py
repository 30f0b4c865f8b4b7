"""review-trainer: a SageMaker training job that fine-tunes a BERT-family classifier of star ratings.

The packages, lowest first. Each may import the ones listed before it, never one after it
(tests/test_layout.py holds the tree to this):

    contract    what SageMaker hands the job and takes back: /opt/ml, SM_* and the config files,
                hyperparameters, failures and their exit codes, files written whole
    data        channels: formats, the scan, sharding, tf.data streams, Pipe mode; File, FastFile and
                Pipe input behind one Channel type
    model       the pretrained checkpoint and its tokenizer, the classifier, its compiled inference,
                the frozen encoder's cache
    telemetry   what a running job tells: metric lines, TensorBoard, Debugger rules and tensors, the
                profile report
    training    how the job trains on its devices: backend, precision, topology, the step, the loop,
                checkpoints and stops; its stages (set-up, model and resume, training)
    outputs     what the job leaves: the evaluation, the SavedModel, hf/, the manifest, published
    insights    after publishing: SHAP explanations and Clarify's bias metrics
    job         the job read top to bottom: run() calls each stage in turn
    cli         the commands: `train` (start-up before Keras, the job, how it ended) and `predict`
"""

# Lowest first: a package may import the ones before it (tests/test_layout.py).
LAYERS = ("contract", "data", "model", "telemetry", "training", "outputs", "insights", "job", "cli")
