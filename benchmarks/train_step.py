"""Training-step benchmark on one GPU: forward + backward + fused AdamW of a Llama-shaped model,
for transformers' LlamaForCausalLM (sdpa) and crosschip's reference, torch, torch + compile,
te bf16 and te FP8 backends, and the crosschip-liger plugin (Liger's kernels for RMSNorm, SwiGLU,
RoPE and the loss, torch for the rest; eager and compiled), all given identical weights.

    python benchmarks/train_step.py --shape 1b --seq 2048 4096 --out benchmarks/results/train_step_1b.json
    python benchmarks/train_step.py --shape 8b --seq 4096 --variants transformers te-bf16 te-fp8 \\
        --activation-checkpointing full --out benchmarks/results/train_step_8b.json

Each (variant, seq) runs in its own process so peak memory and compile caches do not mix. The
result JSON keeps the command, versions, device and every number; plot it with plot_train_step.py.
MFU follows torchtitan: 6 x the parameters that take part in matmuls + 12 x layers x hidden x seq
FLOPs per token, over the H100/H200's 989 TFLOP/s dense bf16 peak and over a bf16 matmul rate
measured in the same run. The LM head counts also when it is tied to the embedding (its matmul is
computed either way; only the embedding lookup is free). FP8 runs are stated against the same bf16
peak (``mfu_basis`` in the JSON says so), not against FP8's.

``--activation-checkpointing`` takes one setting for every variant and/or ``VARIANT=SETTING``
overrides, so each side runs at its own best setting that fits (recorded per run).
``--optimizer-in-backward`` steps each parameter as its gradient is ready (no model-sized gradient
memory, which may let a variant keep more activations), as ``crosschip train`` does with that flag.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

SHAPES = {
    # Llama-3.2-1B
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    # Llama-3.1-8B
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
    # a smoke-test size
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=1024, tie_word_embeddings=True, head_dim=32),
}
VARIANTS = ["transformers", "reference", "torch", "torch-compile", "torch-compile-cudagraphs", "te-bf16", "te-fp8",
            "te-bf16-cudagraph", "te-fp8-cudagraph", "liger", "liger-compile"]
#: What each compiled variant passes as from_pretrained(compile=...).
COMPILE = {"torch-compile": True, "liger-compile": True, "torch-compile-cudagraphs": {"mode": "reduce-overhead"},
           "te-bf16-cudagraph": "cuda-graph", "te-fp8-cudagraph": "cuda-graph"}
#: What the liger variants build with the crosschip-liger plugin (plugins/crosschip-liger); torch the rest.
LIGER_COMPONENTS = ("rms_norm", "gated_mlp", "rotary", "loss")
PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
TOKENS_PER_STEP = 4096


def llama_config(shape: str, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=max(seq, 8192), rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       architectures=["LlamaForCausalLM"], **SHAPES[shape])


def flops_per_token(config, seq: int) -> tuple[float, int]:
    """(training FLOPs per token, parameters in matmuls). The LM head's ``vocab x hidden`` counts
    whether or not it is tied: tying shares the weight, not the product."""
    h, i, l = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    matmul_params = l * per_layer + h + config.vocab_size * h
    return 6 * matmul_params + 12 * l * config.hidden_size * seq, matmul_params


def build(variant: str, config, seed: int, ac: str, device: str = "cuda", dtype: str = "bf16", parallel=None):
    """The model of ``variant`` with the canonical weights of ``seed``, in training mode.
    ``parallel``: a :class:`crosschip.specs.ParallelSpec` (tp, dp, sequence parallelism) for a
    launched process group; the crosschip variants then build through the same public path,
    each rank allocating only its shards (``benchmarks/train_step_multigpu.py``)."""
    import torch

    from crosschip.weights.init import canonical_tensor

    if variant == "transformers":
        from transformers import LlamaForCausalLM

        if parallel is not None or device != "cuda" or dtype != "bf16":
            raise ValueError("the transformers variant runs in bf16 on one GPU only")

        config._attn_implementation = "sdpa"
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(canonical_tensor(name, tuple(p.shape), seed, device="cuda", dtype=p.dtype))
        if ac == "selective":
            raise ValueError("transformers checkpoints whole layers only: use full or none for it")
        if ac != "none":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train()
    from crosschip.weights.init import init_weights
    from crosschip.checkpoint.loading import build_model, finalize
    from crosschip.models import model_class
    from crosschip.runtime import Runtime

    # te-* on te; liger-* on torch with Liger's components; every other variant on its name's first word.
    backend = "te" if variant.startswith("te-") else "torch" if variant.startswith("liger") else variant.split("-")[0]
    # strict: a liger component declined or unavailable is an error, not a silent reference fallback.
    components = {c: "liger" for c in LIGER_COMPONENTS} if variant.startswith("liger") else None
    runtime = Runtime(backend, components=components, device=device, dtype=dtype, strict=backend != "reference",
                      precision="fp8" if variant.startswith("te-fp8") else "auto", fp8_recipe="delayed",
                      activation_checkpointing=ac, parallel=parallel)
    model = build_model(model_class("LlamaForCausalLM"), config, runtime)
    init_weights(model, seed=seed, device=device)
    finalize(model)  # as from_pretrained and `crosschip train` do: the parallel plans' gradient hooks
    from crosschip.modeling.compilation import compile_model

    compile_model(model, COMPILE.get(variant, False))  # what from_pretrained(compile=...) and --compile do
    return model.train()


def matmul_tflops() -> float:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    times = []
    for i in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(end))
    return 2 * n**3 / (statistics.median(times) / 1e3) / 1e12


def in_own_process(cmd: list[str], identity: dict) -> dict:
    """Run one ``--worker`` command in its own process and return its RESULT line (or
    ``identity`` with status ``crashed`` and the end of its stderr)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else dict(identity, status="crashed", error=proc.stderr[-2000:])


