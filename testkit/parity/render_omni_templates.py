"""Render conversations with the OFFICIAL Qwen3-Omni and Qwen2.5-Omni chat templates and save them as test data.

Not part of the project and never imported by it: it runs once, by hand, and its output files are committed
(testkit/data/qwen3_omni/renderings.json, testkit/data/qwen2_5_omni/renderings.json). The templates are the model
authors' code: they are read from the fetched repositories at run time and never stored in the project.

    Qwen3-Omni    GitHub repository kyr0/qwen3-omni-vllm-docker, commit d8aab1295f2d8993c9cebe93af5c97bb90cb0f5e,
                  file chat-template.jinja2 (extracted there from Qwen/Qwen3-Omni-30B-A3B-Captioner's
                  chat_template.json; later commits change it), sha256 of the file
                  e314600141e1e59516413f891c052f218ee589c744e499cca377e2c87b5aed47
    Qwen2.5-Omni  GitHub repository huggingface/transformers, commit 134856d34654c9bdc92ebe3a07c1c33390d3a652,
                  tests/models/qwen2_5_omni/test_processor_qwen2_5_omni.py, the "chat_template" string that
                  prepare_processor_dict returns; sha256 of that string (UTF-8)
                  d027e14db2e64eb2c23597240d42ea747b4fd5efd6e6a7604a990949c610f79c

    python testkit/parity/render_omni_templates.py QWEN3_OMNI_GIT_DIR QWEN2_5_OMNI_SOURCE

QWEN3_OMNI_GIT_DIR is a git directory holding that commit (a clone, or the snapshot the `fetch` tool brings).
QWEN2_5_OMNI_SOURCE is a git directory of transformers holding its commit, or that test file as it is at the commit
(or an excerpt holding the "chat_template" line). The run stops if a template's sha256 differs.

Each template renders through transformers' own tokenizer.apply_chat_template, with the tiny byte-level tokenizer
of testkit.tiny.qwen3_omni / qwen2_5_omni, once as text (tokenize=False) and once as ids (tokenize=True). The
templates write one audio placeholder per clip (<|audio_start|><|audio_pad|><|audio_end|> and
<|audio_bos|><|AUDIO|><|audio_eos|>): the ids are recorded UNEXPANDED; the processor later repeats the middle
token once per audio frame of the clip.
"""

import ast
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import transformers  # noqa: E402

from testkit import DATA  # noqa: E402
from testkit.tiny import qwen2_5_omni, qwen3_omni  # noqa: E402

QWEN3 = {"repository": "kyr0/qwen3-omni-vllm-docker", "commit": "d8aab1295f2d8993c9cebe93af5c97bb90cb0f5e",
         "path": "chat-template.jinja2",
         "sha256": "e314600141e1e59516413f891c052f218ee589c744e499cca377e2c87b5aed47"}
QWEN2_5 = {"repository": "huggingface/transformers", "commit": "134856d34654c9bdc92ebe3a07c1c33390d3a652",
           "path": "tests/models/qwen2_5_omni/test_processor_qwen2_5_omni.py",
           "where": 'the "chat_template" string of prepare_processor_dict',
           "sha256": "d027e14db2e64eb2c23597240d42ea747b4fd5efd6e6a7604a990949c610f79c"}
SPEECH_SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
                 "auditory and visual inputs, as well as generating text and speech.")  # Qwen2.5-Omni's model card
SYSTEM = "You edit speech recordings. Answer briefly."

