"""manifest.json: what made the model, beside it in the model folder.

The settings (hyperparameters, backend, precision, topology, XLA), the pretrained checkpoint, the
data (every file with its rows and SHA-256; in Pipe mode the passes read), the libraries'
versions, how training ended (a rule's stop, and which weights were exported) and the test metrics.
"""


def build(startup, devices, pretrained, channels, trained, evaluation, libraries):
    topology = devices.topology
    stopped_by = trained.stopped_by
    return {
        "job_name": startup.env.job_name,
        "image_version": startup.env.image_version,
        "hyperparameters": startup.hp.to_dict(),
        "pretrained_model": {"path": pretrained.checkpoint.path, "model_type": pretrained.checkpoint.model_type},
        "backend": devices.backend,
        "precision": devices.policy,
        "distribution": {"strategy": topology.kind, "workers": topology.num_workers, "replicas": topology.replicas},
        "xla": devices.jit_compile,
        "training_seconds": round(trained.seconds, 1),
        "stopped_by_rule": stopped_by and {"rule": stopped_by.rule, "step": stopped_by.step,
                                           "message": stopped_by.message, "exported": trained.exported},
        **channels.manifest(),
        "libraries": libraries,
        "test_metrics": evaluation.test_metrics,
    }