def timed_steps(step_model, optimizer, ids, warmup: int, steps: int, result: dict, device: str = "cuda",
                **forward):
    """``warmup`` untimed training steps (their time in ``result["warmup_s"]``), then ``steps``
    timed ones from a reset memory peak: ``(seconds per step, losses)``. ``forward``: extra
    arguments of the model's forward. On CUDA each step is timed by events around it; on the
    CPU (smoke tests) by the host clock, the step being synchronous there."""
    import torch

    cuda = device == "cuda"

    def step():
        loss = step_model(input_ids=ids, labels=ids, **forward).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    result["warmup_s"] = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        if not cuda:
            t0 = time.perf_counter()
            losses.append(step().item())
            times.append(time.perf_counter() - t0)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        losses.append(loss.item())
    return times, losses


def worker(args) -> dict:
    import torch

    config = llama_config(args.shape, args.seq)
    batch = max(1, TOKENS_PER_STEP // args.seq)
    result = dict(variant=args.variant, shape=args.shape, seq=args.seq, batch=batch,
                  activation_checkpointing=args.activation_checkpointing,
                  optimizer_in_backward=args.optimizer_in_backward)
    try:
        model = build(args.variant, config, args.seed, args.activation_checkpointing)
        step_model = model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        if args.optimizer_in_backward:  # what `crosschip train --optimizer-in-backward` does
            from crosschip.training.in_backward import step_in_backward

            step_in_backward(optimizer)
        gen = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (batch, args.seq), device="cuda", generator=gen)

        # The crosschip variants ask for no logits, as `crosschip train` does: a loss component
        # may then fuse the LM head in (liger's, given logits, can only compute the cross-entropy).
        forward = {} if args.variant == "transformers" else dict(return_logits=False)
        times, losses = timed_steps(step_model, optimizer, ids, args.warmup, args.steps, result, **forward)
        median = statistics.median(times)
        per_token, matmul_params = flops_per_token(config, args.seq)
        tokens = batch * args.seq
        achieved = per_token * tokens / median / 1e12
        rate = matmul_tflops()
        result.update(
            status="ok", step_s_median=median, step_s_all=times, tokens_per_s=tokens / median,
            tflops=achieved, mfu_vs_peak=achieved / PEAK_TFLOPS, matmul_tflops=rate,
            mfu_vs_matmul=achieved / rate, peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
            mfu_basis="bf16 dense peak" + (" (an FP8 run, stated against bf16)" if args.variant.startswith("te-fp8") else ""),
            matmul_params=matmul_params, losses=losses)
        if args.variant != "transformers":
            result["backends"] = backends_used(model)
    except Exception as exc:  # noqa: BLE001 - recorded (failure), the other variants still run
        result.update(failure(exc))
    return result


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "transformer_engine", "crosschip"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001 - informational only
        pass
    return out


