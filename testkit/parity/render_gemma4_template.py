"""Render conversations with the OFFICIAL Gemma 4 chat template and save them as test data.

Not part of the project and never imported by it: it runs once, by hand, and its output file is committed
(testkit/data/gemma4/renderings.json). The template is the model authors' code: it is read at run time and never
stored in the project.

    Gemma 4   GitHub repository ggml-org/llama.cpp, commit 75f1ba7389067a9f90082515e124c377a1e104b2,
              file models/templates/gemma4.jinja (12133 bytes, LF, a final newline), sha256
              87294f1fa94c3733b7f325252567c990edfd0269ff7df285f995ca5226c8989b

    python testkit/parity/render_gemma4_template.py TEMPLATE_SOURCE

TEMPLATE_SOURCE is a git directory holding that commit (a clone of llama.cpp), or the file itself as it is at the
commit. The `fetch` tool refuses llama.cpp (1.47 GB, over its 500 MB limit); the file was taken from the stored copy
of that path at that commit (the `read_file` tool, repo + path + commit) and written out byte for byte. The run
stops if the sha256 differs.

The same template, byte for byte apart from two things, is forcepusher/gemma4_jinja's chat_template.jinja at commit
7be15a9f0d509f31924a84b6925141c7840c7357 ("original template", 2026-04-11; CRLF line ends, no final newline): there
format_parameters reads value['type'] directly, where llama.cpp's copy first takes the first entry of a list of
types (value_type). The app's tools declare one type per parameter, so both render them alike.

Each case renders through transformers' own tokenizer.apply_chat_template, with the tiny tokenizer of
testkit.tiny.gemma4 (Gemma 4's special tokens; the ids below 107 are the real ones), once as text (tokenize=False)
and once as ids (tokenize=True). The template writes one <|audio|> per clip: the ids are recorded UNEXPANDED; the
processor replaces each with <|audio> + one <|audio|> per 40 ms of the clip + <audio|>.

Tool results go as `tool_responses` on the assistant message that made the calls, as Google's function-calling
notebook does: this template has no tool role (a {"role": "tool"} message renders as a turn of role "tool"; the
case openai_tool_message shows it).
"""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import transformers  # noqa: E402

from testkit import DATA  # noqa: E402
from testkit.parity.render_omni_templates import (  # noqa: E402
    REASONING, REPLY_1, SYSTEM, TOOLS, WORDS, WORDS_2, audio, call, render, text, user,
)
from testkit.tiny import gemma4  # noqa: E402

SOURCE = {"repository": "ggml-org/llama.cpp", "commit": "75f1ba7389067a9f90082515e124c377a1e104b2",
          "path": "models/templates/gemma4.jinja",
          "sha256": "87294f1fa94c3733b7f325252567c990edfd0269ff7df285f995ca5226c8989b"}
SECOND_COPY = {"repository": "forcepusher/gemma4_jinja", "commit": "7be15a9f0d509f31924a84b6925141c7840c7357",
               "path": "chat_template.jinja",
               "differs": "CRLF line ends, no final newline; format_parameters uses value['type'] where llama.cpp's "
                          "copy uses value_type (the first of a list of types)"}
MADE_2 = "Made Audio 2 (Audio 1 without 0.52-0.91 s)."
THOUGHT = f"<|channel>thought\n{REASONING}<channel|>"  # how the model writes its thinking


def labelled(n: int, name: str) -> list[dict]:
    """A clip as the app writes it: a text part "Audio N: " and then the audio part."""
    return [text(f"Audio {n}: "), audio(name)]


def model(content: str = "", *calls: dict, responses: list[dict] | None = None, **extra) -> dict:
    """An assistant message: its text, the calls it made and (Gemma's way) the results of those calls."""
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = list(calls)
    if responses:
        message["tool_responses"] = responses
    return message | extra


def result(name: str, response) -> dict:
    return {"name": name, "response": response}


