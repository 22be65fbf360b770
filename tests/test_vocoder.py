"""Unit vocoders: the published code HiFi-GAN layout loads, chunked synthesis equals offline and joins without
clicks, the embedded nano vocoder and its unit extractor work together, and spoken WER is computable."""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from speaking import hifigan_config, nano_vocoder, random_hifigan

from lyra.vocoder import (
    EMBEDDED_VOCODER,
    ChunkedSynthesis,
    CodeHiFiGAN,
    NanoVocoder,
    fold_weight_norm,
    load_code_hifigan,
    load_vocoder,
    synthesize_units,
)

PUBLISHED_KEYS = {  # a few names of facebookresearch/speech-resynthesis' CodeGenerator checkpoint ("generator")
    "dict.weight", "conv_pre.weight_g", "conv_pre.weight_v", "conv_pre.bias", "ups.0.weight_g", "ups.4.weight_v",
    "resblocks.0.convs1.0.weight_g", "resblocks.14.convs2.2.weight_v", "conv_post.weight_g", "conv_post.bias",
    "dur_predictor.conv1.0.weight", "dur_predictor.ln1.weight", "dur_predictor.conv2.0.bias", "dur_predictor.proj.weight",
}


def weight_normed(vocoder: CodeHiFiGAN, seed: int = 0) -> CodeHiFiGAN:
    """The vocoder as it is trained and published: torch weight norm (weight_g / weight_v) on every conv of the
    generator, with magnitudes g that differ from |v| so folding them matters."""
    normed = copy.deepcopy(vocoder)
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, module in normed.named_modules():
            if isinstance(module, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)) and not name.startswith("dur_predictor"):
                torch.nn.utils.weight_norm(module)
                with torch.no_grad():
                    module.weight_g.mul_(torch.rand(module.weight_g.shape, generator=g) + 0.5)
    return normed


def write_published(folder, vocoder, config):
    folder.mkdir(parents=True, exist_ok=True)
    normed = weight_normed(vocoder)
    torch.save({"generator": normed.state_dict(), "optim_g": {}, "steps": 100, "epoch": 1}, folder / "g_00000100")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return normed


def test_code_hifigan_loads_the_published_layout(tmp_path):
    vocoder = random_hifigan(num_units=20)
    normed = write_published(tmp_path / "vocoder", vocoder, hifigan_config(20))
    state = torch.load(tmp_path / "vocoder" / "g_00000100", weights_only=True)["generator"]
    assert PUBLISHED_KEYS <= set(state)

    loaded = load_vocoder(tmp_path / "vocoder")
    assert isinstance(loaded, CodeHiFiGAN) and loaded.num_units == 20 and loaded.sample_rate == 16000
    units = torch.tensor([3, 7, 7, 1, 19, 0, 4, 12, 5, 5, 8])
    durations = loaded.durations(units)
    assert durations.min() >= 1
    audio = loaded.synthesize(units)
    assert audio.shape == (int(durations.sum()) * 320,) and audio.dtype == np.float32
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0 and np.abs(audio).max() > 0
    with torch.inference_mode():  # the weight-normed module computes its weights from g and v on every call
        expected = normed.synthesize_frames(torch.repeat_interleave(units, durations)).numpy()
    assert np.abs(audio - expected).max() < 1e-5
    # without a duration predictor every unit is one frame
    plain = write_published(tmp_path / "plain", random_hifigan(20, dur=False), hifigan_config(20, dur=False))
    assert len(load_vocoder(tmp_path / "plain").synthesize(units)) == len(units) * 320 and plain.dur_predictor is None


def test_code_hifigan_refuses_what_does_not_fit(tmp_path):
    vocoder = random_hifigan(num_units=20)
    write_published(tmp_path / "v", vocoder, hifigan_config(20))
    with pytest.raises(ValueError, match="missing"):  # the config says 30 units, the checkpoint holds 20
        load_code_hifigan(tmp_path / "v" / "g_00000100", {**hifigan_config(20), "dur_predictor_params": None})
    with pytest.raises(ValueError, match="has shape"):
        load_code_hifigan(tmp_path / "v" / "g_00000100", hifigan_config(30))
    with pytest.raises(ValueError, match="'f0' is set"):
        load_code_hifigan(tmp_path / "v" / "g_00000100", {**hifigan_config(20), "f0": True})
    with pytest.raises(ValueError, match="units must lie"):
        vocoder.synthesize([3, 25])
    folded = fold_weight_norm({"a.weight_g": torch.full((2, 1, 1), 3.0), "a.weight_v": torch.ones(2, 4, 2)})
    assert torch.allclose(folded["a.weight"], torch.full((2, 4, 2), 3.0 / 8 ** 0.5))


