"""Qwen-Audio-Chat (Qwen/Qwen-Audio-Chat), the first generation, from its official files without its remote code.

This module is what the app needs to know of the family (its checkpoints, prompts, audio tokens,
abilities); model.py loads and runs it, imported only when a checkpoint is loaded, so
choosing a family costs no torch or transformers import.
"""

from chat.conversation import ASSISTANT, Conversation, Message
from chat.families.base import Family, ReplyStep
from chat.families.qwen_audio_chat.spans import TimestampReader, spans_step
from chat.prompts import AudioPart, PromptRenderer, Segments, exchanges
from chat.settings import GenerationSettings
from chat.toolcalls import ReplyReader

MODEL_TYPE = "qwen"  # with `audio` in config.json: Qwen-VL shares the model_type
AUDIO_PAD, AUDIO_START, AUDIO_END = "[[[AUDIO:modality]]]", "<audio>", "</audio>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SAMPLES_PER_FRAME = 160  # 10-ms mel frames


class QwenAudioChatRenderer(PromptRenderer):
    """The original's make_context layout with the official web demo's queries, `Audio N: <audio>...</audio>\\n`.

    Tool results are shown ReAct-style as `Observation:` lines inside the reply, the format the
    Qwen-7B-Chat family was trained on; a clip a tool made is heard there too.
    """

    def write(self, prompt: Segments, system: str, messages: tuple[Message, ...], parts: dict[str, list[AudioPart]],
              tools: tuple[dict, ...]) -> None:
        """The prompt, ending where the assistant's reply begins (or continues after a tool).

        As make_context does, a turn's role, its newline and its content are encoded apart.
        """
        self.turn_start(prompt, "system")
        prompt.text(system)
        prompt.control(IM_END)
        pairs = exchanges(messages)
        for index, (query, reply) in enumerate(pairs):
            prompt.text("\n")
            self.turn_start(prompt, "user")
            _audio(prompt, query, parts)
            prompt.text(query.text)
            prompt.control(IM_END)
            prompt.text("\n")
            self.turn_start(prompt, "assistant")
            for message in reply:
                if message.role == ASSISTANT:
                    prompt.text(message.text)
                else:
                    prompt.text("\nObservation: ")
                    _audio(prompt, message, parts)
                    prompt.text(f"{message.text}\n")
            if index < len(pairs) - 1:
                prompt.control(IM_END)

    @staticmethod
    def turn_start(prompt: Segments, role: str) -> None:
        """`<|im_start|>`, then the role, its newline and the turn's content, each encoded apart."""
        prompt.control(IM_START)
        prompt.text(role)
        prompt.break_text()
        prompt.text("\n")
        prompt.break_text()


def _audio(prompt: Segments, message: Message, parts: dict[str, list[AudioPart]]) -> None:
    for part in (part for clip in message.clips for part in parts[clip.id]):
        prompt.audio_line(part, AUDIO_START, AUDIO_PAD, AUDIO_END)


class QwenAudioChat(Family):
    """Qwen-Audio-Chat: Whisper-large-v2-style encoder, Qwen-7B, ChatML; trained on word timestamps."""

    name = "qwen-audio-chat"
    title = "Qwen-Audio-Chat"
    example_checkpoint = "Qwen/Qwen-Audio-Chat"
    # its chat_generation_config.json: sampling at top_p 0.5, top_k off, temperature and repetition left at 1
    settings = GenerationSettings(temperature=1.0, top_p=0.5, top_k=0, repetition_penalty=1.0)
    tool_style = "react"  # Qwen-7B-Chat's tool format, when a person asks for the tools (--tools)
    # Not offered the tools by default: it edits speech by answering with timestamps, as its demo did; it saw
    # no tool list in training, and one (about 1,700 tokens) would take most of the 2048 tokens it was trained on.
    # a person's text may hold any audio token but these three, which would claim a clip (as in make_context,
    # ChatML tokens are text there anyway; they are broken up so a renderer's split never sees them)
    control_tokens = (IM_START, IM_END, "<|endoftext|>", AUDIO_START, AUDIO_END, AUDIO_PAD)
    # the Whisper-style encoder, its projection into the LLM, and lm_head: see the Qwen2-Audio family for why
    unquantized_modules = ("audio_tower", "audio_projector", "lm_head")
    renderer_class = QwenAudioChatRenderer

    def reader(self, tools: bool) -> ReplyReader:
        """The reply's text with its timestamps readable (`3.04 s`), and with tools its ReAct calls."""
        return TimestampReader(super().reader(tools))

    def after_reply(self, conversation: Conversation) -> ReplyStep | None:
        """The clips the reply's timestamp spans name, cut from the clip the question was about."""
        return spans_step(conversation)

    def recognizes(self, config: dict) -> bool:
        """config.json of model_type qwen with an audio encoder."""
        return config.get("model_type") == MODEL_TYPE and isinstance(config.get("audio"), dict)

    def recognizes_name(self, model_name: str) -> bool:
        """Names such as Qwen/Qwen-Audio-Chat."""
        return "qwen-audio" in model_name.lower()

    def n_audio_tokens(self, n_samples: int) -> int:
        """Tokens of a part of n_samples: T // 2 with T = (n_samples // 160 - 1) // 2 + 1."""
        return ((n_samples // SAMPLES_PER_FRAME - 1) // 2 + 1) // 2



FAMILY = QwenAudioChat()
