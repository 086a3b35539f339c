"""Gemma 4 (google/gemma-4-E2B-it, -E4B-it): Google's small multimodal models with an audio encoder, trained to call
tools in their own syntax.

Its prompt is its chat template's (llama.cpp models/templates/gemma4.jinja at 75f1ba73, tested byte for byte
against the renderings in testkit/data/gemma4/), written from the app's messages as that template writes them:

- Turns are `<|turn>ROLE\\n ... <turn|>\\n` after a <bos>; the assistant's role is `model`. Text parts are trimmed
  and joined with nothing, so the app's label `Audio 1: ` reads `Audio 1:` right before the clip. Each clip part is
  `<|audio>` + one `<|audio|>` per 40 ms + `<audio|>`, as the processor expands the template's one `<|audio|>`.
- No system turn unless the person set a system prompt, tools are offered, or thinking is on (the template's rule);
  the app's default system prompt stands for "none set".
- Tools are declared in the system turn as `<|tool>declaration:NAME{...}<tool|>`; a call is
  `<|tool_call>call:NAME{...}<tool_call|>` (chat.toolcalls.Gemma4Parser) and its result goes on the assistant
  message that made it, as `<|tool_response>response:NAME{value:...}<tool_response|>`: the model goes on in the
  same turn. The app keeps results as TOOL messages after the reply: they are merged back here, and the reply that
  follows them (the answer written after the results) becomes that message's content, which the template writes
  after the results. Text a calling reply wrote before its first call has no place in the template (it writes a
  message's content after its results) and is left out, so a turn still running continues its open model turn.
- A tool's clip (delete_ranges makes Audio 2) cannot go in a result: the result's text names it, and the clip itself
  is heard at the start of the next user turn, labelled like any clip, so later turns can ask about it.
- Thinking is off (the generation prompt ends with the empty thought channel `<|channel>thought\\n<channel|>`): the
  -it checkpoints answer directly when the template is rendered with its defaults, and the app's replies are short
  edits and answers; a thought written anyway (`<|channel>thought\\n...<channel|>`) is split off by reasoning_tags
  and, as the template does, never shown to the model again.
"""

import json
import math
from collections.abc import Callable

from chat.conversation import ASSISTANT, TOOL, USER, Message
from chat.families.base import Family
from chat.gemma4_args import STRING_MARK, write_value
from chat.openai_content import audio_content, text_content
from chat.prompts import AudioPart, Prompt, PromptRenderer, Segments
from chat.settings import GenerationSettings
from chat.toolcalls import Gemma4Parser

MODEL_TYPE = "gemma4"
BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
TURN_OPEN, TURN_CLOSE = "<|turn>", "<turn|>"
TOOL_OPEN, TOOL_CLOSE = "<|tool>", "<tool|>"
CALL_OPEN, CALL_CLOSE = "<|tool_call>", "<tool_call|>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<|tool_response>", "<tool_response|>"
THINK = "<|think|>"
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"
AUDIO_START, AUDIO_TOKEN, AUDIO_END = "<|audio>", "<|audio|>", "<audio|>"
IMAGE_TOKENS = ("<|image>", "<|image|>", "<image|>", "<|video|>")
EMPTY_THOUGHT = f"{CHANNEL_OPEN}thought\n{CHANNEL_CLOSE}"  # the generation prompt's, with thinking off
THOUGHT_OPEN = f"{CHANNEL_OPEN}thought"  # how a reply that thinks starts
# every special token the template or the processor writes: a piece of text between two of them is encoded alone
CONTROL_TOKENS = (BOS, EOS, PAD, TURN_OPEN, TURN_CLOSE, TOOL_OPEN, TOOL_CLOSE, CALL_OPEN, CALL_CLOSE, RESPONSE_OPEN,
                  RESPONSE_CLOSE, STRING_MARK, THINK, CHANNEL_OPEN, CHANNEL_CLOSE, AUDIO_START, AUDIO_TOKEN,
                  AUDIO_END, *IMAGE_TOKENS)
