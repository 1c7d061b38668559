"""Training speed and memory of a large preset on one GPU or several (issue 7 item 4): the
project's torch Trainer (one process) or DistributedTrainer (FSDP2, under torchrun) takes
`--warmup` + `--steps` optimizer steps on random tokens; the timed steps give tokens/s per GPU,
the step time and MFU, and the whole run the peak memory per GPU (the max over ranks). No data
set and no checkpoint are read or written (a 7B checkpoint is ~110 GB).

    # one GPU: 7b at T=4096, batch 1, activation checkpointing, fused AdamW (the CUDA default)
    python benchmarks/train_scale.py --activation-checkpointing --json /tmp/7b_1gpu.json
    # two GPUs, FSDP2 (rank 0 prints; per-GPU numbers)
    torchrun --standalone --nproc_per_node 2 benchmarks/train_scale.py \\
        --activation-checkpointing --json /tmp/7b_2gpu.json
    # the CPU, quick: --model tiny --seq-len 128 --device cpu (also under torchrun: gloo)

Prints one progress line per step (flushed) and then a markdown table row:
model, GPUs, seq_len, batch/GPU, tokens/s/GPU, step time, MFU, peak memory per GPU.
MFU = tokens/s/GPU x retention.metrics.flops_per_token (6 N for the matmuls plus the retention
term; the recomputation of activation checkpointing is not counted) / the device's dense peak
from retention.metrics.PEAK_FLOPS at the run's precision: H200 and H100 bf16 989 TFLOP/s
(--peak-flops overrides). Peak memory: torch.cuda.max_memory_allocated and
max_memory_reserved over the whole run (model build included); on the CPU the peak RSS.
Out of memory: the phase, the memory numbers and the advice are printed, exit status 2.
PYTORCH_CUDA_ALLOC_CONF defaults to expandable_segments:True here (less fragmentation).

Memory estimate, 7b preset (N = 6.893 B parameters, 50,304-token vocabulary, untied head),
one H200 (139 GiB usable), T = 4096, batch 1, bf16 autocast, activation checkpointing:

    fp32 master weights              4 N     27.6 GB
    fp32 AdamW moments               8 N     55.1 GB
    fp32 gradients (end of backward) 4 N     27.6 GB    (None during the forward)
    = training state                        110.3 GB = 102.7 GiB
    bf16 autocast weight copies      2 N     13.4 GB    forward only (the cache empties when
                                                        autocast exits; recomputation casts one
                                                        layer at a time)
    checkpointed layer inputs  32 x 4096 x 4096 x 4 B   2.1 GB  (the residual stream is fp32:
                                                        the embedding output is not autocast)
    one layer recomputed (MLP 4 x 90 MB, q/k/v/o, ...)  ~1-2 GB
    power retention backward, one layer: none at T = 4096 (one chunk, no states); in chunks
        (T > 16,384 at d = 128) the per-chunk states and their gradients, 2 x [32 heads,
        T/256 chunks, 9216, 128] bf16, ~5 GB per 4,096 tokens
    logits fp32 1 x 4096 x 50304 + log-softmax + their gradients  ~3.3 GB (start of backward)
    AdamW: fused kernel, no temporaries (explicit loop: ~0.8 GB, the largest parameter)
    grad norm: torch._foreach_norm, no g*g temporaries

  peak (end of backward) ~ 110.3 + 2.1 + 2 + 5 ~ 120 GB ~ 112 GiB; forward peak ~ 83 + 13.4 +
  2.1 + 5 + 3.3 ~ 107 GB. Both fit in 139 GiB with ~25 GiB to spare, so no chunked
  cross-entropy or CPU offload is needed; fragmentation is what could still bite, hence
  expandable segments. Two H200s with FSDP2: 55 GB of sharded state per GPU plus one or two
  gathered layers (bf16, ~0.4 GB each; the root 0.8 GB) and their unsharded fp32 gradients
  before the reduce-scatter (~0.8-1.6 GB), plus the same activations: ~65-70 GB per GPU.

Time (estimate, H200): model build ~30-40 s (the weights are drawn on the CPU in canonical
order, ~25 s for 6.9 B normals, then copied to the GPU; under FSDP2 every rank draws them and
keeps its shard); a step ~1.5-4 s (53 GFLOP per token x 4096 tokens = 0.22 PFLOP, plus the
recomputation; the Triton retention kernels at d = 128 are the slow part); with 2 + 5 steps
about 1.5 minutes per command after the imports, under 6 minutes including pip install.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

GIB = 2**30
EXIT_OOM = 2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="7b", help="preset (tiny, small, medium, large, 7b)")
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--n-layers", type=int, default=None,
                   help="override the preset's layer count (a shorter smoke test)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=1, help="rows per GPU per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiles)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on CUDA only")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--impl", choices=["auto", "kernel", "ops"], default="auto",
                   help="power retention path (auto: Triton kernels on CUDA)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="device peak FLOP/s for MFU (default: retention.metrics.PEAK_FLOPS)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results (rank 0) to this file")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, profile one more step (torch profiler: CUDA "
                        "kernels, or operators on the CPU) and print where its time goes")
    return p.parse_args(argv)


def say(ranks, *args):
    if ranks.main:
        print(*args, flush=True)


def memory_now(torch, device) -> dict:
    """This rank's memory numbers in GiB (CUDA), or the peak RSS (CPU)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return {"allocated_gib": torch.cuda.memory_allocated(device) / GIB,
                "reserved_gib": torch.cuda.memory_reserved(device) / GIB,
                "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
                "device_free_gib": free / GIB, "device_total_gib": total / GIB}
    from retention.backends.torch.trainer import _process_peak_rss
    rss = _process_peak_rss()
    return {"peak_rss_gib": rss / GIB if rss else None}


