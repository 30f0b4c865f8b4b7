"""What the job leaves in the model folder, written aside and moved in only once the run succeeded.

    model/
    ├── tensorflow/saved_model/0/   TF Serving layout; signature serving_default:
    │                               input_ids, input_mask (int32 [-1, max_seq_length]) -> probabilities
    ├── tokenizer/                  the checkpoint's vocab.txt and tokenizer files
    ├── label_map.json              class index -> label value
    ├── hf/                         head=cls: the same classifier for transformers in PyTorch
    │                               (transformers_export.py)
    ├── metrics/                    evaluation.json and confusion_matrix.png (when the test ran)
    └── manifest.json               hyperparameters, data files with hashes, library versions

Everything is first written into `model/.partial/`; `publish` renames each entry into place (a
rename on the same file system), so a job that fails or is killed never leaves a model that looks
valid. `export_and_publish` is the job's export stage, on the chief.
"""

import importlib.metadata
import os
import platform
import shutil

from review_trainer.contract.files import write_json
from review_trainer.model.pretrained import copy_tokenizer_files
from review_trainer.outputs import evaluation, manifest

SAVED_MODEL_PATH = os.path.join("tensorflow", "saved_model", "0")
STAGING = ".partial"


def staging_dir(model_dir):
    return os.path.join(model_dir, STAGING)


def start_staging(model_dir):
    """An empty staging folder; what a killed run left there is removed."""
    path = staging_dir(model_dir)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def discard_staging(model_dir):
    shutil.rmtree(staging_dir(model_dir), ignore_errors=True)


def export_saved_model(model, max_seq_length, path):
    """A SavedModel whose serving_default takes token ids and a mask and returns probabilities.

    The endpoint is written in Keras ops: on the TensorFlow backend it is traced as a tf.function,
    on JAX Keras converts it with jax2tf, so the SavedModel is the same for TF Serving either way."""
    import keras
    import tensorflow as tf

    def serve(input_ids, input_mask):
        logits = model({"token_ids": input_ids, "padding_mask": input_mask}, training=False)
        return {"probabilities": keras.ops.softmax(keras.ops.cast(logits, "float32"))}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve, input_signature=[
        tf.TensorSpec([None, max_seq_length], tf.int32, name="input_ids"),
        tf.TensorSpec([None, max_seq_length], tf.int32, name="input_mask"),
    ])
    archive.write_out(path, verbose=False)


def copy_tokenizer(checkpoint_dir, destination, max_seq_length):
    copy_tokenizer_files(checkpoint_dir, destination)
    write_json({"max_seq_length": max_seq_length, "padding": "max_length", "truncation": True},
               os.path.join(destination, "review_trainer_tokenizer.json"))


def write_label_map(classes, path):
    write_json({"index_to_label": {str(i): label for i, label in enumerate(classes)},
                "label_to_index": {label: i for i, label in enumerate(classes)}}, path)


def library_versions():
    names = ("tensorflow", "tensorflow-cpu", "keras", "keras-hub", "tokenizers", "numpy",
             "sagemaker-training", "pyarrow", "shap", "smclarify")
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def export_and_publish(startup, devices, pretrained, channels, state, trained, evaluated, print_fn=print):
    """The export stage: the model folder written aside and published, with the evaluation and the
    manifest; returns the model folder. Whatever ends it early leaves no staged file behind."""
    env = startup.env
    staged = start_staging(env.model_dir)
    try:
        _export(startup, devices, pretrained, channels, state, trained, evaluated, staged, print_fn)
        if evaluated.report is not None:
            evaluation.write_report(evaluated.report, os.path.join(env.output_data_dir, "evaluation.json"))
        publish(env.model_dir)
    except BaseException:
        discard_staging(env.model_dir)
        raise
    print_fn(f"model written to {env.model_dir}")
    return env.model_dir


def _export(startup, devices, pretrained, channels, state, trained, evaluated, staged, print_fn):
    hp = startup.hp
    evaluated.write(os.path.join(staged, "metrics"))
    export_saved_model(trained.model, hp.max_seq_length, os.path.join(staged, SAVED_MODEL_PATH))
    copy_tokenizer(pretrained.checkpoint.path, os.path.join(staged, "tokenizer"), hp.max_seq_length)
    write_label_map(hp.classes, os.path.join(staged, "label_map.json"))
    if hp.head == "cls":
        from review_trainer.outputs import transformers_export  # safetensors and KerasHub's converters

        architecture = transformers_export.export_transformers(trained.model, state.backbone, pretrained.checkpoint,
                                                               hp.classes, hp.max_seq_length, os.path.join(staged, "hf"))
        print_fn(f"hf/ written: {architecture} for transformers (PyTorch)")
    else:
        print_fn(f"hf/ skipped: the {hp.head} head has no transformers architecture (only head=cls exports one)")
    write_json(manifest.build(startup, devices, pretrained, channels, trained, evaluated, library_versions()),
               os.path.join(staged, "manifest.json"))


def publish(model_dir):
    """Moves every staged entry into the model folder; manifest.json goes last."""
    staged = staging_dir(model_dir)
    names = sorted(os.listdir(staged), key=lambda name: name == "manifest.json")
    for name in names:
        target = os.path.join(model_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
        os.replace(os.path.join(staged, name), target)
    os.rmdir(staged)