WINDOW_S = 30.0  # the feature extractor's max_length (480000 samples): it cuts longer audio silently
SAMPLE_RATE_HZ = 16000
FRAME_SAMPLES, HOP_SAMPLES = 321, 160  # the extractor's unfold (frame_length 320 + 1) and hop; half a frame padded left
MEL_FRAMES_PER_TOKEN = 4  # two stride-2 convolutions
DECLARATION_KEYS = ("description", "type", "properties", "required", "nullable")  # the template's standard_keys


def n_audio_tokens(n_samples: int) -> int:
    """The processor's count for a part encoded alone: mel frames (n - 161) // 160 + 1, then ceil(F / 4)."""
    n_frames = (n_samples + HOP_SAMPLES - FRAME_SAMPLES) // HOP_SAMPLES + 1
    return max(0, math.ceil(n_frames / MEL_FRAMES_PER_TOKEN))


def strip_thinking(text: str) -> str:
    """The template's strip_thinking: every `<|channel>...<channel|>` taken out, then trimmed."""
    out = ""
    for part in text.split(CHANNEL_CLOSE):
        out += part.split(CHANNEL_OPEN)[0] if CHANNEL_OPEN in part else part
    return out.strip()


def _parameters(properties: dict) -> str:
    """The template's format_parameters (its `required` argument is unused there too)."""
    out = []
    for key, value in sorted(properties.items(), key=lambda item: item[0].lower()):
        if key in DECLARATION_KEYS:
            continue
        fields = []
        if value.get("description"):
            fields.append(f"description:{_string(value['description'])}")
        if value.get("nullable"):
            fields.append("nullable:true")
        value_type = value.get("type") if isinstance(value.get("type"), str) else value["type"][0]
        upper = value_type.upper()
        extra = ""
        if upper == "STRING":
            if value.get("enum"):
                fields.append(f"enum:{_argument(value['enum'])}")
        elif upper == "OBJECT":
            inner = value.get("properties")
            extra = ",properties:{" + (_parameters(inner) if isinstance(inner, dict) else _parameters(value)) + "}"
            if value.get("required"):
                extra += ",required:[" + ",".join(_string(item) for item in value["required"]) + "]"
        elif upper == "ARRAY" and isinstance(value.get("items"), dict) and value["items"]:
            extra = ",items:{" + _items(value["items"]) + "}"
        # as the template: "," before type only after a description, nullable or enum (an object's or array's
        # extra fields open with their own ",", even first)
        body = ",".join(fields) + extra + ("," if fields else "")
        out.append(f"{key}:{{{body}type:{_string(upper)}}}")
    return ",".join(out)


def _items(items: dict) -> str:
    out = []
    for key, value in sorted(items.items(), key=lambda item: item[0].lower()):
        if value is None:
            continue
        if key == "properties":
            out.append("properties:{" + (_parameters(value) if isinstance(value, dict) else "") + "}")
        elif key == "required":
            out.append("required:[" + ",".join(_string(item) for item in value) + "]")
        elif key == "type":
            out.append("type:" + _argument(value.upper() if isinstance(value, str) else [v.upper() for v in value]))
        else:
            out.append(f"{key}:{_argument(value)}")
    return ",".join(out)


def _string(text: str) -> str:
    return f"{STRING_MARK}{text}{STRING_MARK}"


def _argument(value: object) -> str:
    """The template's format_argument(value) with escaped (quoted) keys, as declarations write them."""
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda item: item[0].lower())
        return "{" + ",".join(f"{_string(key)}:{_argument(item)}" for key, item in items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_argument(item) for item in value) + "]"
    return write_value(value)


def declaration(tool: dict) -> str:
    """The template's format_function_declaration of an OpenAI function spec, trimmed."""
    function = tool["function"]
    out = f"declaration:{function['name']}{{description:{_string(function.get('description', ''))}"
    params = function.get("parameters")
    if params:
        out += ",parameters:{"
        if params.get("properties"):
            out += "properties:{" + _parameters(params["properties"]) + "},"
        if params.get("required"):
            out += "required:[" + ",".join(_string(item) for item in params["required"]) + "],"
        if params.get("type"):
            out += f"type:{_string(params['type'].upper())}}}"
    if "response" in function:
        response = function["response"]
        out += ",response:{"
        if response.get("description"):
            out += f"description:{_string(response['description'])},"
        if str(response.get("type", "")).upper() == "OBJECT":
            out += f"type:{_string(response['type'].upper())}}}"
    return (out + "}").strip()


