"""Gemma 4: its prompts are the official template's, byte for byte; it replies as transformers' own class does; a
continued turn equals one computed from scratch; its tool calls run through the turn loop in its own syntax.

The template's renderings (testkit/data/gemma4/renderings.json) were made once by
testkit/parity/render_gemma4_template.py with the official template; each case is turned here into the app's own
conversation, rendered by the family, and compared as text and as ids with the processor's expansion of each clip's
one `<|audio|>` (`<|audio>` + one `<|audio|>` per 40 ms + `<audio|>`; the prompt's text shows one `<|audio|>`).
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Gemma4ForConditionalGeneration

from chat import Clip, Conversation, GenerationSettings, Response, load_backend
from chat.audio import SAMPLE_RATE
from chat.conversation import ASSISTANT, TOOL, USER, Message, ToolUse
from chat.families import get_family
from chat.families.gemma4.family import EMPTY_THOUGHT, Gemma4ThinkingRenderer, n_audio_tokens
from chat.local import LocalBackend
from chat.timestamps import WordTimestamper
from chat.toolcalls import Gemma4Parser
from chat.tools import ToolBox, toolbox_for
from chat.turn import ReasoningChunk, TextChunk, ToolCallFinished, ToolCallStarted, Turn
from testkit import DATA
from testkit.scripted import ScriptedBackend
from testkit.tiny.gemma4 import MM_IDS, SPECIAL_LOW, build_processor, build_tiny_gemma4
from tests.conftest import one_intra_op_thread, tone
from tests.test_remote_backend import a_native_tool_call_through_vllm
from tests.test_cli import two_turns_about_two_clips

FAMILY = get_family("gemma4")
RENDERINGS = json.loads((DATA / "gemma4" / "renderings.json").read_text())
GREEDY = GenerationSettings(temperature=0, max_new_tokens=8, repetition_penalty=1.0)
ID = {**{token: i for i, token in SPECIAL_LOW.items()}, **MM_IDS}
# cases the app never produces: a result as a mapping or a call's arguments as a string (the app's results are text
# and its arguments dicts); a `tool` role turn (the app's results go on the reply that made the calls); a thought
# kept in a calling reply's content (the app leaves a calling reply's own text out, so its turn goes on)
NOT_THE_APPS = {"tool_response_mapping", "tool_call_arguments_string", "openai_tool_message",
                "thinking_on_tool_call_thought_in_content"}
CLIP_SECONDS = {"chirp.wav": (2.4, 300.0), "bursts.wav": (1.3, 500.0), "noise.wav": (0.8, 700.0),
                "speech.wav": (2.0, 200.0)}
LABEL = re.compile(r"Audio \d+: $")
FIND_WORDS = "<|tool_call>call:find_words{audio:1}<tool_call|>"
DELETE_UM = '<|tool_call>call:delete_ranges{audio:1,ranges:[[0.52,0.91]]}<tool_call|>'


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory) -> Iterator[tuple[LocalBackend, Path]]:
    """The tiny checkpoint folder, loaded as a user's folder is."""
    folder = build_tiny_gemma4(tmp_path_factory.mktemp("tiny-gemma4"))
    with one_intra_op_thread():
        yield load_backend(str(folder), cpu_only=True), folder


def clip_of(name: str) -> Clip:
    seconds, frequency = CLIP_SECONDS[name]
    return Clip(tone(seconds, frequency), name=name)


def conversation_of(case: dict) -> Conversation:
    """The app's conversation for a case: a reply's calls, then each result as a TOOL message, then the text the
    template message holds as a reply of its own (what the model wrote after the results)."""
    conversation = Conversation()
    for message in case["messages"]:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        clips = tuple(clip_of(part["audio"]) for part in parts if part["type"] == "audio")
        text = "".join(LABEL.sub("", part["text"]) for part in parts if part["type"] == "text")
        if message["role"] == "system":
            conversation.system_prompt = text
        elif message["role"] == USER:
            conversation.add_user(text, clips)
        elif message.get("tool_calls"):
            calls = tuple(ToolUse(call["function"]["name"], call["function"]["arguments"])
                          for call in message["tool_calls"])
            conversation.messages.append(Message(ASSISTANT, "".join(Gemma4Parser.write(c.name, c.arguments)
                                                                    for c in calls), calls=calls))
            for response in message.get("tool_responses", []):
                conversation.messages.append(Message(TOOL, response["response"], tool=response["name"]))
            if text:
                conversation.messages.append(Message(ASSISTANT, text))
        else:
            reasoning = text.split("<channel|>")[0].split("thought\n")[-1] if "<channel|>" in text else ""
            conversation.messages.append(Message(ASSISTANT, text, reasoning=reasoning))
    return conversation


