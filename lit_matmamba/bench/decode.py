"""Decoding speed on one GPU, in one process: the nested model's graphed decoder at every
granularity against stock mamba-ssm's CUDA-graph decoder on a standalone model of each width."""

from __future__ import annotations

import gc
import time

import torch

from lit_matmamba.graphs import GraphedDecoder
from lit_matmamba.kernels.mamba_ssm_compat import clear_autotuning

from .common import build_lm, require_cuda, stock_lm, time_ms, write_results


def decode(
    preset: str = "lm-1.4b",
    batches: list[int] | None = None,
    prompt_len: int = 64,
    new_tokens: int = 256,
    reps: int = 3,
    stock: bool = True,
    out: str | None = "decode.json",
) -> dict:
    """Tokens/s of greedy decoding at D, D/2, D/4, D/8: the nested model against stock mamba-ssm
    on a standalone model of each width.

    Nested: `MatMambaLM.generate` with a `GraphedDecoder` built once per width and batch (the
    step captured as one CUDA graph, the state preallocated), bf16 weights and SSM state. Stock:
    `MambaLMHeadModel.generate(cg=True, top_k=1)` (mamba-ssm's own CUDA-graph decoder), bf16
    weights and state, built by `bench.common.stock_lm`, so without causal-conv1d: its conv step
    runs mamba-ssm's PyTorch fallback. Both decode `new_tokens` tokens after a prompt of
    `prompt_len` random tokens (no end-of-text stop), timed from the prompt to the last token
    (prefill included), median of `reps` runs after one warm-up (which captures the graphs).

    Also per nested row: `step_ms`, one graph replay (a decoding step without sampling), and
    `head_ms`, the LM head alone at that batch: the part of a step that does not shrink with the
    width (the head and the embedding are not nested).

    Args:
        preset: model preset (`MatMambaConfig.presets()`).
        batches: batch sizes (default 1, 8, 64).
        prompt_len: prompt tokens per sequence.
        new_tokens: tokens generated per sequence.
        reps: timed runs per measurement (the median is reported).
        stock: time stock mamba-ssm too (needs its model classes and transformers).
        out: JSON file for the results (None: do not write).
    """
    require_cuda()
    batches = batches or [1, 8, 64]
    t0 = time.time()
    torch.backends.cuda.matmul.allow_tf32 = True
    model = build_lm(preset).to(torch.bfloat16).eval()
    cfg = model.config
    grans = list(cfg.default_granularities())
    prompts = {b: torch.randint(0, cfg.vocab_size, (b, prompt_len), device="cuda") for b in batches}
    results: dict = dict(
        preset=preset,
        batches=batches,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        rows=[],
    )

    def tokens_per_s(ms: float, batch: int) -> float:
        return batch * new_tokens / (ms / 1e3)

    for w in grans:
        for b in batches:
            ids = prompts[b]
            decoder = GraphedDecoder(model, w, b, ssm_dtype=torch.bfloat16, buckets=[b])
            ms = time_ms(
                lambda d=decoder, ids=ids, w=w: model.generate(ids, new_tokens, w, temperature=0, decoder=d),
                warmup=1,
                reps=reps,
            )
            token = torch.zeros(b, dtype=torch.long, device="cuda")
            step_ms = time_ms(lambda d=decoder, t=token: d.step(t), warmup=3, reps=20)
            h = torch.randn(b, cfg.d_model, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                head_ms = time_ms(lambda h=h: model.lm_head(h), warmup=3, reps=20)
            row = dict(kind="nested", width=w, batch=b, ms=ms, tokens_per_s=tokens_per_s(ms, b))
            row.update(step_ms=step_ms, head_ms=head_ms)
            results["rows"].append(row)
            print(
                f"nested w={w:5d} batch {b:3d}: {row['tokens_per_s']:9.0f} tokens/s  step {step_ms:.3f} ms "
                f"(LM head {head_ms:.3f} ms)",
                flush=True,
            )
            del decoder
            torch.cuda.empty_cache()

    if stock:
        try:
            for w in grans:
                clear_autotuning(pins=False)  # each model tunes mamba-ssm's prefill kernels for itself
                ref = stock_lm(cfg, w).to(torch.bfloat16).eval()
                for b in batches:
                    ids = prompts[b]

                    def run(ref=ref, ids=ids):
                        with torch.inference_mode():
                            return ref.generate(ids, prompt_len + new_tokens, cg=True, top_k=1)

                    ms = time_ms(run, warmup=1, reps=reps)
                    assert run().shape == (b, prompt_len + new_tokens)
                    row = dict(kind="stock", width=w, batch=b, ms=ms, tokens_per_s=tokens_per_s(ms, b))
                    results["rows"].append(row)
                    print(f"stock  w={w:5d} batch {b:3d}: {row['tokens_per_s']:9.0f} tokens/s", flush=True)
                del ref
                gc.collect()
                torch.cuda.empty_cache()
        except ImportError as err:  # mamba-ssm's generation imports transformers
            results["stock_error"] = f"stock mamba-ssm could not run: {err}"
            print(results["stock_error"], flush=True)
    _compare(results, grans)
    results["wall_s"] = time.time() - t0
    write_results(out, results)
    _print_summary(results, cfg.d_model)
    return results


def _compare(results: dict, grans: list[int]) -> None:
    """Ratios: nested over stock at each width and batch, and each width over D (nested)."""
    rows = {(r["kind"], r["width"], r["batch"]): r for r in results["rows"]}
    for r in results["rows"]:
        if r["kind"] != "nested":
            continue
        full = rows[("nested", grans[0], r["batch"])]
        r["vs_full"] = r["tokens_per_s"] / full["tokens_per_s"]
        s = rows.get(("stock", r["width"], r["batch"]))
        if s is not None:
            r["vs_stock"] = r["tokens_per_s"] / s["tokens_per_s"]
            r["stock_tokens_per_s"] = s["tokens_per_s"]
    nested = [r for r in results["rows"] if r["kind"] == "nested"]
    results["all_at_least_stock"] = (
        all(r["vs_stock"] >= 1 for r in nested) if all("vs_stock" in r for r in nested) else None
    )
    smallest = rows.get(("nested", grans[-1], 1))
    results["narrowest_vs_full_at_batch_1"] = smallest["vs_full"] if smallest else None


def _print_summary(results: dict, d_model: int) -> None:
    """The table last: the device tool and a terminal show the end of the output."""
    nan = float("nan")
    print(
        f"\n== {results['preset']} greedy decoding, prompt {results['prompt_len']} + {results['new_tokens']} "
        f"new tokens, bf16, on {results['device']} (stock: mamba-ssm generate(cg=True), no causal-conv1d)"
    )
    print(
        f"{'width':>10s} {'batch':>5s} {'nested tok/s':>12s} {'stock tok/s':>11s} {'x stock':>7s} "
        f"{'x D':>5s} {'step ms':>8s} {'head ms':>8s}"
    )
    for r in results["rows"]:
        if r["kind"] != "nested":
            continue
        label = f"{r['width']} (D/{d_model // r['width']})" if r["width"] != d_model else f"{r['width']} (D)"
        print(
            f"{label:>10s} {r['batch']:5d} {r['tokens_per_s']:12.0f} {r.get('stock_tokens_per_s', nan):11.0f} "
            f"{r.get('vs_stock', nan):6.2f}x {r['vs_full']:4.2f}x {r['step_ms']:8.3f} {r['head_ms']:8.3f}"
        )
    print(
        f"every width at least stock: {results['all_at_least_stock']}; narrowest over D at batch 1: "
        f"{results['narrowest_vs_full_at_batch_1'] or nan:.2f}x; {results['wall_s']:.0f} s"
    )
