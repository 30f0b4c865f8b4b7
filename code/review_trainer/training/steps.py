"""One training step and one evaluation step, compiled for the Keras backend the job runs on.

The loop (loop.py) is the same for both; it calls `train(batch, votes)` and
`evaluate(batch, votes)`, each returning, summed over the job's replicas,

    [loss_sum, correct, examples, gradient_norm_squared, *votes]

gradient_norm_squared (0 in evaluation) is of the gradient of the batch's mean loss, unscaled (a
float16 loss scale divided out): exact on one replica. With several, each replica's gradient covers
its own share of the batch; the sum is that of replicas * |replica gradient|^2, whose root is the
root mean square of the norms each replica would see training alone on its share (equal to the
exact norm when the replicas' gradients agree), at no extra collective.

TensorFlowSteps runs a step on every replica of the topology's tf.distribute strategy (one device,
several GPUs or several hosts). JaxSteps runs it on one device, as a pure function of the training
state jitted by XLA: Keras's variables are not touched while it trains, so `sync_model()` writes the
state back into them before anything reads the model (a checkpoint, the end of training).
"""

import numpy as np


def for_backend(backend, topology, model, jit_compile, head=None):
    if backend == "jax":
        return JaxSteps(model, head)
    return TensorFlowSteps(topology, model, jit_compile, head)


def _sparse_cross_entropy():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)


class TensorFlowSteps:
    """Steps under the topology's strategy. Keras's optimizer sums the replicas' gradients; each
    replica's loss is its sum over the global example count, so the summed gradients are those of
    the mean over the global batch (the last batch of a pass is smaller)."""

    def __init__(self, topology, model, jit_compile, head=None):
        import tensorflow as tf

        self.topology = topology
        self.model = model
        # The model's head alone, for batches of cached encoder outputs (model/frozen_encoder.py): its
        # variables are the model's own, and with the encoder frozen, all of its trainable ones.
        self.head = head
        self._loss = _sparse_cross_entropy()
        # XLA compiles the replica's own computation; the collectives stay outside it.
        self._forward_backward = tf.function(self._forward_backward_fn, jit_compile=jit_compile)
        self._train_step = tf.function(lambda batch, votes: self._run(self._train_replica, batch, votes))
        self._eval_step = tf.function(lambda batch, votes: self._run(self._eval_replica, batch, votes))

    def train(self, batch, votes):
        return self._train_step(batch, votes).numpy()

    def evaluate(self, batch, votes):
        return self._eval_step(batch, votes).numpy()

    def sync_model(self):
        """The strategy's variables are the model's: nothing to write back."""

    @staticmethod
    def out_of_memory(error):
        import tensorflow as tf

        return isinstance(error, tf.errors.ResourceExhaustedError)

    def _run(self, replica_fn, batch, votes):
        outputs = self.topology.strategy.run(replica_fn, args=(batch, votes))
        return self.topology.strategy.experimental_local_results(outputs)[0]  # the same on every replica

    def _train_replica(self, batch, votes):
        import keras
        import tensorflow as tf

        features, labels = batch
        context = tf.distribute.get_replica_context()
        examples = tf.cast(tf.shape(labels)[0], tf.float32)
        job_examples = context.all_reduce(tf.distribute.ReduceOp.SUM, examples)
        gradients, loss_sum, correct, norm_squared = self._forward_backward(features, labels, job_examples)
        if isinstance(self.model.optimizer, keras.optimizers.LossScaleOptimizer):
            gradients = self._non_finite_everywhere_if_anywhere(gradients, context)
        self.model.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
        norm_squared *= context.num_replicas_in_sync  # see the module's docstring
        return context.all_reduce(tf.distribute.ReduceOp.SUM,
                                  tf.concat([[loss_sum, correct, examples, norm_squared], votes], 0))

    @staticmethod
    def _non_finite_everywhere_if_anywhere(gradients, context):
        """float16: Keras's LossScaleOptimizer decides to skip a step (and lower the scale) from each
        worker's first replica's own gradients, before they are summed; an overflow on another
        replica would then reach the weights (or one worker would skip and the other not, and
        hang). One non-finite gradient anywhere makes every replica's non-finite: one decision."""
        import tensorflow as tf

        def values(g):  # an embedding's gradient stays sparse (IndexedSlices)
            return g.values if isinstance(g, tf.IndexedSlices) else g

        def poisoned(g, poison):
            if isinstance(g, tf.IndexedSlices):
                return tf.IndexedSlices(g.values + tf.cast(poison, g.dtype), g.indices, g.dense_shape)
            return g + tf.cast(poison, g.dtype)

        present = [values(g) for g in gradients if g is not None]
        non_finite = tf.add_n([tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32)) for g in present])
        anywhere = context.all_reduce(tf.distribute.ReduceOp.SUM, non_finite) > 0
        poison = tf.where(anywhere, float("nan"), 0.0)
        return [None if g is None else poisoned(g, poison) for g in gradients]

    def _forward_backward_fn(self, features, labels, job_examples):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            logits = self._classify(features, training=True)
            per_example = self._loss(labels, logits)
            loss = tf.reduce_sum(per_example) / tf.maximum(job_examples, 1.0)
            scaled = self.model.optimizer.scale_loss(loss)  # float16: the loss scale
        gradients = tape.gradient(scaled, self.model.trainable_variables)
        scale = tf.cast(self.model.optimizer.scale_loss(tf.constant(1.0)), tf.float32)
        norm_squared = tf.add_n([_squared_norm_tf(g) for g in gradients if g is not None]) / tf.square(scale)
        return gradients, tf.reduce_sum(per_example), self._correct(logits, labels), norm_squared

    def _eval_replica(self, batch, votes):
        import tensorflow as tf

        features, labels = batch
        logits = self._classify(features, training=False)
        sums = [tf.reduce_sum(self._loss(labels, logits)), self._correct(logits, labels),
                tf.cast(tf.shape(labels)[0], tf.float32), 0.0]
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.concat([sums, votes], 0))

    def _classify(self, features, training):
        """Logits of a batch: token ids through the whole model, encoder outputs through its head."""
        return (self.head if _is_cached(features) else self.model)(features, training=training)

    @staticmethod
    def _correct(logits, labels):
        import tensorflow as tf

        predicted = tf.argmax(logits, axis=-1, output_type=labels.dtype)
        return tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))


