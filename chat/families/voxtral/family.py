"""Voxtral (mistralai/Voxtral-Mini-3B-2507, Voxtral-Small-24B-2507): Mistral's audio LLM, trained to call tools.

Its "chat template" is mistral-common, Mistral's own tokenizer library: it writes the system prompt,
the tool list ([AVAILABLE_TOOLS]), each clip ([BEGIN_AUDIO] then 375 [AUDIO] per 30 s), replies, tool
calls and tool results exactly as the model was trained. So the conversation's one layout here is
OpenAI-format messages (openai_messages): the token ids come from mistral-common given them
(model.py), a vLLM server takes them as they are, and the prompt's text writes them out, for
reading and for estimating its length. Text a person types is never read as a
control token: mistral-common encodes it as text.

In the messages each clip part follows its label (`Audio 2:`), a tool's result is a tool message,
and a clip a tool made follows in a user message of its own, so the model hears it. Tokenizers before
v13 take no system prompt in a conversation with audio (Voxtral was trained without one there): the
system prompt then opens the first user message.
"""

import json
from collections.abc import Callable

from chat.conversation import ASSISTANT, TOOL, USER, Message
from chat.families.base import Family
from chat.openai_content import audio_content, text_content
from chat.prompts import AudioPart, Prompt, PromptRenderer, Segments
from chat.settings import GenerationSettings

MODEL_TYPE = "voxtral"
AUDIO_TOKENS_PER_PART = 375  # 12.5 audio tokens per second of a 30-s chunk


def call_id(number: int) -> str:
    """The id of the conversation's number-th tool call: nine characters, as Mistral's tokenizers require."""
    return f"{number:09d}"


def openai_messages(prompt: Prompt, audio: Callable[[AudioPart], dict], system_role: bool) -> list[dict]:
    """The prompt as OpenAI-format chat messages, Voxtral's one layout: mistral-common, a vLLM server and the
    prompt's own text all take it. audio(part) is a part's content chunk.

    system_role: the system prompt is a system message; else it opens the first user message.
    """
    return chat_messages(prompt.system, prompt.messages, prompt.clip_parts, audio, system_role)


def chat_messages(system: str, messages: tuple[Message, ...], parts: dict[str, list[AudioPart]],
                  audio: Callable[[AudioPart], dict], system_role: bool) -> list[dict]:
    """openai_messages() of a prompt's parts before it is one (see there)."""

    def heard(message: Message) -> list[dict]:
        return [chunk for clip in message.clips for part in parts.get(clip.id, [])
                for chunk in (text_content(f"{part.label}:"), audio(part))]

    out = [{"role": "system", "content": system}] if system and system_role else []
    system_text = [text_content(system)] if system and not system_role else []
    n_calls, open_call = 0, None
    for message in messages:
        if message.role == USER:
            text = [text_content(message.text)] if message.text else []
            out.append({"role": "user", "content": system_text + heard(message) + text})
            system_text = []
        elif message.role == ASSISTANT and message.calls:
            n_calls += 1
            open_call = call_id(n_calls)
            call = message.calls[0]
            function = {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}
            out.append({"role": "assistant", "content": message.display_text or None,
                        "tool_calls": [{"id": open_call, "type": "function", "function": function}]})
        elif message.role == ASSISTANT and message.text:
            out.append({"role": "assistant", "content": message.text})
        elif message.role == TOOL:
            if open_call is not None:  # a call the model could not write has no id: its error goes back as a user turn
                out.append({"role": "tool", "tool_call_id": open_call, "content": message.text})
            else:
                out.append({"role": "user", "content": [text_content(message.text)]})
            open_call = None
            if any(parts.get(clip.id) for clip in message.clips):
                out.append({"role": "user", "content": heard(message)})
    return out


class VoxtralRenderer(PromptRenderer):
    """The chat messages written out as mistral-common tokenizes them (the ids come from mistral-common itself)."""

    def write(self, prompt: Segments, system: str, messages: tuple[Message, ...], parts: dict[str, list[AudioPart]],
              tools: tuple[dict, ...]) -> None:
        """What the ids spell, one [AUDIO] standing for each part's run. The tokenizer's version is known only once a
        checkpoint is loaded: the text shows the layout every version takes (the system prompt opens the first user
        message where there is audio)."""
        prompt.control("<s>")
        chat = chat_messages(system, messages, parts, _part, system_role=not any(parts.values()))
        last_user = max((n for n, message in enumerate(chat) if message["role"] == "user"), default=None)
        for n, message in enumerate(chat):
            content = message["content"]
            if message["role"] == "system":
                _wrapped(prompt, "SYSTEM_PROMPT", content)
            elif message["role"] == "user":
                if tools and n == last_user:  # where mistral-common lists them (v7 and later: before the last query)
                    _wrapped(prompt, "AVAILABLE_TOOLS", json.dumps(list(tools), ensure_ascii=False))
                prompt.control("[INST]")
                for chunk in content:
                    if chunk["type"] == "text":
                        prompt.text(chunk["text"])
                    else:
                        prompt.control("[BEGIN_AUDIO]")
                        prompt.audio(chunk["part"], "[AUDIO]")
                prompt.control("[/INST]")
            elif message["role"] == "assistant":
                prompt.text(content or "")
                if "tool_calls" in message:
                    calls = [{"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}
                             for call in message["tool_calls"]]
                    prompt.control("[TOOL_CALLS]")
                    prompt.text(json.dumps(calls, ensure_ascii=False))
                prompt.control("</s>")
            else:
                _wrapped(prompt, "TOOL_RESULTS", content)


def _part(part: AudioPart) -> dict:
    """A part as a chunk of the messages the prompt's text is written from."""
    return {"type": "audio_part", "part": part}


def _wrapped(prompt: Segments, tag: str, text: str) -> None:
    prompt.control(f"[{tag}]")
    prompt.text(text)
    prompt.control(f"[/{tag}]")


class Voxtral(Family):
    """Voxtral Mini 3B and Small 24B: Whisper-large-v3 encoder, a Mistral LLM, mistral-common's format."""

    name = "voxtral"
    title = "Voxtral"
    example_checkpoint = "mistralai/Voxtral-Mini-3B-2507"
    context_tokens = 32768
    # Mistral's recommended chat sampling for Voxtral: temperature 0.2, top_p 0.95
    settings = GenerationSettings(temperature=0.2, top_p=0.95, top_k=0, repetition_penalty=1.0)
    tool_style = "mistral"
    offers_tools = True  # trained on function calling
    # the Whisper encoder and its projection into the LLM, and lm_head: see the Qwen2-Audio family for why
    unquantized_modules = ("model.audio_tower", "model.multi_modal_projector", "lm_head")
    served_by_vllm = True
    renderer_class = VoxtralRenderer

    def recognizes(self, config: dict) -> bool:
        """config.json's model_type is voxtral."""
        return config.get("model_type") == MODEL_TYPE

    def recognizes_name(self, model_name: str) -> bool:
        """Names such as mistralai/Voxtral-Mini-3B-2507."""
        return "voxtral" in model_name.lower()

    def n_audio_tokens(self, n_samples: int) -> int:
        """375 for any part: it is padded to 30 s."""
        return AUDIO_TOKENS_PER_PART

    def request_messages(self, prompt: Prompt) -> list[dict]:
        """The same messages with each part's audio, for a vLLM server with Voxtral's mistral-common tokenizer.

        The server's tokenizer version is not known here: with audio, the system prompt opens the first user
        message, which every version takes.
        """
        return openai_messages(prompt, lambda part: audio_content(part.samples), system_role=not prompt.audio_parts)



FAMILY = Voxtral()
