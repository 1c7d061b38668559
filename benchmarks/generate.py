"""Decode speed and memory against context length (issue 5 item 5): the `small` preset's
recurrent decode vs a Hugging Face LlamaForCausalLM of the same size with its KV cache (torch),
and vs mlx-lm's llama (MLX), random weights, same process, same device.

    python benchmarks/generate.py                                   # this CPU, torch + mlx
    python benchmarks/generate.py --device cuda --contexts 1024 8192 32768 65536

Retention rows: "retention" is the plain functional `model.step` loop; "retention-graph" (CUDA)
is the GraphDecoder that generate() uses there: the state updated in place in fixed buffers and
the whole step replayed as one CUDA graph (--no-graph leaves it out); "retention-static" is the
same decoder without a graph (on the CPU with --graph); "retention-compiled" is the decoder
with compile=True (fused layers by torch.compile, in the graph on CUDA; --no-compile drops it).

For each context N both models are brought to position N, then `--decode-tokens` greedy
tokens are timed one by one (after `--warmup` untimed ones, a device sync after each);
ms/token is their median.

How a context is built (--fill):
  prefill  real prefill of N random tokens, in chunks of --prefill-chunk (both models).
  random   retention: the state after a 256-token prefill, relabelled as position N;
           llama: its KV cache filled with N random keys/values per layer. Decode does the
           same work whatever the state/cache holds, so this measures the same thing as
           `prefill` without paying for a 64k prefill (minutes per model on a CPU).
Default: prefill on CUDA, random elsewhere.

Memory: "state MiB" is the retention state or the KV cache (all layers, batch 1);
"peak MiB" is torch.cuda.max_memory_allocated during decode (weights included) on CUDA,
mx.get_peak_memory() on MLX, and not measured on the torch CPU path.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import inspect
import json
import os
import platform
import statistics
import sys
import time

MIB = 2**20


def preset_config(preset: str, vocab_size: int):
    from retention.config import create_model_config
    return create_model_config(preset, vocab_size=vocab_size)


def llama_kwargs(config, max_positions: int) -> dict:
    """The Llama of the same size: same width, depth, heads, MLP, vocab, tied head."""
    return dict(vocab_size=config.vocab_size, hidden_size=config.d_model,
                intermediate_size=config.mlp_hidden, num_hidden_layers=config.n_layers,
                num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
                head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
                rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
                max_position_embeddings=max_positions)


def time_decode(step, token, warmup: int, n: int, sync) -> float:
    """Median seconds per token over n greedy steps (step: token -> next token), each step
    synced: the median shrugs off other processes' bursts on a shared machine."""
    for _ in range(warmup):
        token = step(token)
    sync()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        token = step(token)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def repeated(args, framework: str, model: str, measure) -> list[dict]:
    """measure(N) -> (seconds/token, state MiB, peak MiB) for every context, --repeats times
    round-robin; each context keeps its fastest median (cheap for retention: one state each)."""
    best: dict[int, tuple] = {}
    for _ in range(args.repeats):
        for N in args.contexts:
            result = measure(N)
            if N not in best or result[0] < best[N][0]:
                best[N] = result
    rows = []
    for N in args.contexts:
        sec, state_mib, peak = best[N]
        rows.append(dict(framework=framework, model=model, context=N, ms_per_token=sec * 1e3,
                         state_mib=state_mib, peak_mib=peak))
        print_row(rows[-1])
    return rows


