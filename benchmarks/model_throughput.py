"""Model-level training throughput (issue 6 item 6): the `small` preset (~124M, power retention,
Triton kernels on CUDA) against a Hugging Face LlamaForCausalLM of the same size, in one
process on one GPU, at T in {1k, 4k, 16k, 64k} with the same tokens per step (default 65,536:
batch = tokens_per_step // T). Random tokens; each step is forward + backward + gradient
clipping + AdamW.

    python benchmarks/model_throughput.py --json /tmp/throughput.json --profile
    # quick CPU check: --preset tiny --seqs 64 --tokens-per-step 128 --steps 1 --warmup 1 \\
    #                  --device cpu

Both models train under the project trainer's precision policy: float32 master weights,
gradients and AdamW moments, the forward under bfloat16 autocast on CUDA (float32 on the
CPU); logits are upcast to float32 for the cross entropy.
- retention: the project's torch Trainer (retention.train.trainer_class), its fused AdamW and
  global-norm clipping; the power retention path is the dispatcher's (Triton on CUDA).
- llama: LlamaForCausalLM(attn_implementation="sdpa", tied head, no KV cache), SDPA restricted
  to the flash backend on CUDA (--sdpa-backend), clip_grad_norm_ (foreach) and
  torch.optim.AdamW(fused=True); same lr, betas, eps, weight decay and clip norm.
Both steps read the loss and the gradient norm back (.item()) as the Trainer does.

Timing: `--warmup` untimed steps per T (Triton compiles and autotunes there), then `--steps`
steps, each between torch.cuda.synchronize calls; tokens/s = tokens per step / mean step time.
Peak memory: torch.cuda.max_memory_allocated from the first warmup step of the row (model and
optimizer state included; the peak is reset per row); on the CPU the process's peak RSS.

MFU = tokens/s x FLOPs per token / the device's dense bf16 peak (retention.metrics.PEAK_FLOPS;
H200 989 TFLOP/s; --peak-flops overrides).
- retention: retention.metrics.flops_per_token (6 N_matmul + 3 x the retention term of the
  cheaper exact form: attention form up to T ~ 4k at d=64, chunked beyond).
- llama: 6 N_matmul + 12 L d_model T (PaLM, appendix B: the full T x T score and value
  matmuls, forward + backward; causal flash does half of that work, so the JSON also has
  `flops_per_token_causal` = 6 N + 6 L d_model T).
N_matmul counts every projection and the LM head, not the embedding lookup.

Rows run in order: retention at every T, then llama at every T. Each row prints as soon as it
is measured; an out-of-memory row prints OOM (another error prints ERROR and its traceback on
stderr) and the run goes on. --json is rewritten after every row. --profile runs
torch.profiler over 2 retention steps at --profile-seq (after the retention rows) and prints
the top 15 CUDA kernels by total time, and the time per kernel family.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback

GIB = 2**30
SEQS = (1024, 4096, 16384, 65536)
MODELS = ("retention", "llama")
# Our Triton kernels appear in a profile under their function names (kernels/triton/); the
# names are also read from the package at profile time, so renamed kernels still count.
RETENTION_KERNELS = ("_attn_fwd", "_attn_dq", "_attn_dkv", "_state_scan", "_out_fwd",
                     "_dq_bwd", "_dkv_bwd", "_row_delta", "_step")
# Kernel families for the profile summary: (family, substrings of the name), first match wins.
KERNEL_FAMILIES = (
    ("attention (flash)", ("flash", "fmha")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "wgmma", "sm90_", "sm80_",
                "aten::mm", "aten::bmm", "aten::addmm")),
    ("torch.compile (Inductor Triton)", ("triton_",)),
    ("AdamW", ("adam",)),
    ("communication (NCCL)", ("nccl",)),
    ("cross entropy / softmax", ("softmax", "nll_loss", "cross_entropy")),
    ("reductions / norms", ("reduce", "norm")),
    ("elementwise / copies", ("elementwise", "vectorized", "copy", "fill", "cat", "index",
                              "embedding", "unrolled")),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--seqs", nargs="+", type=int, default=list(SEQS))
    p.add_argument("--tokens-per-step", type=int, default=65536,
                   help="batch = tokens_per_step // T (at least 1)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row (compiles)")
    p.add_argument("--preset", "--model-size", dest="preset", default="small",
                   help="retention preset the two models take their sizes from")
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--n-layers", type=int, default=None, help="override the preset's depth")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bf16 autocast over fp32 weights on CUDA, fp32 on the CPU")
    p.add_argument("--impl", choices=["auto", "kernel", "ops"], default="auto",
                   help="power retention path (auto: Triton kernels on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each retention decoder layer (the Trainer's option)")
    p.add_argument("--compile-llama", action="store_true",
                   help="torch.compile each Llama decoder layer too (a like-for-like check)")
    p.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=True,
                   help="fused AdamW for both models (default on, the CPU too)")
    p.add_argument("--sdpa-backend", choices=["flash", "default"], default="flash",
                   help="llama on CUDA: only the flash SDPA kernel, or torch's own choice")
    p.add_argument("--peak-flops", type=float, default=None)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over 2 retention steps at --profile-seq")
    p.add_argument("--profile-seq", type=int, default=16384)
    p.add_argument("--json", help="write the results here (rewritten after every row)")
    args = p.parse_args(argv)
    if min(args.seqs) <= 0 or args.tokens_per_step <= 0 or args.steps <= 0 or args.warmup < 0:
        p.error("--seqs and --tokens-per-step must be positive, --steps >= 1, --warmup >= 0")
    return args


def say(*args) -> None:
    print(*args, flush=True)


# --- memory and FLOPs -------------------------------------------------------------------------

def reset_peak(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(torch, device) -> dict:
    """The row's peak (CUDA, reset per row) or the process's peak RSS so far (CPU), in GiB."""
    if device.type == "cuda":
        return {"peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}
    from retention.backends.torch.trainer import _process_peak_rss
    rss = _process_peak_rss()
    return {"peak_gib": rss / GIB if rss else None, "peak_reserved_gib": None}


def free_memory(torch, device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def llama_matmul_parameters(config) -> int:
    """Llama's projections (q, k, v, o, gate, up, down) per layer plus the LM head."""
    c = config
    per_layer = 2 * c.q_dim * c.d_model + 2 * c.kv_dim * c.d_model + 3 * c.mlp_hidden * c.d_model
    return c.n_layers * per_layer + c.vocab_size * c.d_model


