"""The page in a real browser: headless chromium with a fake microphone, against launch.py run as a person would.

Two apps start together: the tiny Qwen2-Audio model (a copy that only max_new_tokens stops, so a reply
is as long as the test asks), and a scripted OpenAI-compatible server behind a login, for the tool call.
Screenshots of the finished conversations are saved to test-artifacts/.
"""

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from app.web import CSS, THEME, build_demo, launch
from chat.loading import load_backend
from launch import voices_for
from chat.speech import Voices
from chat.store import DB_FILE, Store
from chat.tts import CURATED_VOICES, KokoroSpeech
from testkit.tiny.gemma4 import build_tiny_gemma4
from testkit.tiny.qwen2_5_omni import build_tiny_qwen2_5_omni
from testkit.tiny.qwen3_omni import build_tiny_qwen3_omni
from tests.conftest import tone, write_audio
from tests.openai_server import OpenAIServer
from tests.test_web import endless_copy, free_port

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
START_TIMEOUT_S = 180.0
# Generous on purpose: a busy 2-core CI machine runs the app, the model and chromium at once.
REPLY_TIMEOUT_MS = 60_000
SPOKEN_TIMEOUT_MS = 420_000  # a spoken reply ends with its speech, made on the same busy CPU as the browser
LOGIN = ("ann", "wonderland")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]
# Collects every text the last reply shows, in order, as the page changes: replies stream in too fast to poll.
WATCH_REPLY = """() => {
    window.replyTexts = [];
    new MutationObserver(() => {
        const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
        const text = bots.length ? bots[bots.length - 1].innerText : '';
        if (text && text !== window.replyTexts[window.replyTexts.length - 1]) window.replyTexts.push(text);
    }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
}"""


# Playwright's expect() keeps its own 5 s default, which page.set_default_timeout does not change.
expect.set_options(timeout=REPLY_TIMEOUT_MS)


class App:
    """launch.py in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, folder: Path, *args: str) -> None:
        folder.mkdir(parents=True)
        self.data, self.log = folder / "data", folder / "server.log"
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "GRADIO_TEMP_DIR": str(folder / "gradio")}
        port = self.url.rsplit(":", 1)[1]
        command = [sys.executable, "launch.py", *args, "--server-port", port, "--data-dir", str(self.data)]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"launch.py exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                urllib.request.urlopen(self.url, timeout=10)
                return
            except OSError:  # not listening yet (URLError, ConnectionError), or too busy to answer in time
                time.sleep(0.2)
        pytest.fail(f"launch.py did not serve {self.url} within {START_TIMEOUT_S:.0f} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    def __enter__(self) -> "App":
        """Serving: wait_until_up(); leaving the block stops it."""
        try:
            self.wait_until_up()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def apps(tiny_qwen2_audio, tmp_path_factory):
    """{"local": the tiny model's app, "remote": the scripted server's app, with a login and a 1 MB upload limit,
    "openai": that server}."""
    folder = tmp_path_factory.mktemp("browser")
    model = endless_copy(tiny_qwen2_audio, folder / "model")
    with OpenAIServer() as openai:
        local = App(folder / "local", "-c", str(model), "--cpu-only")
        remote = App(folder / "remote", "-c", openai.model, "--api-base", openai.url, "--auth", ":".join(LOGIN),
                     "--max-upload-mb", "1", "--tools")
        try:
            local.wait_until_up()
            remote.wait_until_up()
            yield {"local": local, "remote": remote, "openai": openai}
        finally:
            local.stop()
            remote.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Browser:
    """Headless chromium whose microphone speaks a 48 kHz espeak-ng sentence."""
    folder = tmp_path_factory.mktemp("microphone")
    subprocess.run(["espeak-ng", "-w", str(folder / "speech.wav"), "What is the weather like today?"], check=True)
    subprocess.run(["sox", folder / "speech.wav", "-r", "48000", "-c", "1", folder / "speech48k.wav"], check=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={folder / 'speech48k.wav'}"],
        )
        yield browser
        browser.close()


def new_page(browser: Browser) -> Page:
    """A page in a fresh context: its own localStorage, so its own session."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.grant_permissions(["microphone"])
    page = context.new_page()
    page.set_default_timeout(REPLY_TIMEOUT_MS)
    page.set_default_navigation_timeout(REPLY_TIMEOUT_MS)
    return page


