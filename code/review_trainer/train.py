"""The `train` entry point: SageMaker contract in, evaluated SavedModel out.

Read top to bottom, this is the job:
  1. read the contract and the hyperparameters
  2. open the pretrained checkpoint and its tokenizer
  3. scan the channels (formats, bad rows, hashes) and build streaming datasets
  4. build the classifier, resume from the newest checkpoint, and fit it (SIGTERM: checkpoint, stop)
  5. evaluate on the test channel, print sample predictions
  6. export the SavedModel, tokenizer, label map, metrics and manifest; publish them; success

Any error ends in output/failure (first line `<Kind>: <message>`) and a non-zero exit code; see
errors.py. Training runs in this process, which handles SIGTERM itself (stopping.py).
"""

import errno
import os
import sys
import time
import traceback

import keras
from review_trainer import checkpointing, data, environment, evaluate, export, precision
from review_trainer.errors import (
    EXIT_INTERNAL_ERROR,
    EXIT_SUCCESS,
    CheckpointError,
    DataError,
    HyperparameterError,
    JobError,
    ResourceError,
)
from review_trainer.hyperparameters import Hyperparameters
from review_trainer.metric_log import MetricLogger, format_metrics
from review_trainer.model import build_classifier
from review_trainer.pretrained import ReviewTokenizer, load_backbone, open_checkpoint
from review_trainer.stopping import StopSignal

SAMPLE_REVIEWS = ("This is great!", "This is OK.", "This is terrible.")


