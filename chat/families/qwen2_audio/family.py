"""Qwen2-Audio-Instruct (Qwen/Qwen2-Audio-7B-Instruct): its checkpoints, prompts, audio tokens and server layout."""

from chat.clip import Clip
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


class Qwen2AudioRenderer(PromptRenderer):
    """Byte-identical to the processor's chat template for clips up to 30 s.

    Clips carry their conversation number rather than a per-prompt counter, so dropped history
    never renumbers them, and long clips appear as labelled parts. Tool results go back as the
    user turn `<tool_response>...</tool_response>`, the Qwen2.5 convention.
    """

    def write(self, prompt: Segments, system: str, messages: tuple[Message, ...], parts: dict[str, list[AudioPart]],
              tools: tuple[dict, ...]) -> None:
        """The prompt, ending where the assistant's reply begins; the text between control tokens is encoded whole."""
        self.turn(prompt, "system", system)
        for message in messages:
            if message.role == ASSISTANT and not message.text:
                continue  # a reply that failed before its first token has nothing to show the model
            if message.role == TOOL:
                self.turn(prompt, USER, "<tool_response>\n", message.clips, parts, f"{message.text}\n</tool_response>")
            else:
                self.turn(prompt, message.role, "", message.clips, parts, message.text)
        prompt.control(IM_START)
        prompt.text("assistant\n")

    @staticmethod
    def turn(prompt: Segments, role: str, before: str, clips: tuple[Clip, ...] = (),
             parts: dict[str, list[AudioPart]] | None = None, after: str = "") -> None:
        """`<|im_start|>role\n`, text before the clips, each clip part on a labelled line, text after, `<|im_end|>\n`."""
        prompt.control(IM_START)
        prompt.text(f"{role}\n{before}")
        for part in (part for clip in clips for part in parts[clip.id]):
            prompt.text(f"{part.label}: ")
            prompt.control(AUDIO_BOS)
            prompt.audio(part, AUDIO_TOKEN)
            prompt.control(AUDIO_EOS)
            prompt.text("\n")
        prompt.text(after)
        prompt.control(IM_END)
        prompt.text("\n")


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
