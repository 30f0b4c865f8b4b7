"""The job's training stages: set up the devices, build and resume the model, train it.

Each takes what the stages before it returned and returns a small object of its own:

    set_up(startup)                                  -> Devices     topology, precision, XLA, learning rate
    build_model(startup, devices, pretrained, ...)   -> ModelState  built in the strategy's scope, resumed
    train(startup, devices, pretrained, state, ...)  -> Trained     the trained model and how training ended

On several hosts every host runs them; the chief alone writes checkpoints and reports, and only
the chief goes on to evaluate and export (Trained.exports).
"""

import dataclasses
import os

import keras
from review_trainer.contract import environment
from review_trainer.contract.errors import HyperparameterError
from review_trainer.data import bucket_lengths
from review_trainer.model.classifier import Classifier, build_classifier_parts
from review_trainer.model.frozen_encoder import EncoderCache
from review_trainer.model.pretrained import load_backbone
from review_trainer.telemetry import hooks
from review_trainer.telemetry.rules import Triggered
from review_trainer.training import checkpoints, precision
from review_trainer.training.loop import TrainingLoop
from review_trainer.training.topology import Topology


@dataclasses.dataclass(frozen=True)
class Devices:
    """How this host trains: its topology, the precision policy, XLA, the optimizer's learning rate."""

    topology: Topology
    backend: str
    policy: str  # Keras's dtype policy: float32, mixed_bfloat16 or mixed_float16
    jit_compile: bool
    learning_rate: float  # learning_rate, times the replicas with scale_learning_rate

    @property
    def idle(self):
        """This host does not train (distribution=none on several hosts: the chief alone does)."""
        return self.topology.idle


def set_up(startup, print_fn=print):
    """The topology (its strategy before any other TensorFlow operation), precision and seeds; the
    start lines; on the chief, the folders it will write, checked now rather than after training."""
    env, hp = startup.env, startup.hp
    if keras.backend.backend() != startup.backend.name:
        raise HyperparameterError(
            f"backend={startup.backend.name} ({startup.backend.reason}), but Keras was imported with the "
            f"{keras.backend.backend()} backend: start the job with the `train` command, which sets KERAS_BACKEND "
            "before Keras is imported")
    topology = Topology.set_up(env, hp, startup.distribution, startup.backend.name)
    capability = precision.gpu_compute_capability()
    # Trainium computes in bfloat16 natively: Neuron takes the bf16 path whatever the host CPU has
    policy = precision.choose_policy(hp.use_amp, capability, precision.cpu_has_bf16() or env.num_neurons > 0)
    jit_compile = precision.choose_jit_compile(hp.use_xla, capability, startup.backend.name)
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(hp.seed)
    devices = Devices(topology, startup.backend.name, policy, jit_compile,
                      hp.learning_rate * (topology.replicas if hp.scale_learning_rate else 1))
    print_fn(f"hosts={','.join(env.hosts)} current_host={env.current_host} gpus={env.num_gpus} cpus={env.num_cpus} "
             f"backend={devices.backend} precision={policy} xla={jit_compile} backend_reason={startup.backend.reason}")
    print_fn(topology.describe(hp.train_batch_size) + f" learning_rate={devices.learning_rate:g}"
             + (f" (scale_learning_rate: {hp.learning_rate:g} x {topology.replicas} replicas)"
                if hp.scale_learning_rate else ""))
    print_fn("hyperparameters " + " ".join(f"{k}={v}" for k, v in hp.to_dict().items()))
    if devices.idle:
        print_fn(f"host {topology.current_host} stops here: {topology.reason}")
    elif topology.is_chief:
        environment.check_writable({"model folder": env.model_dir, "output data folder": env.output_data_dir,
                                    **({"TensorBoard folder": env.tensorboard_dir} if hp.enable_tensorboard else {})})
    return devices


@dataclasses.dataclass(frozen=True)
class ModelState:
    """The classifier, compiled with its optimizer, and where training resumes."""

    classifier: Classifier  # the model, and views of its encoder and head
    backbone: keras.Model  # the pretrained encoder inside it (outputs/transformers_export.py reads its weights)
    start_step: int  # the global step restored (0: a fresh start)
    position: dict  # where the checkpoint's epoch stood (checkpoints.Checkpointer.position)
    store: checkpoints.CheckpointStore | None  # the chief's, when checkpointing is on; None elsewhere
    fingerprint: dict | None  # what the store's checkpoints must have been written by
    checkpointing_on: bool  # enable_checkpointing, or a CheckpointConfig

    @property
    def model(self):
        return self.classifier.model


def build_model(startup, devices, pretrained, channels, print_fn=print):
    """Built, compiled and restored in the strategy's scope, from the newest checkpoint this same
    job wrote (only the chief reads checkpoints, and sends what it restored to the other hosts)."""
    env, hp, topology = startup.env, startup.hp, devices.topology
    checkpointing_on = hp.enable_checkpointing or env.checkpoint_config_present
    store = (checkpoints.open_store(env.checkpoint_dir, hp.keep_checkpoints, hp.resume, print_fn)
             if checkpointing_on and topology.is_chief else None)
    with topology.scope():
        backbone = load_backbone(pretrained.checkpoint)
        backbone.trainable = not hp.freeze_bert_layer  # a frozen encoder runs in inference mode (no dropout)
        classifier = build_classifier_parts(backbone, len(hp.classes), hp.max_seq_length, head=hp.head,
                                            dropout=pretrained.checkpoint.classifier_dropout,
                                            cudnn_lib_config=env.cudnn_lib_config)
        # float16: compile wraps the optimizer in Keras's LossScaleOptimizer
        classifier.model.compile(optimizer=keras.optimizers.Adam(learning_rate=devices.learning_rate,
                                                                 epsilon=hp.epsilon))
        classifier.model.optimizer.build(classifier.model.trainable_variables)
        fingerprint = store and checkpoints.fingerprint(hp, channels.train, pretrained.checkpoint, devices.policy,
                                                        topology)
        start_step, position = checkpoints.resume(store, classifier.model, fingerprint, topology,
                                                  channels.train_passes.total_steps, print_fn)
    return ModelState(classifier, backbone, start_step, position, store, fingerprint, checkpointing_on)