def set_settings(page: Page, **values: str) -> None:
    """Fill side-panel fields by label (e.g. max_new_tokens="300" fills "Max new tokens")."""
    page.get_by_label("Toggle Sidebar").click()
    for name, value in values.items():
        field = page.get_by_label(name.replace("_", " ").capitalize())
        field.fill(value)
        field.press("Tab")
    page.get_by_label("Toggle Sidebar").click()


def send(page: Page, text: str, files: list[Path] = ()) -> None:
    if files:
        page.locator("#chat-input input[type=file]").set_input_files([str(f) for f in files])
        expect(page.locator("#chat-input [data-testid=upload-button]")).to_be_enabled()
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-input textarea").press("Enter")


def wait_for_replies(page: Page, n: int) -> list[str]:
    """The texts of the replies once there are n and the last has ended."""
    expect(page.locator("#chatbot [data-testid=bot]")).to_have_count(n)
    expect(page.locator("#chat-input [data-testid=submit-button]")).to_be_visible()
    return reply_texts(page)


def reply_texts(page: Page) -> list[str]:
    return page.locator("#chatbot [data-testid=bot]").all_inner_texts()


def test_record_attach_ask_stop_regenerate_and_reload(apps, browser, speech_wav, audio_files):
    app, page = apps["local"], new_page(browser)
    page.goto(app.url)
    chat = page.locator("#chatbot")
    expect(chat).to_contain_text("Ask a spoken question")  # the examples of an empty chat
    set_settings(page, max_new_tokens="300", seed="1234")

    page.locator("#recorder").get_by_role("button", name="Record").click()
    page.wait_for_timeout(1500)
    page.locator("#recorder").get_by_role("button", name="Stop").click()
    expect(chat).to_contain_text("Audio 1 · recording")

    page.evaluate(WATCH_REPLY)
    send(page, "What is in Audio 2?", [speech_wav, audio_files["flac"]])
    final = wait_for_replies(page, 1)[-1]
    expect(chat).to_contain_text("Audio 2 · question.wav")
    expect(chat).to_contain_text("Audio 3 · tone.flac · 2.0 s")
    partials = [t for t in page.evaluate("window.replyTexts") if t != final and t.strip()]
    assert len(set(partials)) >= 3, partials

    set_settings(page, max_new_tokens="8192")  # about a minute of tokens: only Stop ends this reply in time
    send(page, "Tell me more.")
    expect(page.locator("#chatbot [data-testid=bot]")).to_have_count(2)
    page.wait_for_function("() => document.querySelectorAll('#chatbot [data-testid=bot]')[1].innerText.length > 20")
    # a click event, not a pointer click: on a busy machine the streaming chat re-renders over the button
    page.locator("#chat-input button.stop-button").dispatch_event("click")
    expect(chat).to_contain_text("Stopped by the user.")
    stopped = reply_texts(page)[-1]
    page.wait_for_timeout(500)
    assert reply_texts(page)[-1] == stopped  # the model stopped too: nothing more arrives

    set_settings(page, max_new_tokens="300")
    page.locator("#chatbot").get_by_role("button", name="Retry").click()
    expect(chat).not_to_contain_text("Stopped by the user.")
    regenerated = wait_for_replies(page, 2)
    assert regenerated[1] != stopped

    user_texts = page.locator("#chatbot [data-testid=user] .message-content").all_inner_texts()
    page.reload()
    expect(page.locator("#chatbot [data-testid=bot]")).to_have_count(2)
    assert reply_texts(page) == regenerated
    assert page.locator("#chatbot [data-testid=user] .message-content").all_inner_texts() == user_texts
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat.png", full_page=True)

    with sqlite3.connect(app.data / DB_FILE) as conn:
        (session_id,) = conn.execute("SELECT session_id FROM conversations").fetchone()
    saved = Store(app.data).load(session_id)
    assert [(c.name, c.source) for c in saved.clips()] == [
        ("recording", "recorded"), ("question.wav", "uploaded"), ("tone.flac", "uploaded")]
    assert [m.text for m in saved.messages if m.role == "user"] == ["What is in Audio 2?", "Tell me more."]