def llama_flops_per_token(config, seq_len: int, causal: bool = False) -> float:
    """6 N + 12 L d_model T (PaLM's count: QK^T and AV over the full T x T, fwd + bwd);
    causal=True halves the attention term (the work a causal flash kernel does)."""
    attention = 12 * config.n_layers * config.q_dim * seq_len
    return 6 * llama_matmul_parameters(config) + (attention / 2 if causal else attention)


# --- the two models: each a step(inputs, targets) -> loss -------------------------------------

class RetentionRunner:
    """The project's torch Trainer, built once and reused for every T."""

    name = "retention"

    def __init__(self, args, model_config):
        from retention.config import TrainConfig
        from retention.train import trainer_class
        from retention.backends.torch.power_retention import resolve_impl
        self.args = args
        config = TrainConfig(model=model_config, data="synthetic", seq_len=max(args.seqs),
                             batch_size=1, steps=1, lr=args.lr, min_lr=0.0, warmup_steps=0,
                             schedule="constant", eval_every=0, save_every=0,
                             precision=args.precision, device=args.device, seed=args.seed,
                             progress=False, tensorboard=False, compile=args.compile,
                             fused_adamw=args.fused_adamw)
        self.trainer = trainer_class("torch")(model_config, config)
        self.trainer.model.impl = args.impl
        self.device = self.trainer.device
        self.precision = self.trainer.precision
        self.path = resolve_impl(args.impl, self.device)
        self.params = sum(p.numel() for p in self.trainer.params.values())

    def describe(self) -> str:
        return (f"{self.trainer.describe()}, power retention path: {self.path}, "
                f"compile {self.args.compile}")

    def step(self, inputs, targets) -> float:
        return self.trainer.train_step([(inputs, targets)], self.args.lr)["loss"]

    def flops_per_token(self, config, T) -> dict:
        from retention.metrics import flops_per_token
        return {"flops_per_token": flops_per_token(config, T)}

    def after_failure(self) -> None:
        for p in self.trainer.params.values():
            p.grad = None


