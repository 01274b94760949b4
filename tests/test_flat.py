"""The flat buffer: parameters become views, the model computes the same function."""

import torch
from conftest import random_bert

from fedmpi.flat import FlatParameters


def tiny_model():
    return random_bert(vocab=50, width=8, layers=1).eval()


def test_parameters_become_views_of_one_buffer():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 5))
    before = model(input_ids=ids).logits
    flat = FlatParameters(model)
    assert flat.numel == sum(p.numel() for p in model.parameters())
    assert flat.is_intact()
    assert torch.equal(model(input_ids=ids).logits, before)
    flat.buffer.zero_()  # writing the buffer changes the model
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())


def test_integer_buffers_and_frozen_parameters_stay_out():
    model = tiny_model()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    flat = FlatParameters(model)
    assert "bert.embeddings.word_embeddings.weight" not in flat.names
    assert flat.numel == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_optimizer_steps_update_the_buffer_in_place():
    model = tiny_model()
    flat = FlatParameters(model)
    before = flat.buffer.clone()
    optimizer = torch.optim.AdamW(flat.params, lr=0.1, fused=True)
    model.train()
    loss = model(input_ids=torch.randint(0, 50, (2, 5)), labels=torch.tensor([0, 1])).loss
    loss.backward()
    optimizer.step()
    assert flat.is_intact()
    assert not torch.equal(flat.buffer, before)
