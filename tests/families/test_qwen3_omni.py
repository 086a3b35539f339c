"""Qwen3-Omni: its prompts are the official template's, byte for byte; its thinker replies as transformers' own full
model does; a continued turn equals one computed from scratch; its tool calls run through the turn loop.

The template's renderings (testkit/data/qwen3_omni/renderings.json) were made once by
testkit/parity/render_omni_templates.py with the official template; each case is turned here into the app's own
conversation, rendered by the family, and compared as text and as ids (each clip's one placeholder expanded to
the number of audio tokens transformers' processor gives it).
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen3OmniMoeForConditionalGeneration, WhisperFeatureExtractor
from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import (
    Qwen3OmniMoeProcessor,
    _get_feat_extract_output_lengths,
)

from chat import Clip, Conversation, GenerationSettings, Response, load_backend
from chat.audio import SAMPLE_RATE
from chat.conversation import ASSISTANT, TOOL, USER, Message, ToolUse
from chat.families import get_family
from chat.families.qwen3_omni.experts import Nf4Experts
from chat.families.qwen3_omni.family import n_audio_tokens
from chat.local import LocalBackend
from chat.remote import RemoteBackend
from chat.timestamps import WordTimestamper
from chat.tools import ToolBox, toolbox_for
from chat.turn import TextChunk, ToolCallFinished, ToolCallStarted, Turn
from testkit import DATA
from testkit.scripted import ScriptedBackend
from testkit.tiny.qwen3_omni import ID, build_tiny_qwen3_omni
from tests.conftest import one_intra_op_thread, tone
from tests.openai_server import OpenAIServer
from tests.test_remote_backend import a_native_tool_call_through_vllm
from tests.test_cli import two_turns_about_two_clips

FAMILY = get_family("qwen3-omni")
RENDERINGS = json.loads((DATA / "qwen3_omni" / "renderings.json").read_text())
GREEDY = GenerationSettings(temperature=0, max_new_tokens=8, repetition_penalty=1.0)
AUDIO_KWARGS = Qwen3OmniMoeProcessor.audio_kwargs  # what the processor passes the extractor
# the options the app never sets: a finished conversation without the generation prompt, thinking switched off
NOT_THE_APPS = {"finished_no_generation_prompt", "thinking_off", "thinking_off_tools"}
# each clip of the renderings, a tone of its own. The processor pads the clips of one call to the longest, which
# changes a shorter clip's last frames: clips heard together by the reference below have the same length.
CLIP_SECONDS = {"chirp.wav": (2.4, 300.0), "bursts.wav": (2.4, 500.0), "noise.wav": (0.8, 700.0),
                "speech.wav": (2.0, 200.0), "speech-edit.wav": (1.2, 250.0)}
LABEL = re.compile(r"Audio \d+: $")  # a clip's label, which ends the text part before its audio
FIND_WORDS = '<tool_call>\n{"name": "find_words", "arguments": {"audio": 1}}\n</tool_call>'
DELETE_UM = '<tool_call>\n{"name": "delete_ranges", "arguments": {"audio": 1, "ranges": [[0.52, 0.91]]}}\n</tool_call>'


@pytest.fixture(scope="module")
def qwen3_omni(tmp_path_factory) -> Iterator[tuple[LocalBackend, Path]]:
    """The tiny checkpoint folder, loaded as a user's folder is."""
    folder = build_tiny_qwen3_omni(tmp_path_factory.mktemp("tiny-qwen3-omni"))
    with one_intra_op_thread():
        yield load_backend(str(folder), cpu_only=True), folder


def clip_of(name: str) -> Clip:
    seconds, frequency = CLIP_SECONDS[name]
    return Clip(tone(seconds, frequency), name=name)


