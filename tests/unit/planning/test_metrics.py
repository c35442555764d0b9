import math

import pytest
import torch

from orthorank.metrics import mean_nll, perplexity, token_nll
from tests.tiny_models import VOCAB, tiny_model


def test_uniform_logits_give_vocab_size():
    model = tiny_model(tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    ids = torch.randint(3, VOCAB, (3, 17), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, ids, batch_size=2) == pytest.approx(VOCAB, rel=1e-5)


def test_token_nll_known_value():
    # two tokens of vocabulary 2: logits favour id 1 with log-odds log(3): p(1) = 3/4
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    ids = torch.tensor([[0, 1]])
    assert float(token_nll(logits, ids)) == pytest.approx(-math.log(0.75))


def test_matches_manual_and_batch_independent():
    model = tiny_model()
    ids = torch.randint(3, VOCAB, (5, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert mean_nll(model, ids, batch_size=1) == pytest.approx(float(manual), rel=1e-5)
    assert mean_nll(model, ids, batch_size=3) == pytest.approx(float(manual), rel=1e-5)


@pytest.mark.parametrize(
    "ids, error",
    [([[1, 2]], TypeError), (torch.ones(4, dtype=torch.long), ValueError), (torch.ones(2, 1, dtype=torch.long), ValueError),
     (torch.ones(2, 3), TypeError)],
)
def test_bad_ids_refused(ids, error):
    with pytest.raises(error):
        perplexity(tiny_model(layers=1), ids)


def test_bad_batch_size_refused():
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(tiny_model(layers=1), torch.ones(1, 4, dtype=torch.long), batch_size=0)
