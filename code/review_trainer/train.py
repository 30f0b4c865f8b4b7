"""The `train` entry point: SageMaker contract in, evaluated SavedModel out.

Read top to bottom, this is the job (the `train` command, launch.py, has chosen Keras's backend):
  1. read the contract and the hyperparameters; set up the topology (tf.distribute strategy)
  2. open the pretrained checkpoint and its tokenizer
  3. scan the channels (formats, bad rows, hashes) and build this worker's streaming datasets
  4. build the classifier in the strategy's scope, resume from the newest checkpoint, and train it
     in training_loop.py (SIGTERM: every host stops after the same step, the chief checkpoints),
     watched by the Debugger rules (rules.py: a stop by rule is a result), the profiler, the
     Debugger tensors and TensorBoard
  5. evaluate on the test channel, print sample predictions
  6. export the SavedModel, tokenizer, label map, PyTorch (transformers) copy, metrics and manifest;
     publish them
  7. explain test reviews and report bias (insights.py; never fails the job); success

Any error ends in output/failure (first line `<Kind>: <message>`) and a non-zero exit code; see
errors.py. Training runs in this process, which handles SIGTERM itself (stopping.py).
"""

import dataclasses
import errno
import os
import sys
import time
import traceback

import keras
from review_trainer import (
    backend,
    checkpointing,
    data,
    debugger_tensors,
    environment,
    evaluate,
    export,
    frozen_encoder,
    insights,
    precision,
    profiler,
    rules,
    transformers_export,
)
from review_trainer.data import sharding
from review_trainer.errors import (
    EXIT_INTERNAL_ERROR,
    EXIT_SUCCESS,
    DataError,
    HyperparameterError,
    JobError,
    JobStopped,
    ResourceError,
    TrainingError,
)
from review_trainer.hyperparameters import Hyperparameters
from review_trainer.metric_log import MetricLogger, TensorBoardLog, format_metrics, forward_function
from review_trainer.model import build_classifier_parts
from review_trainer.pretrained import ReviewTokenizer, load_backbone, open_checkpoint
from review_trainer.stopping import StopSignal
from review_trainer.topology import Topology
from review_trainer.training_loop import TrainingLoop

SAMPLE_REVIEWS = ("This is great!", "This is OK.", "This is terrible.")


