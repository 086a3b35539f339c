"""Qwen2-Audio-Instruct (Qwen/Qwen2-Audio-7B-Instruct): its checkpoints, prompts, audio tokens and server layout."""

from dataclasses import dataclass

from chat.conversation import ASSISTANT, TOOL, USER, Message
from chat.families.base import Family
from chat.openai_content import audio_content, text_content
from chat.prompts import AudioPart, Prompt, PromptRenderer, Segments

MODEL_TYPE = "qwen2_audio"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS = "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"
FRAMES_PER_HALF_TOKEN = 2  # 10-ms mel frames per encoder step before the pool of 2
SAMPLES_PER_FRAME = 160
MAX_AUDIO_TOKENS_PER_PART = 750  # a full 30-s window


@dataclass(frozen=True)
class ChatTurn:
    """One turn of the chat template: its role and its content in order, text and clip parts (each part on a
    labelled line)."""

    role: str
    content: tuple[str | AudioPart, ...]


def chat_turns(messages: tuple[Message, ...], parts: dict[str, list[AudioPart]]) -> list[ChatTurn]:
    """The messages as the template's turns, the one layout of both the local prompt and a server's request.

    A reply that failed before its first token has nothing to show the model and is left out. The template
    has no tool role: tool results are a user turn of `<tool_response>` blocks, the Qwen2.5 convention (the
    results of one reply's several calls in one turn), with the clip a tool made inside its block.
    """
    turns: list[ChatTurn] = []
    for previous, message in zip((None, *messages), messages):
        heard = tuple(part for clip in message.clips for part in parts[clip.id])
        if message.role == TOOL:
            block = ("<tool_response>\n", *heard, f"{message.text}\n</tool_response>")
            if previous is not None and previous.role == TOOL:
                turns[-1] = ChatTurn(USER, (*turns[-1].content, "\n", *block))
            else:
                turns.append(ChatTurn(USER, block))
        elif message.role == USER or message.text:
            turns.append(ChatTurn(message.role, (*heard, message.text)))
    return turns


class Qwen2AudioRenderer(PromptRenderer):
    """Byte-identical to the processor's chat template for clips up to 30 s.

    Clips carry their conversation number rather than a per-prompt counter, so dropped history
    never renumbers them, and long clips appear as labelled parts.
    """

    def write(self, prompt: Segments, system: str, messages: tuple[Message, ...], parts: dict[str, list[AudioPart]],
              tools: tuple[dict, ...]) -> None:
        """The prompt, ending where the assistant's reply begins; the text between control tokens is encoded whole."""
        for turn in [ChatTurn("system", (system,)), *chat_turns(messages, parts)]:
            prompt.control(IM_START)
            prompt.text(f"{turn.role}\n")
            for chunk in turn.content:
                if isinstance(chunk, str):
                    prompt.text(chunk)
                else:
                    prompt.audio_line(chunk, AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS)
            prompt.control(IM_END)
            prompt.text("\n")
        prompt.control(IM_START)
        prompt.text("assistant\n")


class Qwen2Audio(Family):
    """Qwen2-Audio-Instruct: Whisper-large-v3 encoder, Qwen-7B, ChatML with `Audio N:` lines."""

    name = "qwen2-audio"
    title = "Qwen2-Audio"
    example_checkpoint = "Qwen/Qwen2-Audio-7B-Instruct"
    # Not trained on tool calls (its users report that function prompts are ignored): the editing tools are
    # offered only when a person asks for them (--tools), in the Qwen2.5 Hermes format
    control_tokens = (IM_START, IM_END, "<|endoftext|>", AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)
    # Left in bf16 when the language model is quantized. The Whisper-large audio encoder (0.6B weights,
    # 1.3 GB) is what hears: quantization noise there reaches every audio token of every clip, for a small
    # saving. The projector is one small layer that maps audio into the LLM's embedding space. lm_head turns
    # each hidden state into logits, where rounding errors change the sampled token directly (transformers
    # keeps it unquantized by default too). Names are full module paths: transformers 5 matches a skip
    # pattern from the start of the name or as a suffix, so a bare "audio_tower" would match nothing.
    unquantized_modules = ("model.audio_tower", "model.multi_modal_projector", "lm_head")
    served_by_vllm = True
    renderer_class = Qwen2AudioRenderer

    def recognizes(self, config: dict) -> bool:
        """config.json's model_type is qwen2_audio."""
        return config.get("model_type") == MODEL_TYPE

    def recognizes_name(self, model_name: str) -> bool:
        """Names such as Qwen/Qwen2-Audio-7B-Instruct."""
        return "qwen2-audio" in model_name.lower()

    def n_audio_tokens(self, n_samples: int) -> int:
        """10-ms mel frames, halved by a stride-2 convolution (rounding up), then by a pool of 2 (rounding down)."""
        n_half_tokens = -(-n_samples // (SAMPLES_PER_FRAME * FRAMES_PER_HALF_TOKEN))
        return min(MAX_AUDIO_TOKENS_PER_PART, n_half_tokens // 2)

    def request_messages(self, prompt: Prompt) -> list[dict]:
        """The prompt's turns as OpenAI chat messages, which the model's chat template on the server renders.

        vLLM's template writes `Audio k:` with k counting the audio of the request. That is the
        conversation's numbering while no history was dropped and no clip is longer than one window;
        otherwise a note after the audio names the clip.
        """
        messages: list[dict] = [{"role": "system", "content": prompt.system}]
        n_sent = 0
        for turn in chat_turns(prompt.messages, prompt.clip_parts):
            if turn.role == ASSISTANT:
                messages.append({"role": ASSISTANT, "content": turn.content[-1]})
                continue
            content = []
            for chunk in turn.content:
                if isinstance(chunk, str):
                    content += [text_content(chunk)] if chunk else []
                else:
                    n_sent += 1
                    content += [audio_content(chunk.samples), *_clip_note(chunk, n_sent)]
            messages.append({"role": turn.role, "content": content})
        return messages


def _clip_note(part: AudioPart, server_number: int) -> list[dict]:
    """A note naming the part's clip where the server's `Audio k` label would mislead."""
    if part.n_parts > 1:
        name = f"part {part.index + 1} of {part.n_parts} of this conversation's Audio {part.number}"
        return [text_content(f"(Audio {server_number} is {name}.)\n")]
    if part.number != server_number:
        return [text_content(f"(Audio {server_number} is this conversation's Audio {part.number}.)\n")]
    return []


FAMILY = Qwen2Audio()
