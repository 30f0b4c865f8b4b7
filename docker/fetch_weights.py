"""Bakes the pretrained checkpoint into the image (standard library only: it runs before the venv).

    --source hub    downloads <model-id> at a pinned <revision> from the Hugging Face hub and checks
                    every file against docker/weights/<model-id>/<revision>.sha256 (sha256sum format)
    --source local  copies a Hugging Face folder from the build context (CI uses a generated one);
                    a SHA256SUMS file in it, when present, is checked too

The image must run with network isolation, so this is the only place weights are fetched.
"""

import argparse
import hashlib
import json
import os
import shutil
import ssl
import sys
import urllib.request

HUB_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json")
REQUIRED = ("config.json", "model.safetensors", "vocab.txt")
SUPPORTED_MODEL_TYPES = ("distilbert", "bert")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_sums(path):
    sums = {}
    with open(path) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                digest, name = line.split(maxsplit=1)
                sums[name.strip().lstrip("*")] = digest
    return sums


def check_sums(folder, sums, sums_file):
    for name, expected in sums.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            sys.exit(f"{name} is listed in {sums_file} but missing")
        actual = sha256(path)
        if actual != expected:
            sys.exit(f"{name}: SHA-256 {actual} does not match {expected} from {sums_file}")


def download(model_id, revision, output, sums_dir):
    sums_file = os.path.join(sums_dir, model_id, f"{revision}.sha256")
    # HF_ENDPOINT: a hub mirror, as huggingface_hub reads it; PIP_CERT: the build's CA bundle.
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    os.makedirs(output, exist_ok=True)
    for name in HUB_FILES:
        url = f"{endpoint}/{model_id}/resolve/{revision}/{name}"
        print(f"downloading {url}")
        with urllib.request.urlopen(url, context=context if url.startswith("https:") else None,
                                    timeout=60) as response, open(os.path.join(output, name), "wb") as f:
            shutil.copyfileobj(response, f)
    if not os.path.isfile(sums_file):
        computed = "\n".join(f"{sha256(os.path.join(output, n))}  {n}" for n in HUB_FILES)
        sys.exit(f"no recorded hashes for {model_id}@{revision}. The downloaded files hash to:\n{computed}\n"
                 f"Check them against the hub's file pages, then commit them as {sums_file}.")
    check_sums(output, read_sums(sums_file), sums_file)


def copy_local(folder, output):
    if not os.path.isdir(folder):
        sys.exit(f"--source local: {folder} is not a folder in the build context")
    shutil.copytree(folder, output, dirs_exist_ok=True)
    sums_file = os.path.join(output, "SHA256SUMS")
    if os.path.isfile(sums_file):
        check_sums(output, read_sums(sums_file), sums_file)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=("hub", "local"), required=True)
    parser.add_argument("--model-id", default="distilbert-base-uncased")
    parser.add_argument("--revision", required=True)
    parser.add_argument("--local-dir")
    parser.add_argument("--sums-dir", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    if args.source == "hub":
        download(args.model_id, args.revision, args.output, args.sums_dir)
    else:
        copy_local(args.local_dir, args.output)
    missing = [n for n in REQUIRED if not os.path.isfile(os.path.join(args.output, n))]
    if missing:
        sys.exit(f"the pretrained folder lacks {', '.join(missing)}")
    with open(os.path.join(args.output, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        sys.exit(f"config.json has model_type {model_type!r}; the trainer supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    print(f"baked {model_type} weights into {args.output}: {', '.join(sorted(os.listdir(args.output)))}")


if __name__ == "__main__":
    main()