def kv_tensors(cache):
    """Every key and value tensor of a Hugging Face cache (new and old layouts)."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return list(cache.key_cache) + list(cache.value_cache)


# --- torch ---------------------------------------------------------------------------------
def torch_rows(args, config):
    import torch
    from retention.backends import get_backend

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    torch.manual_seed(0)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []

    def peak_start():
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    def peak_mib():
        return torch.cuda.max_memory_allocated(device) / MIB if cuda else None

    def random_tokens(n):
        return torch.randint(0, config.vocab_size, (1, n), generator=gen).to(device)

    # Retention: the recurrent state is all the context there is.
    from retention.backends.torch.graph_decode import GraphDecoder
    backend = get_backend("torch")
    model = backend.build_model(config, seed=0, device=device).to(dtype).eval()
    decoder_kwargs = None       # None: the functional model.step loop

    def measure(N):
        if args.fill == "prefill":
            state = None
            for start in range(0, N, args.prefill_chunk):
                _, state = model.prefill(random_tokens(min(args.prefill_chunk, N - start)),
                                         state)
        else:
            _, state = model.prefill(random_tokens(256))
            state.offset = N
        state_mib = sum(S.numel() * S.element_size() + z.numel() * z.element_size()
                        for S, z in state.layers) / MIB
        if decoder_kwargs is not None:   # warm-up steps include the capture (and compile)
            decoder = GraphDecoder(model, state, graph=cuda, warmup=1, **decoder_kwargs)
            step = lambda tok: decoder.step(tok).argmax(-1)  # noqa: E731
        else:
            holder = {"state": state}

            def step(tok):
                logits, holder["state"] = model.step(tok, holder["state"])
                return logits.argmax(-1)
        state = None
        peak_start()
        sec = time_decode(step, random_tokens(1)[:, 0], max(args.warmup, 2),
                          args.decode_tokens, sync)
        return sec, state_mib, peak_mib()

    with torch.inference_mode():
        rows += repeated(args, "torch", "retention", measure)
        if args.graph:
            decoder_kwargs = {}
            rows += repeated(args, "torch", "retention-graph" if cuda else "retention-static",
                             measure)
        if args.graph and args.compile:
            # The opt-in fused layers compiled by inductor, inside the same graph; a failure
            # (no compiler, an inductor bug) costs this row only.
            decoder_kwargs = {"compile": True}
            try:
                rows += repeated(args, "torch", "retention-compiled", measure)
            except Exception as e:  # noqa: BLE001
                print(f"retention-compiled failed: {type(e).__name__}: {e}", file=sys.stderr)
    model = None
    gc.collect()

    # Llama with Hugging Face's default (dynamic) KV cache.
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.cache_utils import DynamicCache
    except ImportError:
        print("transformers is not installed (pip install transformers): skipping the Llama "
              "baseline", file=sys.stderr)
        return rows
    lconf = LlamaConfig(**llama_kwargs(config, max(args.contexts) + args.decode_tokens + 64))
    llama = LlamaForCausalLM(lconf).to(device=device, dtype=dtype).eval()
    # transformers >= 5.x names the argument `cache`; older releases `past_key_values`.
    cache_arg = "cache" if "cache" in inspect.signature(llama.forward).parameters \
        else "past_key_values"
    with torch.inference_mode():
        for N in args.contexts:
            try:
                cache = DynamicCache(config=lconf)
            except TypeError:        # transformers < 4.56
                cache = DynamicCache()
            if args.fill == "prefill":
                for start in range(0, N, args.prefill_chunk):
                    llama(random_tokens(min(args.prefill_chunk, N - start)),
                          use_cache=True, logits_to_keep=1, **{cache_arg: cache})
            else:
                shape = (1, config.n_kv_heads, N, config.head_dim)
                for layer in range(config.n_layers):
                    cache.update(torch.randn(shape, device=device, dtype=dtype),
                                 torch.randn(shape, device=device, dtype=dtype), layer)

            def step(tok):
                out = llama(tok[:, None], use_cache=True, **{cache_arg: cache})
                return out.logits[:, -1].argmax(-1)

            cache_mib = sum(t.numel() * t.element_size() for t in kv_tensors(cache)) / MIB
            peak_start()
            sec = time_decode(step, random_tokens(1)[:, 0], args.warmup, args.decode_tokens,
                              sync)
            rows.append(dict(framework="torch", model="llama-kv", context=N,
                             ms_per_token=sec * 1e3, state_mib=cache_mib, peak_mib=peak_mib()))
            print_row(rows[-1])
            cache = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return rows


# --- mlx -----------------------------------------------------------------------------------
def mlx_rows(args, config):
    import mlx.core as mx
    import numpy as np
    from retention.backends import get_backend
    try:
        from mlx_lm.models import llama as mlx_llama
        from mlx_lm.models.cache import KVCache
    except ImportError:
        mlx_llama = None
        print("mlx-lm is not installed (pip install mlx-lm): skipping its llama baseline",
              file=sys.stderr)
    dtype = getattr(mx, args.dtype)
    rng = np.random.default_rng(0)
    peak = getattr(mx, "get_peak_memory", None)
    reset_peak = getattr(mx, "reset_peak_memory", None)
    rows = []

    def random_tokens(n):
        return mx.array(rng.integers(0, config.vocab_size, (1, n)).astype(np.int32))

    def peak_mib():
        return peak() / MIB if peak else None

    def peak_start():
        if reset_peak:
            reset_peak()

    sync = lambda: None  # noqa: E731  (each step evaluates its token)

    model = get_backend("mlx").build_model(config, seed=0)
    model.set_dtype(dtype)

    def measure(N):
        if args.fill == "prefill":
            state = None
            for start in range(0, N, args.prefill_chunk):
                _, state = model.prefill(random_tokens(min(args.prefill_chunk, N - start)),
                                         state)
                mx.eval([list(p) for p in state.layers])
        else:
            _, state = model.prefill(random_tokens(256))
            mx.eval([list(p) for p in state.layers])
            state.offset = N
        holder = {"state": state}

        def step(tok):
            logits, holder["state"] = model.step(tok, holder["state"])
            nxt = mx.argmax(logits, axis=-1)
            mx.eval(nxt, [list(p) for p in holder["state"].layers])
            return nxt

        state_mib = sum(S.nbytes + z.nbytes for S, z in state.layers) / MIB
        state = None
        peak_start()
        sec = time_decode(step, random_tokens(1)[:, 0], args.warmup, args.decode_tokens, sync)
        return sec, state_mib, peak_mib()

    rows += repeated(args, "mlx", "retention", measure)
    model = None
    gc.collect()
    if mlx_llama is None:
        return rows

    largs = mlx_llama.ModelArgs(model_type="llama",
                                **llama_kwargs(config, max(args.contexts) + 1024))
    llama = mlx_llama.Model(largs)
    llama.set_dtype(dtype)
    mx.eval(llama.parameters())
    for N in args.contexts:
        cache = [KVCache() for _ in range(config.n_layers)]
        if args.fill == "prefill":
            for start in range(0, N, args.prefill_chunk):
                mx.eval(llama(random_tokens(min(args.prefill_chunk, N - start)), cache=cache))
        else:
            shape = (1, config.n_kv_heads, N, config.head_dim)
            for c in cache:
                c.state = (mx.random.normal(shape, dtype=dtype),
                           mx.random.normal(shape, dtype=dtype), N)
                mx.eval(c.keys, c.values)

        def step(tok):
            nxt = mx.argmax(llama(tok[:, None], cache=cache)[:, -1], axis=-1)
            mx.eval(nxt, [c.keys for c in cache], [c.values for c in cache])
            return nxt

        cache_mib = sum(c.keys.nbytes + c.values.nbytes for c in cache) / MIB
        peak_start()
        sec = time_decode(step, random_tokens(1)[:, 0], args.warmup, args.decode_tokens, sync)
        rows.append(dict(framework="mlx", model="mlx-lm llama", context=N,
                         ms_per_token=sec * 1e3, state_mib=cache_mib, peak_mib=peak_mib()))
        print_row(rows[-1])
        cache = None
        gc.collect()
    return rows


# --- report --------------------------------------------------------------------------------
HEADER = (f"{'framework':9s} {'model':18s} {'context':>8s} {'ms/token':>9s} {'tokens/s':>9s} "
          f"{'state MiB':>10s} {'peak MiB':>9s}")


def print_row(r):
    peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
    print(f"{r['framework']:9s} {r['model']:18s} {r['context']:8d} {r['ms_per_token']:9.2f} "
          f"{1e3 / r['ms_per_token']:9.1f} {r['state_mib']:10.1f} {peak:>9s}", flush=True)


def summary(rows) -> list[str]:
    lines = []
    for fw in sorted({r["framework"] for r in rows}):
        base = {r["context"]: r["ms_per_token"] for r in rows
                if r["framework"] == fw and not r["model"].startswith("retention")}
        variants = sorted({r["model"] for r in rows
                           if r["framework"] == fw and r["model"].startswith("retention")})
        for variant in variants:
            ours = {r["context"]: r["ms_per_token"] for r in rows
                    if r["framework"] == fw and r["model"] == variant}
            if len(ours) > 1:
                lo, hi = min(ours), max(ours)
                spread = max(ours.values()) / min(ours.values()) - 1
                lines.append(f"{fw}: {variant} decode {ours[hi]:.2f} ms at {hi} vs "
                             f"{ours[lo]:.2f} ms at {lo}; max/min - 1 = {spread:.1%} "
                             f"({'flat within 10%' if spread <= 0.10 else 'NOT within 10%'})")
            for n in sorted(set(ours) & set(base)):
                lines.append(f"{fw}: at {n} tokens the KV-cache baseline takes "
                             f"{base[n] / ours[n]:.2f}x {variant}'s time per token")
    return lines


def markdown(rows) -> str:
    """The rows as the docs/benchmarks.md table."""
    out = ["| framework | model | context | ms/token | tokens/s | state / KV cache MiB "
           "| peak MiB |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        peak = "–" if r["peak_mib"] is None else f"{r['peak_mib']:,.0f}"
        out.append(f"| {r['framework']} | {r['model']} | {r['context']:,} | "
                   f"{r['ms_per_token']:,.2f} | {1e3 / r['ms_per_token']:,.1f} | "
                   f"{r['state_mib']:,.1f} | {peak} |")
    return "\n".join(out)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "machine": platform.machine(),
            "processor": cpu_name(), "argv": sys.argv[1:],
            "cpus": os.cpu_count()}
    for name in ("torch", "transformers", "mlx", "mlx-lm", "numpy"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if "torch" in info:
        import torch
        info["torch_threads"] = torch.get_num_threads()
    if args.device.startswith("cuda"):
        import torch
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    p.add_argument("--frameworks", nargs="+", choices=["torch", "mlx"], default=None,
                   help="default: torch and mlx on cpu, torch only on cuda")
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 8192, 32768, 65536])
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3,
                   help="retention runs per context, round-robin; the fastest median counts "
                   "(the KV-cache baselines run once: their growth dwarfs the noise)")
    p.add_argument("--fill", choices=["prefill", "random"], default=None)
    p.add_argument("--prefill-chunk", type=int, default=4096)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--preset", default="small", help="model size of both sides (default small)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads); 1 avoids OpenMP spin-waits "
                   "on a shared machine")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the GraphDecoder that generate() uses (a CUDA graph per "
                   "step on CUDA, static in-place buffers on the CPU); default: on for cuda")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="with --graph, also time GraphDecoder(compile=True): fused layers "
                   "compiled by torch.compile inside the graph (default: on for cuda)")
    p.add_argument("--json", help="also write the rows and environment to this file")
    args = p.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    args.fill = args.fill or ("prefill" if cuda else "random")
    args.graph = cuda if args.graph is None else args.graph
    args.compile = cuda if args.compile is None else args.compile
    frameworks = args.frameworks or (["torch"] if cuda else ["torch", "mlx"])
    config = preset_config(args.preset, args.vocab_size)
    env = environment(args)
    print(f"# {args.preset} preset ({config.num_parameters() / 1e6:.0f}M params), batch 1, "
          f"{args.dtype}, fill={args.fill}, {args.decode_tokens} timed decode tokens; {env}")
    print(HEADER)
    rows = []
    if "torch" in frameworks:
        rows += torch_rows(args, config)
    if "mlx" in frameworks:
        rows += mlx_rows(args, config)
    lines = summary(rows)
    print()
    print(markdown(rows))
    print()
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows, "summary": lines}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
