"""Qwen2-Audio-Instruct (Qwen/Qwen2-Audio-7B-Instruct): its checkpoints, prompts, audio tokens and server layout."""

from chat.conversation import ASSISTANT, TOOL, USER, Message
from chat.families.base import Family
from chat.openai_content import audio_content, text_content
from chat.prompts import AudioPart, Prompt, PromptRenderer

MODEL_TYPE = "qwen2_audio"
AUDIO_PLACEHOLDER = "<|audio_bos|><|AUDIO|><|audio_eos|>"
FRAMES_PER_HALF_TOKEN = 2  # 10-ms mel frames per encoder step before the pool of 2
SAMPLES_PER_FRAME = 160
MAX_AUDIO_TOKENS_PER_PART = 750  # a full 30-s window


class Qwen2AudioRenderer(PromptRenderer):
    """Byte-identical to the processor's chat template for clips up to 30 s.

    Clips carry their conversation number rather than a per-prompt counter, so dropped history
    never renumbers them, and long clips appear as labelled parts. Tool results go back as the
    user turn `<tool_response>...</tool_response>`, the Qwen2.5 convention.
    """

    def render_text(self, system: str, messages: tuple[Message, ...], parts: dict[str, list[AudioPart]],
                    tools: tuple[dict, ...]) -> str:
        """The prompt text, ending where the assistant's reply begins."""
        text = f"<|im_start|>system\n{system}<|im_end|>\n"
        for message in messages:
            if message.role == ASSISTANT and not message.text:
                continue  # a reply that failed before its first token has nothing to show the model
            audio = "".join(f"{part.label}: {AUDIO_PLACEHOLDER}\n" for clip in message.clips for part in parts[clip.id])
            role, body = message.role, audio + message.text
            if message.role == TOOL:
                role, body = USER, f"<tool_response>\n{body}\n</tool_response>"
            text += f"<|im_start|>{role}\n{body}<|im_end|>\n"
        return text + "<|im_start|>assistant\n"


class Qwen2Audio(Family):
    """Qwen2-Audio-Instruct: Whisper-large-v3 encoder, Qwen-7B, ChatML with `Audio N:` lines."""

    name = "qwen2-audio"
    title = "Qwen2-Audio"
    example_checkpoint = "Qwen/Qwen2-Audio-7B-Instruct"
    # Not trained on tool calls (its users report that function prompts are ignored): the editing tools are
    # offered only when a person asks for them (--tools), in the Qwen2.5 Hermes format
    control_tokens = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
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
        """The prompt as OpenAI chat messages, laid out so the model's chat template renders the local prompt text.

        vLLM renders the request with the model's chat template, which writes `Audio k:` with k
        counting the audio of the request. That is the conversation's numbering while no history was
        dropped and no clip is longer than one window; otherwise a note after the audio names the clip.
        """
        n_sent = 0
        messages: list[dict] = [{"role": "system", "content": prompt.system}]
        for message in prompt.messages:
            if message.role == ASSISTANT:
                if message.text:  # as in the local prompt, a reply that failed before its first token is left out
                    messages.append({"role": "assistant", "content": message.text})
                continue
            audio: list[dict] = []
            clip_ids = {clip.id for clip in message.clips}
            for part in (part for part in prompt.audio_parts if part.clip.id in clip_ids):  # a clip is in one message
                n_sent += 1
                audio += [audio_content(part.samples), *_clip_note(part, n_sent)]
            if message.role == TOOL:  # the template has no tool role; the local prompt puts the audio inside the tags
                content = [text_content("<tool_response>\n"), *audio, text_content(f"{message.text}\n</tool_response>")]
            else:
                content = audio + ([text_content(message.text)] if message.text else [])
            messages.append({"role": "user", "content": content})
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
