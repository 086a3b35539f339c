"""launch.py: its flags, the refusal to share without a login, a share link that fails, and the hand-over to --cli.

The page itself is served by launch.py in tests/test_browser.py (--cpu-only, --server-port, --data-dir,
--api-base, --auth, --max-upload-mb).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import gradio.networking
import httpx
import pytest

import launch
from chat.store import Store
from testkit.scripted import ScriptedBackend
from testkit.tiny.qwen2_5_omni import build_tiny_qwen2_5_omni
from tests.conftest import one_intra_op_thread
from tests.openai_server import OpenAIServer
from tests.test_web import free_port

ROOT = Path(__file__).resolve().parent.parent
FLAGS = [
    "-c", "--checkpoint-path", "--cpu-only", "--quantization", "--api-base", "--api-key", "--server-name",
    "--server-port", "--inbrowser", "--share", "--share-without-login", "--auth", "--auth-file", "--concurrency",
    "--max-upload-mb", "--data-dir", "--tools", "--no-tools", "--word-model", "--cli", "--server-api-key",
    "--server-api-key-file", "--api-only", "--voice", "--tts-model",
]


def run_launch(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, input=stdin, capture_output=True, text=True,
                          timeout=60)


def test_help_documents_every_flag_with_its_default():
    result = run_launch("--help")
    assert result.returncode == 0
    for flag in FLAGS:
        assert f" {flag}" in result.stdout, flag
    for default in ("Qwen/Qwen2-Audio-7B-Instruct", "default: 8000", "default: 127.0.0.1", "{4bit,8bit,fp8,none}"):
        assert default in " ".join(result.stdout.split())


def test_defaults_match_the_official_demos():
    args = launch.parse_args([])
    assert args.checkpoint_path == "Qwen/Qwen2-Audio-7B-Instruct"
    assert (args.server_name, args.server_port) == ("127.0.0.1", 8000)
    assert not (args.share or args.cpu_only or args.inbrowser or args.cli) and args.logins == []


def test_share_without_a_login_is_refused_unless_explicitly_allowed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch.parse_args(["--share"])
    assert exit_info.value.code == 2
    assert "--share makes the page public: add --auth USER:PASSWORD" in capsys.readouterr().err
    assert launch.parse_args(["--share", "--auth", "ann:pw"]).logins == [("ann", "pw")]
    assert launch.parse_args(["--share", "--share-without-login"]).share


def test_logins_come_from_flags_and_from_a_file(tmp_path):
    auth_file = tmp_path / "logins.txt"
    auth_file.write_text("bob:b0b\n\n  carol:pass:with:colons  \n")
    args = launch.parse_args(["--auth", "ann:pw", "--auth-file", str(auth_file)])
    assert args.logins == [("ann", "pw"), ("bob", "b0b"), ("carol", "pass:with:colons")]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--auth", "ann"], "a login must be USER:PASSWORD with neither empty, not 'ann':..."),
        (["--auth", "ann:"], "a login must be USER:PASSWORD"),
        (["--auth-file", "/no/such/logins.txt"], "cannot read --auth-file /no/such/logins.txt"),
        (["--concurrency", "0"], "--concurrency and --max-upload-mb must be at least 1"),
        (["--quantization", "2bit"], "invalid choice: '2bit'"),
        (["--api-only", "--server-name", "0.0.0.0"], "--api-only, but the API must stay off: --server-name 0.0.0.0"),
        (["--server-api-key-file", "/no/such/keys"], "cannot read --server-api-key-file /no/such/keys"),
    ],
)
def test_bad_flags_are_named(capsys, argv, message):
    with pytest.raises(SystemExit):
        launch.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_share_link_that_cannot_be_made_is_an_error_not_a_silent_local_page(tmp_path, monkeypatch, capsys):
    def no_tunnel(**kwargs):
        raise RuntimeError("Could not get share link from Gradio API Server.")  # what gradio meets offline

    monkeypatch.setattr(gradio.networking, "setup_tunnel", no_tunnel)
    args = launch.parse_args(["--share", "--auth", "ann:pw", "--server-port", str(free_port())])
    assert launch.serve(args, ScriptedBackend(), Store(tmp_path), "", voices=None) == 1
    assert "error: the public share link could not be made" in capsys.readouterr().err


def test_a_model_that_cannot_be_loaded_ends_with_its_message(tmp_path, capsys):
    assert launch.main(["-c", str(tmp_path / "missing"), "--cpu-only", "--data-dir", str(tmp_path / "data")]) == 1
    assert f"error: There is no model folder {tmp_path / 'missing'}" in capsys.readouterr().err


def test_a_voice_the_model_lacks_ends_with_the_voices_it_has(tmp_path, capsys):
    folder = build_tiny_qwen2_5_omni(tmp_path / "omni")
    argv = ["-c", str(folder), "--cpu-only", "--cli", "--voice", "nosuch", "--data-dir", str(tmp_path / "data")]
    with one_intra_op_thread():
        assert launch.main(argv) == 1
    assert "error: There is no voice 'nosuch'; choose one of: Chelsie, Ethan." in capsys.readouterr().err


def test_cli_hands_over_to_the_terminal_client():
    with OpenAIServer() as server:
        server.enqueue(["Hello ", "from ", "the server."])
        result = run_launch("--cli", "-c", server.model, "--api-base", server.url, stdin="hi there\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert "Hello from the server." in result.stdout
    assert server.requests[0]["messages"][-1]["content"][-1]["text"] == "hi there"


@pytest.mark.parametrize("flags, offered", [((), False), (("--no-tools",), False), (("--tools",), True)])
def test_tools_are_offered_to_a_family_not_trained_on_them_only_when_asked(flags, offered):
    with OpenAIServer() as server:
        run_launch("--cli", "-c", server.model, "--api-base", server.url, *flags, stdin="hi\n/quit\n")
    system = server.requests[0]["messages"][0]["content"]
    assert ("<tools>" in system) == offered


def test_choosing_a_family_imports_no_torch():
    """Every start imports the families; torch and transformers come only with a local checkpoint."""
    code = "import sys, chat, launch; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.strip() == "[]"


def test_api_only_serves_the_api_and_no_page(tiny_qwen2_audio, tmp_path):
    port = free_port()
    command = [sys.executable, "launch.py", "--api-only", "-c", str(tiny_qwen2_audio), "--cpu-only", "--server-port",
               str(port), "--server-api-key", "sk-box", "--data-dir", str(tmp_path / "data")]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline, models = time.monotonic() + 120, None
        while models is None and time.monotonic() < deadline and server.poll() is None:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer sk-box"})
            except httpx.TransportError:
                time.sleep(0.2)
        page = httpx.get(f"http://127.0.0.1:{port}/")
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert models.status_code == 200 and models.json()["data"][0]["family"] == "Qwen2-Audio"
    assert page.status_code == 404
