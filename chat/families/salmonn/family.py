"""SALMONN (bytedance/SALMONN): Whisper + BEATs + a window-level Q-Former feeding Vicuna with LoRA.

A checkpoint is not one folder but four parts named by the decode yaml of SALMONN's own repository
(`configs/decode_config.yaml`): the Vicuna folder (`llama_path`), the Whisper folder (`whisper_path`),
the BEATs `.pt` (`beats_path`) and SALMONN's `.pth` (`ckpt`: LoRA, Q-Former, projection). `-c` takes
that yaml. This module is what the app needs to know of the family; model.py loads and runs it.

The prompt. One clip and one question render exactly the original's
`<s>USER: <Speech><SpeechHere></Speech> {question}\\nASSISTANT:`. More turns follow Vicuna v1.1, the
multi-turn format its LLM was trained on, with SALMONN's own `\\n` before `ASSISTANT:`: each earlier
reply follows `ASSISTANT:` and ends with `</s>`, as SALMONN's training targets did, and the next
`USER:` follows at once. With more than one clip (or a clip longer than 30 s, sent in parts) each
`<Speech>...</Speech>` is preceded by its label, `Audio 2: `. The text between the markers `<s>`,
`</s>`, `<SpeechHere>` and a reply's start is tokenized piece by piece, each with sentencepiece's
leading `▁`, as the original tokenizes the text around the speech and its training targets apart.
SALMONN was trained without a system prompt, so none is sent, and without tool calls, so the editing
tools are off for it.
"""

from pathlib import Path

import yaml

from chat.conversation import ASSISTANT, Message
from chat.errors import BackendError
from chat.families.base import Family
from chat.prompts import AudioPart, PromptRenderer, Segments, exchanges
from chat.settings import GenerationSettings

BOS, EOS, SPEECH_HERE = "<s>", "</s>", "<SpeechHere>"
SPEECH_START, SPEECH_END = "<Speech>", "</Speech>"
USER_TURN, REPLY_START = "USER: ", "\nASSISTANT:"  # the yaml's prompt_template, "USER: {}\nASSISTANT:"
WHISPER_FRAMES = 1500  # Whisper's output for its fixed 30-s input
SECOND_PER_WINDOW = 0.333333  # the Q-Former's window and stride in both released configs
YAML_SUFFIXES = (".yaml", ".yml")


def window_frames(second_per_window: float) -> int:
    """Whisper frames in one Q-Former window (17 for a third of a second), as the original rounds it."""
    return round(WHISPER_FRAMES * second_per_window / 30.0)


def n_query_windows(second_per_window: float, second_stride: float) -> int:
    """Q-Former windows over Whisper's 1500 frames: 88 for the released configs (the last 4 frames dropped)."""
    return (WHISPER_FRAMES - window_frames(second_per_window)) // window_frames(second_stride) + 1


class SalmonnRenderer(PromptRenderer):
    """The original prompt for one clip and one question, extended in Vicuna's multi-turn style (see the module)."""

    def write(self, prompt: Segments, system: str, messages: tuple[Message, ...], parts: dict[str, list[AudioPart]],
              tools: tuple[dict, ...]) -> None:
        """The prompt, ending where the assistant's reply begins; system is not used (none was trained)."""
        labelled = sum(len(clip_parts) for clip_parts in parts.values()) > 1
        prompt.control(BOS)
        pairs = exchanges(messages)
        for index, (query, replies) in enumerate(pairs):
            prompt.text(USER_TURN)
            for part in (part for clip in query.clips for part in parts[clip.id]):
                # the original joins speech and question with one space, also when the question is empty
                prompt.text(f"{part.label}: {SPEECH_START}" if labelled else SPEECH_START)
                prompt.audio(part, SPEECH_HERE)
                prompt.text(f"{SPEECH_END} ")
            prompt.text(query.text + REPLY_START)
            if index < len(pairs) - 1:
                reply = "".join(m.text for m in replies if m.role == ASSISTANT)
                prompt.break_text()  # a reply is tokenized apart, as SALMONN's training targets were
                prompt.text(reply, shown=f" {reply}")  # sentencepiece's leading `▁` reads as a space
                prompt.control(EOS)
class Salmonn(Family):
    """SALMONN 7B (Vicuna-7B v1.5) and 13B (Vicuna-13B v1.1), from their decode yaml."""

    name = "salmonn"
    title = "SALMONN"
    example_checkpoint = "configs/decode_config.yaml"
    context_tokens = 2048  # Vicuna v1.1; the 7B's v1.5 holds 4096, read from its config when loaded
    # The original decodes with 4 beams, up to 200 tokens; a streamed reply is one beam, so greedy
    settings = GenerationSettings(max_new_tokens=200, temperature=0.0, top_p=0.9, top_k=0, repetition_penalty=1.0)
    tool_style = None  # never trained on tool calls: the editing tools are off for it
    control_tokens = (BOS, EOS, SPEECH_HERE, REPLY_START)
    # Whisper, BEATs, the Q-Former and the projection are attached after the LLM loads, in bf16; of the LLM
    # only lm_head stays unquantized (see the Qwen2-Audio family for why)
    unquantized_modules = ("lm_head",)
    renderer_class = SalmonnRenderer

    def config_of_file(self, path: Path) -> dict | None:
        """A yaml file's contents: -c names SALMONN's decode yaml, which names its parts."""
        if path.suffix not in YAML_SUFFIXES:
            return None
        try:
            config = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise BackendError(f"Cannot read {path} as a yaml file: {e}") from e
        return config if isinstance(config, dict) else {}

    def recognizes(self, config: dict) -> bool:
        """A decode yaml whose model section names the LLM and Whisper."""
        model = config.get("model")
        return isinstance(model, dict) and "llama_path" in model and "whisper_path" in model

    def n_audio_tokens(self, n_samples: int) -> int:
        """One token per Q-Former window, whatever the part's length: Whisper always hears 30 s."""
        return n_query_windows(SECOND_PER_WINDOW, SECOND_PER_WINDOW)



FAMILY = Salmonn()