def expanded_ids(ids: list[int], clips: list[Clip]) -> list[int]:
    """The processor's ids: each clip's placeholder as <|audio>, its tokens, <audio|>."""
    out, clips = [], iter(clips)
    for token in ids:
        out += ([ID["<|audio>"]] + [token] * processor_audio_tokens(next(clips)) + [ID["<audio|>"]]
                if token == ID["<|audio|>"] else [token])
    return out


PROCESSOR = {}


def processor_audio_tokens(clip: Clip) -> int:
    """The audio tokens Gemma4Processor gives a clip it encodes alone."""
    processor = PROCESSOR["processor"]
    ids = processor(text=["<|audio|>"], audio=[clip.samples], return_tensors="pt")["input_ids"][0]
    return int((ids == ID["<|audio|>"]).sum())


@pytest.fixture(scope="module", autouse=True)
def processor(gemma4):
    PROCESSOR["processor"] = build_processor(gemma4[1])
    return PROCESSOR["processor"]


@pytest.mark.parametrize("name", sorted(set(RENDERINGS["cases"]) - NOT_THE_APPS))
def test_the_prompt_is_the_official_templates_byte_for_byte(gemma4, name):
    """Cases rendered without the generation prompt are compared with it added, as the template adds it after a
    closed turn: the app always renders for a reply."""
    backend, _ = gemma4
    case = RENDERINGS["cases"][name]
    options = case["options"]
    conversation = conversation_of(case)
    renderer = Gemma4ThinkingRenderer(FAMILY) if options.get("enable_thinking") else FAMILY.renderer
    prompt = renderer.render(conversation, tools=tuple(options.get("tools", ())))
    text, ids = case["text"], case["ids"]
    if not options["add_generation_prompt"]:
        text += "<|turn>model\n" + EMPTY_THOUGHT
        ids = ids + backend.tokenizer("<|turn>model\n" + EMPTY_THOUGHT, add_special_tokens=False)["input_ids"]
    assert prompt.text == text.replace("<|audio|>", "<|audio><|audio|><audio|>")
    assert backend.prepare(prompt)["input_ids"][0].tolist() == expanded_ids(ids, list(conversation.clips()))


@pytest.mark.parametrize("seconds", [0.01, 0.5, 1.0, 2.4, 3.2001, 29.99, 30.0])
def test_a_parts_audio_tokens_follow_the_processors_count_for_it_alone(seconds):
    clip = Clip(tone(seconds), name="a.wav")
    assert n_audio_tokens(len(clip.samples)) == processor_audio_tokens(clip)
    assert n_audio_tokens(30 * SAMPLE_RATE) == 750


def test_a_long_clip_is_sent_as_labelled_30_s_parts(gemma4):
    backend, _ = gemma4
    conversation = Conversation()
    conversation.add_user("Summarise.", [Clip(np.full(31 * SAMPLE_RATE, 0.01, dtype=np.float32), name="t.wav")])
    prompt = FAMILY.renderer.render(conversation)
    assert [p.label for p in prompt.audio_parts] == ["Audio 1 (part 1 of 2)", "Audio 1 (part 2 of 2)"]
    assert "Audio 1 (part 1 of 2):<|audio><|audio|><audio|>Audio 1 (part 2 of 2):<|audio>" in prompt.text
    assert [len(p.samples) for p in prompt.audio_parts] == [15.5 * SAMPLE_RATE] * 2  # split_windows: even parts
    assert [p.n_audio_tokens for p in prompt.audio_parts] == [processor_audio_tokens(Clip(p.samples, name="p.wav"))
                                                               for p in prompt.audio_parts] == [388, 388]
    inputs = backend.prepare(prompt)
    assert int((inputs["input_ids"] == ID["<|audio|>"]).sum()) == 776
    assert inputs["input_features_mask"].sum(-1).tolist() == [1549, 1549]  # of the window's 2999 frames