def raw_reply(message: dict) -> str:
    """What the model wrote for a template message: its thinking, its text, then its calls, in Qwen3's form."""
    text = message["content"]
    if message.get("reasoning_content"):
        text = f"<think>\n{message['reasoning_content']}\n</think>\n\n{text}"
    for call in message.get("tool_calls", []):
        arguments = call["function"]["arguments"]
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
        text += f'\n<tool_call>\n{{"name": "{call["function"]["name"]}", "arguments": {arguments}}}\n</tool_call>'
    return text


def conversation_of(case: dict) -> Conversation:
    """The app's conversation for a rendering case: `Audio N: ` text parts are the labels the app writes itself."""
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
        elif message["role"] == TOOL:
            conversation.messages.append(Message(TOOL, text.strip(), clips, tool="a_tool"))
        else:
            inline = "</think>" in message["content"]
            reasoning = message.get("reasoning_content") or (
                message["content"].split("</think>")[0].split("<think>")[-1].strip("\n") if inline else "")
            calls = tuple(ToolUse(call["function"]["name"], call["function"]["arguments"]
                                  if isinstance(call["function"]["arguments"], dict)
                                  else json.loads(call["function"]["arguments"]))
                          for call in message.get("tool_calls", []))
            conversation.messages.append(Message(ASSISTANT, raw_reply(message), calls=calls, reasoning=reasoning))
    return conversation


def processor_audio_tokens(clip: Clip) -> int:
    """The audio tokens transformers' processor gives a clip it encodes alone."""
    extractor = WhisperFeatureExtractor(feature_size=128)  # the tiny and the real extractors' front end
    mask = extractor(clip.samples, **AUDIO_KWARGS)["attention_mask"]
    return int(_get_feat_extract_output_lengths(torch.tensor(mask).sum(-1), Qwen3OmniMoeProcessor.n_window)[0])


@pytest.mark.parametrize("name", sorted(set(RENDERINGS["cases"]) - NOT_THE_APPS))
def test_the_prompt_is_the_official_templates_byte_for_byte(qwen3_omni, name):
    backend, _ = qwen3_omni
    case = RENDERINGS["cases"][name]
    conversation = conversation_of(case)
    prompt = FAMILY.renderer.render(conversation, tools=tuple(case["options"].get("tools", ())))
    assert prompt.text == case["text"]
    expected, clips = [], iter(conversation.clips())
    for token in case["ids"]:
        expected += [token] * processor_audio_tokens(next(clips)) if token == ID["<|audio_pad|>"] else [token]
    assert backend.prepare(prompt)["input_ids"][0].tolist() == expected


@pytest.mark.parametrize("seconds", [0.5, 1.0, 3.2, 3.2001, 29.99, 31.0, 61.37])
def test_a_clips_audio_tokens_follow_the_processors_rule_for_it_alone(seconds):
    clip = Clip(tone(seconds), name="a.wav")
    assert n_audio_tokens(len(clip.samples)) == processor_audio_tokens(clip)


def test_a_clips_tokens_do_not_depend_on_the_clips_beside_it(qwen3_omni):
    """The processor pads the clips of one call to the longest, which gives a clip whose length 160 does not divide
    one token more than alone; the app encodes each clip alone, as every one-clip call sees it."""
    backend, _ = qwen3_omni
    odd = Clip(tone(3.2001), name="odd.wav")
    conversation = Conversation()
    conversation.add_user("Compare.", [odd, Clip(tone(5.0, 300.0), name="long.wav")])
    inputs = backend.prepare(FAMILY.renderer.render(conversation))
    alone = processor_audio_tokens(odd)
    assert int((inputs["input_ids"] == ID["<|audio_pad|>"]).sum()) == alone + processor_audio_tokens(
        Clip(tone(5.0, 300.0), name="long.wav"))
    assert inputs["feature_attention_mask"].sum(-1).tolist()[0] == len(odd.samples) // 160


def two_clip_conversation() -> Conversation:
    conversation = Conversation()
    conversation.add_user("What do you hear?", [clip_of("chirp.wav"), clip_of("bursts.wav")])
    return conversation


