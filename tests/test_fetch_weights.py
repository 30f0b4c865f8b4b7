"""docker/fetch_weights.py: hub downloads are checked against committed hashes; local folders too."""

import functools
import hashlib
import http.server
import os
import subprocess
import sys
import threading

import pytest
from conftest import REPO
from tiny_pretrained import make_distilbert

SCRIPT = os.path.join(REPO, "docker", "fetch_weights.py")
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path):
    """A hub-like server on 127.0.0.1: /<model id>/resolve/<revision>/<file>."""
    root = tmp_path / "hub"
    model = make_distilbert(str(root / "org" / "tiny" / "resolve" / REVISION))
    with open(os.path.join(model, "tokenizer.json"), "w") as f:
        f.write("{}")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", model
    server.shutdown()


def fetch(tmp_path, endpoint, sums_dir, *extra):
    return subprocess.run(
        [sys.executable, SCRIPT, "--source", "hub", "--model-id", "org/tiny", "--revision", REVISION,
         "--sums-dir", str(sums_dir), "--output", str(tmp_path / "out"), *extra],
        env=dict(os.environ, HF_ENDPOINT=endpoint), capture_output=True, text=True)


def write_sums(sums_dir, model, names):
    path = sums_dir / "org" / "tiny" / f"{REVISION}.sha256"
    path.parent.mkdir(parents=True)
    lines = [f"{hashlib.sha256(open(os.path.join(model, n), 'rb').read()).hexdigest()}  {n}" for n in names]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_hub_files_matching_the_committed_hashes_are_baked(tmp_path, hub):
    endpoint, model = hub
    write_sums(tmp_path / "sums", model, ["config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
                                          "tokenizer_config.json"])
    result = fetch(tmp_path, endpoint, tmp_path / "sums")
    assert result.returncode == 0, result.stderr
    assert "baked distilbert weights" in result.stdout
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == open(f"{model}/model.safetensors", "rb").read()


def test_a_file_that_does_not_match_its_hash_fails_the_build(tmp_path, hub):
    endpoint, model = hub
    write_sums(tmp_path / "sums", model, ["config.json", "model.safetensors", "vocab.txt"])
    with open(os.path.join(model, "model.safetensors"), "ab") as f:
        f.write(b"tampered")
    result = fetch(tmp_path, endpoint, tmp_path / "sums")
    assert result.returncode != 0
    assert "model.safetensors: SHA-256" in result.stderr and "does not match" in result.stderr


def test_without_recorded_hashes_the_build_stops_and_prints_them(tmp_path, hub):
    endpoint, model = hub
    result = fetch(tmp_path, endpoint, tmp_path / "sums")
    assert result.returncode != 0
    digest = hashlib.sha256(open(os.path.join(model, "config.json"), "rb").read()).hexdigest()
    assert f"{digest}  config.json" in result.stderr
    assert f"org/tiny/{REVISION}.sha256" in result.stderr


def test_a_local_folder_is_copied_and_checked(tmp_path):
    folder = make_distilbert(str(tmp_path / "weights" / "mine"))
    result = subprocess.run([sys.executable, SCRIPT, "--source", "local", "--revision", "-", "--local-dir", folder,
                             "--sums-dir", str(tmp_path), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(folder))
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text('{"model_type": "gpt2"}')
    result = subprocess.run([sys.executable, SCRIPT, "--source", "local", "--revision", "-", "--local-dir",
                             str(tmp_path / "gpt"), "--sums-dir", str(tmp_path), "--output", str(tmp_path / "out2")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "lacks model.safetensors, vocab.txt" in result.stderr
