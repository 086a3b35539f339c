"""Qwen2.5-Omni (Qwen/Qwen2.5-Omni-7B, -3B), the text side: it listens and answers in text (its voice comes later).

Its chat template is ChatML with each clip as `<|audio_bos|><|AUDIO|><|audio_eos|>`, labelled `Audio N: ` when the
template is given add_audio_id, the form used here: no newline after a clip, the clips before the text of a user turn.
Labels carry the conversation's clip numbers (the template's own count while no history is dropped), and a clip
longer than the 300-s window appears as labelled parts.

The system prompt always opens with the model card's speech prompt, which the model needs to speak: written from the
first turn, the prompt (and its attention cache) stays the same when the voice is turned on later. A person's own
system prompt, and the tool instructions the app adds when tools are on, follow it after a blank line; the app's
generic default ("You are a helpful assistant.") is left out, since the speech prompt takes its place.

Not trained on tool calls, so the tools are offered only on request (--tools), in the Qwen2.5 Hermes format. The
template has a tool role: a tool's result is a `tool` turn, its text first and then the clip it made, labelled like
any other (`Audio 2 = Audio 1 reversed (0.90 s). Audio 2: <|audio_bos|>...`).
"""

from collections.abc import Iterator

from chat.conversation import ASSISTANT, DEFAULT_SYSTEM_PROMPT, USER, Message
from chat.families.base import Family
from chat.openai_content import audio_content, text_content
from chat.prompts import AudioPart, Prompt, PromptRenderer, Segments

MODEL_TYPE = "qwen2_5_omni"
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS = "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"
VISION_TOKENS = ("<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
                 "<|IMAGE|>", "<|VIDEO|>")  # the vocabulary's other special tokens: a typed one must stay text too
# Qwen2.5-Omni's model card: the system prompt the model needs to answer in speech
SPEECH_SYSTEM_PROMPT = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
                        "perceiving auditory and visual inputs, as well as generating text and speech.")
WINDOW_S = 300.0  # the feature extractor's chunk_length in the real preprocessor_config.json
SAMPLES_PER_FRAME = 160  # one 10-ms mel frame at 16 kHz (a part of n samples has ceil(n / 160) frames)
CONTEXT_TOKENS = 32768  # the thinker's max_position_embeddings; a loaded checkpoint states its own

Chunk = str | AudioPart  # a turn's content in order: text, or a clip part (its label, then its audio)


def system_text(system: str) -> str:
    """The system turn's text: the speech prompt, then the person's own prompt (with any tool instructions) after a
    blank line. An opening that is the app's default prompt, or the speech prompt itself, is not repeated."""
    for opening in (SPEECH_SYSTEM_PROMPT, DEFAULT_SYSTEM_PROMPT):
        if system == opening or system.startswith(f"{opening}\n\n"):
            system = system.removeprefix(opening).removeprefix("\n\n")
            break
    return f"{SPEECH_SYSTEM_PROMPT}\n\n{system}" if system else SPEECH_SYSTEM_PROMPT


def chat_turns(messages: tuple[Message, ...], parts: dict[str, list[AudioPart]]) -> Iterator[tuple[str, list[Chunk]]]:
    """(role, content) of each turn after the system turn: the one layout of the local prompt and a server's request.

    A user turn's clips come before its text; a tool turn's text comes first, then a space and the clip it made.
    A reply that failed before its first token has nothing to show the model and is left out.
    """
    for message in messages:
        if message.role == ASSISTANT and not message.text:
            continue
        heard: list[Chunk] = [part for clip in message.clips for part in parts.get(clip.id, [])]
        if message.role == USER:
            yield message.role, heard + ([message.text] if message.text else [])
        else:
            yield message.role, [f"{message.text} " if heard else message.text, *heard]


