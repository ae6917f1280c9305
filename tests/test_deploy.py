"""Deploying sub-models: checkpoints that rebuild themselves, export, decoding, search, lm-eval."""

from __future__ import annotations

import pytest
import torch

from lit_matmamba import MatMambaConfig, MatMambaLM
from lit_matmamba.data.tokenizer import train_bpe_tokenizer
from lit_matmamba.models.lm import sample

F64 = torch.float64
TEXT = (
    "When shall we three meet again, in thunder, lightning, or in rain? When the hurlyburly's done, "
    "when the battle's lost and won. That will be ere the set of sun. Where the place? Upon the heath. "
)
WIDTHS = [None, 16, 8, [32, 4, 16]]
WIDTH_IDS = ["full", "w16", "w8", "mixnmatch"]


def lm_config(**kw) -> MatMambaConfig:
    base = dict(d_model=32, n_layer=3, vocab_size=320, d_state=8, headdim=8, chunk_size=8)
    return MatMambaConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return train_bpe_tokenizer([TEXT] * 20, vocab_size=300).to_str()


@pytest.fixture
def lm() -> MatMambaLM:
    torch.manual_seed(0)
    return MatMambaLM(lm_config()).double().eval()


def argmax_by_forward(model: MatMambaLM, prompt: list[int], steps: int, width) -> list[int]:
    """Greedy decoding the slow way: the whole sequence through the forward at every step."""
    seq = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([seq]), width)[0, -1, : model.config.vocab_size]
        seq.append(int(logits.argmax()))
    return seq


# Decoding -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", WIDTHS, ids=WIDTH_IDS)
def test_greedy_generate_equals_stepwise_argmax_for_prompts_of_different_lengths(lm, width):
    prompts = [[5, 9, 2, 7, 7, 1, 30], [11], [3, 3, 8, 4], [40, 41, 42, 43]]
    out = lm.generate([torch.tensor(p) for p in prompts], 9, width, temperature=0)
    for prompt, row in zip(prompts, out):
        assert row.tolist() == argmax_by_forward(lm, prompt, 9, width)
    # a tensor of prompts of one length gives the same rows
    same = lm.generate(torch.tensor(prompts[2:]), 9, width, temperature=0)
    assert same.tolist() == [r.tolist() for r in out[2:]]


def test_generation_stops_at_eos(lm):
    prompts = [torch.tensor([5, 9, 2]), torch.tensor([11, 12])]
    free = lm.generate(prompts, 6, 16, temperature=0)
    eos = int(free[0][3 + 2])  # the third new token of the first prompt
    out = lm.generate(prompts, 6, 16, temperature=0, eos_token_id=eos)
    first = free[0].tolist()
    assert out[0].tolist() == first[: first.index(eos, 3) + 1]  # stops right after its first EOS
    padded = lm.generate(torch.stack([prompts[0], prompts[0]]), 6, 16, temperature=0, eos_token_id=eos)
    assert padded.shape == (2, 9) and (padded[:, len(out[0]) :] == eos).all()


def test_sampling_respects_top_k_top_p_and_the_seed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, 0.0), torch.zeros(2000, dtype=torch.long))
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    drawn = sample(logits, 1.0, generator=g)
    assert set(drawn.tolist()) == {0, 1, 2, 3} and abs(float((drawn == 0).float().mean()) - 0.5) < 0.05
    a = sample(logits, 0.7, top_k=3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, sample(logits, 0.7, top_k=3, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, 1.0, top_p=0.0)
