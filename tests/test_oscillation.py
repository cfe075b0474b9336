"""Oscillation tracking, freezing and dampening against hand-made cases and formulas."""

from __future__ import annotations

import math

import pytest
import torch

import zoo
from zoo.packing import load_packed, save_packed
from zoo.quant import LSQ
from zoo.quant.oscillation import (
    OscillationState,
    dampening_grad,
    dampening_loss,
    dampening_weight,
    freeze_threshold,
)


def test_counts_oscillations_on_hand_made_integer_sequences():
    # four weights: steady; one move then back (1 oscillation); 0,1,0,1,0 (3); a staircase (0)
    sequences = torch.tensor(
        [
            [2, 2, 2, 2, 2],
            [0, 1, 1, 0, 0],
            [0, 1, 0, 1, 0],
            [0, 1, 2, 3, 4],
        ],
        dtype=torch.float32,
    ).T
    m = 0.5
    state = OscillationState((4,), momentum=m)
    counts = torch.zeros(4)
    expected_freq = torch.zeros(4)
    for step, x in enumerate(sequences):
        osc = state.update(x)
        counts += osc.float()
        if step > 0:
            expected_freq = m * osc.float() + (1 - m) * expected_freq
    assert counts.tolist() == [0, 1, 3, 0]
    torch.testing.assert_close(state.freq, expected_freq)
    assert state.freq[2].item() == pytest.approx(1 - 0.5**3)  # oscillations at steps 2, 3, 4
    ema = sequences[0].clone()
    for x in sequences[1:]:
        ema = m * x + (1 - m) * ema
    torch.testing.assert_close(state.ema_int, ema)


def test_freezing_holds_the_rounded_ema_value_and_blocks_the_gradient():
    q = LSQ(bits=2)
    w = torch.tensor([[0.10, 0.26, -0.3, 0.9]], requires_grad=True)
    q.step.data.fill_(0.25)
    q.initialized.fill_(True)
    state = q.track_oscillations(w.shape, momentum=0.5)
    state.update(torch.tensor([[0.0, 1.0, -1.0, 1.0]]))
    state.update(torch.tensor([[0.0, 0.0, -1.0, 1.0]]))
    state.update(torch.tensor([[0.0, 1.0, -1.0, 1.0]]))  # weight 1 oscillated once: freq 0.5
    assert state.freeze(0.3) == 1 and state.frozen.tolist() == [[False, True, False, False]]
    frozen_value = torch.round(state.ema_int[0, 1]).item()
    w2 = torch.tensor([[0.10, -0.4, -0.3, 0.2]], requires_grad=True)  # weight 1 moved far away
    out = q(w2)
    assert out[0, 1].item() == frozen_value * 0.25
    out.sum().backward()
    assert w2.grad[0, 1].item() == 0.0 and w2.grad[0, 0].item() == 1.0
    assert q.integer(w2)[0, 1].item() == frozen_value and q.integer(w2, frozen=False)[0, 1].item() == -2.0


def test_dampening_loss_and_gradient_against_formula():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, 2, 2, generator=gen) * 0.6
    s, q_n, q_p = torch.tensor([0.2]), 4, 3
    q = torch.round(torch.clamp(w / s, -q_n, q_p)) * s
    clipped = w.clamp(-q_n * 0.2, q_p * 0.2)
    expected = ((q - clipped) ** 2).sum(0).mean()
    torch.testing.assert_close(dampening_loss(w, q, s, q_n, q_p), expected)
    wg = w.clone().requires_grad_(True)
    dampening_loss(wg, q, s, q_n, q_p).backward()
    torch.testing.assert_close(dampening_grad(w, q, s, q_n, q_p), wg.grad)


def test_schedules_at_chosen_steps():
    assert freeze_threshold(0.0, 0.1, 0.01) is None and freeze_threshold(0.2499, 0.1, 0.01) is None
    assert freeze_threshold(0.25, 0.1, 0.01) == pytest.approx(0.1)
    assert freeze_threshold(0.625, 0.1, 0.01) == pytest.approx(0.055)
    assert freeze_threshold(1.0, 0.1, 0.011) == pytest.approx(0.011)
    assert dampening_weight(0.1, 0.1) == 0.0
    assert dampening_weight(0.25, 0.1) == pytest.approx(0.0)
    assert dampening_weight(0.625, 0.1) == pytest.approx(0.05)
    assert dampening_weight(1.0, 0.1) == pytest.approx(0.1)
    assert dampening_weight(0.4, 0.1) == pytest.approx(0.05 * (1 - math.cos(math.pi * 0.2)))


def test_packed_export_uses_frozen_values_and_drops_training_state(tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model("resnet20_w2a2").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)  # initializes the LSQ steps
    layer = model.layer1[0].conv1
    state = layer.weight_quantizer.track_oscillations(layer.weight.shape)
    state.frozen[0, 0, 0, 0] = True
    state.frozen_int[0, 0, 0, 0] = -2.0
    with torch.no_grad():
        before = model(x)
    save_packed(model, tmp_path / "m.safetensors", real_dtype="float32")  # exact logits
    loaded = load_packed(tmp_path / "m.safetensors")
    assert loaded.layer1[0].conv1.weight[0, 0, 0, 0].item() == -2.0 * layer.weight_quantizer.step.item()
    with torch.no_grad():
        assert torch.equal(loaded(x), before)