class LlamaRunner:
    """LlamaForCausalLM of the same size, trained the way the Trainer trains."""

    name = "llama"

    def __init__(self, args, model_config, device, precision):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        c, self.args, self.device, self.precision = model_config, args, device, precision
        self.torch = torch
        lconf = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model,
                            intermediate_size=c.mlp_hidden, num_hidden_layers=c.n_layers,
                            num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                            head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
                            rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
                            max_position_embeddings=max(args.seqs), use_cache=False,
                            attn_implementation="sdpa")
        torch.manual_seed(args.seed)
        self.model = LlamaForCausalLM(lconf).to(device=device, dtype=torch.float32).train()
        if args.compile_llama:
            for layer in self.model.model.layers:
                layer.compile()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.param_list = [p for p in self.model.parameters() if p.requires_grad]
        from retention.config import TrainConfig
        t = TrainConfig()  # the Trainer's AdamW defaults
        self.clip_norm = t.clip_norm
        groups = [{"params": [p for p in self.param_list if p.ndim >= 2],
                   "weight_decay": t.weight_decay},
                  {"params": [p for p in self.param_list if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=t.betas, eps=t.eps,
                                           fused=args.fused_adamw)
        self.attn_impl = self.model.config._attn_implementation

    def describe(self) -> str:
        t = self.torch
        name = t.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        sdpa = self.args.sdpa_backend if self.device.type == "cuda" else "default"
        return (f"transformers LlamaForCausalLM, attn {self.attn_impl} ({sdpa} backend), "
                f"torch {t.__version__} on {self.device} ({name}), {self.precision}, "
                f"AdamW fused={self.args.fused_adamw}, compile {self.args.compile_llama}")

    def _sdpa_context(self):
        import contextlib
        if self.device.type != "cuda" or self.args.sdpa_backend == "default":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # an error, never a silent math path

    def step(self, inputs, targets) -> float:
        import numpy as np
        import torch.nn.functional as F
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64)).to(self.device)
        y = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64)).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with self._sdpa_context():
            if self.precision == "bfloat16":
                with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                    logits = self.model(input_ids=x).logits
            else:
                logits = self.model(input_ids=x).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.param_list, self.clip_norm or float("inf"),
                                              foreach=True)
        loss_value, _ = loss.item(), norm.item()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value

    def flops_per_token(self, config, T) -> dict:
        return {"flops_per_token": llama_flops_per_token(config, T),
                "flops_per_token_causal": llama_flops_per_token(config, T, causal=True)}

    def after_failure(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


# --- measuring one row ------------------------------------------------------------------------

def is_out_of_memory(error: BaseException) -> bool:
    from retention.backends.torch.trainer import Trainer
    return Trainer.is_out_of_memory(error)


def measure(runner, T: int, batch: int, args, rng, peak) -> dict:
    """Warmup + timed steps of `runner` at [batch, T]; the row's record."""
    import torch
    device, vocab = runner.device, args.model_config.vocab_size

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def draw():
        tokens = rng.integers(0, vocab, size=(batch, T + 1))
        return tokens[:, :-1], tokens[:, 1:]

    row = {"model": runner.name, "seq_len": T, "batch": batch, "tokens_per_step": batch * T}
    reset_peak(torch, device)
    losses, times = [], []
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        losses.append(runner.step(*draw()))
    sync()
    row["warmup_s"] = time.perf_counter() - t0
    for _ in range(args.steps):
        inputs, targets = draw()
        sync()
        t0 = time.perf_counter()
        losses.append(runner.step(inputs, targets))
        sync()
        times.append(time.perf_counter() - t0)
    mean = statistics.fmean(times)
    tps = batch * T / mean
    flops = runner.flops_per_token(args.model_config, T)
    row.update(status="ok", tokens_per_sec=tps, step_ms=mean * 1e3,
               step_ms_median=statistics.median(times) * 1e3,
               step_ms_all=[t * 1e3 for t in times], losses=losses, **flops,
               mfu=tps * flops["flops_per_token"] / peak if peak else None,
               **peak_memory(torch, device))
    return row


def run_row(runner, T: int, args, rng, peak) -> dict:
    """measure(), with out-of-memory and other errors turned into a row that says so."""
    import torch
    batch = max(1, args.tokens_per_step // T)
    failure = None
    try:
        return measure(runner, T, batch, args, rng, peak)
    except Exception as e:  # noqa: BLE001 - one failing row must not end the run
        failure = ("oom" if is_out_of_memory(e) else "error",
                   (str(e).splitlines() or [type(e).__name__])[0][:300])
        if failure[0] == "error":
            traceback.print_exc()
    # Outside the except block: the traceback (and the activations it holds) is gone.
    runner.after_failure()
    free_memory(torch, runner.device)
    row = {"model": runner.name, "seq_len": T, "batch": batch, "tokens_per_step": batch * T,
           "status": failure[0], "error": failure[1]}
    if runner.device.type == "cuda":
        row.update(peak_memory(torch, runner.device))
    return row


# --- the profile ------------------------------------------------------------------------------

def retention_kernel_names() -> set:
    """RETENTION_KERNELS plus the name of every triton.jit function in retention.kernels.triton."""
    import importlib
    import pkgutil
    names = set(RETENTION_KERNELS)
    try:
        package = importlib.import_module("retention.kernels.triton")
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for obj in vars(module).values():
                if not type(obj).__module__.startswith("triton"):
                    continue
                fn = obj
                while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> the Python function
                    fn = fn.fn
                if getattr(fn, "__name__", None):
                    names.add(fn.__name__)
    except Exception:  # noqa: BLE001 - no triton here: the fixed list stands
        pass
    return names


def kernel_family(name: str, retention_names=RETENTION_KERNELS) -> str:
    if name.split("(")[0].strip() in retention_names:
        return "power retention (Triton)"
    low = name.lower()
    for family, keys in KERNEL_FAMILIES:
        if any(k in low for k in keys):
            return family
    return "other"


def top_kernels(prof, cuda: bool, n: int = 15) -> tuple[list[dict], float, dict]:
    """(the n events with the most total time, the total over all events, the total by kernel
    family, largest first) in ms: CUDA kernels (device-side events) on a GPU, operators by
    self CPU time on the CPU."""
    from torch.autograd import DeviceType
    averages = prof.key_averages()
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
    # No device-side events listed (an older profiler): operators by their self device time.
    chosen = (kernels or list(averages)) if cuda else list(averages)
    events = []
    for e in chosen:
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            events.append({"name": e.key, "calls": e.count, "total_ms": us / 1e3})
    events.sort(key=lambda r: r["total_ms"], reverse=True)
    total = sum(r["total_ms"] for r in events)
    retention_names = retention_kernel_names()
    for r in events:
        r["share"] = r["total_ms"] / total if total else 0.0
        r["family"] = kernel_family(r["name"], retention_names)
    families: dict[str, float] = {}
    for r in events:
        families[r["family"]] = families.get(r["family"], 0.0) + r["total_ms"]
    return events[:n], total, dict(sorted(families.items(), key=lambda kv: -kv[1]))


def profile_retention(runner, args, rng) -> dict:
    """One untimed step, then torch.profiler over 2 steps at --profile-seq."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    T = args.profile_seq
    batch = max(1, args.tokens_per_step // T)
    cuda = runner.device.type == "cuda"

    def draw():
        tokens = rng.integers(0, args.model_config.vocab_size, size=(batch, T + 1))
        return tokens[:, :-1], tokens[:, 1:]

    def sync():
        if cuda:
            torch.cuda.synchronize(runner.device)

    runner.step(*draw())
    batches = [draw(), draw()]
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for inputs, targets in batches:
            runner.step(inputs, targets)
        sync()
        wall_ms = (time.perf_counter() - t0) * 1e3
    top, total_ms, families = top_kernels(prof, cuda)
    what = "CUDA kernels" if cuda else "CPU operators (self time)"
    say(f"\nProfile: retention, T={T}, batch {batch}, 2 steps, wall {wall_ms:.1f} ms, "
        f"{what} {total_ms:.1f} ms in all"
        + (f" (GPU busy {total_ms / wall_ms:.0%} of the wall time)" if cuda else ""))
    say(f"| # | {'kernel' if cuda else 'operator'} | family | calls | total ms | share | "
        f"mean us |")
    say("| --- | --- | --- | --- | --- | --- | --- |")
    for i, r in enumerate(top, 1):
        name = r["name"] if len(r["name"]) <= 90 else r["name"][:87] + "..."
        say(f"| {i} | {name.replace('|', '/')} | {r['family']} | {r['calls']} | "
            f"{r['total_ms']:.2f} | {r['share']:.1%} | {r['total_ms'] * 1e3 / r['calls']:.1f} |")
    say("\n| family | total ms | share |")
    say("| --- | --- | --- |")
    for family, ms in families.items():
        say(f"| {family} | {ms:.2f} | {ms / total_ms if total_ms else 0:.1%} |")
    return {"seq_len": T, "batch": batch, "steps": 2, "wall_ms": wall_ms,
            "kind": "cuda_kernels" if cuda else "cpu_operators", "total_ms": total_ms,
            "top": top, "families": families}


# --- output -----------------------------------------------------------------------------------

HEADER = ("| model | T | batch | tokens/s | step ms | MFU | peak GiB |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")


def table_row(r: dict) -> str:
    head = f"| {r['model']} | {r['seq_len']} | {r['batch']} |"
    if r["status"] != "ok":
        word = "OOM" if r["status"] == "oom" else "ERROR"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        return f"{head} {word} | {word} | - | {peak} |"
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
    return f"{head} {r['tokens_per_sec']:,.0f} | {r['step_ms']:.1f} | {mfu} | {peak} |"


def write_json(path, record) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, path)


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in ("torch", "triton", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import numpy as np
    import torch
    from retention.config import create_model_config
    from retention.metrics import peak_flops
    from retention.backends.torch.trainer import resolve_device, resolve_precision

    overrides = {"vocab_size": args.vocab_size}
    if args.n_layers:
        overrides["n_layers"] = args.n_layers
    args.model_config = config = create_model_config(args.preset, **overrides)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" \
        else f"cpu ({torch.get_num_threads()} threads)"
    peak = peak_flops(device_name, precision, args.peak_flops)
    record = {"preset": args.preset, "model_config": config.to_dict(), "device": device_name,
              "precision": precision, "precision_policy": "float32 master weights, bf16 "
              "autocast forward" if precision == "bfloat16" else precision,
              "peak_flops": peak, "tokens_per_step": args.tokens_per_step,
              "warmup": args.warmup, "steps": args.steps, "impl": args.impl,
              "compile": args.compile, "compile_llama": args.compile_llama,
              "fused_adamw": args.fused_adamw, "sdpa_backend": args.sdpa_backend,
              "versions": versions(), "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
              "models": {}, "rows": []}
    say(f"model_throughput: preset {args.preset} (d_model {config.d_model}, {config.n_layers} "
        f"layers, {config.n_heads} heads, mlp {config.mlp_hidden}, vocab {config.vocab_size}), "
        f"{args.tokens_per_step:,} tokens/step, T {args.seqs}, warmup {args.warmup}, "
        f"steps {args.steps}, {device_name}, {record['precision_policy']}, "
        f"peak {peak / 1e12 if peak else float('nan'):.3g} TFLOP/s")
    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()

    for name in [m for m in MODELS if m in args.models]:
        free_memory(torch, device)
        reset_peak(torch, device)
        t0 = time.perf_counter()
        runner, build_error = None, None
        try:
            runner = RetentionRunner(args, config) if name == "retention" \
                else LlamaRunner(args, config, device, precision)
        except ImportError as e:
            build_error = ("skipped", f"{e} (pip install transformers)")
        except Exception as e:  # noqa: BLE001
            build_error = ("oom" if is_out_of_memory(e) else "error", str(e)[:300])
            if build_error[0] == "error":
                traceback.print_exc()
        if runner is None:
            say(f"{name}: not built ({build_error[0]}): {build_error[1]}")
            for T in args.seqs:
                record["rows"].append({"model": name, "seq_len": T,
                                       "batch": max(1, args.tokens_per_step // T),
                                       "status": build_error[0], "error": build_error[1]})
            write_json(args.json, record)
            continue
        record["models"][name] = {"params": runner.params, "describe": runner.describe(),
                                  "build_s": time.perf_counter() - t0}
        say(f"{name}: {runner.params / 1e6:.1f}M parameters, built in "
            f"{time.perf_counter() - t0:.1f} s; {runner.describe()}")
        say(HEADER)
        for T in args.seqs:
            row = run_row(runner, T, args, rng, peak)
            record["rows"].append(row)
            write_json(args.json, record)
            extra = f"  (warmup {row['warmup_s']:.1f} s)" if "warmup_s" in row \
                else f"  ({row.get('error', '')})"
            say(table_row(row) + extra)
        if name == "retention" and args.profile:
            try:
                record["profile"] = profile_retention(runner, args, rng)
            except Exception as e:  # noqa: BLE001 - the Llama rows still run
                say(f"profile failed: {'OOM' if is_out_of_memory(e) else 'ERROR'}: "
                    f"{(str(e).splitlines() or [type(e).__name__])[0][:300]}")
                traceback.print_exc()
                runner.after_failure()
            write_json(args.json, record)
        del runner
    record["wall_s"] = time.perf_counter() - t_start
    write_json(args.json, record)

    flops_note = ("MFU against {:.3g} TFLOP/s ({}, {} dense peak); FLOPs/token: retention "
                  "retention.metrics.flops_per_token, llama 6N + 12 L d_model T (PaLM)"
                  .format(peak / 1e12, device_name, precision) if peak else "MFU: no peak known")
    say(f"\n{flops_note}; peak GiB = "
        + ("torch.cuda.max_memory_allocated per row" if device.type == "cuda"
           else "process peak RSS"))
    say(HEADER)
    for row in record["rows"]:
        say(table_row(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