TOOLS = [  # four of the app's editing tools, as chat.tools.Tool.spec() writes them
    {"type": "function", "function": {
        "name": "find_words",
        "description": "List the words said in a clip from start_s on, one JSON line each with start and end in "
                       "seconds.",
        "parameters": {"type": "object", "properties": {
            "audio": {"type": "integer", "minimum": 1},
            "start_s": {"type": "number", "minimum": 0, "maximum": 600.0, "default": 0.0}}, "required": ["audio"]}}},
    {"type": "function", "function": {
        "name": "delete_ranges", "description": "Remove one or more time ranges from a clip; the rest closes up.",
        "parameters": {"type": "object", "properties": {
            "audio": {"type": "integer", "minimum": 1},
            "ranges": {"type": "array", "items": {"type": "array", "items": {"type": "number", "minimum": 0,
                                                                            "maximum": 600.0},
                                                  "minItems": 2, "maxItems": 2},
                       "minItems": 1, "maxItems": 50, "description": "[start_s, end_s] pairs"}},
            "required": ["audio", "ranges"]}}},
    {"type": "function", "function": {
        "name": "keep_range", "description": "Keep only the part of a clip between start_s and end_s.",
        "parameters": {"type": "object", "properties": {
            "audio": {"type": "integer", "minimum": 1},
            "start_s": {"type": "number", "minimum": 0, "maximum": 600.0},
            "end_s": {"type": "number", "minimum": 0, "maximum": 600.0}}, "required": ["audio", "start_s", "end_s"]}}},
    {"type": "function", "function": {
        "name": "change_volume",
        "description": "Make a clip, or only start_s to end_s of it, louder (gain_db > 0) or quieter (< 0).",
        "parameters": {"type": "object", "properties": {
            "audio": {"type": "integer", "minimum": 1},
            "gain_db": {"type": "number", "minimum": -60.0, "maximum": 30.0},
            "start_s": {"type": "number", "minimum": 0, "maximum": 600.0},
            "end_s": {"type": "number", "minimum": 0, "maximum": 600.0}}, "required": ["audio", "gain_db"]}}},
]
WORDS = '{"word": "um", "start": 0.52, "end": 0.91}\n{"word": "hello", "start": 1.02, "end": 1.48}'
WORDS_2 = '{"word": "good", "start": 0.31, "end": 0.6}\n{"word": "morning", "start": 0.6, "end": 1.12}'
REPLY_1 = "It is a rising tone."
REASONING = "The pitch goes up steadily over three seconds."


def audio(name: str) -> dict:
    return {"type": "audio", "audio": name}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def user(*parts: dict | str) -> dict:
    return {"role": "user", "content": [text(p) if isinstance(p, str) else p for p in parts]}


def labelled(n: int, name: str) -> list[dict]:
    """Qwen3-Omni's clip as the app writes it: a text part "Audio N: " and then the audio part."""
    return [text(f"Audio {n}: "), audio(name)]


def call(name: str, arguments: dict | str) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def assistant(content: str, *calls: dict, reasoning: str | None = None) -> dict:
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = list(calls)
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return message


def tool(content: str | list[dict]) -> dict:
    return {"role": "tool", "content": content}