def report_oom(torch, device, ranks, phase: str, error: BaseException, args, record) -> None:
    """Print the failure with the memory numbers, write the JSON, leave without teardown
    (the other ranks would wait in a collective; torchrun stops them when this one exits)."""
    mem = memory_now(torch, device)
    text = ", ".join(f"{k} {v:.2f}" for k, v in mem.items() if v is not None)
    lines = [f"OUT OF MEMORY on rank {ranks.rank} ({device}) during {phase}: {text}",
             f"  {str(error).splitlines()[0][:400] if str(error) else type(error).__name__}",
             "  try --activation-checkpointing, a smaller --batch-size or --seq-len, or more "
             "GPUs (torchrun --nproc_per_node N)"]
    for line in lines:
        print(line, flush=True)
        print(line, file=sys.stderr, flush=True)
    if args.json:
        path = args.json if ranks.main else f"{args.json}.rank{ranks.rank}"
        with open(path, "w") as f:
            json.dump({**record, "status": "oom", "oom_phase": phase, "oom_rank": ranks.rank,
                       "memory": mem, "error": str(error)[:2000]}, f, indent=2)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_OOM)


def profile_step(torch, trainer, batch, lr, device, ranks) -> None:
    """One more step under the torch profiler: its kernels (operators on the CPU) by kernel
    family and the top 25, classified as model_throughput.py's profile does."""
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from model_throughput import top_kernels

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        trainer.train_step(batch, lr)
        if cuda:
            torch.cuda.synchronize(device)
    if not ranks.main:
        return
    top, total, families = top_kernels(prof, cuda, n=25)
    say(ranks, f"-- profiled step: {total:.1f} ms of {'CUDA kernels' if cuda else 'operators'}; "
        + ", ".join(f"{f} {100 * ms / total:.1f}%" for f, ms in families.items()))
    for r in top:
        say(ranks, f"  {r['total_ms']:9.2f} ms  {r['share']:6.1%}  {r['calls']:5d}x  "
                   f"{r['family']:32s} {r['name'][:90]}")


