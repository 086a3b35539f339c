"""Qwen3-Omni (Qwen/Qwen3-Omni-30B-A3B-Instruct, -Thinking): Qwen's omni MoE model, trained to call tools.

Its prompt is its chat template's, written here as the template writes it (tested byte for byte against the
official template's renderings in testkit/data/qwen3_omni/). The one layout is the template's own messages
(chat_messages): the local prompt is written from them, and a vLLM server gets them with each clip as
input_audio. The template has no clip labels: each clip is a text part `Audio N: ` followed by its audio part;
no system message unless the person set one. Tools go in the template's `# Tools` section, calls come back as
Hermes `<tool_call>` JSON, several per reply, and each result is a `tool` message, which the template wraps in
`<tool_response>` inside a user turn. The Thinking model's reasoning (Message.reasoning) is kept only where the
template keeps it: in the replies after the last text-only user message.
"""

import json
from collections.abc import Callable

from chat.conversation import ASSISTANT, TOOL, USER, Message
from chat.families.base import Family
from chat.openai_content import audio_content, text_content
from chat.prompts import AudioPart, Prompt, PromptRenderer, Segments
from chat.settings import GenerationSettings

MODEL_TYPE = "qwen3_omni_moe"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
AUDIO_START, AUDIO_TOKEN, AUDIO_END = "<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_call>", "<tool_response>", "</tool_response>"
WINDOW_S = 300.0  # the feature extractor's chunk_length (preprocessor_config.json); the model checks it on load
SAMPLES_PER_FRAME = 160  # 10-ms mel frames at 16 kHz
FRAMES_PER_CHUNK = 100  # the audio encoder's convolution chunk (n_window 50, doubled)
TOKENS_PER_CHUNK = 13  # what one full chunk becomes after three stride-2 convolutions
TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def _audio(part: AudioPart) -> dict:
    """A part as a content chunk of the messages the prompt is written from."""
    return {"type": "audio_part", "part": part}


def labelled(parts: list[AudioPart], audio: Callable[[AudioPart], dict]) -> list[dict]:
    """Each part as the text part `Audio N: ` (or `Audio N (part k of n): `) followed by its audio part."""
    return [chunk for part in parts for chunk in (text_content(f"{part.label}: "), audio(part))]


def reply_content(message: Message) -> str:
    """What a reply said to the person, as the template's `content`: without its thinking and its calls."""
    text = message.text
    if message.reasoning or text.lstrip().startswith(THINK_OPEN):
        text = text.split(THINK_CLOSE, 1)[1].lstrip("\n") if THINK_CLOSE in text else ""
    if message.calls:
        text = text.split(TOOL_CALL_OPEN, 1)[0].strip()
    return text


def chat_messages(messages: tuple[Message, ...], parts: dict[str, list[AudioPart]],
                  audio: Callable[[AudioPart], dict]) -> list[dict]:
    """The messages as the template's messages; audio(part) is a part's content chunk.

    A user turn without clips is a string (the template looks for the last such "query"); with clips, a list.
    A tool message's clip follows its text. A reply that failed before its first token has nothing to show the
    model and is left out.
    """
    out = []
    for message in messages:
        heard = [part for clip in message.clips for part in parts.get(clip.id, [])]
        if message.role == USER:
            text = [text_content(message.text)] if message.text else []
            out.append({"role": USER, "content": labelled(heard, audio) + text if heard else message.text})
        elif message.role == TOOL:
            text = f"{message.text} " if heard else message.text
            out.append({"role": TOOL, "content": [text_content(text), *labelled(heard, audio)] if heard else text})
        elif message.text:
            reply = {"role": ASSISTANT, "content": reply_content(message), "reasoning_content": message.reasoning}
            if message.calls:
                reply["tool_calls"] = [{"type": "function", "function": {"name": call.name,
                                                                          "arguments": call.arguments}}
                                       for call in message.calls]
            out.append(reply)
    return out


def last_query(chat: list[dict]) -> int:
    """The index of the last user message whose content is a string and not a tool response, as the template
    finds it; the last message's when there is none (a clip makes a user message a list)."""
    for index in range(len(chat) - 1, -1, -1):
        content = chat[index]["content"]
        if chat[index]["role"] == USER and isinstance(content, str) and not (
                content.startswith(TOOL_RESPONSE_OPEN) and content.endswith(TOOL_RESPONSE_CLOSE)):
            return index
    return len(chat) - 1


