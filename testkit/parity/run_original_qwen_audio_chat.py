"""Run the ORIGINAL Qwen-Audio-Chat code on the tiny checkpoint and save what it computes, as test data.

Not part of the project and never imported by it: it runs once, by hand, in a side virtual environment
with the original's own pins, and its output file is committed (testkit/data/qwen_audio_chat/parity.json).

    python3 -m venv /tmp/qa-orig
    /tmp/qa-orig/bin/pip install torch==2.13.0 transformers==4.32.0 tiktoken einops \\
        transformers_stream_generator==0.0.4 pillow matplotlib requests safetensors "numpy<2.3"
    # the original code: GitHub QwenLM/Qwen-Audio (same files as the hub repository), e.g. a clone at $REPO
    /tmp/qa-orig/bin/python testkit/parity/run_original_qwen_audio_chat.py $REPO testkit/data/qwen_audio_chat/parity.json

The original's .py files are copied into a temporary copy of the tiny checkpoint (with an empty
`cpp_kernels.py`, which its loader demands and only int8 KV caching uses) and loaded with
trust_remote_code, as its README does. Audio is written as 16-bit wav, which the original reads with ffmpeg.
"""

import json
import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testkit.parity.qwen_audio_chat_cases import CASES, CLIPS, SAMPLE_RATE, SYSTEM, clip  # noqa: E402
from testkit.tiny.qwen_audio_chat import build_tiny_qwen_audio_chat  # noqa: E402

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.generation import GenerationConfig  # noqa: E402

ORIGINAL_FILES = ("modeling_qwen.py", "configuration_qwen.py", "qwen_generation_utils.py", "tokenization_qwen.py",
                  "audio.py")
N_NEW_TOKENS = 12
N_TOP_LOGITS = 50
N_PROBED_LOGITS = 500  # logits at fixed random ids too, not only the top ones


def query_text(folder: Path, clips: list[tuple[str, int]], text: str) -> str:
    """The official web demo's query: `Audio N: <audio>path</audio>\\n` per clip, then the text."""
    return "".join(f"Audio {n}: <audio>{folder / name}</audio>\n" for name, n in clips) + text


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(samples.tobytes())


def main(repo: Path, output: Path) -> None:
    work = Path(tempfile.mkdtemp())
    checkpoint = build_tiny_qwen_audio_chat(work / "checkpoint")
    for name in ORIGINAL_FILES:
        (checkpoint / name).write_bytes(subprocess.run(["git", "--git-dir", str(repo), "show", f"HEAD:{name}"],
                                                       capture_output=True, check=True).stdout)
    (checkpoint / "cpp_kernels.py").write_text("")
    audio = work / "audio"
    audio.mkdir()
    for name, spec in CLIPS.items():
        write_wav(audio / name, clip(*spec))

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, torch_dtype=torch.float32).eval()
    model.generation_config = GenerationConfig.from_pretrained(checkpoint, trust_remote_code=True)
    make_context = sys.modules[type(model).__module__.replace("modeling_qwen", "qwen_generation_utils")].make_context
    stop_ids = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]

    probe_ids = sorted(np.random.default_rng(0).choice(len(tokenizer), N_PROBED_LOGITS, replace=False).tolist())
    results = {"clips": {name: list(spec) for name, spec in CLIPS.items()}, "system": SYSTEM,
               "probe_ids": probe_ids, "cases": {}}
    for case, (history, clips, text) in CASES.items():
        past = [(query_text(audio, h_clips, h_text), reply) for h_clips, h_text, reply in history]
        query = query_text(audio, clips, text)
        raw_text, context_tokens, audio_info = make_context(tokenizer, query, history=past, system=SYSTEM,
                                                            max_window_size=6144, chat_format="chatml")
        input_ids = torch.tensor([context_tokens])
        with torch.no_grad():
            logits = model(input_ids, audio_info=audio_info).logits[0, -1]
            generated = model.generate(input_ids, audio_info=audio_info, do_sample=False, max_new_tokens=N_NEW_TOKENS,
                                       eos_token_id=stop_ids, pad_token_id=tokenizer.eod_id, top_p=None, top_k=None,
                                       repetition_penalty=1.0, generation_config=model.generation_config)
        top = torch.topk(logits, N_TOP_LOGITS)
        results["cases"][case] = {
            "prompt_ids": context_tokens,
            "top_logit_ids": top.indices.tolist(), "top_logits": top.values.tolist(),
            "probe_logits": logits[probe_ids].tolist(),
            "greedy_ids": generated[0, len(context_tokens):].tolist(),
            "audio_span_tokens": audio_info["audio_span_tokens"] if audio_info else [],
        }
        print(case, len(context_tokens), "prompt tokens; greedy", results["cases"][case]["greedy_ids"])
    output.write_text(json.dumps(results, indent=1))
    shutil.rmtree(work)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
