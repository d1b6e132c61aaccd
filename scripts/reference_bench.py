#!/usr/bin/env python3
"""Training-step throughput of the PyTorch reference (github.com/digitaldaimyo/ASA).

`asa bench --reference PATH` runs this script (embedded in the binary, fed on stdin) right after
timing its own step, with the same config, batch, sequence length, device and thread count, and
prints the ratio. It can also be run by hand:

    python3 scripts/reference_bench.py --ref /path/to/ASA --config cfg.json \
        --batch 4 --seq-len 256 --device cpu --dtype f32 --threads 2 --warmup 1 --iters 3

One step is what a reference training run does: forward in train mode, cross-entropy on the
shifted targets, backward, clip_grad_norm_(1.0), AdamW(lr 3e-4, betas (0.9, 0.95), weight decay
0.01). The ids are uniform random (one fixed batch, generated before timing). `--dtype bf16`
runs the forward and loss under torch.autocast(bfloat16) (CUDA only). Each step is timed by wall
clock after a device synchronisation.

Output: exactly one JSON line on stdout,
    {"tokens_per_sec": ..., "step_seconds": [...], "torch_version": "...", "device": "..."}
with tokens_per_sec = batch * seq_len / median(step_seconds). Any failure is one line
"reference_bench: error: ..." on stderr and exit code 2.
"""

import argparse
import json
import os
import sys
import time
import types


def fail(msg):
    sys.stderr.write(f"reference_bench: error: {msg}\n")
    sys.exit(2)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", required=True, help="checkout of digitaldaimyo/ASA (holds src/asa)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config-json", help="model config as a JSON object (ASMTrainConfig names)")
    g.add_argument("--config", help="file holding that JSON object (or {\"model\": {...}})")
    p.add_argument("--variant", default=None, help="baseline | online | intervene (default: "
                   "the config's 'variant', else baseline)")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--progress", action="store_true",
                   help="one line per step on stderr (asa bench --seq-lens relays them)")
    return p.parse_args(argv)


def import_reference(ref):
    """Imports asa.config and asa.asm_lm from REF/src/asa.

    The package's __init__ also imports its Hugging Face loader (huggingface_hub), which a
    benchmark does not need; so the package is registered as a bare module whose __path__ is the
    checkout's folder, and only the two submodules are imported from it.
    """
    pkg_dir = os.path.join(os.path.abspath(ref), "src", "asa")
    for f in ("config.py", "asm_lm.py", "asa.py", "asm_block.py"):
        if not os.path.isfile(os.path.join(pkg_dir, f)):
            fail(f"{ref} is not a checkout of digitaldaimyo/ASA (no src/asa/{f})")
    old = sys.modules.get("asa")
    if old is None or os.path.abspath(os.path.dirname(getattr(old, "__file__", "") or "")) != pkg_dir:
        for name in [m for m in sys.modules if m == "asa" or m.startswith("asa.")]:
            del sys.modules[name]
        pkg = types.ModuleType("asa")
        pkg.__path__ = [pkg_dir]
        pkg.__file__ = os.path.join(pkg_dir, "__init__.py")
        sys.modules["asa"] = pkg
    try:
        from asa.config import ASMTrainConfig
        from asa.asm_lm import build_model_from_cfg
    except Exception as e:  # noqa: BLE001 - reported as one line
        fail(f"cannot import the reference from {pkg_dir}: {type(e).__name__}: {e}")
    return ASMTrainConfig, build_model_from_cfg


def load_config(args):
    if args.config_json is not None:
        text, where = args.config_json, "--config-json"
    elif args.config is not None:
        try:
            with open(args.config) as f:
                text = f.read()
        except OSError as e:
            fail(f"cannot read config {args.config}: {e}")
        where = args.config
    else:
        text, where = "{}", "defaults"
    try:
        obj = json.loads(text)
    except ValueError as e:
        fail(f"{where} is not valid JSON: {e}")
    if not isinstance(obj, dict):
        fail(f"{where} must be a JSON object")
    variant = obj.get("variant")
    if isinstance(obj.get("model"), dict):
        obj = obj["model"]
        variant = obj.get("variant", variant)
    return obj, variant


def main(argv):
    args = parse_args(argv)
    if args.batch <= 0 or args.seq_len <= 0 or args.iters <= 0 or args.warmup < 0:
        fail("--batch, --seq-len and --iters must be positive, --warmup non-negative")
    try:
        import torch
        import torch.nn.functional as F
    except Exception as e:  # noqa: BLE001
        fail(f"PyTorch is not available to {sys.executable} ({type(e).__name__}: {e})")

    ASMTrainConfig, build_model_from_cfg = import_reference(args.ref)
    raw, cfg_variant = load_config(args)
    variant = args.variant or cfg_variant or "baseline"

    import dataclasses

    known = {f.name for f in dataclasses.fields(ASMTrainConfig)}
    # keys of ours the reference config does not have (mlp_bias, variant, ...) are dropped; the
    # reference library's MLP always has biases
    cfg = ASMTrainConfig(**{k: v for k, v in raw.items() if k in known})
    if args.seq_len > cfg.max_seq_len:
        cfg.max_seq_len = args.seq_len

    if args.device == "cuda" and not torch.cuda.is_available():
        fail(f"--device cuda, but torch {torch.__version__} sees no CUDA device")
    if args.dtype == "bf16" and args.device != "cuda":
        fail("--dtype bf16 is only supported with --device cuda")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    try:
        model = build_model_from_cfg(cfg, variant=variant).to(device)
    except Exception as e:  # noqa: BLE001
        fail(f"cannot build the reference model: {type(e).__name__}: {e}")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01)

    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=gen)
    ids = ids.to(device)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                            enabled=args.dtype == "bf16"):
            logits = model(x)
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    def progress(what, i, n, dt):
        if args.progress:
            sys.stderr.write(f"reference_bench: {variant} {what} {i}/{n}  {dt:.3f}s\n")
            sys.stderr.flush()

    try:
        for i in range(args.warmup):
            t0 = time.perf_counter()
            step()
            sync()
            progress("warmup", i + 1, args.warmup, time.perf_counter() - t0)
        times = []
        for i in range(args.iters):
            t0 = time.perf_counter()
            loss = step()
            sync()
            times.append(time.perf_counter() - t0)
            progress("step", i + 1, args.iters, times[-1])
        last_loss = float(loss.item())
    except torch.cuda.OutOfMemoryError as e:
        fail(f"out of GPU memory: {e}".splitlines()[0])
    except RuntimeError as e:
        fail(f"reference step failed: {e}".splitlines()[0])
    except MemoryError:
        fail("out of memory (MemoryError)")

    med = sorted(times)[len(times) // 2] if len(times) % 2 else \
        0.5 * (sorted(times)[len(times) // 2 - 1] + sorted(times)[len(times) // 2])
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"cpu ({torch.get_num_threads()} threads)"
    out = {
        "tokens_per_sec": args.batch * args.seq_len / med,
        "step_seconds": times,
        "torch_version": torch.__version__,
        "device": dev_name,
        "dtype": args.dtype,
        "variant": variant,
        "loss": last_loss,
    }
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