def run(env, stop_signal):
    started = time.monotonic()  # explain_max_seconds=auto is a share of the job's time (insights.py)
    # 1. contract, hyperparameters, and the topology (its strategy comes before any other TensorFlow op)
    hp = Hyperparameters.from_dict(env.hyperparameters)
    backend_name, backend_reason = backend.choose(hp.backend, num_hosts=len(env.hosts), num_gpus=env.num_gpus,
                                                  num_neurons=env.num_neurons, distribution=hp.distribution,
                                                  use_xla=hp.use_xla)
    if keras.backend.backend() != backend_name:
        raise HyperparameterError(
            f"backend={backend_name} ({backend_reason}), but Keras was imported with the {keras.backend.backend()} "
            "backend: start the job with the `train` command, which sets KERAS_BACKEND before Keras is imported")
    topology = Topology.set_up(env, hp, backend_name)
    if environment.TRAIN_CHANNEL not in env.channel_dirs and environment.TRAIN_CHANNEL not in env.pipe_channels:
        present = [*env.channel_dirs, *env.pipe_channels]
        raise DataError(
            f"the required channel 'train' is missing: expected files under "
            f"{env.base_dir}/input/data/train (channels present: {', '.join(present) or 'none'})"
        )
    capability = precision.gpu_compute_capability()
    # Trainium computes in bfloat16 natively: Neuron takes the bf16 path whatever the host CPU has
    policy = precision.choose_policy(hp.use_amp, capability, precision.cpu_has_bf16() or env.num_neurons > 0)
    jit_compile = precision.choose_jit_compile(hp.use_xla, capability, backend_name)
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(hp.seed)
    learning_rate = hp.learning_rate * (topology.replicas if hp.scale_learning_rate else 1)
    print(f"hosts={','.join(env.hosts)} current_host={env.current_host} gpus={env.num_gpus} "
          f"cpus={env.num_cpus} backend={backend_name} precision={policy} xla={jit_compile} "
          f"backend_reason={backend_reason}")
    print(topology.describe(hp.train_batch_size) + f" learning_rate={learning_rate:g}"
          + (f" (scale_learning_rate: {hp.learning_rate:g} x {topology.replicas} replicas)" if hp.scale_learning_rate else ""))
    print("hyperparameters " + " ".join(f"{k}={v}" for k, v in hp.to_dict().items()))
    if topology.idle:
        print(f"host {topology.current_host} stops here: {topology.reason}")
        return
    hook_config = None  # the Estimator's debugger_hook_config or rules: read on every host, so all fail alike
    if env.debug_hook_config is not None:
        try:
            hook_config = debugger_tensors.HookConfig.from_json(env.debug_hook_config, env.default_tensors_dir)
        except (ValueError, TypeError, KeyError) as error:
            raise HyperparameterError(f"debughookconfig.json: {error}") from error
    if topology.is_chief:
        environment.check_writable({"model folder": env.model_dir, "output data folder": env.output_data_dir,
                                    **({"TensorBoard folder": env.tensorboard_dir} if hp.enable_tensorboard else {})})

    # 2. pretrained checkpoint
    pretrained = open_checkpoint(hp.pretrained_model_dir or env.default_pretrained_model_dir)
    if hp.max_seq_length > pretrained.max_positions:
        raise HyperparameterError(
            f"max_seq_length={hp.max_seq_length} exceeds the checkpoint's "
            f"max_position_embeddings={pretrained.max_positions}"
        )
    tokenizer = ReviewTokenizer(pretrained, hp.max_seq_length)

    # 3. data: scanned here (on every host, the test channel too: the hosts stay in step, and bad data
    #    fails them all at the start), read through this worker's shard (data/sharding.py)
    spec = data.RowSpec(hp.text_column, hp.label_column, hp.classes, hp.max_seq_length)
    # bias_facet (and bias_group): read by the scan of train (a bounded sample) and test (insights.py)
    bias_spec = dataclasses.replace(spec, extra_columns=tuple(c for c in (hp.bias_facet, hp.bias_group) if c))
    #    A Pipe-mode channel is not scanned: its FIFOs are read once, pass by pass (data/pipe.py).
    wanted = {"train": True, "validation": hp.run_validation, "test": hp.run_test}
    channels, pipes, pipe_readers = {}, {}, {}  # pipe_readers: each Pipe channel's data.PipePasses
    for name, is_wanted in wanted.items():
        if name not in env.channel_dirs and name not in env.pipe_channels:
            print(f"channel={name} skipped: no {name} channel")
            continue
        if not is_wanted:
            print(f"channel={name} skipped: run_{name}=false")
            continue
        if name in env.pipe_channels:
            pipes[name] = data.PipeChannel(name, *env.pipe_channels[name])
            channels[name] = data.ChannelSummary(name, [])
            check_pipe_mode(name, hp, topology, env.channel_distribution[name])
            print(f"channel={name} input_mode=Pipe record_wrapper={pipes[name].record_wrapper} fifos="
                  f"{pipes[name].fifo('<pass>')}: not scanned (a FIFO is read once); rows are counted as they "
                  "stream and max_bad_row_fraction is checked at the end of each pass")
            continue
        channels[name] = data.scan_channel(name, env.channel_dirs[name], bias_spec if name != "validation" else spec,
                                           hp.max_bad_row_fraction, facet_values=hp.bias_facet_values or ())
        for line in data.describe(channels[name]):
            print(line)
    topology.barrier("the data scan")
    # ShardedByS3Key on several hosts: each scanned its own files, so a stop could end some hosts only
    own_files = topology.num_workers > 1 and env.channel_distribution["train"] == sharding.SHARDED_BY_S3_KEY
    insights.check_settings(hp, channels, pipes, topology, own_files)  # bias_facet_values present, few values
    job_rules = rules.Rules(hp)
    if "train" in pipes:
        print("rule=class_imbalance skipped: the train channel is in Pipe mode, read once and not scanned")
    else:
        try:
            job_rules.check_class_balance(channels["train"].class_counts, hp.classes, may_stop=not own_files)
        except DataError:
            job_rules.write_report(os.path.join(env.output_data_dir, "rules.json"))
            raise
    if "train" in pipes:  # an epoch is a pass, as long as the FIFO
        train_shard = sharding.for_pipe(topology)
        steps_per_epoch = total_steps = None
        print(f"channel=train input_mode=Pipe sharding={train_shard.by} reason={train_shard.reason}")
    else:
        train_shard = sharding.for_training(channels["train"], topology, env.channel_distribution["train"])
        print(f"channel=train {train_shard.describe(hp.train_batch_size)}")
        steps_per_epoch = hp.train_steps_per_epoch or train_shard.steps_per_pass(hp.train_batch_size)
        total_steps = hp.epochs * steps_per_epoch
    validation = None
    if "validation" in channels:
        if "validation" in pipes:
            pipe_readers["validation"] = data.PipePasses(
                pipes["validation"], spec, tokenizer, hp.validation_batch_size, hp.max_bad_row_fraction,
                sharding.for_pipe(topology), topology=topology)
            validation = (pipe_readers["validation"], None)
        else:
            shard = sharding.for_evaluation(channels["validation"], topology, env.channel_distribution["validation"])
            batches = topology.distribute(lambda: data.make_dataset(
                channels["validation"], spec, tokenizer, hp.validation_batch_size,
                repeat=hp.validation_steps is not None, endless=True, shard=shard))
            validation = (batches, hp.validation_steps or shard.steps_per_pass(hp.validation_batch_size))
            print(f"channel=validation {shard.describe(hp.validation_batch_size)}")

    # 4. model, resume, training: built, compiled and restored in the strategy's scope
    checkpointing_on = hp.enable_checkpointing or env.checkpoint_config_present
    store = (checkpointing.open_store(env.checkpoint_dir, hp.keep_checkpoints, hp.resume)
             if checkpointing_on and topology.is_chief else None)
    with topology.scope():
        backbone = load_backbone(pretrained)
        backbone.trainable = not hp.freeze_bert_layer
        # A frozen encoder runs in inference mode (no dropout), so its outputs can be cached
        classifier = build_classifier_parts(backbone, len(hp.classes), hp.max_seq_length, head=hp.head,
                                            dropout=pretrained.classifier_dropout)
        model = classifier.model
        # float16: compile wraps the optimizer in Keras's LossScaleOptimizer
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate, epsilon=hp.epsilon))
        model.optimizer.build(model.trainable_variables)
        fingerprint = store and checkpointing.fingerprint(
            hp, channels["train"], pretrained, policy, topology,
            train_input=f"Pipe RecordWrapperType={pipes['train'].record_wrapper}" if "train" in pipes else None)
        global_step, position = checkpointing.resume(store, model, fingerprint, topology, total_steps)
    loop = TrainingLoop(topology, model, jit_compile=jit_compile, backend=backend_name, head=classifier.head, batch_sizes={
        "train_batch_size": hp.train_batch_size, "validation_batch_size": hp.validation_batch_size})
    checkpointer = checkpointing.Checkpointer(store, fingerprint, model, global_step, hp.checkpoint_every_n_steps,
                                              checkpointing_on=checkpointing_on, position=position,
                                              resume_by_position="train" in pipes, sync_model=loop.sync_model)
    job_rules.watch(model, loop.sync_model, isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer),
                    keep_best=topology.is_chief)
    hooks = [MetricLogger(hp.log_every_n_steps, steps_per_epoch, total_steps), checkpointer, job_rules]
    # Read now: during JAX training the optimizer's variables are donated to the step (training_steps.py)
    learning_rate_value = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    tensors = None
    if hook_config is not None and topology.is_chief:
        epochs_done = global_step // steps_per_epoch if steps_per_epoch else (position or {}).get("epochs_done", 0)
        tensors = debugger_tensors.TensorHook(debugger_tensors.DebuggerTensorWriter(hook_config), learning_rate_value,
                                              evaluations_done=epochs_done if validation else 0)
        hooks.append(tensors)
        print(f"debugger_tensors={hook_config.local_path} collections={','.join(hook_config.collections)} "
              "(smdebug's layout)")
    profile = None
    if hp.enable_profiler and topology.is_chief:
        profile = profiler.Profiler(profiler.interval_from_config(env.profiler_config), env.output_data_dir)
        hooks.append(profile)
    if hp.enable_tensorboard and topology.is_chief:
        hooks.append(TensorBoardLog(env.tensorboard_dir, hp.log_every_n_steps, learning_rate_value,
                                    graph_of=forward_function(model, hp.max_seq_length)
                                    if backend_name == "tensorflow" else None))
    # Frozen encoder: its outputs kept from the first epoch on, the head trained on them (frozen_encoder.py)
    cache = None
    if hp.freeze_bert_layer and hp.cache_frozen_encoder:
        cache = frozen_encoder.EncoderCache(classifier.encoder, hp.max_seq_length, tokenizer.pad_id)
        hooks.append(cache)
        print(cache.describe(None if "train" in pipes else train_shard.reviews_per_worker))
    elif hp.freeze_bert_layer:
        print("frozen_encoder_cache=off (cache_frozen_encoder=false): the frozen encoder runs on every batch")
    stage = cache.stage if cache else (lambda batches: batches)
    if "train" in pipes:
        train_batches = pipe_readers["train"] = data.PipePasses(
            pipes["train"], spec, tokenizer, hp.train_batch_size, hp.max_bad_row_fraction, train_shard, seed=hp.seed,
            topology=topology, bucket_by_length=hp.bucket_by_length, stage=stage)
    else:
        train_batches = topology.distribute(lambda: stage(data.make_training_stream(
            channels["train"], spec, tokenizer, hp.train_batch_size, hp.seed, start_step=global_step,
            shard=train_shard, bucket_by_length=hp.bucket_by_length)))
    if hp.bucket_by_length:
        print("bucket_by_length=true: training batches are cut to lengths "
              f"{','.join(map(str, data.bucket_lengths(hp.max_seq_length)))} (the serving signature takes {hp.max_seq_length})")
    print(f"training: {hp.epochs} epoch(s) of {steps_per_epoch or 'one Pipe-mode pass of'} steps from step {global_step}, "
          f"{model.count_params():,} parameters "
          f"({'encoder frozen, in inference mode (no dropout)' if hp.freeze_bert_layer else 'all trainable'})")
    if profile:
        profile.start()
    try:
        with stop_signal.deferred():
            training_seconds = loop.fit(train_batches, start_step=global_step, steps_per_epoch=steps_per_epoch,
                                        epochs=hp.epochs, validation=validation, stop_signal=stop_signal, hooks=hooks,
                                        position=position)
    finally:
        if profile:  # its report covers training, also one that was stopped or failed
            profile.close()
    if tensors:
        tensors.close()
    if cache:
        cache.close()  # up to half the memory (bilstm), free again for evaluation and export
    stopped_by = loop.ended_by
    if stopped_by:
        print(f"training stopped by rule {stopped_by.rule} after step {stopped_by.step}: {stopped_by.message}")
    if checkpointer.saves:
        print(f"checkpoints={checkpointer.saves} checkpoint_seconds_total={checkpointer.save_seconds:.2f} "
              f"training_seconds={training_seconds:.1f} "
              f"checkpoint_share={checkpointer.save_seconds / training_seconds:.2%}")

    if not topology.is_chief:
        print(f"host {topology.current_host} is done: the chief host {topology.hosts[0]} evaluates and exports")
        return
    rules_path = os.path.join(env.output_data_dir, "rules.json")
    exported = None
    if stopped_by:
        if stopped_by.rule == rules.NON_FINITE and job_rules.best is None:
            job_rules.write_report(rules_path)
            raise TrainingError(
                f"the loss became NaN or infinite at step {stopped_by.step}, and no finite model was kept to export "
                "(one is kept at each better validation loss: give the job a validation channel); lower "
                f"learning_rate (now {learning_rate_value:g}) or check the data; the rules' record is in {rules_path}")
        exported = job_rules.restore_best()
        print("exporting the " + (f"best model: step {exported['step']}, val_loss={exported['val_loss']:.4f}"
                                  if exported["weights"] == "best" else f"last model: step {exported['step']}"))
    model_dir = env.model_dir
    staged = export.start_staging(model_dir)

    # 5. evaluation
    report = test_predictions = None
    if "test" in channels:
        if "test" in pipes:
            test_pipe = pipe_readers["test"] = data.PipePasses(pipes["test"], spec, tokenizer, hp.test_batch_size,
                                                               hp.max_bad_row_fraction)
            test_data = test_pipe.dataset()
        else:
            test_data = data.make_dataset(channels["test"], spec, tokenizer, hp.test_batch_size,
                                          repeat=hp.test_steps is not None)
            if hp.test_steps is not None:
                test_data = test_data.take(hp.test_steps)
        try:
            labels, probabilities, test_loss = evaluate.predict(model, test_data)
        except ValueError:  # no batch at all: a Pipe-mode pass that broke off or had no good row says why
            if "test" in pipes:
                test_pipe.finish()
            raise
        if "test" in pipes:
            test_pipe.finish()
        test_predictions = (labels, probabilities.argmax(axis=1))  # class indexes, for the bias report
        report = evaluate.classification_report(*test_predictions, hp.classes, seed=hp.seed)
        scores = report["multiclass_classification_metrics"]
        print(format_metrics(test_loss=test_loss, test_accuracy=scores["accuracy"]["value"],
                             test_macro_f1=scores["macro_f1"]["value"], test_rows=len(labels)))
        evaluate.write_report(report, os.path.join(staged, "metrics", "evaluation.json"))
        evaluate.plot_confusion_matrix(report, os.path.join(staged, "metrics", "confusion_matrix.png"))
    if hp.run_sample_predictions:
        token_ids, padding_mask = tokenizer(SAMPLE_REVIEWS)
        # A plain call: Keras's predict would run under the strategy, with the other hosts gone.
        logits = model({"token_ids": token_ids, "padding_mask": padding_mask}, training=False)
        for text, probabilities in zip(SAMPLE_REVIEWS, keras.ops.convert_to_numpy(keras.ops.softmax(logits))):
            print(f"sample_prediction label={hp.classes[probabilities.argmax()]} "
                  f"confidence={probabilities.max():.3f} text={text!r}")

    # 6. export, then publish
    export.export_saved_model(model, hp.max_seq_length, os.path.join(staged, export.SAVED_MODEL_PATH))
    export.copy_tokenizer(pretrained.path, os.path.join(staged, "tokenizer"), hp.max_seq_length)
    export.write_label_map(hp.classes, os.path.join(staged, "label_map.json"))
    if hp.head == "cls":
        architecture = transformers_export.export_transformers(model, backbone, pretrained, hp.classes,
                                                               hp.max_seq_length, os.path.join(staged, "hf"))
        print(f"hf/ written: {architecture} for transformers (PyTorch)")
    else:
        print(f"hf/ skipped: the {hp.head} head has no transformers architecture (only head=cls exports one)")
    export.write_json({
        "job_name": env.job_name,
        "image_version": env.image_version,
        "hyperparameters": hp.to_dict(),
        "pretrained_model": {"path": pretrained.path, "model_type": pretrained.model_type},
        "backend": backend_name,
        "precision": policy,
        "distribution": {"strategy": topology.kind, "workers": topology.num_workers, "replicas": topology.replicas},
        "xla": jit_compile,
        "training_seconds": round(training_seconds, 1),
        "stopped_by_rule": stopped_by and {"rule": stopped_by.rule, "step": stopped_by.step,
                                           "message": stopped_by.message, "exported": exported},
        "data": {name: [f.to_dict() for f in channel.files] for name, channel in channels.items()},
        "pipe_mode": {name: {"record_wrapper": pipes[name].record_wrapper, "passes": reader.passes}
                      for name, reader in pipe_readers.items()},
        "libraries": export.library_versions(),
        "test_metrics": report and {k: v["value"] for k, v in report["multiclass_classification_metrics"].items()
                                    if isinstance(v, dict) and "value" in v},
    }, os.path.join(staged, "manifest.json"))
    if report is not None:
        evaluate.write_report(report, os.path.join(env.output_data_dir, "evaluation.json"))
    job_rules.write_report(rules_path, exported)
    export.publish(model_dir)
    print(f"model written to {model_dir}")

    # 7. explanations and bias: the model is published; nothing here fails the job (insights.py)
    try:
        insights.run(hp, channels, pipes, spec, bias_spec, model, tokenizer, test_predictions,
                     env.output_data_dir, job_seconds=time.monotonic() - started, stop_signal=stop_signal)
    except JobStopped as stopped:  # the model is published: the job still succeeds
        print(f"explanations and bias cut short ({stopped}); the model is published")