def failure(exc: BaseException) -> dict:
    """How a variant that raised is recorded (status and the error's first words), so one failing
    variant does not hide the others."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return dict(status="oom", error=str(exc).splitlines()[0])
    return dict(status="error", error=f"{type(exc).__name__}: {exc}"[:2000])


def backends_used(model) -> dict[str, list[str]]:
    """Which backend built each component kind (from the runtime's decision report)."""
    return {k: sorted(v["backend"] for v in entries) for k, entries in model.runtime.report.summary().items()}


def write_report(path: str | None, report: dict) -> None:
    """Write the results JSON (after every run, so a cut-off session keeps what finished)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(report, fh, indent=2)


def _relative_to_transformers(runs: list[dict]) -> None:
    for seq in {r["seq"] for r in runs}:
        base = next((r for r in runs if r["seq"] == seq and r["variant"] == "transformers" and r["status"] == "ok"), None)
        if base:
            for r in runs:
                if r["seq"] == seq and r["status"] == "ok":
                    r["speedup_vs_transformers"] = r["tokens_per_s"] / base["tokens_per_s"]
                    r["memory_vs_transformers"] = r["peak_memory_gib"] / base["peak_memory_gib"]


def checkpointing_per_variant(parser, given: list[str], settings) -> dict[str, str]:
    """``--activation-checkpointing`` as ``{variant: setting}``: a bare setting applies to every
    variant, ``VARIANT=SETTING`` to one (later entries win)."""
    chosen = dict.fromkeys(VARIANTS, "none")
    for entry in given:
        variant, _, setting = entry.rpartition("=")
        if setting not in settings or (variant and variant not in VARIANTS):
            parser.error(f"--activation-checkpointing {entry!r}: expected SETTING or VARIANT=SETTING with SETTING "
                         f"one of {', '.join(settings)} and VARIANT one of {', '.join(VARIANTS)}")
        for name in [variant] if variant else VARIANTS:
            chosen[name] = setting
    return chosen


def main(argv=None) -> int:
    from crosschip.specs import CHECKPOINTING

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--activation-checkpointing", nargs="+", default=["none"], metavar="[VARIANT=]SETTING",
                        help=f"{', '.join(CHECKPOINTING)}: one for every variant, and/or VARIANT=SETTING for one")
    parser.add_argument("--optimizer-in-backward", nargs="*", choices=VARIANTS, default=None, metavar="VARIANT",
                        help="step each parameter in the backward pass, freeing its gradient (crosschip.training."
                             "in_backward), for these variants; bare: for every crosschip variant")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    checkpointing = checkpointing_per_variant(parser, args.activation_checkpointing, CHECKPOINTING)
    in_backward = set(VARIANTS[1:] if args.optimizer_in_backward == [] else args.optimizer_in_backward or ())
    if args.worker:
        args.optimizer_in_backward = args.variant in in_backward
        args.seq = args.seq[0]
        args.activation_checkpointing = checkpointing[args.variant]
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    runs = []
    report = {"command": "python " + " ".join(sys.argv),
              "versions": versions(), "shape": args.shape, "config": SHAPES[args.shape],
              "tokens_per_step": TOKENS_PER_STEP, "peak_tflops": PEAK_TFLOPS,
              "activation_checkpointing": {v: checkpointing[v] for v in args.variants},
              "optimizer_in_backward": sorted(in_backward & set(args.variants)), "runs": runs}
    for seq in args.seq:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--shape", args.shape,
                   "--seq", str(seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--seed", str(args.seed), "--activation-checkpointing", checkpointing[variant]]
            if variant in in_backward:
                cmd += ["--optimizer-in-backward", variant]
            run = in_own_process(cmd, dict(variant=variant, seq=seq))
            runs.append(run)
            if run.get("status") == "ok":
                print(f"{args.shape} seq {seq:5d} {variant:14s} {run['tokens_per_s']:10,.0f} tok/s  "
                      f"MFU {run['mfu_vs_peak']:.1%} of 989 / {run['mfu_vs_matmul']:.1%} of measured "
                      f"{run['matmul_tflops']:.0f} TFLOP/s  peak {run['peak_memory_gib']:.1f} GiB", flush=True)
            else:
                print(f"{args.shape} seq {seq:5d} {variant:14s} {run['status']}: {run.get('error', '')[:300]}",
                      flush=True)
            _relative_to_transformers(runs)
            write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