class Qwen3OmniRenderer(PromptRenderer):
    """The template's text: ChatML, the tools in the system turn, results grouped in one user turn."""

    def write(self, prompt: Segments, system: str, messages: tuple[Message, ...], parts: dict[str, list[AudioPart]],
              tools: tuple[dict, ...]) -> None:
        """The prompt, ending where the assistant's reply begins."""
        if tools:
            declarations = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
            self._turn(prompt, "system", [text_content((f"{system}\n\n" if system else "") + TOOLS_HEADER
                                                       + declarations + TOOLS_FOOTER)])
        elif system:
            self._turn(prompt, "system", [text_content(system)])
        chat = chat_messages(messages, parts, _audio)
        query = last_query(chat)
        for index, message in enumerate(chat):
            if message["role"] == USER:
                self._turn(prompt, USER, _chunks(message["content"]))
            elif message["role"] == ASSISTANT:
                self._reply(prompt, message, keeps_reasoning=index > query)
            else:
                if index == 0 or chat[index - 1]["role"] != TOOL:
                    prompt.control(IM_START)
                    prompt.text(USER)
                prompt.text(f"\n{TOOL_RESPONSE_OPEN}\n")
                self._content(prompt, _chunks(message["content"]))
                prompt.text(f"\n{TOOL_RESPONSE_CLOSE}")
                if index == len(chat) - 1 or chat[index + 1]["role"] != TOOL:
                    prompt.control(IM_END)
                    prompt.text("\n")
        prompt.control(IM_START)
        prompt.text(f"{ASSISTANT}\n")

    def _turn(self, prompt: Segments, role: str, content: list[dict]) -> None:
        prompt.control(IM_START)
        prompt.text(f"{role}\n")
        self._content(prompt, content)
        prompt.control(IM_END)
        prompt.text("\n")

    def _reply(self, prompt: Segments, message: dict, keeps_reasoning: bool) -> None:
        content, reasoning = message["content"], message["reasoning_content"]
        prompt.control(IM_START)
        if keeps_reasoning and reasoning:
            prompt.text(f"{ASSISTANT}\n{THINK_OPEN}\n{reasoning.strip(chr(10))}\n{THINK_CLOSE}\n\n"
                        f"{content.lstrip(chr(10))}")
        else:
            prompt.text(f"{ASSISTANT}\n{content}")
        for n, call in enumerate(message.get("tool_calls", [])):
            function = call["function"]
            arguments = json.dumps(function["arguments"], ensure_ascii=False)
            separator = "\n" if n or content else ""
            prompt.text(f'{separator}{TOOL_CALL_OPEN}\n{{"name": "{function["name"]}", "arguments": {arguments}}}\n'
                        "</tool_call>")
        prompt.control(IM_END)
        prompt.text("\n")

    @staticmethod
    def _content(prompt: Segments, content: list[dict]) -> None:
        for chunk in content:
            if chunk["type"] == "text":
                prompt.text(chunk["text"])
            else:
                prompt.control(AUDIO_START)
                prompt.audio(chunk["part"], AUDIO_TOKEN)
                prompt.control(AUDIO_END)


def _chunks(content: str | list[dict]) -> list[dict]:
    return [text_content(content)] if isinstance(content, str) else content


def n_audio_tokens(n_samples: int) -> int:
    """The processor's rule for a clip encoded alone: 10-ms frames (the last partial one dropped), then per
    100-frame chunk 13 tokens, and for the rest of a chunk three stride-2 convolutions rounding up."""
    n_frames = n_samples // SAMPLES_PER_FRAME
    rest = n_frames % FRAMES_PER_CHUNK
    for _ in range(3):
        rest = (rest - 1) // 2 + 1
    return rest + n_frames // FRAMES_PER_CHUNK * TOKENS_PER_CHUNK


class Qwen3Omni(Family):
    """Qwen3-Omni-30B-A3B's thinker: an audio encoder of its own (AuT), a 30B MoE language model, ChatML."""

    name = "qwen3-omni"
    title = "Qwen3-Omni"
    example_checkpoint = "Qwen/Qwen3-Omni-30B-A3B-Instruct"
    context_tokens = 65536
    window_s = WINDOW_S
    system_prompt = ""  # no system message unless a person sets one: Qwen3-Omni was trained without one
    # the model card's sampling for the thinker (its vLLM example): temperature 0.6, top_p 0.95, top_k 20
    settings = GenerationSettings(temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.0)
    tool_style = "qwen3"
    offers_tools = True  # trained on function calling
    reasoning_tags = (THINK_OPEN, THINK_CLOSE)  # the Thinking model's; the Instruct model writes none
    control_tokens = (IM_START, IM_END, "<|endoftext|>", AUDIO_START, AUDIO_TOKEN, AUDIO_END)
    # Left in bf16 when the language model is quantized: the audio encoder, which hears every clip, the vision
    # tower (never run here), and lm_head (see the Qwen2-Audio family). The experts: chat/families/qwen3_omni/.
    unquantized_modules = ("model.audio_tower", "model.visual", "lm_head")
    served_by_vllm = True
    talker = "chat.families.qwen3_omni.talker.Qwen3OmniTalker"
    renderer_class = Qwen3OmniRenderer

    def recognizes(self, config: dict) -> bool:
        """config.json's model_type is qwen3_omni_moe (the full model; the thinker-only class loads from it)."""
        return config.get("model_type") in (MODEL_TYPE, f"{MODEL_TYPE}_thinker")

    def recognizes_name(self, model_name: str) -> bool:
        """Names such as Qwen/Qwen3-Omni-30B-A3B-Instruct."""
        return "qwen3-omni" in model_name.lower()

    def n_audio_tokens(self, n_samples: int) -> int:
        """See n_audio_tokens(): a part is encoded alone, so its length never depends on its neighbours."""
        return n_audio_tokens(n_samples)

    def request_messages(self, prompt: Prompt) -> list[dict]:
        """The template's messages with each part as input_audio and calls as OpenAI writes them, for vLLM; each
        tool message names the call it answers, in order."""
        messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
        n_calls, unanswered = 0, []
        for message in chat_messages(prompt.messages, prompt.clip_parts, lambda part: audio_content(part.samples)):
            if message["role"] == TOOL and unanswered:
                message["tool_call_id"] = unanswered.pop(0)
            for call in message.get("tool_calls", []):
                n_calls += 1
                call["id"] = f"call_{n_calls}"
                call["function"]["arguments"] = json.dumps(call["function"]["arguments"], ensure_ascii=False)
                unanswered.append(call["id"])
            messages.append(message)
        return messages


FAMILY = Qwen3Omni()