def qwen3_cases() -> dict[str, tuple[list[dict], dict]]:
    """name: (messages, apply_chat_template options); clips labelled "Audio N: " in text parts, as the app does."""
    gen = {"add_generation_prompt": True}
    ask_1 = user(*labelled(1, "chirp.wav"), "What do you hear?")
    two_clips = user(*labelled(1, "chirp.wav"), *labelled(2, "bursts.wav"), "How do they differ?")
    um = user(*labelled(1, "speech.wav"), "Remove the word 'um' from Audio 1.")
    find_1 = call("find_words", {"audio": 1})
    delete_um = call("delete_ranges", {"audio": 1, "ranges": [[0.52, 0.91]]})
    made_2 = tool([text("Made Audio 2: "), audio("speech-edit.wav")])
    return {
        "one_clip": ([ask_1], gen),
        "one_clip_system": ([{"role": "system", "content": SYSTEM}, ask_1], gen),
        "audio_only": ([user(*labelled(1, "chirp.wav"))], gen),
        "two_turns": ([ask_1, assistant(REPLY_1), user(*labelled(2, "bursts.wav"), "And this one?")], gen),
        "several_clips_several_turns": (
            [two_clips, assistant("The second one pulses."), user(*labelled(3, "noise.wav"), "And Audio 3?"),
             assistant("It is noise."), {"role": "user", "content": "Which clip is the longest?"}], gen),
        "finished_no_generation_prompt": ([ask_1, assistant(REPLY_1)], {"add_generation_prompt": False}),
        "add_audio_id_has_no_effect": ([ask_1], gen | {"add_audio_id": True}),
        "tools": ([ask_1], gen | {"tools": TOOLS}),
        "tools_system": ([{"role": "system", "content": SYSTEM}, ask_1], gen | {"tools": TOOLS}),
        "tool_call_one": ([um, assistant("", find_1), tool(WORDS)], gen | {"tools": TOOLS}),
        "tool_calls_two": (
            [two_clips, assistant("I will list the words of both clips.", find_1, call("find_words", {"audio": 2})),
             tool(WORDS), tool(WORDS_2)], gen | {"tools": TOOLS}),
        "tool_chain_then_new_turn": (
            [um, assistant("", find_1), tool(WORDS), assistant("", delete_um), made_2,
             assistant("Done: Audio 2 is Audio 1 without 'um'."),
             {"role": "user", "content": "Now make Audio 2 louder."}], gen | {"tools": TOOLS}),
        "tool_call_arguments_string": (
            [um, assistant("", call("delete_ranges", '{"audio": 1, "ranges": [[0.52, 0.91]]}')), made_2],
            gen | {"tools": TOOLS}),
        "thinking_off": ([ask_1], gen | {"enable_thinking": False}),
        "thinking_off_tools": ([um], gen | {"tools": TOOLS, "enable_thinking": False}),
        "thinking_on_drops_earlier_reasoning": (
            [ask_1, assistant(REPLY_1, reasoning=REASONING), user(*labelled(2, "bursts.wav"), "And this one?")],
            gen | {"enable_thinking": True}),
        "thinking_on_drops_inline_think": (
            [ask_1, assistant(f"<think>\n{REASONING}\n</think>\n\n{REPLY_1}"),
             {"role": "user", "content": "Is it loud?"}], gen | {"enable_thinking": True}),
        # The template finds "the last query" among user messages whose content is a string: after a user message
        # with a clip (a list) it keeps no reasoning at all, after a text-only one it keeps the current chain's.
        "thinking_on_tool_chain_after_clip": (
            [um, assistant("", find_1, reasoning="First find when 'um' is said."), tool(WORDS)],
            gen | {"tools": TOOLS, "enable_thinking": True}),
        "thinking_on_tool_chain_after_text": (
            [um, assistant("Done.", reasoning=REASONING), {"role": "user", "content": "Also remove 'hello'."},
             assistant("", find_1, reasoning="Find when 'hello' is said."), tool(WORDS)],
            gen | {"tools": TOOLS, "enable_thinking": True}),
    }


def qwen2_5_cases() -> dict[str, tuple[list[dict], dict]]:
    """name: (messages, apply_chat_template options); the app sends the speech system prompt and add_audio_id."""
    gen = {"add_generation_prompt": True, "add_audio_id": True}
    system = {"role": "system", "content": SPEECH_SYSTEM}
    ask_1 = user(audio("chirp.wav"), "What do you hear?")
    return {
        "one_clip": ([system, ask_1], gen),
        "one_clip_default_system": ([ask_1], gen),
        "one_clip_no_audio_id": ([system, ask_1], {"add_generation_prompt": True}),
        "audio_only": ([system, user(audio("chirp.wav"))], gen),
        "two_turns": ([system, ask_1, assistant(REPLY_1), user(audio("bursts.wav"), "And this one?")], gen),
        "several_clips_several_turns": (
            [system, user(audio("chirp.wav"), audio("bursts.wav"), "How do they differ?"),
             assistant("The second one pulses."), user(audio("noise.wav"), "And Audio 3?"), assistant("It is noise."),
             {"role": "user", "content": "Which clip is the longest?"}], gen),
        "finished_no_generation_prompt": ([system, ask_1, assistant(REPLY_1)], gen | {"add_generation_prompt": False}),
        # No tool section: a tool message renders as any other role, and a clip in it takes the next number.
        "tool_messages": (
            [system, user(audio("speech.wav"), "Remove the word 'um' from Audio 1."),
             assistant('<tool_call>\n{"name": "find_words", "arguments": {"audio": 1}}\n</tool_call>'), tool(WORDS),
             assistant('<tool_call>\n{"name": "delete_ranges", "arguments": {"audio": 1, "ranges": [[0.52, 0.91]]}}'
                       '\n</tool_call>'),
             tool([text("Made "), audio("speech-edit.wav")])], gen),
    }