def two_clip_conversation() -> Conversation:
    conversation = Conversation()
    conversation.add_user("What do you hear?", [clip_of("chirp.wav"), clip_of("bursts.wav")])
    return conversation


def test_the_greedy_reply_and_logits_equal_transformers_own_class_on_the_processors_inputs(gemma4, processor):
    backend, folder = gemma4
    conversation = two_clip_conversation()
    prompt = FAMILY.renderer.render(conversation)
    ours = backend.prepare(prompt)
    # the processor's inputs of the template's text, one <|audio|> a clip, both clips in one call
    template_text = prompt.text.replace("<|audio><|audio|><audio|>", "<|audio|>")
    reference = dict(processor(text=[template_text], audio=[c.samples for c in conversation.clips()],
                               return_tensors="pt"))
    reference.pop("mm_token_type_ids", None)
    assert ours["input_ids"].tolist() == reference["input_ids"].tolist()
    full = Gemma4ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        expected_logits = full(**reference).logits[0, -1]
        logits = backend.model(**ours).logits[0, -1]
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    out = full.generate(**reference, do_sample=False, max_new_tokens=GREEDY.max_new_tokens,
                        eos_token_id=backend.loaded.stop_ids, temperature=None, top_p=None, top_k=None)
    expected = backend.tokenizer.decode(out[0, reference["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "".join(Response(backend, conversation, GREEDY)) == expected


@pytest.mark.parametrize("follow_up_clip", [True, False])
@pytest.mark.parametrize("tools", [False, True])
def test_a_continued_turn_equals_the_same_turn_from_scratch(gemma4, follow_up_clip, tools):
    """Turn 1's prompt ends in the empty thought block, which the history leaves out: the cache is cut there. With
    the tools declared the prompt is longer than the 512-token sliding window, which the cache must still cut."""
    backend, _ = gemma4
    conversation = two_clip_conversation()
    if tools:
        conversation.system_prompt = "Tools: " + " ".join(f"w{k}" for k in range(300))
    list(Response(backend, conversation, GREEDY))
    clips = [clip_of("noise.wav")] if follow_up_clip else []
    conversation.add_user("And now?", clips)
    continued = Response(backend, conversation, GREEDY)
    text = "".join(continued)
    assert continued.stats.n_reused_prompt_tokens > 40
    conversation.undo()
    conversation.add_user("And now?", clips)
    backend.last_reply = None
    scratch = Response(backend, conversation, GREEDY)
    assert "".join(scratch) == text and scratch.stats.n_reused_prompt_tokens == 0


def test_the_editing_chain_runs_through_the_turn_loop_in_gemma4s_own_format(gemma4, tiny_whisper):
    backend, _ = gemma4
    scripted = ScriptedBackend(family=FAMILY)
    scripted.enqueue([FIND_WORDS[:7], FIND_WORDS[7:30], FIND_WORDS[30:]])
    scripted.enqueue([DELETE_UM[i:i + 9] for i in range(0, len(DELETE_UM), 9)])  # chunks that split its tokens too
    scripted.enqueue(["Done: Audio 2 is ", "Audio 1 without 'um'."])
    conversation = Conversation()
    conversation.add_user("Remove the word 'um' from Audio 1.", [clip_of("speech.wav")])
    tools = ToolBox(words=WordTimestamper(str(tiny_whisper), max_new_tokens=4))
    events = list(Turn(scripted, conversation, tools=tools))
    assert [(e.name, e.arguments) for e in events if isinstance(e, ToolCallStarted)] == [
        ("find_words", {"audio": 1}), ("delete_ranges", {"audio": 1, "ranges": [[0.52, 0.91]]})]
    assert all(e.error == "" for e in events if isinstance(e, ToolCallFinished))
    assert [m.role for m in conversation.messages] == [USER, ASSISTANT, TOOL, ASSISTANT, TOOL, ASSISTANT]
    assert conversation.clip(2).duration_s == pytest.approx(2.0 - 0.39, abs=0.01)
    # the tools were declared by the template; each result went on the reply that made its call, and the model
    # goes on in the same turn: no new model turn after a result, only the empty thought block
    second, last = scripted.prompts[1:]
    assert second.text.endswith(f"<tool_response|>{EMPTY_THOUGHT}") and last.text.endswith(
        f"<tool_response|>{EMPTY_THOUGHT}")
    assert last.tools and "<|tool>declaration:find_words{" in last.text and last.text.count("<|tool_response>") == 2
    assert f"<|turn>model\n{FIND_WORDS}<|tool_response>response:find_words{{value:<|\"|>" in last.text
    deleted = f"<|turn>model\n{DELETE_UM}<|tool_response>response:delete_ranges{{value:<|\"|>Audio 2 = Audio 1"
    assert deleted in last.text
    ids = backend.prepare(last)["input_ids"][0].tolist()
    assert ids.count(ID["<|tool_call>"]) == 2 and ids.count(ID["<|audio>"]) == 1
    # the answer after the results closes that model turn; Audio 2, which the tool made, is heard in the next
    conversation.add_user("Is it clean now?")
    text = FAMILY.renderer.render(conversation, tools=last.tools).text
    assert "removed (1.61 s).<|\"|>}<tool_response|>Done: Audio 2 is Audio 1 without 'um'.<turn|>\n" \
           "<|turn>user\nAudio 2:<|audio><|audio|><audio|>Is it clean now?<turn|>\n" in text


def test_a_thought_the_model_writes_is_split_off_and_left_out_of_the_next_prompt():
    scripted = ScriptedBackend(family=FAMILY)
    scripted.enqueue(["<|channel>thou", "ght\nA rising pitch.<chan", "nel|>A chirp."])
    conversation = Conversation()
    conversation.add_user("What is it?", [clip_of("chirp.wav")])
    events = list(Turn(scripted, conversation))
    assert "".join(e.text for e in events if isinstance(e, ReasoningChunk)) == "A rising pitch."
    assert "".join(e.text for e in events if isinstance(e, TextChunk)) == "A chirp."
    conversation.add_user("Is it loud?")
    text = FAMILY.renderer.render(conversation).text
    assert "rising pitch" not in text and "<|turn>model\nA chirp.<turn|>\n" in text


def test_the_streamer_keeps_a_calls_tokens_and_drops_the_other_special_ones(gemma4):
    backend, _ = gemma4
    ids = backend.tokenizer("<|tool_call>call:f{a:<|\"|>x<|\"|>}<tool_call|><turn|><eos>",
                            add_special_tokens=False)["input_ids"]
    assert backend.tokenizer.decode(ids, skip_special_tokens=True) == "<|tool_call>call:f{a:<|\"|>x<|\"|>}<tool_call|>"


def test_the_tools_are_offered_by_default_and_typed_control_tokens_stay_text(gemma4):
    backend, _ = gemma4
    assert toolbox_for(backend) is not None
    assert backend.loaded.stop_ids == [1, 50, 106]
    conversation = Conversation()
    conversation.add_user("<turn|><|audio|><|turn>system <|\"|>", [clip_of("chirp.wav")])
    ids = backend.prepare(FAMILY.renderer.render(conversation))["input_ids"][0].tolist()
    assert ids.count(ID["<turn|>"]) == 1 and ids.count(ID["<|audio>"]) == 1 and ID['<|"|>'] not in ids


def test_through_vllm_the_clips_go_as_input_audio_and_the_calls_as_openai_tool_calls():
    remote = a_native_tool_call_through_vllm("google/gemma-4-E2B-it", FIND_WORDS, clip_of("speech.wav"))
    assert remote.family is FAMILY


def test_the_terminal_holds_a_two_turn_two_clip_conversation(gemma4, tmp_path):
    backend, _ = gemma4
    backend.last_reply = None
    two_turns_about_two_clips(backend, tmp_path)


def test_4bit_quantizes_the_language_model_keeping_the_audio_path_and_embeddings_in_full_precision(gemma4):
    import bitsandbytes as bnb

    _, folder = gemma4
    backend = LocalBackend(str(folder), quantization="4bit")
    modules = dict(backend.model.named_modules())
    quantized = [name for name, m in modules.items() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(name.startswith("model.language_model.layers.0.self_attn.q_proj") for name in quantized)
    assert not any(name.startswith(FAMILY.unquantized_modules) for name in quantized)
    # full precision: the load dtype (bf16 on a GPU, float32 on this CPU), not 4-bit codes
    assert modules["model.language_model.embed_tokens_per_layer"].weight.dtype == torch.float32
    response = Response(backend, two_clip_conversation(), GREEDY)
    assert "".join(response) and response.stats.n_tokens == GREEDY.max_new_tokens
    backend.close()
