"""The frozen encoder (freeze_bert_layer=true): inference mode, and its cache (frozen_encoder.py).

The tiny checkpoints have dropout 0.1, so an encoder that ran in training mode would give other
outputs on every call. Tolerances, float32 (use_amp=false): a cached output is the encoder's output
for the same review computed in another batch of another width (a length bucket, or
max_seq_length for bilstm), so the two differ by summation order only, about 1e-7 of values of
order 1 (atol 1e-5 leaves a margin of 100). The cached and uncached jobs apply the same head
dropout masks (the head's seed generators draw the same sequence either way), so their weights
and metrics differ at most by that noise carried through the steps of Adam: here they are
bit-identical; held to 1e-5 absolute (Adam moves a weight by about the learning rate, 1e-3, per step,
so a head trained on other inputs ends far outside it).
"""

import json
import os
import re

import keras
import numpy as np
import pytest
from conftest import FAST_HYPERPARAMETERS, amazon_tsv, make_opt_ml, make_reviews, run_train, train_in_process
from review_trainer import data
from review_trainer.contract.hyperparameters import Hyperparameters
from review_trainer.model import frozen_encoder
from review_trainer.model.classifier import ENCODER_OUTPUT, build_classifier_parts
from review_trainer.model.pretrained import ReviewTokenizer, load_backbone, open_checkpoint
from review_trainer.training import checkpoints
from test_distributed import run_on_two_cpu_devices
from test_pipe_mode import job_data, metric_lines, run_pipe_job

MAX_LENGTH = 16
SPEC = data.RowSpec("review_body", "star_rating", ("1", "2", "3", "4", "5"), MAX_LENGTH)
TRAIN_ROWS = make_reviews(96, 1)  # 73 distinct texts: repeated reviews are cached once


def frozen_classifier(checkpoint_dir, head):
    backbone = load_backbone(open_checkpoint(checkpoint_dir))
    backbone.trainable = False
    return build_classifier_parts(backbone, 5, MAX_LENGTH, head=head), backbone


def inputs(rows):
    token_ids = np.full((rows, MAX_LENGTH), 7, np.int32)
    token_ids[:, 0] = 2  # [CLS]
    return {"token_ids": token_ids, "padding_mask": np.ones((rows, MAX_LENGTH), np.int32)}


def independent_encoder_output(backbone, head, token_ids, padding_mask):
    """What the head reads, from the backbone called directly in inference mode at max_seq_length."""
    backbone_inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    if "segment_ids" in backbone.input:
        backbone_inputs["segment_ids"] = np.zeros_like(token_ids)
    encoded = backbone(backbone_inputs, training=False)
    if head == "bilstm":
        return np.asarray(encoded["sequence_output"] if isinstance(encoded, dict) else encoded)
    return np.asarray(encoded["pooled_output"] if isinstance(encoded, dict) else encoded[:, 0, :])


# The model: frozen means inference mode; the encoder and the head are views of the classifier
@pytest.mark.parametrize("head", ["cls", "bilstm"])
def test_a_frozen_encoder_runs_in_inference_mode_even_in_a_training_call(distilbert_dir, head):
    parts, backbone = frozen_classifier(distilbert_dir, head)
    x = inputs(4)
    first, second = (np.asarray(parts.encoder(x, training=True)) for _ in range(2))
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, independent_encoder_output(backbone, head, **x), atol=1e-6, equal_nan=False)
    # The same backbone trainable: dropout is on in a training call, so the check above can fail.
    trainable = build_classifier_parts(load_backbone(open_checkpoint(distilbert_dir)), 5, MAX_LENGTH, head=head)
    dropped = [np.asarray(trainable.encoder(x, training=True)) for _ in range(2)]
    assert np.isfinite(dropped).all() and not np.allclose(*dropped)