def cases() -> dict[str, tuple[list[dict], dict]]:
    """name: (messages, apply_chat_template options); clips labelled "Audio N: " in text parts, as the app does."""
    gen, done = {"add_generation_prompt": True}, {"add_generation_prompt": False}
    tools = gen | {"tools": TOOLS}
    system = {"role": "system", "content": SYSTEM}
    ask_1 = user(*labelled(1, "chirp.wav"), "What do you hear?")
    two_clips = user(*labelled(1, "chirp.wav"), *labelled(2, "bursts.wav"), "How do they differ?")
    ask_2 = user(*labelled(2, "bursts.wav"), "And this one?")
    um = user(*labelled(1, "speech.wav"), "Remove the word 'um' from Audio 1.")
    find_1, find_2 = call("find_words", {"audio": 1}), call("find_words", {"audio": 2})
    delete_um = call("delete_ranges", {"audio": 1, "ranges": [[0.52, 0.91]]})
    found_1 = result("find_words", WORDS)
    return {
        "one_clip": ([ask_1], gen),
        "one_clip_no_generation_prompt": ([ask_1], done),
        "audio_only": ([user(*labelled(1, "chirp.wav"))], gen),
        "two_clips": ([two_clips], gen),
        "two_turns": ([ask_1, model(REPLY_1), ask_2], gen),
        "finished_no_generation_prompt": ([ask_1, model(REPLY_1)], done),
        "system": ([system, ask_1], gen),
        "tools": ([ask_1], tools),
        "tools_system": ([system, ask_1], tools),
        # The model stopped at <|tool_response> (a stop token); the app appends the result and generates on:
        # no new model turn, only the empty thought channel (thinking off).
        "tool_call_one": ([um, model("", find_1, responses=[found_1])], tools),
        "tool_call_one_answered": (
            [um, model("'um' is said from 0.52 to 0.91 s.", find_1, responses=[found_1])], tools | done),
        "tool_calls_two": (
            [two_clips, model("", find_1, find_2, responses=[found_1, result("find_words", WORDS_2)])], tools),
        # Each step of a chain is its own assistant message: the template opens a new model turn for each, though
        # the model wrote them all in one turn (it never closed the first with <turn|>).
        "tool_chain_then_new_turn": (
            [um, model("", find_1, responses=[found_1]),
             model("Done: Audio 2 is Audio 1 without 'um'.", delete_um, responses=[result("delete_ranges", MADE_2)]),
             {"role": "user", "content": "Now make Audio 2 louder."}], tools),
        "tool_response_mapping": (
            [um, model("", find_1, responses=[result("find_words", {"words": [
                {"word": "um", "start": 0.52, "end": 0.91}, {"word": "hello", "start": 1.02, "end": 1.48}]})])],
            tools),
        # Arguments as a JSON string go in verbatim between the call's own braces.
        "tool_call_arguments_string": (
            [um, model("", call("delete_ranges", '{"audio": 1, "ranges": [[0.52, 0.91]]}'),
                       responses=[result("delete_ranges", MADE_2)])], tools),
        "openai_tool_message": ([um, model("", find_1), {"role": "tool", "content": WORDS}], tools),
        "thinking_off": ([ask_1], gen | {"enable_thinking": False}),
        "thinking_on": ([ask_1], gen | {"enable_thinking": True}),
        "thinking_on_system_tools": ([system, um], tools | {"enable_thinking": True}),
        # Earlier thinking written in the reply is stripped; a reasoning_content field is never rendered.
        "thinking_on_drops_earlier_thinking": (
            [ask_1, model(f"{THOUGHT}{REPLY_1}"), ask_2], gen | {"enable_thinking": True}),
        "thinking_on_ignores_reasoning_content": (
            [ask_1, model(REPLY_1, reasoning_content=REASONING), ask_2], gen | {"enable_thinking": True}),
        "thinking_on_tool_call": ([um, model("", find_1, responses=[found_1])], tools | {"enable_thinking": True}),
        # A thought kept in a calling message's content is stripped, but the content is not empty, so the turn is
        # closed after the results and no model turn follows: the prompt ends in <turn|>.
        "thinking_on_tool_call_thought_in_content": (
            [um, model(THOUGHT, find_1, responses=[found_1])], tools | {"enable_thinking": True}),
    }


def write(path: Path, tokenizer, rendered: dict) -> None:
    """The renderings as JSON, each id list on one line."""
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.get_added_vocab()}
    document = {
        "family": "gemma4", "template": SOURCE, "second_copy": SECOND_COPY, "transformers": transformers.__version__,
        "tokenizer": "testkit.tiny.gemma4.tiny_tokenizer() (GemmaTokenizer; ids below 107 as the real vocab's, "
                     "multimodal tokens in the real order)",
        "added_token_ids": dict(sorted(special.items(), key=lambda item: item[1])),
        "real_multimodal_ids": dict(zip(gemma4.MULTIMODAL, gemma4.REAL_MM_IDS)),
        "ids_note": "unexpanded: one <|audio|> per clip, as the template writes it; the processor replaces it with "
                    "<|audio> + one <|audio|> per 40 ms of the clip (at most 750, 30 s) + <audio|>",
        "cases": rendered,
    }
    text_out = json.dumps(document, indent=1, ensure_ascii=False)
    text_out = re.sub(r'"ids": \[([\d,\s]*)\]', lambda m: '"ids": [' + " ".join(m.group(1).split()) + "]", text_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_out + "\n")


def template(source: str) -> str:
    """The template at the commit, from a git directory or the file; stops if the sha256 differs."""
    path = Path(source)
    if path.is_dir():
        raw = subprocess.run(["git", f"--git-dir={path}", "show", f"{SOURCE['commit']}:{SOURCE['path']}"],
                             check=True, capture_output=True).stdout
    else:
        raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SOURCE["sha256"]:
        raise SystemExit(f"{source}: sha256 {digest}, expected {SOURCE['sha256']}")
    return raw.decode()


def main(source: str) -> None:
    tokenizer = gemma4.tiny_tokenizer()
    write(DATA / "gemma4" / "renderings.json", tokenizer, render(tokenizer, template(source), cases(), "<|audio|>"))


if __name__ == "__main__":
    main(sys.argv[1])