def local_numel(t) -> int:
    return (t.to_local() if hasattr(t, "to_local") else t).numel()


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import numpy as np
    import torch
    from retention.config import TrainConfig, create_model_config
    from retention.distributed import init_ranks
    from retention.metrics import flops_per_token, peak_flops
    from retention.backends.torch.trainer import Trainer
    from retention.train import trainer_class

    t_start = time.perf_counter()
    ranks = init_ranks("torch", args.device)
    overrides = {"vocab_size": args.vocab_size}
    if args.n_layers:
        overrides["n_layers"] = args.n_layers
    model_config = create_model_config(args.model, **overrides)
    config = TrainConfig(model=model_config, data="synthetic", seq_len=args.seq_len,
                         batch_size=args.batch_size, grad_accum=args.grad_accum,
                         steps=args.warmup + args.steps, lr=args.lr, min_lr=0.0,
                         warmup_steps=0, schedule="constant", eval_every=0, save_every=0,
                         precision=args.precision, device=args.device, seed=args.seed,
                         peak_flops=args.peak_flops, progress=False, tensorboard=False,
                         activation_checkpointing=args.activation_checkpointing,
                         compile=args.compile, fused_adamw=args.fused_adamw)
    n_params = model_config.num_parameters()
    record = {"model": args.model, "params": n_params, "gpus": ranks.world,
              "seq_len": args.seq_len, "batch_per_gpu": args.batch_size,
              "grad_accum": args.grad_accum, "activation_checkpointing":
              args.activation_checkpointing, "compile": args.compile, "impl": args.impl,
              "torch": torch.__version__, "python": platform.python_version(),
              "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    say(ranks, f"train_scale: {args.model} ({n_params / 1e9:.2f} B parameters), "
        f"{ranks.world} rank(s), seq_len {args.seq_len}, batch {args.batch_size}/GPU x "
        f"accum {args.grad_accum}, activation checkpointing {args.activation_checkpointing}, "
        f"compile {args.compile}")

    device = torch.device("cpu")
    t0 = time.perf_counter()
    try:
        cls = trainer_class("torch", ranks)
        trainer = cls(model_config, config, ranks) if ranks.distributed \
            else cls(model_config, config)
        device = trainer.device
    except Exception as e:  # noqa: BLE001 - out of memory is reported, the rest re-raised
        if Trainer.is_out_of_memory(e):
            if config.device != "cpu" and torch.cuda.is_available():
                device = torch.device("cuda", torch.cuda.current_device())
            report_oom(torch, device, ranks, "model build", e, args, record)
        raise
    trainer.model.impl = args.impl
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    init_s = time.perf_counter() - t0
    state = sum(local_numel(p) for p in trainer.params.values()) * 4 * 3  # weights + moments
    record.update(device=trainer.device_name, precision=trainer.precision,
                  fused_adamw=trainer.fused_adamw, init_s=init_s,
                  state_gib_per_gpu=(state + state // 3) / GIB)  # + the gradients
    say(ranks, f"device: {trainer.describe()}")
    say(ranks, f"built in {init_s:.1f} s; weights + moments {state / GIB:.1f} GiB per GPU "
        f"(+ {state / 3 / GIB:.1f} GiB of gradients in the backward); memory now "
        + json.dumps({k: round(v, 2) for k, v in memory_now(torch, device).items() if v}))

    rng = np.random.default_rng(args.seed + 1000 * ranks.rank)  # each rank its own rows

    def micro_batches():
        out = []
        for _ in range(args.grad_accum):
            tokens = rng.integers(0, model_config.vocab_size,
                                  size=(args.batch_size, args.seq_len + 1))
            out.append((tokens[:, :-1], tokens[:, 1:]))
        return out

    times, losses = [], []
    total = args.warmup + args.steps
    for i in range(total):
        phase = "warmup" if i < args.warmup else "timed"
        batch = micro_batches()
        t0 = time.perf_counter()
        try:
            result = trainer.train_step(batch, args.lr)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the update kernels run after the .item()s
        except Exception as e:  # noqa: BLE001
            if trainer.is_out_of_memory(e):
                report_oom(torch, device, ranks, f"step {i + 1} ({phase})", e, args, record)
            raise
        dt = time.perf_counter() - t0
        losses.append(result["loss"])
        if phase == "timed":
            times.append(dt)
        mem = memory_now(torch, device)
        peak = mem.get("peak_allocated_gib", mem.get("peak_rss_gib"))
        say(ranks, f"step {i + 1}/{total} ({phase}): {dt:.3f} s, loss {result['loss']:.4f}, "
            f"grad norm {result['grad_norm']:.3f}, peak {peak or 0:.2f} GiB "
            f"(rank {ranks.rank})")

    if args.profile:
        profile_step(torch, trainer, micro_batches(), args.lr, device, ranks)
    # Per GPU: the slowest rank's mean step, the largest rank's memory.
    mem = memory_now(torch, device)
    if device.type == "cuda":
        peaks = [mem["peak_allocated_gib"], mem["peak_reserved_gib"]]
    else:
        peaks = [mem["peak_rss_gib"] or 0.0, 0.0]
    mean_step = statistics.fmean(times) if times else float("nan")
    if ranks.distributed:
        import torch.distributed as dist
        t = torch.tensor([mean_step, *peaks], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        mean_step, *peaks = t.tolist()
    tokens_step = args.batch_size * args.grad_accum * args.seq_len  # per GPU
    tps = tokens_step / mean_step
    flops_tok = flops_per_token(model_config, args.seq_len)
    peak = peak_flops(trainer.device_name, trainer.precision, args.peak_flops)
    mfu = tps * flops_tok / peak if peak else None
    record.update(status="ok", step_time_s=mean_step, step_times_s=times,
                  step_time_median_s=statistics.median(times) if times else None,
                  tokens_per_step_per_gpu=tokens_step, tokens_per_sec_per_gpu=tps,
                  flops_per_token=flops_tok, peak_flops=peak, mfu=mfu, losses=losses,
                  peak_allocated_gib=peaks[0] if device.type == "cuda" else None,
                  peak_reserved_gib=peaks[1] if device.type == "cuda" else None,
                  peak_rss_gib=peaks[0] if device.type != "cuda" else None,
                  wall_s=time.perf_counter() - t_start)
    if ranks.main:
        setup = ", ".join(x for x, on in (("AC", args.activation_checkpointing),
                                          ("compile", args.compile),
                                          ("fused AdamW", trainer.fused_adamw)) if on)
        if device.type == "cuda":
            memory = f"{peaks[0]:.1f} / {peaks[1]:.1f}"
            head = "peak memory/GPU GiB (allocated / reserved)"
        else:
            memory, head = f"{peaks[0]:.2f} (RSS)", "peak memory/process GiB"
        print(f"\nMFU against {peak / 1e12:.1f} TFLOP/s ({trainer.device_name}, "
              f"{trainer.precision} dense peak) and {flops_tok / 1e9:.2f} GFLOP/token"
              if peak else "\nMFU: no peak FLOP/s known for this device (--peak-flops)")
        print(f"| model | GPUs | device | seq_len | batch/GPU | setup | tokens/s/GPU | "
              f"step time s | MFU | {head} |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| {args.model} | {ranks.world} | {trainer.device_name} | {args.seq_len} | "
              f"{args.batch_size} x {args.grad_accum} | {setup or '-'} | {tps:,.0f} | "
              f"{mean_step:.3f} | {'-' if mfu is None else f'{mfu:.1%}'} | {memory} |",
              flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=2)
    if ranks.distributed:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