def test_a_recording_sent_alone_is_a_spoken_question(apps, browser):
    app, page = apps["local"], new_page(browser)
    page.goto(app.url)
    set_settings(page, max_new_tokens="40")
    page.locator("#recorder").get_by_role("button", name="Record").click()
    page.wait_for_timeout(1000)
    page.locator("#recorder").get_by_role("button", name="Stop").click()
    expect(page.locator("#chatbot")).to_contain_text("Audio 1 · recording")
    page.locator("#chat-input [data-testid=submit-button]").click()  # nothing typed: the recording is the question
    assert wait_for_replies(page, 1)[0].strip()


def log_in(page: Page, user: str, password: str) -> None:
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


def test_a_login_is_needed_and_a_wrong_password_is_refused(apps, browser):
    page = new_page(browser)
    page.goto(apps["remote"].url)
    log_in(page, LOGIN[0], "not the password")
    expect(page.get_by_text("Incorrect Credentials")).to_be_visible()
    expect(page.locator("#chatbot")).to_have_count(0)
    log_in(page, *LOGIN)
    expect(page.locator("#chatbot")).to_contain_text("Ask a spoken question")


def test_a_file_over_max_upload_mb_is_refused_with_the_limit(apps, browser, tmp_path):
    page = new_page(browser)
    page.goto(apps["remote"].url)
    log_in(page, *LOGIN)
    big = write_audio(tmp_path / "lecture.wav", tone(45.0))  # 1.4 MB of 16-bit samples
    page.locator("#chat-input input[type=file]").set_input_files([str(big)])
    toast = page.get_by_test_id("toast-body")
    expect(toast).to_contain_text('exceed the maximum allowed size of 1.0 Mb: "lecture.wav"')


def test_a_tool_call_shows_its_step_and_the_edited_clip(apps, browser, speech_wav):
    openai = apps["openai"]
    openai.enqueue(["I will cut it.\n<tool_call>\n", '{"name": "delete_ranges", "arguments": ',
                    '{"audio": 1, "ranges": [[0.5, 1.0]]}}\n</tool_call>'], delay_s=0.05)
    openai.enqueue(["Done: ", "Audio 2 is ", "Audio 1 without that second."], delay_s=0.05)
    page = new_page(browser)
    page.goto(apps["remote"].url)
    log_in(page, *LOGIN)

    send(page, "Remove 0.5 to 1.0 s from Audio 1.", [speech_wav])
    chat = page.locator("#chatbot")
    expect(chat).to_contain_text("Done: Audio 2 is Audio 1 without that second.")
    expect(chat).to_contain_text("🛠 delete_ranges")
    expect(chat).to_contain_text("Audio 2 · audio2-delete_ranges.wav")
    expect(chat).not_to_contain_text("<tool_call>")
    expect(chat.locator("[data-testid=waveform-Audio]")).to_have_count(2)  # the clip sent, and the edit
    assert len(openai.requests) == 2
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "tool-call.png", full_page=True)


def test_a_refused_file_is_named_and_taken_out_while_the_text_and_good_files_stay(apps, browser, tmp_path, audio_files):
    app, page = apps["local"], new_page(browser)
    page.goto(app.url)
    set_settings(page, max_new_tokens="20")
    bad = tmp_path / "notes.wav"
    bad.write_text("my notes, not audio")
    page.locator("#chat-input input[type=file]").set_input_files([str(audio_files["flac"]), str(bad)])
    expect(page.locator("#attached")).to_have_text("Attached: tone.flac · notes.wav")  # by name, not only icons
    page.locator("#chat-input textarea").fill("What is this?")
    page.locator("#chat-input textarea").press("Enter")
    expect(page.get_by_test_id("toast-body")).to_contain_text("Not sent: notes.wav is not an audio file this app reads")
    expect(page.locator("#attached")).to_have_text("Attached: tone.flac")
    expect(page.locator("#chat-input textarea")).to_have_value("What is this?")
    expect(page.locator("#chatbot [data-testid=bot]")).to_have_count(0)
    page.locator("#chat-input textarea").press("Enter")  # the good file and the text are still there: send again
    wait_for_replies(page, 1)
    expect(page.locator("#chatbot")).to_contain_text("Audio 1 · tone.flac")
    expect(page.locator("#chatbot")).to_contain_text("What is this?")