def template_messages(messages: tuple[Message, ...], parts: dict[str, list[AudioPart]],
                      audio: Callable[[AudioPart], dict]) -> list[dict]:
    """The messages as the template's: a reply with calls carries its results (the TOOL messages after it) as
    tool_responses and the answer written after them as its content; a tool's clips open the next user turn.

    Content is a string for a model message; for a user message, a list of text parts and audio(part) chunks.
    A reply that failed before its first token has nothing to show the model and is left out.
    """
    out: list[dict] = []
    pending_clips: list[AudioPart] = []  # clips tools made, heard at the next user turn
    calling: dict | None = None  # the last reply with calls, while its results and answer come in
    for message in messages:
        heard = [part for clip in message.clips for part in parts.get(clip.id, [])]
        if message.role == USER:
            calling = None
            chunks = [chunk for part in pending_clips + heard for chunk in (text_content(f"{part.label}: "),
                                                                             audio(part))]
            pending_clips = []
            out.append({"role": USER, "content": chunks + ([text_content(message.text)] if message.text else [])})
        elif message.role == TOOL:
            pending_clips += heard
            if calling is not None:
                calling.setdefault("tool_responses", []).append({"name": message.tool or "unknown",
                                                                 "response": message.text})
        elif message.calls:
            calling = {"role": ASSISTANT, "content": "",
                       "tool_calls": [{"type": "function", "function": {"name": call.name,
                                                                         "arguments": call.arguments}}
                                      for call in message.calls]}
            out.append(calling)
        elif message.text:
            if calling is not None and calling.get("tool_responses") and not calling["content"]:
                calling["content"] = message.text  # the answer after the results, in the same model turn
            else:
                out.append({"role": ASSISTANT, "content": message.text})
            calling = None
    return out


class Gemma4Renderer(PromptRenderer):
    """The template's text: turns, the tools in the system turn, results on the reply that made the calls."""

    thinking = False

    def _defused(self, message: Message) -> Message:
        """A person's and a tool's text defused; a reply's control tokens (its calls, its thought) are the model's."""
        return message if message.role == ASSISTANT else super()._defused(message)

    def write(self, prompt: Segments, system: str, messages: tuple[Message, ...], parts: dict[str, list[AudioPart]],
              tools: tuple[dict, ...]) -> None:
        """The prompt, ending where the model's reply begins."""
        write = self._writer(prompt)
        write(BOS)
        last_type = None
        if self.thinking or tools or system:
            write(f"{TURN_OPEN}system\n")
            if self.thinking:
                write(THINK)
            write(system.strip())
            for tool in tools:
                write(f"{TOOL_OPEN}{declaration(tool)}{TOOL_CLOSE}")
            write(f"{TURN_CLOSE}\n")
        for message in template_messages(messages, parts, _audio):
            last_type = None
            role = "model" if message["role"] == ASSISTANT else message["role"]
            write(f"{TURN_OPEN}{role}\n")
            for call in message.get("tool_calls", []):
                write(Gemma4Parser.write(call["function"]["name"], call["function"]["arguments"]))
            for response in message.get("tool_responses", []):
                value = response["response"]
                body = (",".join(f"{key}:{write_value(item)}" for key, item in
                                 sorted(value.items(), key=lambda entry: entry[0].lower()))
                        if isinstance(value, dict) else f"value:{write_value(value)}")
                write(f"{RESPONSE_OPEN}response:{response['name']}{{{body}}}{RESPONSE_CLOSE}")
            content = message["content"]
            if isinstance(content, str):
                write(strip_thinking(content) if role == "model" else content.strip())
            else:
                for chunk in content:
                    if chunk["type"] == "text":
                        write(chunk["text"].strip())
                    else:
                        prompt.control(AUDIO_START)
                        prompt.audio(chunk["part"], AUDIO_TOKEN)
                        prompt.control(AUDIO_END)
            if message.get("tool_responses") and not content:
                last_type = "tool_response"  # the model goes on in this turn
            else:
                # (the template also skips the new model turn after results whose turn its content closed; the app
                # never ends a prompt there, and a model turn is opened as after any closed turn)
                write(f"{TURN_CLOSE}\n")
        if last_type != "tool_response":
            write(f"{TURN_OPEN}model\n")
        if not self.thinking:
            write(EMPTY_THOUGHT)

    def _writer(self, prompt: Segments) -> Callable[[str], None]:
        """Writes text, each control token in it as a control segment (as the tokenizer splits on them)."""
        def write(text: str) -> None:
            start = 0
            for match in self.control_token.finditer(text):
                prompt.text(text[start:match.start()])
                prompt.control(match.group())
                start = match.end()
            prompt.text(text[start:])
        return write