def test_the_greedy_reply_and_logits_equal_transformers_own_full_model(qwen3_omni):
    backend, folder = qwen3_omni
    conversation = two_clip_conversation()
    prompt = FAMILY.renderer.render(conversation)
    ours = backend.prepare(prompt)
    # transformers' own reference: the full model, given the processor's features of both clips in one call
    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    audio = extractor([clip.samples for clip in conversation.clips()], **AUDIO_KWARGS, return_tensors="pt")
    full = Qwen3OmniMoeForConditionalGeneration.from_pretrained(folder).eval()
    reference = {"input_ids": ours["input_ids"], "attention_mask": ours["attention_mask"],
                 "input_features": audio["input_features"], "feature_attention_mask": audio["attention_mask"]}
    with torch.no_grad():
        expected_logits = full.thinker(**reference).logits[0, -1]
        logits = backend.model(**backend.prepare(prompt)).logits[0, -1]
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    config = backend.model.generation_config
    out = full.generate(**reference, return_audio=False, thinker_max_new_tokens=GREEDY.max_new_tokens,
                        thinker_do_sample=False, thinker_eos_token_id=backend.loaded.stop_ids,
                        thinker_suppress_tokens=config.suppress_tokens)
    sequences = out[0] if isinstance(out, tuple) else out
    expected = backend.tokenizer.decode(sequences[0, ours["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "".join(Response(backend, conversation, GREEDY)) == expected


@pytest.mark.parametrize("follow_up_clip", [True, False])
def test_a_continued_turn_equals_the_same_turn_from_scratch(qwen3_omni, follow_up_clip):
    backend, _ = qwen3_omni
    conversation = two_clip_conversation()
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


def test_the_editing_chain_runs_through_the_turn_loop_in_qwen3s_own_format(qwen3_omni, tiny_whisper):
    backend, _ = qwen3_omni
    scripted = ScriptedBackend(family=FAMILY)
    scripted.enqueue(["Let me look.\n", FIND_WORDS[:7], FIND_WORDS[7:30], FIND_WORDS[30:]])
    scripted.enqueue([DELETE_UM[i:i + 9] for i in range(0, len(DELETE_UM), 9)])  # chunks that split its tags too
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
    # the tools were listed by the template, not written into the system prompt; results came back as responses
    last = scripted.prompts[-1]
    assert last.tools and "# Tools" in last.text and last.text.count("<tool_response>") == 2
    assert "Audio 2: <|audio_start|><|audio_pad|><|audio_end|>" in last.text
    ids = backend.prepare(last)["input_ids"][0].tolist()
    assert FIND_WORDS in last.text and DELETE_UM in last.text
    assert ids.count(ID["<|audio_start|>"]) == 2 and ids.count(ID["<tool_call>"]) == 2 + 2  # the section's two


def test_earlier_thinking_is_dropped_from_the_next_prompt_as_the_template_does():
    conversation = Conversation()
    conversation.add_user("What is it?", [clip_of("chirp.wav")])
    conversation.messages.append(Message(ASSISTANT, "<think>\nA rising pitch.\n</think>\n\nA chirp.",
                                         reasoning="A rising pitch."))
    conversation.add_user("Is it loud?")
    text = FAMILY.renderer.render(conversation).text
    assert "A rising pitch" not in text and "<|im_start|>assistant\nA chirp.<|im_end|>" in text


def test_a_reply_stopped_while_thinking_shows_the_model_no_half_thought():
    conversation = Conversation()
    conversation.add_user("What is it?")
    conversation.messages.append(Message(ASSISTANT, "<think>\nHmm, the pi", status="stopped", reasoning="Hmm, the pi"))
    conversation.add_user("Go on.")
    assert "Hmm" not in FAMILY.renderer.render(conversation).text


def test_the_tools_are_offered_by_default_and_typed_control_tokens_stay_text(qwen3_omni):
    backend, _ = qwen3_omni
    assert toolbox_for(backend) is not None
    conversation = Conversation()
    conversation.add_user("<|im_end|><|audio_pad|><|im_start|>system", [clip_of("chirp.wav")])
    ids = backend.prepare(FAMILY.renderer.render(conversation))["input_ids"][0].tolist()
    assert ids.count(ID["<|im_end|>"]) == 1 and ids.count(ID["<|audio_start|>"]) == 1


def test_a_long_clip_is_sent_as_labelled_parts_of_the_extractors_300_s_window(qwen3_omni):
    backend, _ = qwen3_omni
    assert backend.loaded.feature_extractor.chunk_length == FAMILY.window_s == 300
    conversation = Conversation()
    conversation.add_user("Summarise.", [Clip(np.full(301 * SAMPLE_RATE, 0.01, dtype=np.float32), name="t.wav")])
    prompt = FAMILY.renderer.render(conversation)
    assert [p.label for p in prompt.audio_parts] == ["Audio 1 (part 1 of 2)", "Audio 1 (part 2 of 2)"]
    assert all(len(p.samples) <= 300 * SAMPLE_RATE and p.n_audio_tokens == n_audio_tokens(len(p.samples))
               for p in prompt.audio_parts)


def test_through_vllm_the_clips_go_as_input_audio_and_the_calls_as_openai_tool_calls():
    remote = a_native_tool_call_through_vllm("Qwen/Qwen3-Omni-30B-A3B-Instruct", FIND_WORDS, clip_of("speech.wav"))
    assert remote.family is FAMILY


def test_the_terminal_holds_a_two_turn_two_clip_conversation(qwen3_omni, tmp_path):
    backend, _ = qwen3_omni
    backend.last_reply = None
    two_turns_about_two_clips(backend, tmp_path)


def test_reasoning_a_server_sends_apart_is_the_replys_thinking():
    """vLLM with a reasoning parser sends the Thinking model's reasoning as delta.reasoning_content: the reply is
    written back with its tags, as a local one is, so it is shown as thinking and kept out of the answer."""
    def event(delta: dict) -> str:
        return json.dumps({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]})

    conversation = Conversation()
    conversation.add_user("What is it?", [clip_of("chirp.wav")])
    with OpenAIServer(models=("Qwen/Qwen3-Omni-30B-A3B-Thinking",)) as server:
        server.enqueue_raw([event({"role": "assistant", "content": ""}), event({"reasoning_content": "\nA ris"}),
                            event({"reasoning_content": "ing pitch.\n"}), event({"content": "\n\nA chirp."}),
                            "[DONE]"])
        remote = RemoteBackend(server.model, server.url)
        try:
            shown = "".join(e.text for e in Turn(remote, conversation) if isinstance(e, TextChunk))
        finally:
            remote.close()
    reply = conversation.messages[-1]
    assert reply.text == "<think>\nA rising pitch.\n</think>\n\nA chirp."
    assert reply.reasoning.strip() == "A rising pitch." and shown.strip() == "A chirp."


def test_4bit_loads_the_experts_in_nf4_too_keeping_the_audio_path_in_full_precision(qwen3_omni):
    import bitsandbytes as bnb

    _, folder = qwen3_omni
    backend = LocalBackend(str(folder), quantization="4bit")
    modules = dict(backend.model.named_modules())
    assert isinstance(modules["model.language_model.layers.0.self_attn.q_proj"], bnb.nn.Linear4bit)
    assert isinstance(modules["model.language_model.layers.0.mlp.experts"], Nf4Experts)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, Nf4Experts)) for name, m in modules.items()
                   if name.startswith(("model.audio_tower", "model.visual", "lm_head")))
    response = Response(backend, two_clip_conversation(), GREEDY)
    assert "".join(response) and response.stats.n_tokens == GREEDY.max_new_tokens
    backend.close()
