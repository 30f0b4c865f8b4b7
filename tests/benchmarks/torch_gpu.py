"""Benchmark (GPU, not a test): the reference the product's JAX step is held against on a GPU.

transformers' DistilBertForSequenceClassification in PyTorch, DistilBERT-base's shape (random
weights, as jax_gpu.py), batch 128, 64 tokens, AdamW, bf16 autocast; eager and with torch.compile.
Samples/s of full training steps (forward, backward, optimizer), timed after warm-up with the GPU
synchronized at both ends.

    python3 tests/benchmarks/torch_gpu.py [--small] [--out results.json]
"""

import argparse
import json
import time


def samples_per_second(model, optimizer, ids, mask, labels, steps, autocast):
    import torch

    def step():
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(5):  # compilation and warm-up
        step()
    if ids.is_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    assert torch.isfinite(loss).item()  # also waits for the last step
    return steps * len(ids) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="a tiny model, to try the script on a CPU")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out")
    args = parser.parse_args()
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = (transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=5)
              if args.small else transformers.DistilBertConfig(num_labels=5))  # distilbert-base-uncased's shape
    batch_size, length = (8, 16) if args.small else (args.batch_size, 64)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (batch_size, length), generator=generator).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 5, (batch_size,), generator=generator).to(device)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "transformers": transformers.__version__, "batch_size": batch_size, "length": length,
               "samples_per_second": {}}
    for name, compiled in (("bf16 autocast", False), ("bf16 autocast + torch.compile", True)):
        torch.manual_seed(0)
        model = transformers.DistilBertForSequenceClassification(config).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=device == "cuda")
        runnable = torch.compile(model) if compiled else model
        speed = samples_per_second(runnable, optimizer, ids, mask, labels, args.steps, autocast=True)
        results["samples_per_second"][name] = round(speed, 1)
        print(f"transformers PyTorch {name:<31} {speed:9.1f} samples/s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