def render(tokenizer, template: str, cases: dict, placeholder: str) -> dict:
    """Each case as text and as (unexpanded) ids, through transformers' apply_chat_template."""
    placeholder_id = tokenizer.convert_tokens_to_ids(placeholder)
    out = {}
    for name, (messages, options) in cases.items():
        rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **options)
        ids = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False,
                                            **options)
        if ids != tokenizer(rendered, add_special_tokens=False).input_ids:
            raise AssertionError(f"{name}: tokenize=True differs from the tokenized text")
        n_clips = sum(isinstance(m["content"], list) and sum(p.get("type") == "audio" for p in m["content"])
                      for m in messages)
        if ids.count(placeholder_id) != n_clips:
            raise AssertionError(f"{name}: {ids.count(placeholder_id)} placeholders for {n_clips} clips")
        out[name] = {"messages": messages, "options": options, "text": rendered, "ids": ids}
    return out


def write(path: Path, family: str, source: dict, tokenizer, placeholder: str, cases: dict) -> None:
    """The renderings as JSON, each id list on one line."""
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.get_added_vocab()}
    document = {
        "family": family, "template": source, "transformers": transformers.__version__,
        "tokenizer": f"testkit.tiny.{family}.tiny_tokenizer() (byte-level; added tokens in the real order)",
        "added_token_ids": dict(sorted(special.items(), key=lambda item: item[1])),
        "ids_note": f"unexpanded: one {placeholder} per clip, as the template writes it; the processor repeats it "
                    "once per audio frame of the clip",
        "cases": cases,
    }
    text_out = json.dumps(document, indent=1, ensure_ascii=False)
    text_out = re.sub(r'"ids": \[([\d,\s]*)\]', lambda m: '"ids": [' + " ".join(m.group(1).split()) + "]", text_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_out + "\n")


def checked(template: str, source: dict) -> str:
    digest = hashlib.sha256(template.encode()).hexdigest()
    if digest != source["sha256"]:
        raise SystemExit(f"{source['repository']} {source['path']}: sha256 {digest}, expected {source['sha256']}")
    return template


def qwen3_template(git_dir: str) -> str:
    shown = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{QWEN3['commit']}:{QWEN3['path']}"],
                           check=True, capture_output=True)
    return checked(shown.stdout.decode(), QWEN3)


def qwen2_5_template(source: str) -> str:
    path = Path(source)
    if path.is_dir():  # a transformers git directory
        code = subprocess.run(["git", f"--git-dir={path}", "show", f"{QWEN2_5['commit']}:{QWEN2_5['path']}"],
                              check=True, capture_output=True).stdout.decode()
    else:
        code = path.read_text()
    literal = re.search(r'"chat_template": ("(?:[^"\\]|\\.)*")', code)
    if literal is None:
        raise SystemExit(f"{source}: no \"chat_template\" string")
    return checked(ast.literal_eval(literal.group(1)), QWEN2_5)


def main(qwen3_git_dir: str, qwen2_5_source: str) -> None:
    tokenizer = qwen3_omni.tiny_tokenizer()
    cases = render(tokenizer, qwen3_template(qwen3_git_dir), qwen3_cases(), "<|audio_pad|>")
    write(DATA / "qwen3_omni" / "renderings.json", "qwen3_omni", QWEN3, tokenizer, "<|audio_pad|>", cases)
    tokenizer = qwen2_5_omni.tiny_tokenizer()
    cases = render(tokenizer, qwen2_5_template(qwen2_5_source), qwen2_5_cases(), "<|AUDIO|>")
    write(DATA / "qwen2_5_omni" / "renderings.json", "qwen2_5_omni", QWEN2_5, tokenizer, "<|AUDIO|>", cases)


if __name__ == "__main__":
    main(*sys.argv[1:3])
