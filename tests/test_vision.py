"""Image-token positions (lyra/vision.py): zero at the start, one row per merged token in the merger's order,
a cell's place as a fraction of the image, and a model that gains them answers as before until trained."""

import torch
from conftest import tiny_config
from helpers import IMAGE, image_inputs
from torch import nn

from lyra import LyraForConditionalGeneration
from lyra.configuration import ImagePositionConfig
from lyra.training.trainer import with_image_positions
from lyra.vision import ImagePositions


def positions(frequencies: int = 4, dim: int = 8) -> ImagePositions:
    return ImagePositions(ImagePositionConfig(enabled=True, frequencies=frequencies), llm_dim=dim, merge_size=2)


def test_features_go_row_by_row_and_place_cells_as_fractions():
    module = positions()
    f = module.features(2, 3)  # 2 rows, 3 columns of merged cells
    assert f.shape == (6, 16)
    rows, cols = f[:, :8], f[:, 8:]
    assert torch.equal(rows[0], rows[2]) and not torch.equal(rows[2], rows[3])  # one row, then the next
    assert torch.equal(cols[0], cols[3]) and not torch.equal(cols[0], cols[1])
    assert len({tuple(r.tolist()) for r in f}) == 6
    # the middle row of 3 and the only row of 1 sit at the same height (half way down)
    torch.testing.assert_close(module.features(3, 2)[2, :8], module.features(1, 2)[0, :8])
    assert not torch.allclose(module.features(3, 2)[0, :8], module.features(1, 2)[0, :8])


def test_forward_gives_one_row_per_merged_token_and_starts_at_zero():
    module = positions()
    grid = torch.tensor([[1, 4, 6], [2, 2, 2]])  # 2 x 3 cells; then a 2-frame clip of 1 x 1 cell
    out = module(grid)
    assert out.shape == (6 + 2, 8) and not out.any()
    nn.init.normal_(module.proj.weight)
    out = module(grid)
    assert len({tuple(r.tolist()) for r in out[:6]}) == 6  # every cell of the image its own vector
    assert torch.equal(out[6], out[7])  # the frames of one cell share its place


def test_a_model_gains_positions_without_changing_its_answers():
    torch.manual_seed(0)
    plain = LyraForConditionalGeneration(tiny_config(image_positions={"enabled": False})).eval()
    assert plain.image_positions is None
    placed = with_image_positions(plain).eval()
    assert placed.config.settings.image_positions.enabled and with_image_positions(placed) is placed
    inputs = image_inputs()
    assert torch.equal(placed(**inputs).logits, plain(**inputs).logits)
    # trained away from zero, they reach the image tokens (and only those) at their cells
    nn.init.normal_(placed.image_positions.proj.weight, std=0.5)
    embeds, _ = placed.embed_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"])
    before, _ = plain.embed_inputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_thw"])
    moved = (embeds != before).any(-1)[0]
    assert torch.equal(moved, inputs["input_ids"][0] == IMAGE)


def test_a_fresh_model_of_a_preset_with_positions_starts_them_at_zero():
    model = LyraForConditionalGeneration(tiny_config(image_positions={"enabled": True}))
    assert model.image_positions is not None
    assert not model.image_positions.proj.weight.any() and not model.image_positions.proj.bias.any()