def run(env, stop_signal):
    # 1. contract and hyperparameters
    hp = Hyperparameters.from_dict(env.hyperparameters)
    if environment.TRAIN_CHANNEL not in env.channel_dirs:
        raise DataError(
            f"the required channel 'train' is missing: expected files under "
            f"{env.base_dir}/input/data/train (channels present: {', '.join(env.channel_dirs) or 'none'})"
        )
    capability = precision.gpu_compute_capability()
    policy = precision.choose_policy(hp.use_amp, capability, precision.cpu_has_bf16())
    jit_compile = precision.choose_jit_compile(hp.use_xla, capability)
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(hp.seed)
    print(f"hosts={','.join(env.hosts)} current_host={env.current_host} gpus={env.num_gpus} "
          f"cpus={env.num_cpus} precision={policy} xla={jit_compile}")
    print("hyperparameters " + " ".join(f"{k}={v}" for k, v in hp.to_dict().items()))

    # 2. pretrained checkpoint
    pretrained = open_checkpoint(hp.pretrained_model_dir or env.default_pretrained_model_dir)
    if hp.max_seq_length > pretrained.max_positions:
        raise HyperparameterError(
            f"max_seq_length={hp.max_seq_length} exceeds the checkpoint's "
            f"max_position_embeddings={pretrained.max_positions}"
        )
    tokenizer = ReviewTokenizer(pretrained, hp.max_seq_length)

    # 3. data
    spec = data.RowSpec(hp.text_column, hp.label_column, hp.classes, hp.max_seq_length)
    wanted = {"train": True, "validation": hp.run_validation, "test": hp.run_test}
    channels = {}
    for name, is_wanted in wanted.items():
        if name not in env.channel_dirs:
            print(f"channel={name} skipped: no {name} channel")
            continue
        if not is_wanted:
            print(f"channel={name} skipped: run_{name}=false")
            continue
        channels[name] = data.scan_channel(name, env.channel_dirs[name], spec, hp.max_bad_row_fraction)
        for line in data.describe(channels[name]):
            print(line)
    steps_per_epoch = hp.train_steps_per_epoch or data.batches_per_pass(channels["train"], hp.train_batch_size)
    total_steps = hp.epochs * steps_per_epoch
    validation_data = None
    if "validation" in channels:
        validation_data = data.make_dataset(channels["validation"], spec, tokenizer, hp.validation_batch_size,
                                            repeat=hp.validation_steps is not None)

    # 4. model, resume, training
    backbone = load_backbone(pretrained)
    backbone.trainable = not hp.freeze_bert_layer
    model = build_classifier(backbone, len(hp.classes), hp.max_seq_length, head=hp.head)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=hp.learning_rate, epsilon=hp.epsilon),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
    )
    store, fingerprint, global_step = None, {}, 0
    if hp.enable_checkpointing or env.checkpoint_config_present:
        store = checkpointing.CheckpointStore(env.checkpoint_dir, hp.keep_checkpoints)
        fingerprint = checkpointing.fingerprint(hp, channels["train"], pretrained, policy)
        if not hp.resume:
            print(f"resume=false: deleting the checkpoints in {env.checkpoint_dir}")
            store.remove_all()
        store.remove_temporary()
        saved = store.latest()
        if saved is not None:
            mismatch = checkpointing.differences(saved.fingerprint, fingerprint)
            if mismatch:
                raise CheckpointError(
                    f"the checkpoint {saved.path} was written by a different job: {'; '.join(mismatch)}. "
                    "Run with the original settings and data to resume, or set resume=false to delete "
                    "the checkpoints and start fresh"
                )
            checkpointing.restore(model, saved)
            global_step = saved.global_step
            print(f"resumed from {saved.path}: global step {global_step} of {total_steps}")
    checkpointer = checkpointing.Checkpointer(store, fingerprint, global_step, total_steps,
                                              hp.checkpoint_every_n_steps, stop_signal, writes=env.is_chief)
    callbacks = [MetricLogger(hp.log_every_n_steps, hp.train_batch_size, global_step), checkpointer]
    if hp.enable_tensorboard and env.is_chief:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=env.tensorboard_dir, update_freq="epoch"))
    print(f"training: {hp.epochs} epoch(s) of {steps_per_epoch} steps from step {global_step}, "
          f"{model.count_params():,} parameters ({'encoder frozen' if hp.freeze_bert_layer else 'all trainable'})")
    started = time.perf_counter()
    with stop_signal.deferred():
        # An interrupted epoch is finished first, with its remaining steps; then whole epochs.
        # Each fit reads the training stream from its own global step (see make_training_stream).
        epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
        while epoch < hp.epochs:
            train_stream = data.make_training_stream(channels["train"], spec, tokenizer, hp.train_batch_size,
                                                     hp.seed, start_batch=global_step)
            last_epoch = epoch + 1 if step_in_epoch else hp.epochs
            model.fit(train_stream, initial_epoch=epoch, epochs=last_epoch,
                      steps_per_epoch=steps_per_epoch - step_in_epoch, validation_data=validation_data,
                      validation_steps=hp.validation_steps, callbacks=callbacks, shuffle=False, verbose=0)
            epoch, step_in_epoch = last_epoch, 0
            global_step = epoch * steps_per_epoch
    training_seconds = time.perf_counter() - started
    if checkpointer.saves:
        print(f"checkpoints={checkpointer.saves} checkpoint_seconds_total={checkpointer.save_seconds:.2f} "
              f"training_seconds={training_seconds:.1f} "
              f"checkpoint_share={checkpointer.save_seconds / training_seconds:.2%}")

    if not env.is_chief:
        return
    model_dir = env.model_dir
    staged = export.start_staging(model_dir)

    # 5. evaluation
    report = None
    if "test" in channels:
        test_data = data.make_dataset(channels["test"], spec, tokenizer, hp.test_batch_size,
                                      repeat=hp.test_steps is not None)
        if hp.test_steps is not None:
            test_data = test_data.take(hp.test_steps)
        labels, probabilities, test_loss = evaluate.predict(model, test_data)
        report = evaluate.classification_report(labels, probabilities.argmax(axis=1), hp.classes, seed=hp.seed)
        scores = report["multiclass_classification_metrics"]
        print(format_metrics(test_loss=test_loss, test_accuracy=scores["accuracy"]["value"],
                             test_macro_f1=scores["macro_f1"]["value"], test_rows=len(labels)))
        evaluate.write_report(report, os.path.join(staged, "metrics", "evaluation.json"))
        evaluate.plot_confusion_matrix(report, os.path.join(staged, "metrics", "confusion_matrix.png"))
    if hp.run_sample_predictions:
        token_ids, padding_mask = tokenizer(SAMPLE_REVIEWS)
        logits = model.predict_on_batch({"token_ids": token_ids, "padding_mask": padding_mask})
        for text, probabilities in zip(SAMPLE_REVIEWS, keras.ops.convert_to_numpy(keras.ops.softmax(logits))):
            print(f"sample_prediction label={hp.classes[probabilities.argmax()]} "
                  f"confidence={probabilities.max():.3f} text={text!r}")

    # 6. export, then publish
    export.export_saved_model(model, hp.max_seq_length, os.path.join(staged, export.SAVED_MODEL_PATH))
    export.copy_tokenizer(pretrained.path, os.path.join(staged, "tokenizer"), hp.max_seq_length)
    export.write_label_map(hp.classes, os.path.join(staged, "label_map.json"))
    export.write_json({
        "job_name": env.job_name,
        "image_version": env.image_version,
        "hyperparameters": hp.to_dict(),
        "pretrained_model": {"path": pretrained.path, "model_type": pretrained.model_type},
        "precision": policy,
        "xla": jit_compile,
        "training_seconds": round(training_seconds, 1),
        "data": {name: [f.to_dict() for f in channel.files] for name, channel in channels.items()},
        "libraries": export.library_versions(),
        "test_metrics": report and {k: v["value"] for k, v in report["multiclass_classification_metrics"].items()
                                    if isinstance(v, dict) and "value" in v},
    }, os.path.join(staged, "manifest.json"))
    if report is not None:
        evaluate.write_report(report, os.path.join(env.output_data_dir, "evaluation.json"))
    export.publish(model_dir)
    print(f"model written to {model_dir}")


def main():
    stop_signal = StopSignal()
    stop_signal.install()
    environment.clear_outcome()
    try:
        run(environment.read_environment(), stop_signal)
        environment.write_success()
        print("training job succeeded")
        return EXIT_SUCCESS
    except BaseException as error:  # noqa: BLE001 - every ending is reported in output/failure
        kind, message, exit_code = describe_failure(error)
        details = "" if isinstance(error, JobError) else traceback.format_exc()
        print(f"training job failed: {kind}: {message}", file=sys.stderr)
        if details:
            print(details, file=sys.stderr)
        export.discard_staging(environment.model_dir())
        environment.write_failure(kind, message, details)
        return exit_code


def describe_failure(error):
    """(kind, message, exit code) for any exception, disk-full errors included."""
    if isinstance(error, JobError):
        return error.kind, str(error), error.exit_code
    if _is_disk_full(error):
        resource = ResourceError(
            f"no space left on device ({error}); free space or give the job a larger volume "
            "(VolumeSizeInGB)"
        )
        return resource.kind, str(resource), resource.exit_code
    if isinstance(error, MemoryError):
        resource = ResourceError("out of memory; lower train_batch_size or max_seq_length, or use a larger instance")
        return resource.kind, str(resource), resource.exit_code
    return "InternalError", f"{type(error).__name__}: {error}", EXIT_INTERNAL_ERROR


def _is_disk_full(error):
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
