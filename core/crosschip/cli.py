"""The ``crosschip`` command line."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from crosschip.errors import ConfigurationError, CrosschipError
from crosschip.specs import CHECKPOINTING, FP8_RECIPES, PRECISIONS
from crosschip.training.train_args import COMPILE_MODES


def _backends_data(registry, backend=None) -> dict:
    from crosschip.plugins.registry import REFERENCE
    from crosschip.runtime import Runtime

    # Resolve first: validating the runtime may mark a plugin failed, which the rows then show.
    runtime = Runtime(backend, registry=registry, strict=False)
    resolved = {}
    for component in registry.component_names():
        _, chosen, chain, declines = runtime.select(component)
        resolved[component] = {"backend": chosen, "source": chain.source, "chain": list(chain.backends),
                               "passed_over": [{"backend": b, "reason": r} for b, r in declines]}
    plugins = []
    for record in sorted(registry.plugins.values(), key=lambda p: (p.name != REFERENCE, p.name)):
        names = record.backends or [record.name]
        for name in names:
            backend_record = registry.backends.get(name)
            entry = {
                "name": name,
                "plugin": record.value,
                "source": record.source,
                "distribution": record.distribution,
                "version": record.version,
                "status": record.status,
                "reason": record.reason,
                "priority": None,
                "device_types": [],
                "available": False,
                "components": [],
            }
            if backend_record is not None:
                probe = backend_record.probe()
                d = backend_record.descriptor
                entry.update(priority=d.priority, device_types=list(d.device_types),
                             available=probe.available, components=registry.components_of(name),
                             fallbacks=list(d.fallbacks), declined_kinds=dict(d.declined_kinds))
                if record.usable:
                    entry["status"] = "available" if probe.available else "unavailable"
                    entry["reason"] = probe.reason
            plugins.append(entry)

    environment = {}
    for name in registry.backend_names():
        try:
            facts = registry.call_on([name], "crosschip_environment_info")
        except Exception as exc:  # diagnostics must not break the listing
            facts = [{"error": f"{type(exc).__name__}: {exc}"}]
        environment[name] = {k: v for d in facts if d for k, v in d.items()}
    return {"device": str(runtime.device), "backends": plugins, "resolved": resolved,
            "environment": environment}


def _print_backends(data: dict, out) -> None:
    rows = [("backend", "status", "priority", "distribution", "version", "components")]
    for b in data["backends"]:
        rows.append((b["name"], b["status"], "-" if b["priority"] is None else str(b["priority"]),
                     b["distribution"], b["version"], ",".join(b["components"]) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
    reasons = [b for b in data["backends"] if b["reason"]]
    if reasons:
        out.write("\nstatus reasons:\n")
        for b in reasons:
            out.write(f"  {b['name']}: {b['reason']}\n")
    declined = [(b["name"], kind, why) for b in data["backends"] for kind, why in b.get("declined_kinds", {}).items()]
    if declined:
        out.write("\nkinds a backend declines:\n")
        for name, kind, why in declined:
            out.write(f"  {name} {kind}: {why}\n")
    out.write(f"\nresolved components (device {data['device']}):\n")
    width = max(len(c) for c in data["resolved"])
    for component, r in data["resolved"].items():
        line = f"  {component.ljust(width)}  {r['backend']}  (from {r['source']}; chain {' > '.join(r['chain'])})"
        if r["passed_over"]:
            line += "; passed over: " + "; ".join(f"{p['backend']}: {p['reason']}" for p in r["passed_over"])
        out.write(line + "\n")


def cmd_backends(args) -> int:
    from crosschip.plugins.registry import get_registry, strict_from_env

    registry = get_registry()
    data = _backends_data(registry, args.backend)
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_backends(data, sys.stdout)
    if strict_from_env(None) and registry.problems():
        registry.raise_for_problems()
    return 0


def cmd_train(args) -> int:
    import torch.distributed as dist

    from crosschip.parallel.distributed import shutdown
    from crosschip.training.train import TrainArgs, train

    fields = {k: getattr(args, k) for k in TrainArgs.__dataclass_fields__ if hasattr(args, k)}
    result = train(TrainArgs(**fields), progress=not args.quiet)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    device = result.model.runtime.device
    result.model = None  # the model holds the mesh; the group is torn down below, in order
    shutdown()
    if rank != 0:
        return 0
    first, last = result.losses[0], sum(result.losses[-10:]) / len(result.losses[-10:])
    print(f"loss {first:.3f} -> {last:.3f} (mean of the last {min(10, len(result.losses))} steps), "
          f"{result.tokens_per_second:,.0f} tokens/s on {device}")
    if not args.save:
        print(f"no checkpoint written (--no-save); step metrics: {result.out / 'metrics.jsonl'}")
        return 0
    if result.lora_base is not None:
        base = result.lora_base
        print(f"saved a PEFT adapter (adapter_config.json, adapter_model.safetensors) for {base} to {result.out}")
        print(f"step metrics: {result.out / 'metrics.jsonl'}")
        print("load it with:")
        print(f"  python -c \"import crosschip; m = crosschip.from_pretrained('{base}', adapter='{result.out}')\"")
        print(f"  crosschip generate --model {base} --adapter {result.out} --prompt 'The engineer'")
        print(f"  peft: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{base}'), '{result.out}')")
        return 0
    print(f"saved a Hugging Face checkpoint to {result.out}")
    print(f"step metrics: {result.out / 'metrics.jsonl'}")
    print("load it with:")
    print(f"  python -c \"import crosschip; m = crosschip.from_pretrained('{result.out}')\"")
    print(f"  crosschip generate --model {result.out} --prompt 'The engineer'")
    print(f"  transformers: AutoModelForCausalLM.from_pretrained('{result.out}')")
    return 0


def _add_data_arguments(train) -> None:
    """``--data`` and what shapes it into examples (see crosschip.training.data)."""
    train.add_argument("--data", default=None, metavar="PATH_OR_ID",
                       help="a dataset to fine-tune on: a local .jsonl, .json, .parquet, .txt or .arrow file, a "
                            "save_to_disk directory, or a Hub dataset id (online); rows of text or chat messages")
    train.add_argument("--text-field", default="text", help="the field holding plain text (default: text)")
    train.add_argument("--messages-field", default="messages",
                       help="the field holding chat messages, a list of {role, content}, rendered with the model's "
                            "chat template (default: messages)")
    train.add_argument("--train-on", default="assistant", choices=("assistant", "all"),
                       help="chat data: the loss on assistant tokens only (default), or on every token")
    train.add_argument("--long-documents", default="truncate", choices=("truncate", "split"),
                       help="a document longer than --seq-len is truncated (default) or split into pieces")
    train.add_argument("--packing", action="store_true",
                       help="pack several documents into each --seq-len row, attention and positions kept "
                            "within each document (instead of padding every document to a row)")
    train.add_argument("--eval-data", default=None, metavar="PATH", help="the validation split, a file as --data")
    train.add_argument("--eval-fraction", type=float, default=0.0, metavar="F",
                       help="hold out this fraction of --data's rows as the validation split (chosen by --seed)")
    train.add_argument("--eval-every", type=int, default=None, metavar="N",
                       help="validation loss and perplexity every N steps (and always at the end)")


def _add_schedule_arguments(train) -> None:
    """The optimizer's schedule and update, and the saves along the way."""
    train.add_argument("--warmup", type=int, default=None, metavar="N",
                       help="warm-up steps (default: min(100, steps / 10), at least one)")
    train.add_argument("--lr-schedule", default="cosine", choices=("cosine", "linear", "constant"),
                       help="after the warm-up: cosine (default) or linear decay to --lr / 10, or constant")
    train.add_argument("--grad-accumulation", type=int, default=1, metavar="N",
                       help="micro-batches of --batch-size per optimizer step (the step's batch is N * batch size)")
    train.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: 0.01)")
    train.add_argument("--max-grad-norm", type=float, default=1.0,
                       help="clip the gradient norm to this (default: 1.0; 0 disables clipping)")
    train.add_argument("--save-every", type=int, default=None, metavar="N",
                       help="also save OUT/checkpoint-STEP every N steps, each a complete resumable checkpoint")
    train.add_argument("--keep-last", type=int, default=None, metavar="K",
                       help="with --save-every: keep only the K newest of this run's checkpoint-STEP saves")