def test_the_side_panel_lists_conversations_and_opens_an_older_one(apps, browser):
    app, page = apps["local"], new_page(browser)
    page.goto(app.url)
    set_settings(page, max_new_tokens="8")
    send(page, "About trains?")
    wait_for_replies(page, 1)
    page.get_by_label("Toggle Sidebar").click()
    page.get_by_role("button", name="New conversation").click()
    expect(page.locator("#chatbot [data-testid=bot]")).to_have_count(0)
    page.get_by_label("Toggle Sidebar").click()
    send(page, "About boats?")
    wait_for_replies(page, 1)
    page.get_by_label("Toggle Sidebar").click()
    history = page.locator("#history")
    expect(history.locator("label")).to_have_count(2)
    expect(history.locator("label").first).to_contain_text("About boats?")
    history.get_by_text("About trains?").click()
    expect(page.locator("#chatbot")).to_contain_text("About trains?")
    expect(page.locator("#chatbot")).not_to_contain_text("About boats?")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "history.png", full_page=True)


BUILDERS = {"Gemma 4": build_tiny_gemma4, "Qwen2.5-Omni": build_tiny_qwen2_5_omni, "Qwen3-Omni": build_tiny_qwen3_omni}


@pytest.fixture(scope="module", params=["SALMONN", *sorted(BUILDERS)])
def family_app(request, tmp_path_factory):
    """(title, the app serving a family's tiny checkpoint, started as a person would: SALMONN from its decode yaml,
    the others from their folders)."""
    folder = tmp_path_factory.mktemp(f"browser-{request.param}")
    checkpoint = (request.getfixturevalue("tiny_salmonn") if request.param == "SALMONN"
                  else BUILDERS[request.param](folder / "model"))
    with App(folder / "app", "-c", str(checkpoint), "--cpu-only") as app:
        yield request.param, app


def test_a_family_answers_two_turns_about_two_clips(family_app, browser, speech_wav, audio_files):
    title, app = family_app
    page = new_page(browser)
    page.goto(app.url)
    expect(page.locator("#header")).to_contain_text(f"({title})")
    if title == "SALMONN":
        expect(page.locator("#header")).to_contain_text("SALMONN was not trained to call tools")
    set_settings(page, max_new_tokens="8")
    send(page, "Describe the sound.", [speech_wav])
    first = wait_for_replies(page, 1)
    send(page, "And how does Audio 2 differ?", [audio_files["flac"]])
    replies = wait_for_replies(page, 2)
    assert replies[0] == first[0] and all(reply.strip() for reply in replies)
    chat = page.locator("#chatbot")
    expect(chat).to_contain_text("Audio 1 · question.wav")
    expect(chat).to_contain_text("Audio 2 · tone.flac · 2.0 s")
    expect(chat).to_contain_text(f"{title} · none ·")  # each reply's figures name the family
    expect(chat).to_contain_text("cached")  # the second turn started from the first one's attention cache
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{title.lower().replace(' ', '-')}.png", full_page=True)


