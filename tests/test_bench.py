"""Each benchmark runs in its quick mode and prints a full table: keeps bench/ from rotting. Nothing here is timed."""

import re

import pytest
import torch
from transformers import (
    Gemma4Config, Gemma4ForConditionalGeneration, Qwen2_5OmniConfig, Qwen2_5OmniThinkerForConditionalGeneration,
)

from bench import api_turns, first_token, gpu, ingest, speech, streaming, turn_prep
from chat.local import LocalBackend
from testkit.tiny import gemma4, omni, qwen2_5_omni


def table(output: str) -> list[list[str]]:
    """The rows printed under the table's dashed rule, split into cells."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"-+( +-+)+", line)) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(re.split(r" {2,}", line.strip()))
    return rows


def is_number(cell: str) -> bool:
    return re.fullmatch(r"-?\d+(\.\d+)?[x%]?", cell) is not None


def test_ingest_quick(capsys):
    ingest.main(["--quick"])
    rows = table(capsys.readouterr().out)
    assert [row[:2] for row in rows] == [["30 s", "wav"], ["30 s", "mp3"]]
    assert all(is_number(cell) for row in rows for cell in row[2:])


def test_api_turns(capsys):
    api_turns.main(["--repeats", "1"])
    rows = table(capsys.readouterr().out)
    assert [row[0] for row in rows] == ["continued (cache reused)", "fresh server"]
    assert int(rows[0][2]) > 0 and rows[1][2] == "0" and all(is_number(row[1]) for row in rows)


def test_turn_prep_quick(capsys):
    turn_prep.main(["--quick"])  # also checks that both routes give the model identical inputs
    output = capsys.readouterr().out
    rows = table(output)
    assert [row[0] for row in rows] == ["1", "2"]
    assert all(is_number(cell) for row in rows for cell in row[1:])
    assert "turn with 2 clips / with 1" in output


def test_first_token_quick(capsys):
    first_token.main(["--quick"])
    rows = table(capsys.readouterr().out)
    assert [row[0] for row in rows] == ["1", "2"]
    assert all(is_number(cell) for row in rows for cell in row[1:])
    assert all(0 < float(row[4].rstrip("%")) < 100 for row in rows)  # the cached turns really reused history


def test_streaming_quick(capsys):
    streaming.main(["--quick"])  # the client must see every chunk the backend yielded
    output = capsys.readouterr().out
    (row,) = table(output)
    assert row[:3] == ["50", "0", str(streaming.QUICK["n_chunks"])]
    assert all(is_number(cell) for cell in row[3:])
    assert "worst median added per chunk" in output


def test_speech_quick(capsys):
    speech.main(["--quick"])  # each route speaks through LocalBackend and a Turn with its voice
    output = capsys.readouterr().out
    rows = table(output)
    assert output.startswith("$ .venv/bin/python -m bench.speech --quick")
    assert [row[0] for row in rows] == list(speech.ROUTES)
    assert all(is_number(cell) for row in rows for cell in row[3:] if cell != "-")
    assert all(float(row[5]) >= float(row[4]) and float(row[7]) > 0 for row in rows)  # audio after the first token
    assert all(0 < float(row[9]) <= 1 for row in rows)  # first audio as a share of the time to the last


@pytest.mark.parametrize("family", ["qwen2-audio", "qwen-audio-chat", "qwen2.5-omni-7b", "qwen3-omni", "gemma4-e2b",
                                    "gemma4-e4b"])
def test_gpu_tiny_quick(capsys, family):
    gpu.main(["--tiny", "--quick", "--family", family])  # exactly the asked-for number of tokens, through LocalBackend
    rows = table(capsys.readouterr().out)
    ple = [["nf4-ple-cpu", "nf4"]] if family.startswith("gemma4") else []  # Gemma 4's PLE-on-CPU load runs too
    assert [row[:2] for row in rows] == [["none", "fp32"], ["nf4", "nf4"], *ple]
    assert all(is_number(cell) for row in rows for cell in row[2:] if cell != "-")


def test_qwen2_5_omni_7b_has_the_real_size():
    config = Qwen2_5OmniConfig(thinker_config=qwen2_5_omni.FULL_THINKER)
    with torch.device("meta"):
        thinker = Qwen2_5OmniThinkerForConditionalGeneration._from_config(config.thinker_config)
    assert round(sum(p.numel() for p in thinker.parameters()) / 1e9, 2) == 8.93  # LM 7.62 B, audio 0.64, vision 0.68


def test_qwen2_5_omni_7b_builder_runs_through_the_app(tmp_path):
    # the GPU builder's whole path on the CPU: the real vocabulary, ids and file layout, narrowed widths
    text = qwen2_5_omni.TEXT | {"vocab_size": omni.REAL_VOCAB_SIZE}
    narrow = qwen2_5_omni.FULL_THINKER | {"audio_config": qwen2_5_omni.AUDIO, "vision_config": qwen2_5_omni.VISION,
                                          "text_config": text}
    folder = qwen2_5_omni.build_qwen2_5_omni_7b(tmp_path, "cpu", thinker=narrow)
    backend = LocalBackend(str(folder), quantization="none", cpu_only=True)
    try:
        assert backend.family.name == "qwen2.5-omni"
        stats = gpu.reply(backend, seed=0, n_new_tokens=4)
        assert stats.n_prompt_tokens > 750  # a 30-s clip is 750 audio tokens, then the question in bytes
    finally:
        backend.close()


@pytest.mark.parametrize(("size", "billions", "ple_billions"), [("e2b", 5.10, 2.35), ("e4b", 7.94, 2.82)])
def test_gemma4_has_the_real_size(size, billions, ple_billions):
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration._from_config(gemma4.real_config(size))
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions
    ple = model.model.language_model.embed_tokens_per_layer
    assert round(ple.weight.numel() / 1e9, 2) == ple_billions  # what nf4-ple-cpu keeps on the CPU


def test_gemma4_builder_runs_through_the_app(tmp_path):
    # the GPU builder's whole path on the CPU: the real vocabulary, ids, layer pattern and files, narrowed widths
    narrow = {"hidden_size": 64, "intermediate_size": 128, "hidden_size_per_layer_input": 8, "head_dim": 16,
              "global_head_dim": 32, "num_hidden_layers": 10, "num_kv_shared_layers": 5,
              "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 2}
    config = Gemma4Config(text_config=gemma4.REAL_TEXT["e2b"] | narrow, audio_config=gemma4.AUDIO,
                          vision_config=gemma4.VISION, **gemma4.REAL_TOP)
    folder = gemma4.build_gemma4_real(tmp_path, "e2b", "cpu", config=config)
    backend = LocalBackend(str(folder), quantization="none", cpu_only=True)
    try:
        assert backend.family.name == "gemma4" and len(backend.tokenizer.tokenizer) == gemma4.REAL_VOCAB_SIZE
        stats = gpu.reply(backend, seed=0, n_new_tokens=4)
        assert stats.n_prompt_tokens > 750  # a 30-s clip is 750 audio tokens, then the question in characters
    finally:
        backend.close()