class Qwen2_5OmniRenderer(PromptRenderer):
    """Byte-identical to the official chat template given add_audio_id, with the speech system prompt."""

    def write(self, prompt: Segments, system: str, messages: tuple[Message, ...], parts: dict[str, list[AudioPart]],
              tools: tuple[dict, ...]) -> None:
        """The prompt, ending where the assistant's reply begins; the text between control tokens is encoded whole."""
        for role, content in [("system", [system_text(system)]), *chat_turns(messages, parts)]:
            prompt.control(IM_START)
            prompt.text(f"{role}\n")
            for chunk in content:
                if isinstance(chunk, str):
                    prompt.text(chunk)
                else:
                    prompt.text(f"{chunk.label}: ")
                    prompt.control(AUDIO_BOS)
                    prompt.audio(chunk, AUDIO_TOKEN)
                    prompt.control(AUDIO_EOS)
            prompt.control(IM_END)
            prompt.text("\n")
        prompt.control(IM_START)
        prompt.text("assistant\n")


class Qwen2_5Omni(Family):
    """Qwen2.5-Omni's thinker: a Whisper-style audio encoder (300-s window, 25 tokens a second), Qwen2.5-7B/3B."""

    name = "qwen2.5-omni"
    title = "Qwen2.5-Omni"
    example_checkpoint = "Qwen/Qwen2.5-Omni-7B"
    context_tokens = CONTEXT_TOKENS
    window_s = WINDOW_S
    system_prompt = SPEECH_SYSTEM_PROMPT
    # settings: none published (the model card generates with transformers' defaults), so the app's own apply
    control_tokens = (IM_START, IM_END, END_OF_TEXT, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS, *VISION_TOKENS)
    # Left in bf16 when the language model is quantized, as full paths in the thinker-only class: the audio encoder
    # (what hears; see the Qwen2-Audio family), the vision encoder (unused here, and small), and lm_head (where
    # rounding errors change the chosen token). Listing lm_head matters: a skip list replaces bitsandbytes' own.
    unquantized_modules = ("model.audio_tower", "model.visual", "lm_head")
    served_by_vllm = True
    talker = "chat.families.qwen2_5_omni.talker.Qwen2_5OmniTalker"
    renderer_class = Qwen2_5OmniRenderer

    def recognizes(self, config: dict) -> bool:
        """config.json's model_type is qwen2_5_omni (the full model; the thinker-only class loads from it)."""
        return config.get("model_type") in (MODEL_TYPE, f"{MODEL_TYPE}_thinker")

    def recognizes_name(self, model_name: str) -> bool:
        """Names such as Qwen/Qwen2.5-Omni-7B."""
        return "qwen2.5-omni" in model_name.lower()

    def n_audio_tokens(self, n_samples: int) -> int:
        """The processor's rule: 10-ms mel frames, halved by a stride-2 convolution (rounding up), then by a pool of
        2 (rounding down); 25 tokens a second, 7500 for a full window."""
        n_frames = -(-n_samples // SAMPLES_PER_FRAME)
        n_half_tokens = (n_frames - 1) // 2 + 1
        return (n_half_tokens - 2) // 2 + 1

    def request_messages(self, prompt: Prompt) -> list[dict]:
        """The prompt's turns as OpenAI chat messages, which the model's chat template on the server renders.

        A server renders without add_audio_id, so each part's label goes before it as text: the server's prompt is
        then the local one, with the conversation's numbers even where history was dropped or a clip is in parts.
        """
        messages: list[dict] = [{"role": "system", "content": system_text(prompt.system)}]
        for role, content in chat_turns(prompt.messages, prompt.clip_parts):
            if role == ASSISTANT:
                messages.append({"role": role, "content": content[0]})
                continue
            chunks = [chunk for item in content for chunk in (
                [text_content(item)] if isinstance(item, str)
                else [text_content(f"{item.label}: "), audio_content(item.samples)])]
            messages.append({"role": role, "content": chunks})
        return messages


FAMILY = Qwen2_5Omni()