def cmd_generate(args) -> int:
    import torch

    from crosschip.checkpoint import hub
    from crosschip.checkpoint.loading import from_pretrained
    from crosschip.training.tokenizer import chat_prompt, check_vocab_fits, load_tokenizer

    _check_generate_args(args)  # before loading: a typo should not cost a model load
    if args.seed is not None:
        torch.manual_seed(args.seed)
    # Weights and tokenizer from one directory: the local one, or the id's cached snapshot.
    directory = hub.resolve(args.model, args.revision, option="--model") or args.model
    model = from_pretrained(directory, backend=args.backend, device=args.device, adapter=args.adapter)
    tokenizer = load_tokenizer(directory)
    check_vocab_fits(tokenizer, model.opts.vocab_size, where=args.model)
    if not args.prompt:
        raise ConfigurationError("--prompt is empty")
    prompt = chat_prompt(tokenizer, args.prompt, args.model) if args.chat else tokenizer.encode(args.prompt)
    ids = torch.tensor([prompt], device=model.runtime.device)
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                         eos_token_id=tokenizer.eos_token_id, cache=args.cache, compile=args.compile)
    answer = tokenizer.decode(out[0, len(prompt):].tolist())
    print(answer if args.chat else args.prompt + answer)
    return 0


def _check_generate_args(args) -> None:
    from crosschip.runtime import parse_device

    if args.max_new_tokens < 0:
        raise ConfigurationError(f"--max-new-tokens must be >= 0, found {args.max_new_tokens}")
    if args.compile and args.cache == "dynamic":
        raise ConfigurationError("--compile needs --cache static (found --cache dynamic): the dynamic cache grows "
                                 "every token, so every token would compile anew")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigurationError(f"--temperature must be >= 0 (0 decodes greedily), found {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigurationError(f"--top-k must be >= 1, found {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigurationError(f"--top-p must be in (0, 1], found {args.top_p}")
    if args.device is not None:
        parse_device(args.device, where="--device")
    if args.adapter is not None:
        from crosschip.lora.attach import CONFIG_FILE

        if not Path(args.adapter).is_dir():
            raise ConfigurationError(f"--adapter {args.adapter}: not a directory (expected a PEFT adapter "
                                     f"directory: {CONFIG_FILE} and adapter_model.safetensors)")


def cmd_convert(args) -> int:
    from crosschip.checkpoint.convert import convert

    summary = convert(args.source, args.out, tp=args.tp, config=args.config, kv_layout=args.kv_layout,
                      fuse_qkv=args.fuse_qkv, progress=not args.quiet, max_shard_size=args.max_shard_size)
    print("\n".join(summary.lines()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosschip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    backends = sub.add_parser("backends", help="list discovered backends and the resolved choice per component")
    backends.add_argument("--json", action="store_true", help="machine-readable output")
    backends.add_argument("--backend", default=None, help="resolve as if this backend (or chain) were requested")
    backends.set_defaults(func=cmd_backends)

    train = sub.add_parser("train", help="train a model (by default a tiny Llama on the built-in corpus)")
    train.add_argument("--model", default="tiny-llama", help="a Hugging Face model directory, a Hub model id "
                       "(org/name, from the local Hugging Face cache, downloaded when online), or a preset "
                       "name (tiny-llama, small-llama)")
    train.add_argument("--revision", default=None, help="with a Hub model id: the branch, tag or commit "
                       "(default main)")
    train.add_argument("--backend", default=None, help="backend or chain (default: auto)")
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--out", default="crosschip-out", help="where to save the checkpoint (a directory; "
                       "what else it holds is kept)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace a checkpoint in --out that this run did not start from (--resume/--model)")
    train.add_argument("--resume", default=None, help="a checkpoint saved by crosschip train to continue from")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default=None)
    train.add_argument("--dtype", default="float32")
    train.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="fp8: FP8 matmuls on a backend that implements them (te); an error elsewhere")
    train.add_argument("--fp8-recipe", default="delayed", choices=FP8_RECIPES)
    train.add_argument("--activation-checkpointing", default="none", choices=CHECKPOINTING)
    train.add_argument("--tp", type=int, default=1,
                       help="tensor parallel degree; launch with torchrun --nproc_per_node TP*DP")
    train.add_argument("--dp", type=int, default=1,
                       help="data parallel degree (FSDP2: parameters, gradients and optimizer state "
                            "sharded; each rank takes batch-size/DP sequences)")
    train.add_argument("--ep", type=int, default=1,
                       help="expert parallel degree, dividing --dp: each data-parallel rank holds 1/EP of every "
                            "mixture-of-experts layer's experts, tokens travel to them by all-to-all")
    train.add_argument("--sequence-parallel", action="store_true",
                       help="with --tp: shard norms and residuals along the sequence")
    train.add_argument("--compile", nargs="?", const=True, default=False, choices=COMPILE_MODES, metavar="MODE",
                       help="torch.compile each decoder block and the loss (forward and backward): faster steps "
                            "after a first, compiling one; MODE is torch.compile's (reduce-overhead also replays "
                            "CUDA graphs), or cuda-graph: each layer's forward and backward recorded as CUDA graphs "
                            "without torch.compile (te, one GPU, --activation-checkpointing none); not run-defining "
                            "(a resume may add or drop it)")
    train.add_argument("--optimizer-in-backward", action="store_true",
                       help="step each parameter as soon as its gradient is ready and free the gradient: "
                            "no model-sized gradient memory; needs --max-grad-norm 0 and --grad-accumulation 1; "
                            "not run-defining")
    train.add_argument("--text", default=None, help="a UTF-8 text file to train on instead of the built-in corpus")
    _add_data_arguments(train)
    _add_schedule_arguments(train)
    train.add_argument("--stop-after", type=int, default=None,
                       help="stop and save after this many steps of this run; continue with --resume")
    train.add_argument("--no-save", dest="save", action="store_false",
                       help="write no checkpoint at the end: the run's result is OUT/metrics.jsonl (sweeps, "
                            "benchmarks)")
    train.add_argument("--log-every", type=int, default=10, metavar="N",
                       help="read the loss back from the device every N steps (one host sync): progress "
                            "bar and the NaN/inf divergence check")
    train.add_argument("--override", action="append", default=None, metavar="NAME=VALUE",
                       help="with --resume: a run-defining setting (lr, seed, batch_size, seq_len, warmup, "
                            "dtype, precision, fp8_recipe, text) that intentionally differs from the saved "
                            "run; repeatable or comma-separated")
    train.add_argument("--log", default=None, metavar="SINKS",
                       help="also send the step metrics (always in OUT/metrics.jsonl) to tensorboard "
                            "(OUT/tensorboard) and/or wandb, comma-separated; each must be installed")
    train.add_argument("--lora", default=None, metavar="SPEC",
                       help="train a LoRA adapter on the frozen --model and save it (PEFT's format) instead of "
                            "the base weights: r=N,alpha=X[,dropout=P][,dora][,rslora][,targets=q_proj+v_proj] "
                            "(default targets: every projection but lm_head)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    gen = sub.add_parser("generate", help="sample from a saved model")
    gen.add_argument("--model", required=True, help="a Hugging Face model directory, or a Hub model id "
                     "(org/name, from the local Hugging Face cache, downloaded when online)")
    gen.add_argument("--revision", default=None, help="with a Hub model id: the branch, tag or commit")
    gen.add_argument("--adapter", default=None, metavar="DIR",
                     help="a PEFT adapter directory (from crosschip train --lora, or from PEFT) to apply on --model")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true",
                     help="the prompt is a user message: render it with the model's chat template and print the answer")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--backend", default=None)
    gen.add_argument("--device", default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--cache", choices=("dynamic", "static"), default=None,
                     help="the KV cache: dynamic (grown each token) or static (preallocated, written in place); "
                     "default static with --compile, else dynamic")
    gen.add_argument("--compile", nargs="?", const=True, default=False, choices=("cuda-graph",),
                     metavar="cuda-graph",
                     help="compile the per-token decode step over the static cache (torch.compile; CUDA graphs on "
                     "CUDA): the first generation pays the compilation; --compile cuda-graph records the eager "
                     "step as a CUDA graph instead, without torch.compile (for te, whose modules it cannot trace)")
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert", help="Hugging Face checkpoint <-> neuronx-distributed (Trainium) shards, or "
                          "shards at another tp; the source format is detected")
    conv.add_argument("source", help="a Hugging Face model directory, or an NxD checkpoint: a tag directory "
                      "(with model/), a directory of tags (the newest finished one is read), or an Optimum Neuron "
                      "model directory (with shards/)")
    conv.add_argument("--out", required=True, help="the directory to write (one atomic save; what else it holds "
                      "is kept)")
    conv.add_argument("--tp", type=int, default=None, help="write NxD shards at this tensor parallel degree (from a "
                      "Hugging Face checkpoint, or re-sharding NxD shards); without it NxD shards are consolidated")
    conv.add_argument("--config", default=None, help="the model's config.json (or its directory), where the "
                      "source has none beside it")
    conv.add_argument("--kv-layout", default=None, choices=("tile", "interleave"),
                      help="where KV heads are replicated (tp above the KV heads): tile (Optimum Neuron, NxD on "
                           "trn1; the default when sharding) or interleave (crosschip on trn2); needed to "
                           "consolidate shards that have no metadata")
    conv.add_argument("--fuse-qkv", action="store_true", help="Hugging Face -> NxD: one fused qkv_proj (Optimum "
                      "Neuron's fuse_qkv) instead of separate q/k/v")
    conv.add_argument("--max-shard-size", default="5GB", help="NxD -> Hugging Face: the largest safetensors file "
                      "to write (more are written with an index); each is assembled in memory")
    conv.add_argument("--quiet", action="store_true", help="no progress bar")
    conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CrosschipError as exc:
        sys.stderr.write(f"crosschip: error: {exc}\n")
        return 2
    except BrokenPipeError:  # `crosschip backends | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