@pytest.mark.parametrize("head", ["cls", "bilstm"])
@pytest.mark.parametrize("checkpoint", ["distilbert_dir", "bert_dir"])
def test_the_head_on_the_encoders_output_is_the_classifier(request, checkpoint, head):
    parts, _ = frozen_classifier(request.getfixturevalue(checkpoint), head)
    x = inputs(3)
    np.testing.assert_allclose(np.asarray(parts.head({ENCODER_OUTPUT: parts.encoder(x)})), np.asarray(parts.model(x)),
                               atol=1e-6, equal_nan=False)
    # The head trains the classifier's own variables, and with the encoder frozen all of its trainable ones.
    assert [id(v) for v in parts.head.trainable_variables] == [id(v) for v in parts.model.trainable_variables]
    assert len(parts.model.trainable_variables) >= 2 and not parts.encoder.trainable_variables
    assert parts.model.get_layer("logits") is parts.head.get_layer("logits")


# The cache stage
def training_stream(tmp_path, tokenizer, rows=TRAIN_ROWS, batch_size=8):
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "train.tsv").write_bytes(amazon_tsv(rows))
    channel = data.scan_channel("train", str(folder), SPEC, 0.01)
    stream = data.make_training_stream(channel, SPEC, tokenizer, batch_size, seed=3, bucket_by_length=True)
    return stream, -(-len(rows) // batch_size)


def distinct_reviews(tokenizer, rows=TRAIN_ROWS):
    token_ids, padding_mask = tokenizer([text for text, _ in rows])
    keys = {}
    for ids, mask in zip(token_ids, padding_mask):
        keys.setdefault(frozen_encoder.review_key(ids, mask), (ids, mask))
    return keys


@pytest.mark.parametrize("head,checkpoint", [("cls", "distilbert_dir"), ("cls", "bert_dir"),
                                             ("bilstm", "distilbert_dir")])
def test_every_cached_review_is_the_encoders_inference_output_and_later_passes_read_the_cache(
        request, tmp_path, head, checkpoint):
    checkpoint_dir = request.getfixturevalue(checkpoint)
    parts, backbone = frozen_classifier(checkpoint_dir, head)
    tokenizer = ReviewTokenizer(open_checkpoint(checkpoint_dir), MAX_LENGTH)
    cache = frozen_encoder.EncoderCache(parts.encoder, MAX_LENGTH, tokenizer.pad_id, print_fn=lambda line: None)
    stream, steps = training_stream(tmp_path, tokenizer)
    reviews = distinct_reviews(tokenizer)
    passes = stream.take(steps), stream.skip(steps).take(steps)  # shuffled, length-bucketed; batch n is a function of n
    batches = list(cache.stage(passes[0]))
    assert (cache.encoded, cache.from_cache) == (len(reviews), len(TRAIN_ROWS) - len(reviews))
    assert len(cache.rows) == cache.store.rows == len(reviews) == 73
    cache.encoded = cache.from_cache = 0
    batches += list(cache.stage(passes[1]))
    assert (cache.encoded, cache.from_cache) == (0, len(TRAIN_ROWS))

    for key, (ids, mask) in reviews.items():
        expected = independent_encoder_output(backbone, head, ids[None], mask[None])[0]
        np.testing.assert_allclose(cache.store.row(cache.rows[key]), expected, atol=1e-5, equal_nan=False)
    # What the stage gave the head, batch by batch, at the batch's own width
    widths = set()
    for (features, _), (cached, _) in zip(passes[0].concatenate(passes[1]), batches, strict=True):
        ids, mask = features["token_ids"].numpy(), features["padding_mask"].numpy()
        widths.add(ids.shape[1])
        full_ids = np.pad(ids, ((0, 0), (0, MAX_LENGTH - ids.shape[1])), constant_values=tokenizer.pad_id)
        full_mask = np.pad(mask, ((0, 0), (0, MAX_LENGTH - ids.shape[1])))
        expected = independent_encoder_output(backbone, head, full_ids, full_mask)
        if head == "bilstm":
            expected = expected[:, :ids.shape[1]]
        np.testing.assert_allclose(cached[ENCODER_OUTPUT].numpy(), expected, atol=1e-5, equal_nan=False)
    assert len(widths) > 1  # length buckets: the cache served batches of several widths


def test_past_the_memory_bound_reviews_go_to_an_unlinked_spill_file_and_past_its_bound_are_encoded_every_pass(
        tmp_path, distilbert_dir):
    parts, backbone = frozen_classifier(distilbert_dir, "bilstm")
    tokenizer = ReviewTokenizer(open_checkpoint(distilbert_dir), MAX_LENGTH)
    spill_dir = tmp_path / "scratch"
    spill_dir.mkdir()
    row_bytes = MAX_LENGTH * 32 * 4  # 16 positions x 32 hidden float32
    lines = []
    cache = frozen_encoder.EncoderCache(parts.encoder, MAX_LENGTH, tokenizer.pad_id, memory_bound=0,
                                        spill_dir=str(spill_dir), spill_bound=50 * row_bytes,
                                        chunk_bytes=10 * row_bytes, print_fn=lines.append)
    assert "storage=memory+spill_file reviews=96 expected_bytes=212.0 KB capped_at=50 (the other" in cache.describe(96)
    stream, steps = training_stream(tmp_path, tokenizer)
    passes = stream.take(steps), stream.skip(steps).take(steps)
    batches = list(cache.stage(passes[0]))

    assert cache.store.memory_bytes == 0 and cache.store.spill_bytes == 50 * row_bytes
    assert all(isinstance(chunk, np.memmap) for chunk in cache.store.chunks) and len(cache.store.chunks) == 5
    assert os.listdir(spill_dir) == []  # unlinked: its space returns when the job ends, however it ends
    assert len(cache.rows) == 50 and cache.store.full
    assert lines == ["frozen_encoder_cache full after 50 reviews (memory 0 B, spill file 102.4 KB): the reviews not "
                     "cached run through the encoder every epoch"]
    # The reviews that did not fit are encoded again in every pass, and are still right.
    cache.encoded = 0
    batches += list(cache.stage(passes[1]))
    not_cached = sum(len({frozen_encoder.review_key(ids, mask) for ids, mask in zip(
        features["token_ids"].numpy(), features["padding_mask"].numpy())} - cache.rows.keys()) for features, _ in passes[1])
    assert cache.encoded == not_cached >= 20  # each once per batch
    for (features, _), (cached, _) in zip(passes[0].concatenate(passes[1]), batches, strict=True):
        ids, mask = features["token_ids"].numpy(), features["padding_mask"].numpy()
        pad = ((0, 0), (0, MAX_LENGTH - ids.shape[1]))
        expected = independent_encoder_output(backbone, "bilstm", np.pad(ids, pad, constant_values=tokenizer.pad_id),
                                              np.pad(mask, pad))[:, :ids.shape[1]]
        np.testing.assert_allclose(cached[ENCODER_OUTPUT].numpy(), expected, atol=1e-5, equal_nan=False)
    for ids, mask in distinct_reviews(tokenizer).values():  # the rows in the spill file
        number = cache.rows.get(frozen_encoder.review_key(ids, mask))
        if number is not None:
            np.testing.assert_allclose(cache.store.row(number), independent_encoder_output(
                backbone, "bilstm", ids[None], mask[None])[0], atol=1e-5, equal_nan=False)
    cache.close()


def test_the_start_line_says_the_choice_the_bound_and_what_a_review_costs(distilbert_dir):
    parts, _ = frozen_classifier(distilbert_dir, "cls")
    cache = frozen_encoder.EncoderCache(parts.encoder, MAX_LENGTH, 0, memory_bound=10_000, spill_bound=0)
    per_review = 32 * 4 + frozen_encoder.INDEX_BYTES
    assert cache.per_review_bytes == per_review
    assert cache.describe(20).startswith(f"frozen_encoder_cache=on storage=memory reviews=20 expected_bytes=5.8 KB "
                                         f"per_review_bytes={per_review} (32 float32 values (the [CLS] vector), 128 "
                                         "bytes, and about 160 of index) memory_bound=10.0 KB (50% of the available")
    assert "storage=memory+spill_file reviews=100 expected_bytes=28.8 KB capped_at=34 (the other" in cache.describe(100)
    spill = frozen_encoder.EncoderCache(parts.encoder, MAX_LENGTH, 0, memory_bound=10_000, spill_bound=10_000)
    assert ("storage=memory+spill_file reviews=100 expected_bytes=28.8 KB (about 34 reviews in memory, the rest in the "
            "spill file)") in spill.describe(100)
    assert "storage=memory+spill_file reviews=unknown (Pipe mode" in cache.describe(None)
    assert 0 < frozen_encoder.available_memory() < 1 << 50


def test_cache_frozen_encoder_is_a_boolean_hyperparameter():
    assert Hyperparameters.from_dict({}).cache_frozen_encoder is True
    assert Hyperparameters.from_dict({"cache_frozen_encoder": "False"}).cache_frozen_encoder is False
    with pytest.raises(Exception, match="cache_frozen_encoder='sometimes': expected true or false"):
        Hyperparameters.from_dict({"cache_frozen_encoder": "sometimes"})
    assert "cache_frozen_encoder" not in checkpoints.TRAJECTORY_HYPERPARAMETERS  # a resume may change it


# The job: cached and uncached frozen runs end alike
def frozen_job(base, pretrained_dir, head, cache, backend="tensorflow"):
    make_opt_ml(str(base), {
        "train": {"part-1.tsv": amazon_tsv(TRAIN_ROWS)},
        "validation": {"validation.tsv": amazon_tsv(make_reviews(24, 3))},
        "test": {"test.tsv": amazon_tsv(make_reviews(30, 4))},
    }, {**FAST_HYPERPARAMETERS, "epochs": "3", "freeze_bert_layer": "true", "head": head,
        "cache_frozen_encoder": cache, "enable_checkpointing": "true", "run_sample_predictions": "false",
        "backend": backend})
    # JAX needs a process of its own: Keras fixes its backend when first imported
    result = (run_train if backend == "jax" else train_in_process)(base, pretrained_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def final_state(base):
    saved = checkpoints.CheckpointStore(os.path.join(base, "checkpoints"), keep=2).latest()
    with open(os.path.join(saved.path, checkpoints.MANIFEST_FILE)) as f:
        paths = [path for path, _ in json.load(f)["variables"]]
    with np.load(os.path.join(saved.path, checkpoints.STATE_FILE)) as arrays:
        return saved.global_step, {path: arrays[f"arr_{i}"] for i, path in enumerate(paths)}


def metric_values(log):
    return [float(v) for v in re.findall(r"\b(?:train_loss|train_accuracy|val_loss|val_accuracy|test_loss|"
                                         r"test_accuracy|test_macro_f1)=(\S+)", log)]


# Each head and each backend once (pairs, not every combination: the cache sits between the encoder
# and the head, whichever the head; the two other pairs cost 80 s of CI for no other code path)
@pytest.mark.parametrize("head,backend", [("cls", "tensorflow"), ("bilstm", "jax")])
def test_the_cached_frozen_job_ends_with_the_uncached_jobs_weights_and_metrics(tmp_path, distilbert_dir, head, backend):
    cached_log = frozen_job(tmp_path / "cached", distilbert_dir, head, "true", backend)
    uncached_log = frozen_job(tmp_path / "uncached", distilbert_dir, head, "false", backend)
    assert f" backend={backend} " in cached_log

    reviews = "reviews=96 expected_bytes="
    per_review = (MAX_LENGTH * 32 if head == "bilstm" else 32) * 4 + frozen_encoder.INDEX_BYTES
    assert re.search(rf"^frozen_encoder_cache=on storage=memory {reviews}\S+ KB per_review_bytes={per_review} .* "
                     r"memory_bound=\S+ \S+ \(50% of the available memory\) spill_dir=\S+ spill_bound=", cached_log, re.M)
    assert re.findall(r"^frozen_encoder_cache epoch=(\d) encoded=(\d+) ", cached_log, re.M)[1:] == [("2", "0"), ("3", "0")]
    assert "frozen_encoder_cache=off (cache_frozen_encoder=false)" in uncached_log
    assert "frozen_encoder_cache epoch" not in uncached_log

    cached_metrics, uncached_metrics = metric_values(cached_log), metric_values(uncached_log)
    assert len(cached_metrics) == 3 * 4 + 3 and cached_metrics == pytest.approx(uncached_metrics, abs=2e-4)
    step, cached = final_state(tmp_path / "cached")
    uncached_step, uncached = final_state(tmp_path / "uncached")
    assert step == uncached_step == 36 and cached.keys() == uncached.keys()
    for path, expected in uncached.items():
        np.testing.assert_allclose(cached[path], expected, atol=1e-5, rtol=0, err_msg=path, equal_nan=False)

    # The frozen encoder's weights are still the pretrained ones (the checkpoint lists the model's
    # variables first, in the order of a model built the same way; names differ between processes).
    parts, backbone = frozen_classifier(distilbert_dir, head)
    encoder_ids = {id(w) for w in backbone.weights}
    saved = list(cached.values())
    compared = 0
    for index, variable in enumerate(parts.model.variables):
        if id(variable) in encoder_ids:
            assert np.isfinite(saved[index]).all(), variable.path
            np.testing.assert_array_equal(saved[index], keras.ops.convert_to_numpy(variable.value), err_msg=variable.path)
            compared += 1
    assert compared == len(backbone.weights) > 20


def test_with_two_replicas_the_cached_job_ends_with_the_one_device_weights(tmp_path):
    """MirroredStrategy over two logical CPUs: each replica's batches pass the cache stage. Without
    dropout (its masks differ per replica), the weights equal those of one device with the same global batch."""
    from tiny_pretrained import make_distilbert

    pretrained = make_distilbert(str(tmp_path / "no-dropout"), dropout=0.0)
    states = []
    for name, hyperparameters in (("one", {"train_batch_size": "16", "distribution": "none"}),
                                  ("two", {"train_batch_size": "8", "distribution": "mirrored"})):
        base = make_opt_ml(str(tmp_path / name), {"train": {"part-1.tsv": amazon_tsv(make_reviews(108, 21))}}, {
            **FAST_HYPERPARAMETERS, "epochs": "2", "freeze_bert_layer": "true", "enable_checkpointing": "true",
            "run_sample_predictions": "false", **hyperparameters})
        result = run_on_two_cpu_devices(base, pretrained) if name == "two" else train_in_process(base, pretrained)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "frozen_encoder_cache=on" in result.stdout and "frozen_encoder_cache epoch=2 encoded=0 " in result.stdout
        states.append(final_state(base))
    (step, one), (two_step, two) = states
    assert step == two_step == 14 and one.keys() == two.keys()
    for path, expected in one.items():
        if not path.startswith("adam/"):
            np.testing.assert_allclose(two[path], expected, rtol=1e-5, atol=1e-6, err_msg=path, equal_nan=False)


def test_a_pipe_mode_cached_job_gives_the_uncached_file_mode_metrics(tmp_path, distilbert_dir):
    """Pipe mode (rows unknown ahead, a FIFO per epoch, tables and TFRecords) against File mode
    without the cache: the same data, the same metric lines."""
    channels, _ = job_data(tmp_path, distilbert_dir)
    hyperparameters = {**FAST_HYPERPARAMETERS, "epochs": "2", "run_sample_predictions": "false",
                       "freeze_bert_layer": "true"}
    file_base = make_opt_ml(str(tmp_path / "file"), channels, {**hyperparameters, "cache_frozen_encoder": "false"})
    file_result = train_in_process(file_base, distilbert_dir)
    assert file_result.returncode == 0, file_result.stderr[-3000:]
    pipe_base = make_opt_ml(str(tmp_path / "pipe"), channels, hyperparameters)
    result = run_pipe_job(pipe_base, distilbert_dir, channels, "RecordIO", {"train": 2, "validation": 2, "test": 1})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "frozen_encoder_cache=on storage=memory+spill_file reviews=unknown (Pipe mode" in result.stdout
    assert "frozen_encoder_cache epoch=2 encoded=0 " in result.stdout
    pipe_lines, file_lines = metric_lines(result.stdout), metric_lines(file_result.stdout)
    assert len(file_lines) == 2 and [line.split(" train_samples_per_second")[0] for line in pipe_lines] == [
        line.split(" train_samples_per_second")[0] for line in file_lines]