class Gemma4ThinkingRenderer(Gemma4Renderer):
    """The template with enable_thinking: `<|think|>` opens the system turn and the reply starts its own thought."""

    thinking = True


def _audio(part: AudioPart) -> dict:
    return {"type": "audio_part", "part": part}


class Gemma4(Family):
    """Gemma 4 E2B / E4B: a USM-style conformer audio encoder (40 ms a token, 30 s at once), Gemma 4's own turns."""

    name = "gemma4"
    title = "Gemma 4"
    example_checkpoint = "google/gemma-4-E2B-it"
    context_tokens = 131072
    window_s = WINDOW_S
    system_prompt = ""
    # the checkpoints' generation_config.json (and the model card): temperature 1, top_p 0.95, top_k 64
    settings = GenerationSettings(temperature=1.0, top_p=0.95, top_k=64, repetition_penalty=1.0)
    tool_style = "gemma4"
    offers_tools = True  # trained on function calling
    reasoning_tags = (THOUGHT_OPEN, CHANNEL_CLOSE)  # a thought the model writes at its reply's start
    control_tokens = CONTROL_TOKENS
    # Left in bf16 when the language model is quantized: the audio tower and its embedder (they hear every clip),
    # the vision tower and its embedder (never run here), the token and per-layer embeddings, and lm_head.
    unquantized_modules = ("model.audio_tower", "model.embed_audio", "model.vision_tower", "model.embed_vision",
                           "model.language_model.embed_tokens", "model.language_model.embed_tokens_per_layer",
                           "lm_head")
    served_by_vllm = True
    renderer_class = Gemma4Renderer

    def recognizes(self, config: dict) -> bool:
        """config.json's model_type is gemma4 with an audio tower (the E2B and E4B checkpoints)."""
        return config.get("model_type") == MODEL_TYPE and bool(config.get("audio_config"))

    def recognizes_name(self, model_name: str) -> bool:
        """Names such as google/gemma-4-E2B-it."""
        name = model_name.lower()
        return "gemma-4" in name or "gemma4" in name

    def n_audio_tokens(self, n_samples: int) -> int:
        """See n_audio_tokens(): a part is encoded alone, so its length never depends on its neighbours."""
        return n_audio_tokens(n_samples)

    def request_messages(self, prompt: Prompt) -> list[dict]:
        """OpenAI messages for vLLM, which renders them with the checkpoint's template: clips as input_audio after
        their labels, each reply's calls as tool_calls (JSON arguments), each result as a tool message naming its
        call; the tools go in the request's `tools`."""
        messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
        n_calls, unanswered = 0, []
        for message in prompt.messages:
            heard = [part for clip in message.clips for part in prompt.clip_parts.get(clip.id, [])]
            chunks = [chunk for part in heard for chunk in (text_content(f"{part.label}: "),
                                                            audio_content(part.samples))]
            if message.role == ASSISTANT:
                if not message.text and not message.calls:
                    continue
                reply = {"role": ASSISTANT, "content": strip_thinking(message.text.split(CALL_OPEN, 1)[0])}
                if message.calls:
                    reply["tool_calls"] = []
                    for call in message.calls:
                        n_calls += 1
                        reply["tool_calls"].append({"id": f"call_{n_calls}", "type": "function", "function": {
                            "name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}})
                        unanswered.append(f"call_{n_calls}")
                messages.append(reply)
            elif message.role == TOOL:
                tool = {"role": TOOL, "content": message.text}
                if unanswered:
                    tool["tool_call_id"] = unanswered.pop(0)
                messages.append(tool)
            else:
                messages.append({"role": USER, "content": chunks + ([text_content(message.text)]
                                                                    if message.text else [])})
        return messages


FAMILY = Gemma4()