def test_thinking_streams_in_a_block_that_folds_away_and_stays_after_a_reload(browser, tmp_path):
    model = "Qwen/Qwen3-Omni-30B-A3B-Thinking"  # a family whose replies start with their thinking
    with OpenAIServer(models=(model,)) as openai:
        openai.enqueue(["<think>\nThe clip ", "rises ", "in pitch, ", "so: a chirp.", "\n</think>\n\n", "It is ",
                        "a chirp."], delay_s=1.0)
        with App(tmp_path / "thinking", "-c", model, "--api-base", openai.url) as app:
            page = new_page(browser)
            page.goto(app.url)
            send(page, "What is it?")
            chat = page.locator("#chatbot")
            block = chat.get_by_text("Thinking", exact=True)
            expect(block).to_be_visible(timeout=30_000)
            expect(chat.get_by_text("The clip rises")).to_be_visible(timeout=30_000)  # open while it is written
            expect(chat).to_contain_text("It is a chirp.", timeout=30_000)
            expect(chat).not_to_contain_text("The clip rises", timeout=30_000)  # folded away once the answer starts
            expect(chat).not_to_contain_text("think>")
            page.reload()
            expect(chat).to_contain_text("It is a chirp.", timeout=30_000)
            expect(block).to_be_visible(timeout=30_000)  # the block stays with the reply
            block.click()
            expect(chat.get_by_text("The clip rises in pitch, so: a chirp.")).to_be_visible(timeout=30_000)
            page.wait_for_timeout(1000)  # the block's opening slide, before the screenshot
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=ARTIFACTS / "thinking.png", full_page=True)


# For the reply asked for last (window.speech.asked, set as it is sent): arrived[k] once a segment of the spoken
# reply's audio stream reached the page's player (a stream of its own: its run is not one seen before it was
# asked), and grew[k] once the reply's text grew after that: its speech was playing while its text was still being
# written. (Whether headless chromium then plays an HLS stream on time depends on its media stack under load, so
# what the tests play is the stored speech, below.)
WATCH_SPEECH = r"""() => {
    const speech = window.speech = {asked: -1, arrived: [], grew: [], runs: new Set(), old: new Set()};
    let lastText = '';
    new PerformanceObserver(list => {
        for (const entry of list.getEntries()) {
            const match = entry.name.match(/\/stream\/[^/]+\/([^/]+)\/[^/]+\/(?!playlist)/);
            if (!match) continue;
            speech.runs.add(match[1]);
            if (!speech.old.has(match[1])) speech.arrived[speech.asked] = true;
        }
    }).observe({type: 'resource'});
    new MutationObserver(() => {
        const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
        const last = bots.length ? bots[bots.length - 1] : null;
        if (last && !last.querySelector('sub') && last.innerText !== lastText) {
            lastText = last.innerText;
            if (speech.arrived[speech.asked]) speech.grew[speech.asked] = true;
        }
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""
ASKED = "k => { window.speech.asked = k; window.speech.old = new Set(window.speech.runs); }"
PLAY_A_WHILE = """async (audio) => {
    audio.muted = true;
    await audio.play();
    await new Promise(resolve => setTimeout(resolve, 1500));
    return audio.currentTime;
}"""
SPOKEN = "🔊 Spoken reply"


TALKER_CODES = 300  # the tiny talker never picks its end code: 6 s of speech a reply, not generate's 82 s
FIRST_SENTENCE = "Here is what I hear. "
# after the first sentence, the scripted reply's text trickles in: heard while it is still being written
TRICKLE = list("It is a voice asking about the weather, and it sounds calm. ")
TRICKLE_DELAY_S = 0.6  # 36 s of text: the first sentence is heard long before its end, even on a busy CPU


@pytest.fixture(scope="module", params=[
    # open: on a busy machine the talker route failed now and then (a reply after a Stop whose audio never reached the
    # page, or a Stop button gone before the click); the talker is covered by tests/test_cli.py and the family tests
    pytest.param("talker", marks=pytest.mark.skip(reason="flaky on a busy machine; see the closing note of issue 19")),
    "text-to-speech",
])
def spoken_app(request, tmp_path_factory, tiny_kokoro):
    """(voice, url, scripted server or None) of a page served here whose replies are spoken from the start: the tiny
    Qwen2.5-Omni speaking with its own talker (a copy that only max_new_tokens stops, so its text streams for long),
    or a served model's replies (a scripted OpenAI-compatible server) read aloud by the tiny Kokoro."""
    folder = tmp_path_factory.mktemp(f"spoken-{request.param}")
    with contextlib.ExitStack() as stack:
        if request.param == "talker":
            checkpoint = endless_copy(build_tiny_qwen2_5_omni(folder / "built"), folder / "model")
            backend, server = load_backend(str(checkpoint), cpu_only=True), None
            backend.talker().max_new_codes = TALKER_CODES
            voices = voices_for(backend, tts_model=None)  # as launch.py makes them
        else:
            server = stack.enter_context(OpenAIServer())
            backend = load_backend(server.model, api_base=server.url)
            kokoro, tagger = tiny_kokoro
            voices = Voices(CURATED_VOICES, lambda: KokoroSpeech(str(kokoro), tagger=str(tagger)))
        stack.callback(backend.close)
        store = Store(folder / "data")
        demo = build_demo(backend, store, voices=voices, voice=voices.default)
        url = f"http://127.0.0.1:{free_port()}"
        launch(demo, store, None, server_name="127.0.0.1", server_port=int(url.rsplit(":", 1)[1]),
               prevent_thread_lock=True, quiet=True, css=CSS, theme=THEME)
        stack.callback(demo.close)
        yield voices.default, url, server