def check_pipe_mode(channel, hp, topology, distribution):
    """What a Pipe-mode channel cannot do: its passes' lengths are known only once read."""
    fixed_steps = {"train": "train_steps_per_epoch", "validation": "validation_steps", "test": "test_steps"}[channel]
    if getattr(hp, fixed_steps) is not None:
        raise HyperparameterError(
            f"{fixed_steps} is set, but channel {channel!r} is in Pipe mode, where a pass is one FIFO, read "
            f"to its end; unset {fixed_steps}, or use File or FastFile mode")
    if topology.num_workers > 1 and distribution == sharding.SHARDED_BY_S3_KEY:
        raise DataError(
            f"channel {channel!r}: Pipe mode with S3DistributionType=ShardedByS3Key on {topology.num_workers} hosts: "
            "the hosts' passes would end at different steps; use FullyReplicated (each host streams the "
            "channel and keeps its share of each batch), or File or FastFile mode")


def main(env=None):
    """The job; env: the contract as launch.py read it (None: read it here)."""
    stop_signal = StopSignal()
    stop_signal.install()
    environment.clear_outcome()
    try:
        run(env or environment.read_environment(), stop_signal)
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
    if isinstance(error, MemoryError) or type(error).__name__ == "ResourceExhaustedError" or (  # TensorFlow's OOM
            type(error).__name__ in ("XlaRuntimeError", "JaxRuntimeError") and "RESOURCE_EXHAUSTED" in str(error)):
        resource = ResourceError(f"out of memory ({type(error).__name__}); lower the batch sizes or "
                                 "max_seq_length, or use a larger instance")
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