def _stream(vocoder, units, pieces, **kwargs):
    synthesis = ChunkedSynthesis(vocoder, **kwargs)
    chunks, start = [], 0
    for n in pieces:
        chunks += synthesis.push(units[start:start + n])
        start += n
    chunks += synthesis.finish()
    return chunks


def _border_jumps(chunks):
    joined = np.concatenate([c.samples for c in chunks])
    borders = np.cumsum([len(c.samples) for c in chunks])[:-1]
    jumps = np.abs(np.diff(joined))
    return joined, jumps[borders - 1], jumps


@pytest.mark.parametrize("make", [lambda: random_hifigan(20), lambda: nano_vocoder(128),
                                  lambda: nano_vocoder(64, duration_kernel=9)], ids=["hifigan", "nano", "nano-wide-durations"])
def test_chunked_synthesis_equals_offline(make):
    """Chunks equal the offline audio, durations included: each unit's duration waits for the units within the
    predictor's reach (8 on each side with a kernel of 9)."""
    vocoder = make()
    g = torch.Generator().manual_seed(0)
    units = torch.randint(0, vocoder.num_units, (90,), generator=g).tolist()
    offline = synthesize_units(vocoder, units)
    pieces = [int(n) for n in torch.randint(0, 6, (60,), generator=g)]
    pieces.append(len(units) - sum(pieces))
    chunks = _stream(vocoder, units, pieces, first_chunk_frames=8, chunk_frames=30)
    joined = np.concatenate([c.samples for c in chunks])
    assert len(chunks) >= 4 and len(chunks[0].samples) == 8 * 320
    assert joined.shape == offline.shape
    assert np.abs(joined - offline).max() < 1e-5
    done = [c.units_done for c in chunks]
    assert done == sorted(done) and done[-1] == len(units)


@pytest.mark.parametrize("make", [lambda: random_hifigan(20), lambda: nano_vocoder(128)], ids=["hifigan", "nano"])
def test_short_lookahead_still_joins_without_clicks(make):
    """With less context than the receptive field the chunks differ slightly from offline; the crossfade keeps
    the jump across every border as small as the jumps inside the audio."""
    vocoder = make()
    units = torch.randint(0, vocoder.num_units, (80,), generator=torch.Generator().manual_seed(1)).tolist()
    offline = synthesize_units(vocoder, units)
    chunks = _stream(vocoder, units, [5] * 16, first_chunk_frames=6, chunk_frames=20, lookahead_frames=3,
                     crossfade_samples=320)
    joined, border, jumps = _border_jumps(chunks)
    assert joined.shape == offline.shape and len(border) >= 3
    assert border.max() <= np.percentile(jumps, 99.9)
    # and it stays close to the offline audio overall
    assert np.sqrt(np.mean((joined - offline) ** 2)) < 0.25 * np.sqrt(np.mean(offline ** 2))


def test_duration_predictor_reach_follows_its_kernel():
    assert nano_vocoder(16).duration_radius == 2 and nano_vocoder(16, duration_kernel=9).duration_radius == 8
    assert random_hifigan(20).duration_radius == 2
    vocoder = nano_vocoder(16, duration_kernel=5)
    units = torch.randint(0, 16, (1, 30), generator=torch.Generator().manual_seed(0))
    changed = units.clone()
    changed[0, 20] = (changed[0, 20] + 1) % 16
    moved = (vocoder.predict_log_durations(units) != vocoder.predict_log_durations(changed))[0].nonzero().flatten()
    assert moved.tolist() == list(range(16, 25))  # units 16..24: within 4 of unit 20
    with pytest.raises(ValueError, match="odd"):
        nano_vocoder(16, duration_kernel=4)


def test_synthesis_state_stays_bounded():
    vocoder = nano_vocoder(128)
    synthesis = ChunkedSynthesis(vocoder, first_chunk_frames=5, chunk_frames=10)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        synthesis.push(torch.randint(0, 128, (8,), generator=g).tolist())
    s = synthesis.state
    assert s.unit_offset > 0 and s.frame_offset > 0
    assert len(s.units) < 600 and len(s.frames) < 600  # trimmed behind the emitted audio
    synthesis.finish()
    assert synthesis.state.finished and synthesis.push is not None
    with pytest.raises(RuntimeError, match="finished"):
        synthesis.push([1])