def ask_and_hear(page: Page, text: str, n_replies: int, files: list[Path] = (),
                 server: OpenAIServer | None = None) -> None:
    """Send, and check that the reply was heard while its text was still being written."""
    if server is not None:
        server.enqueue([FIRST_SENTENCE, *TRICKLE], delay_s=TRICKLE_DELAY_S)
    page.evaluate(ASKED, n_replies - 1)
    send(page, text, files)
    expect(page.locator("#chatbot sub")).to_have_count(n_replies, timeout=SPOKEN_TIMEOUT_MS)  # the reply's figures
    speech = page.evaluate("() => ({arrived: window.speech.arrived, grew: window.speech.grew})")
    assert speech["grew"][n_replies - 1:n_replies] == [True], speech


def test_a_spoken_reply_plays_while_it_is_written_stops_with_stop_and_stays_after_a_reload(
        spoken_app, browser, speech_wav, audio_files):
    voice, url, server = spoken_app
    page = new_page(browser)
    page.goto(url)
    expect(page.locator("#speak input")).to_be_checked()
    page.evaluate(WATCH_SPEECH)
    chat = page.locator("#chatbot")

    set_settings(page, max_new_tokens="3000")  # a reply that goes on for a minute, to Stop while it speaks
    if server is not None:
        server.enqueue([FIRST_SENTENCE, *TRICKLE * 3], delay_s=1.0)
    page.evaluate(ASKED, 0)
    send(page, "Tell me about the weather.")
    page.wait_for_function("() => window.speech.arrived[0]", timeout=SPOKEN_TIMEOUT_MS)
    page.locator("#chat-input button.stop-button").dispatch_event("click")
    player = page.locator("#speech-out audio").last
    expect(player).to_have_js_property("paused", True, timeout=2_000)  # at once, not when the buffer runs out
    silenced_at = player.evaluate("audio => audio.currentTime")
    page.wait_for_timeout(1000)
    assert player.evaluate("audio => audio.currentTime") == silenced_at
    expect(page.locator("#chatbot sub")).to_have_count(1)
    expect(chat).to_contain_text("Stopped by the user.")  # the stopped reply is kept, with what was spoken of it

    set_settings(page, max_new_tokens="1000")  # the tiny model writes for 10 s or more: heard long before its end
    ask_and_hear(page, "Describe the sound.", 2, [speech_wav], server)
    ask_and_hear(page, "And how does Audio 2 differ?", 3, [audio_files["flac"]], server)
    expect(chat.get_by_text(SPOKEN)).to_have_count(3)
    expect(chat).to_contain_text(f"{SPOKEN} · {voice} ·")
    expect(chat).to_contain_text("first audio")  # in each reply's figures

    page.reload()
    expect(chat.get_by_text(SPOKEN)).to_have_count(3, timeout=REPLY_TIMEOUT_MS)
    players = chat.locator("audio")
    expect(players).to_have_count(5)  # the two clips, and the three spoken replies from the store
    for player in players.all():
        assert player.evaluate(PLAY_A_WHILE) > 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"spoken-{voice.lower().replace('_', '-')}.png", full_page=True)