@dataclasses.dataclass(frozen=True)
class Trained:
    model: keras.Model
    seconds: float  # of training (validation included), this host's
    stopped_by: Triggered | None  # the rule that ended training early
    exported: dict | None  # after a stop by rule, which weights are exported (rules.json's record)
    exports: bool  # this host evaluates and exports (the chief); the others are done


def train(startup, devices, pretrained, state, channels, job_rules, stop_signal, print_fn=print):
    """Trains to the last epoch, a rule's stop, or a stop signal (JobStopped, once every host has
    stopped after the same step and the chief has checkpointed it)."""
    env, hp, topology, model = startup.env, startup.hp, devices.topology, state.model
    loop = TrainingLoop(topology, model, jit_compile=devices.jit_compile, backend=devices.backend,
                        head=state.classifier.head, batch_sizes={"train_batch_size": hp.train_batch_size,
                                                                 "validation_batch_size": hp.validation_batch_size})
    training = channels.train_passes
    checkpointer = checkpoints.Checkpointer(
        state.store, state.fingerprint, model, state.start_step, hp.checkpoint_every_n_steps,
        checkpointing_on=state.checkpointing_on, print_fn=print_fn, position=state.position,
        resume_by_position=training.resumes_by_position, sync_model=loop.sync_model)
    job_rules.watch(model, loop.sync_model, isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer),
                    keep_best=topology.is_chief)
    # Read now: during JAX training the optimizer's variables are donated to the step (steps.py)
    learning_rate = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    first_epoch, _ = training.resume_point(state.start_step, state.position)
    telemetry = hooks.for_training(
        env, hp, topology.is_chief, startup.hook_config, model=model, learning_rate=learning_rate,
        steps_per_epoch=training.steps_per_epoch, total_steps=training.total_steps,
        evaluations_done=first_epoch - 1 if channels.validation_passes else 0, graph=devices.backend == "tensorflow",
        print_fn=print_fn)
    cache = _frozen_encoder_cache(hp, state.classifier, pretrained.tokenizer, training, print_fn)
    training.start(state.start_step, stage=cache.stage if cache else None)
    _print_plan(hp, state, training, model, print_fn)
    with telemetry.running(), stop_signal.deferred():
        seconds = loop.fit(training, start_step=state.start_step, position=state.position, epochs=hp.epochs,
                           validation=channels.validation_passes, stop_signal=stop_signal,
                           hooks=[*telemetry.hooks, checkpointer, job_rules, *([cache] if cache else [])])
    if cache:
        cache.close()  # up to half the memory (bilstm), free again for evaluation and export
    _print_end(loop.ended_by, checkpointer, seconds, print_fn)
    if not topology.is_chief:
        print_fn(f"host {topology.current_host} is done: the chief host {topology.hosts[0]} evaluates and exports")
        return Trained(model, seconds, loop.ended_by, None, exports=False)
    rules_path = os.path.join(env.output_data_dir, "rules.json")
    exported = job_rules.model_to_export(rules_path, learning_rate)
    job_rules.write_report(rules_path, exported)
    return Trained(model, seconds, loop.ended_by, exported, exports=True)


def _frozen_encoder_cache(hp, classifier, tokenizer, training, print_fn):
    """freeze_bert_layer: the encoder's outputs kept from the first epoch on, the head trained on them."""
    if not hp.freeze_bert_layer:
        return None
    if not hp.cache_frozen_encoder:
        print_fn("frozen_encoder_cache=off (cache_frozen_encoder=false): the frozen encoder runs on every batch")
        return None
    cache = EncoderCache(classifier.encoder, hp.max_seq_length, tokenizer.pad_id)
    print_fn(cache.describe(training.reviews_per_worker))
    return cache


def _print_plan(hp, state, training, model, print_fn):
    if hp.bucket_by_length:
        print_fn("bucket_by_length=true: training batches are cut to lengths "
                 f"{','.join(map(str, bucket_lengths(hp.max_seq_length)))} (the serving signature takes "
                 f"{hp.max_seq_length})")
    print_fn(f"training: {hp.epochs} epoch(s) of {training.epoch_length} steps from step {state.start_step}, "
             f"{model.count_params():,} parameters "
             f"({'encoder frozen, in inference mode (no dropout)' if hp.freeze_bert_layer else 'all trainable'})")


def _print_end(stopped_by, checkpointer, seconds, print_fn):
    if stopped_by:
        print_fn(f"training stopped by rule {stopped_by.rule} after step {stopped_by.step}: {stopped_by.message}")
    if checkpointer.saves:
        print_fn(f"checkpoints={checkpointer.saves} checkpoint_seconds_total={checkpointer.save_seconds:.2f} "
                 f"training_seconds={seconds:.1f} checkpoint_share={checkpointer.save_seconds / seconds:.2%}")
