"""The classifier's forward pass, compiled once for the Keras backend, outside training.

The test evaluation (outputs/evaluation.py), the frozen encoder's cache (frozen_encoder.py) and
the explanations (insights/reports.py) run the model many times on the chief, outside any
tf.distribute strategy; this is what they call.
"""


def compiled_inference(model, outputs=None):
    """features -> outputs(model(features, training=False)), compiled for the backend, called
    outside any tf.distribute strategy (evaluation on the chief, the frozen encoder's cache).

    On JAX the variables' values are taken now and passed as arguments (closed over, jit would bake
    them into the program as constants); the non-weight ones (dropout seeds) are copied, since the
    training step donates their buffers. `outputs` is written in Keras ops."""
    import keras

    outputs = outputs or (lambda x: x)
    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp

        weights = {id(w) for w in model.weights}
        state = ([v.value for v in model.trainable_variables],
                 [v.value if id(v) in weights else jnp.array(v.value, copy=True) for v in model.non_trainable_variables])
        forward = jax.jit(lambda state, features: outputs(model.stateless_call(*state, features, training=False)[0]))
        return lambda features: forward(state, features)
    import tensorflow as tf

    # Batches come in a few lengths (buckets) and a smaller last one: one trace with unknown dimensions.
    return tf.function(lambda features: outputs(model(features, training=False)), reduce_retracing=True)