def test_spoken_wer_normalises_as_whisper_writes():
    """Whisper writes numbers as digits and spells titles out; the answer's words count the same either way."""
    from lyra.data.speech_eval import error_counts, normalize_text, word_error_rate

    said = "Doctor Berg says the price rose by twenty four percent in nineteen ninety three."
    assert word_error_rate([said], ["Dr. Berg says the price rose by 24% in 1993"]) == 0.0
    assert normalize_text("Don't stop-now!") == ["do", "not", "stop", "now"]
    assert error_counts(["The star is black.", "two"], ["the star is block", ""]) == (2, 5)


# ---- speech units --------------------------------------------------------------------------------------
def _path_cost(distances, path, switch_cost):
    return float(distances[torch.arange(len(path)), path].sum()) + switch_cost * int((path[1:] != path[:-1]).sum())


def test_smooth_path_is_the_cheapest_path():
    """Viterbi against every path of a small case; 0 is the nearest centroid, a huge cost one unit throughout."""
    import itertools

    from lyra.data.units import smooth_path

    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        d = torch.rand(6, 3, generator=g) * 4
        assert torch.equal(smooth_path(d, 0.0), d.argmin(1))
        for cost in (0.5, 1.5, 3.0):
            best = min(_path_cost(d, torch.tensor(p), cost) for p in itertools.product(range(3), repeat=6))
            path = smooth_path(d, cost)
            assert _path_cost(d, path, cost) == pytest.approx(best, abs=1e-5)
        flat = smooth_path(d, 1e6)
        assert (flat == d.sum(0).argmin()).all()


def test_a_switch_cost_makes_runs_longer():
    from lyra.data.units import UnitExtractor, dedup

    g = torch.Generator().manual_seed(1)
    centroids, features = torch.randn(16, 160, generator=g), torch.randn(200, 160, generator=g)
    mean, std = torch.zeros(160), torch.ones(160)
    runs = []
    for cost in (0.0, 20.0, 80.0):
        extractor = UnitExtractor.__new__(UnitExtractor)  # no feature extractor needed for assign()
        extractor.centroids, extractor.mean, extractor.std, extractor.switch_cost = centroids, mean, std, cost
        runs.append(len(dedup(extractor.assign(features).tolist())[0]))
    assert runs[0] > runs[1] > runs[2] >= 1


# ---- embedded nano vocoder -------------------------------------------------------------------------------
needs_embedded = pytest.mark.skipif(not (EMBEDDED_VOCODER / "model.safetensors").exists(),
                                    reason="the embedded nano vocoder is not built")


@needs_embedded
def test_embedded_nano_vocoder_is_small_and_fits_the_nano_generator():
    from lyra import build_config

    vocoder = load_vocoder(EMBEDDED_VOCODER)
    assert isinstance(vocoder, NanoVocoder)
    size = sum(p.stat().st_size for p in EMBEDDED_VOCODER.iterdir())
    assert size < 3 * 2**20
    assert vocoder.num_units == build_config("nano").settings.speech_generator.num_units
    recipe = json.loads((EMBEDDED_VOCODER / "recipe.json").read_text())
    assert recipe["wer_resynthesized"] < 0.5


@needs_embedded
def test_resynthesized_speech_is_understood_by_whisper():
    """Speech in the vocoder's voice -> units (Whisper tiny.en frames + k-means) -> nano vocoder -> Whisper tiny.en.
    Three held-out sentences together: one Piper rendering of a sentence can come back much worse than another."""
    from lyra.data.speech_eval import WhisperTranscriber, spoken_wer, word_error_rate
    from lyra.data.synth_speech import Voices
    from lyra.data.units import UnitExtractor
    from lyra.data.vocoder_recipe import HELD_OUT, parse_voice

    extractor = UnitExtractor.from_pretrained()
    vocoder = load_vocoder(EMBEDDED_VOCODER)
    recipe = json.loads((EMBEDDED_VOCODER / "recipe.json").read_text())
    voice, voices, transcriber = parse_voice(recipe["settings"]["voice"]), Voices(piper_threads=1), WhisperTranscriber()
    texts, heard = HELD_OUT[:3], []
    for text in texts:
        units = extractor.units(voices(text, voice))
        assert len(units) > 20 and max(units) < vocoder.num_units
        heard.append(spoken_wer(vocoder.synthesize(units), text, transcriber=transcriber).transcript)
    assert word_error_rate(texts, heard) <= 0.35, heard
    assert word_error_rate(["the cat sat"], ["the cat sat down"]) == pytest.approx(1 / 3)
    assert word_error_rate(["Hello, world!"], ["hello world"]) == 0.0
