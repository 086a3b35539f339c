"""Random-weight Kokoro checkpoints in the real on-disk layout (hexgrad/Kokoro-82M), and a tiny spaCy English tagger
in the layout of spacy/en_core_web_sm, for chat.tts.

The Kokoro folder holds what the hub repository holds: config.json with the real keys and phoneme vocabulary, the
weights as kokoro-v1_0.pth (a dict of the five parts' state dicts, each key prefixed "module." as in the real file),
and voices/<name>.pt, each a (510, 1, 256) float32 tensor. chat.tts loads it with the code that loads the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from testkit.tiny.common import SEED

WEIGHTS_FILE = "kokoro-v1_0.pth"
VOICE_SHAPE = (510, 1, 256)  # one style vector per phoneme count, as in the real voices
VOICE_STD = 0.4  # the real voices' values lie within about ±1.7
FRAMES_PER_PHONEME = 3.5  # a real voice speaks English at about this many 25-ms frames per phoneme

# The real config's phoneme vocabulary (symbol → id, ids up to 177 of n_token 178).
VOCAB_SYMBOLS = (
    ';:,.!?\u2014\u2026"()\u201c\u201d \u0303ʣʥʦʨᵝꭧAIOQSTWYᵊabcdefhijklmnopqrstuvwxyzɑɐɒæβɔɕçɖðʤəɚɛɜɟɡɥɨɪʝɯɰŋɳɲɴøɸθœ'
    'ɹɾɻʁɽʂʃʈʧʊʋʌɣɤχʎʒʔˈˌːʰʲ↓→↗↘ᵻ'
)
VOCAB_IDS = (
    1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 31, 33, 35, 36, 39, 41, 42,
    43, 44, 45, 46, 47, 48, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71,
    72, 75, 76, 77, 78, 80, 81, 82, 83, 85, 86, 87, 90, 92, 99, 101, 102, 103, 110, 111, 112, 113, 114, 115, 116,
    118, 119, 120, 123, 125, 126, 128, 129, 130, 131, 132, 133, 135, 136, 138, 139, 140, 142, 143, 147, 148, 156,
    157, 158, 162, 164, 169, 171, 172, 173, 177,
)

REAL_CONFIG = {
    "istftnet": {
        "upsample_kernel_sizes": [20, 12], "upsample_rates": [10, 6], "gen_istft_hop_size": 5, "gen_istft_n_fft": 20,
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "resblock_kernel_sizes": [3, 7, 11],
        "upsample_initial_channel": 512,
    },
    "dim_in": 64, "dropout": 0.2, "hidden_dim": 512, "max_conv_dim": 512, "max_dur": 50, "multispeaker": True,
    "n_layer": 3, "n_mels": 80, "n_token": 178, "style_dim": 128, "text_encoder_kernel_size": 5,
    "plbert": {
        "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 2048, "max_position_embeddings": 512,
        "num_hidden_layers": 12, "dropout": 0.1,
    },
    "vocab": dict(zip(VOCAB_SYMBOLS, VOCAB_IDS, strict=True)),
}

# Smaller where the config allows: the decoder's 1024/512 channels (so upsample_initial_channel 512) and hidden_dim 512
# are fixed by kokoro's code,
# and style_dim 128 by the voices' 256 values; the sample rate and the frame length stay those of the real model.
TINY_CONFIG = REAL_CONFIG | {
    "istftnet": REAL_CONFIG["istftnet"] | {
        "resblock_dilation_sizes": [[1, 3, 5]], "resblock_kernel_sizes": [3],
    },
    "n_layer": 1,
    "plbert": REAL_CONFIG["plbert"] | {
        "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 1,
    },
}

# The voices chat.tts offers (chat.tts.CURATED_VOICES), all of them random here.
VOICES = ("af_heart", "af_bella", "am_michael", "bf_emma", "bm_george", "zf_xiaoxiao", "zf_xiaobei", "zm_yunxi",
          "zm_yunjian")

# en_core_web_sm's tagger labels (Penn Treebank tags), which misaki's English G2P reads.
PTB_TAGS = (
    "$", "''", ",", "-LRB-", "-RRB-", ".", ":", "ADD", "AFX", "CC", "CD", "DT", "EX", "FW", "HYPH", "IN", "JJ", "JJR",
    "JJS", "LS", "MD", "NFP", "NN", "NNP", "NNPS", "NNS", "PDT", "POS", "PRP", "PRP$", "RB", "RBR", "RBS", "RP", "SYM",
    "TO", "UH", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ", "WDT", "WP", "WP$", "WRB", "XX", "_SP", "``",
)
TAGGER_WIDTH = 16  # en_core_web_sm: 96


def build_kokoro(folder: Path, config: dict = TINY_CONFIG, voices: tuple[str, ...] = VOICES) -> Path:
    """Save a random-weight Kokoro checkpoint folder built from ``config`` (TINY_CONFIG, or REAL_CONFIG for a
    real-size model to time) and return it.

    The model is kokoro's own KModel, constructed from the config with no weights loaded (an empty weights file),
    so its parts and parameter names are exactly those the real checkpoint fills.
    """
    from kokoro import KModel

    folder = Path(folder)
    (folder / "voices").mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        torch.save({}, folder / WEIGHTS_FILE)
        model = KModel(repo_id=str(folder), config=str(folder / "config.json"), model=str(folder / WEIGHTS_FILE))
        _realistic_durations(model, config["max_dur"])
        parts = ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")
        torch.save({part: {f"module.{k}": v for k, v in getattr(model, part).state_dict().items()} for part in parts},
                   folder / WEIGHTS_FILE)
        for voice in voices:
            torch.save(torch.randn(*VOICE_SHAPE) * VOICE_STD, folder / "voices" / f"{voice}.pt")
    return folder


def _realistic_durations(model: torch.nn.Module, max_dur: int) -> None:
    """Make each phoneme last about as long as real speech does: duration is the sum of max_dur sigmoids, which
    random weights put near max_dur / 2 frames (about 0.6 s a phoneme), so the audio, and the time to make it, would
    be some seven times too long."""
    projection = model.predictor.duration_proj.linear_layer
    with torch.no_grad():
        projection.weight.mul_(0.1)
        projection.bias.fill_(torch.logit(torch.tensor(FRAMES_PER_PHONEME / max_dur)).item())


def build_english_tagger(folder: Path) -> Path:
    """Save a tiny random spaCy English pipeline like en_core_web_sm's tok2vec and tagger (the parts misaki's
    English G2P uses), in spaCy's folder layout, and return it. Its tags are random; the rest of the G2P is real."""
    import spacy
    from thinc.api import fix_random_seed

    fix_random_seed(SEED)
    nlp = spacy.blank("en")
    nlp.add_pipe("tok2vec", config={"model": {
        "@architectures": "spacy.HashEmbedCNN.v2", "width": TAGGER_WIDTH, "depth": 1, "embed_size": 100,
        "window_size": 1, "maxout_pieces": 2, "subword_features": True, "pretrained_vectors": None,
    }})
    tagger = nlp.add_pipe("tagger", config={"model": {
        "@architectures": "spacy.Tagger.v2", "nO": None, "normalize": False,
        "tok2vec": {"@architectures": "spacy.Tok2VecListener.v1", "width": TAGGER_WIDTH, "upstream": "*"},
    }})
    for tag in PTB_TAGS:
        tagger.add_label(tag)
    nlp.initialize()
    nlp.meta["name"] = "core_web_sm"
    nlp.to_disk(folder)
    return Path(folder)
