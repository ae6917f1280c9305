"""`main.py generate`: text from a trained language model at any width."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from lit_matmamba.io import Pretrained

from .common import WidthArg, describe, open_model, parse_width, pick_device, run


def encode_prompts(pretrained: Pretrained, texts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, refusing an empty prompt and one longer than the longest context
    the model was trained on (when the checkpoint recorded it)."""
    tokenizer = pretrained.tokenizer()
    if tokenizer is None:
        raise ValueError(
            f"{pretrained.source} records no tokenizer (checkpoints of a data module without one, or "
            "written before tokenizers were recorded); export it from a checkpoint that has one"
        )
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        which = f"prompt {i + 1}" if len(texts) > 1 else "the prompt"
        if not ids:
            raise ValueError(f"{which} is empty: give some text to continue")
        if pretrained.seq_len is not None and len(ids) > pretrained.seq_len:
            raise ValueError(
                f"{which} has {len(ids)} tokens, more than the longest context the model was trained on "
                f"({pretrained.seq_len} tokens): shorten it"
            )
        out.append(ids)
    return out


def generate(
    ckpt_path: str | None = None,
    model: str | None = None,
    width: WidthArg = None,
    prompt: str | None = None,
    prompts: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    device: str | None = None,
) -> None:
    """Continue text with a trained language model at any width.

    Greedy by default (temperature 0); a positive temperature samples, restricted by top_k and
    top_p. The prompts of a batch may have any lengths: each is prefilled without padding, then
    all decode together with a recurrent state sized to the width in use; a prompt stops at the
    tokenizer's end-of-text token. Prints each continuation and the decoding speed.

    Args:
        ckpt_path: a training checkpoint (.ckpt).
        model: or a model directory (from `export`, or a stock mamba-ssm checkpoint with its
            tokenizer.json).
        width: the width to decode at (default: full): an int, one int per layer (64,32,32,16),
            D/k, or a `search` result JSON.
        prompt: the text to continue.
        prompts: or a text file with one prompt per line, decoded as one batch.
        max_new_tokens: tokens to generate per prompt (fewer when it ends).
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_k: sample among the k most likely tokens only.
        top_p: sample among the most likely tokens whose probability reaches top_p (nucleus).
        seed: seed of the sampling.
        device: cpu, cuda, cuda:1, ... (default: cuda when there is a GPU).
    """
    if (prompt is None) == (prompts is None):
        raise ValueError("give either --prompt TEXT or --prompts FILE")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    dev = pick_device(device)
    pretrained = open_model(ckpt_path, model, dev)
    if not pretrained.is_language_model:
        raise ValueError(
            f"{pretrained.source} holds a {type(pretrained.model).__name__}, not a language model"
        )
    net = pretrained.model
    chosen = parse_width(width, net.config)
    texts = [prompt] if prompt is not None else Path(prompts).read_text("utf-8").splitlines()
    if not texts:
        raise ValueError(f"{prompts} has no prompts")
    ids = encode_prompts(pretrained, texts)
    tokenizer = pretrained.tokenizer()
    generator = torch.Generator(dev).manual_seed(seed)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    out = net.generate(
        [torch.tensor(p) for p in ids],
        max_new_tokens,
        chosen,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        eos_token_id=pretrained.eos_token_id(),
    )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    new_tokens = 0
    for i, (text, prompt_ids, row) in enumerate(zip(texts, ids, out)):
        new = row[len(prompt_ids) :].tolist()
        new_tokens += len(new)
        if len(texts) > 1:
            print(f"--- prompt {i + 1} ---")
        print(text + tokenizer.decode(new, skip_special_tokens=True))
    print(
        f"width {describe(chosen)}: {new_tokens} new tokens for {len(texts)} prompt(s) in {seconds:.2f} s, "
        f"{new_tokens / seconds:.1f} tokens/s (prefill and decoding, {dev.type})"
    )


def main(argv: list[str], prog: str = "python main.py generate") -> None:
    run(generate, argv, prog)