class JaxSteps:
    """Steps on one device: `jax.jit` of Keras's stateless call, gradient and optimizer update.

    The training state is three lists of arrays: the trainable variables, the optimizer's, and the
    model's non-trainable variables that change as it trains (the dropout seeds); the others
    (a frozen encoder's weights) are passed in and never copied out. The step donates the state's
    buffers to its result, so one copy of the state is in memory; until sync_model, the model's
    variables hold buffers that are gone, and reading them fails.
    """

    def __init__(self, model, head=None):
        import jax

        self.model = model
        self.head = head  # as TensorFlowSteps.head
        self._loss = _sparse_cross_entropy()
        weights = {id(v) for v in model.non_trainable_weights}
        self._changing = [v for v in model.non_trainable_variables if id(v) not in weights]  # seed states
        self._fixed = [v for v in model.non_trainable_variables if id(v) in weights]
        self._state = None  # (trainable, changing, optimizer) arrays while training; None: in the variables
        self._fixed_values = None
        self._train_step = jax.jit(self._train_fn, donate_argnums=(0,))
        self._eval_step = jax.jit(self._eval_fn)

    def train(self, batch, votes):
        state = self._current_state()
        sums, self._state = self._train_step(state, self._fixed_values, *_as_numpy(batch), votes)
        return np.asarray(sums)

    def evaluate(self, batch, votes):
        trainable, changing, _ = self._current_state()
        return np.asarray(self._eval_step(trainable, changing, self._fixed_values, *_as_numpy(batch), votes))

    def sync_model(self):
        """Writes the training state into the model's variables (and the optimizer's)."""
        if self._state is None:
            return
        trainable, changing, optimizer = self._state
        for variables, values in ((self.model.trainable_variables, trainable), (self._changing, changing),
                                  (self.model.optimizer.variables, optimizer)):
            for variable, value in zip(variables, values):
                variable.assign(value)
        self._state = None  # the variables hold it now; the next step reads it from them

    @staticmethod
    def out_of_memory(error):
        return "RESOURCE_EXHAUSTED" in str(error) and type(error).__name__ in ("XlaRuntimeError", "JaxRuntimeError")

    def _current_state(self):
        if self._state is None:  # the first step, or the first after sync_model (or a restore)
            self._fixed_values = [v.value for v in self._fixed]
            self._state = ([v.value for v in self.model.trainable_variables], [v.value for v in self._changing],
                           [v.value for v in self.model.optimizer.variables])
        return self._state

    def _stateless_call(self, trainable, changing, fixed, features, training):
        """(logits, changing): Keras's stateless call of the model, or of its head alone on a batch of
        cached encoder outputs (model/frozen_encoder.py), whose variables are some of the model's."""
        values = {id(v): x for v, x in zip(self.model.trainable_variables, trainable)}
        values.update((id(v), x) for v, x in zip(self._changing + self._fixed, [*changing, *fixed]))
        network = self.head if _is_cached(features) else self.model
        logits, non_trainable = network.stateless_call(
            [values[id(v)] for v in network.trainable_variables],
            [values[id(v)] for v in network.non_trainable_variables], features, training=training)
        values.update((id(v), x) for v, x in zip(network.non_trainable_variables, non_trainable))
        return logits, [values[id(v)] for v in self._changing]

    def _train_fn(self, state, fixed, features, labels, votes):
        import jax
        import jax.numpy as jnp
        import keras

        trainable, changing, optimizer_values = state
        optimizer = self.model.optimizer

        def loss_fn(trainable):
            logits, updated_changing = self._stateless_call(trainable, changing, fixed, features, training=True)
            per_example = self._loss(labels, logits)
            loss = jnp.sum(per_example) / jnp.maximum(labels.shape[0], 1)
            # float16: Keras's LossScaleOptimizer multiplies by its current scale, a variable
            with keras.StatelessScope(state_mapping=list(zip(optimizer.variables, optimizer_values))):
                scaled = optimizer.scale_loss(loss)
                scale = optimizer.scale_loss(jnp.float32(1.0))
            return scaled, (updated_changing, jnp.sum(per_example), self._correct(logits, labels), scale)

        gradients, (changing, loss_sum, correct, scale) = jax.grad(loss_fn, has_aux=True)(trainable)
        norm_squared = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in gradients) / jnp.square(scale)
        trainable, optimizer_values = optimizer.stateless_apply(optimizer_values, gradients, trainable)
        sums = jnp.concatenate([jnp.stack([loss_sum, correct, jnp.float32(labels.shape[0]), norm_squared]), votes])
        return sums, (trainable, changing, optimizer_values)

    def _eval_fn(self, trainable, changing, fixed, features, labels, votes):
        import jax.numpy as jnp

        logits, _ = self._stateless_call(trainable, changing, fixed, features, training=False)
        sums = jnp.stack([jnp.sum(self._loss(labels, logits)), self._correct(logits, labels),
                          jnp.float32(labels.shape[0]), jnp.float32(0.0)])
        return jnp.concatenate([sums, votes])

    @staticmethod
    def _correct(logits, labels):
        import jax.numpy as jnp

        return jnp.sum(jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def _squared_norm_tf(gradient):
    """|g|^2 in float32; an embedding's sparse gradient has its repeated rows summed first, as the
    dense gradient would."""
    import tensorflow as tf

    if isinstance(gradient, tf.IndexedSlices):
        rows, positions = tf.unique(gradient.indices)
        gradient = tf.math.unsorted_segment_sum(gradient.values, positions, tf.shape(rows)[0])
    return tf.reduce_sum(tf.square(tf.cast(gradient, tf.float32)))


def _is_cached(features):
    from review_trainer.model.classifier import ENCODER_OUTPUT

    return isinstance(features, dict) and ENCODER_OUTPUT in features


def _as_numpy(batch):
    """A tf.data batch ((features, labels) of tensors) as NumPy arrays, which jax takes without a copy."""
    import keras

    return keras.tree.map_structure(np.asarray, tuple(batch))
