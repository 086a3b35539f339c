"""Start the browser chat (or, with --cli, the terminal client): `python launch.py --help` lists the flags."""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from app.api import why_off
from chat.errors import ChatError
from chat.families import FAMILIES
from chat.backend import QUANTIZATIONS
from chat.loading import DEFAULT_MODEL, load_backend
from chat.store import DATA_DIR_ENV, Store
from chat.timestamps import DEFAULT_WORD_MODEL
from chat.speech import Voices

LOG_FILE = "audio-chat.log"  # in the data folder: loads, refusals, failures and every reply's figures
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_PORT = 8000
log = logging.getLogger("launch")
DEFAULT_MAX_UPLOAD_MB = 200  # a 10-minute clip (the limit per clip) is 100-200 MB as 16-bit wav


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; every flag is documented in --help."""
    parser = argparse.ArgumentParser(
        description="Chat about speech, sounds and music with an audio-language model in the browser or the terminal.")
    model = parser.add_argument_group("model")
    model.add_argument("-c", "--checkpoint-path", default=DEFAULT_MODEL,
                       help=f"hub id or local folder of the model (default: {DEFAULT_MODEL}); its family "
                            f"({', '.join(f.title for f in FAMILIES.values())}) is read from its config.json; "
                            "with --api-base, the model name the server knows")
    model.add_argument("--cpu-only", action="store_true", help="run the model on the CPU even when a GPU is present")
    model.add_argument("--quantization", choices=QUANTIZATIONS,
                       help="load the weights quantized: 4bit or 8bit with bitsandbytes, fp8 on a GPU of compute "
                            "capability 8.9 or newer (default: 4bit on a GPU, none on the CPU)")
    model.add_argument("--api-base",
                       help="URL of an OpenAI-compatible server (vLLM, ...) to use instead of a local model, "
                            "e.g. http://localhost:8001/v1")
    model.add_argument("--api-key", help="key for --api-base (default: $OPENAI_API_KEY)")
    server = parser.add_argument_group("web server")
    server.add_argument("--server-name", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; 0.0.0.0 opens it to the network)")
    server.add_argument("--server-port", type=int, default=DEFAULT_PORT,
                        help=f"port to listen on (default: {DEFAULT_PORT})")
    server.add_argument("--inbrowser", action="store_true", help="open the page in the default browser once it is up")
    server.add_argument("--share", action="store_true",
                        help="also serve through a public link from gradio's share service (needs internet, and "
                             "--auth or --share-without-login); exits with an error if the link cannot be made")
    server.add_argument("--share-without-login", action="store_true",
                        help="allow --share without --auth: anyone with the link can use the model")
    server.add_argument("--auth", action="append", metavar="USER:PASSWORD", default=[],
                        help="require this login (repeat for more users)")
    server.add_argument("--auth-file", type=Path, help="file of logins, one USER:PASSWORD per line")
    server.add_argument("--concurrency", type=int, default=1,
                        help="replies generated at once (default: 1); others wait in a queue that shows their place")
    server.add_argument("--max-upload-mb", type=int, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest file a person may upload, in MB (default: {DEFAULT_MAX_UPLOAD_MB})")
    server.add_argument("--server-api-key", action="append", metavar="KEY", default=[],
                        help="a key the OpenAI-compatible API at /v1 accepts as `Authorization: Bearer KEY` (repeat "
                             "for more); without one the API answers only on a loopback address")
    server.add_argument("--server-api-key-file", type=Path, help="file of API keys, one per line")
    server.add_argument("--api-only", action="store_true",
                        help="serve only the OpenAI-compatible API at /v1, no page (a headless GPU box)")
    server.add_argument("--data-dir", type=Path,
                        help=f"folder for conversations and clips "
                             f"(default: ${DATA_DIR_ENV}, else data/ beside launch.py)")
    offer = model.add_mutually_exclusive_group()
    offer.add_argument("--tools", dest="tools", action="store_const", const=True,
                       help="offer the speech-editing tools to a model family not trained on tool calls (by default "
                            "only Voxtral, which was, is offered them)")
    offer.add_argument("--no-tools", dest="tools", action="store_const", const=False,
                       help="do not offer the speech-editing tools to the model (a shorter system prompt)")
    model.add_argument("--word-model", default=DEFAULT_WORD_MODEL,
                       help=f"Whisper hub id or folder that finds word times for editing by words "
                            f"(default: {DEFAULT_WORD_MODEL}; loaded on first use)")
    voice = parser.add_argument_group("spoken replies")
    voice.add_argument("--voice", metavar="NAME",
                       help="speak replies aloud from the start, in this voice (the page's switch and the terminal's "
                            "/voice change it): an Omni family run here speaks with its own talker (Qwen2.5-Omni: "
                            "Chelsie, Ethan), every other family through the text-to-speech model")
    voice.add_argument("--tts-model",
                       help="hub id or folder of the text-to-speech model that reads replies aloud for families "
                            "without a talker (default: Kokoro-82M from the hub; loaded when a voice is first used)")
    parser.add_argument("--cli", action="store_true", help="chat in this terminal instead of the browser")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.max_upload_mb < 1:
        parser.error("--concurrency and --max-upload-mb must be at least 1")
    try:
        args.logins = logins(args.auth, args.auth_file)
    except ValueError as e:
        parser.error(str(e))
    try:
        args.api_keys = api_keys(args.server_api_key, args.server_api_key_file)
    except ValueError as e:
        parser.error(str(e))
    if args.api_only and (off := why_off(args.api_keys, args.share, args.server_name)):
        parser.error(f"--api-only, but the API must stay off: {off}")
    if args.share and not args.logins and not args.share_without_login:
        parser.error("--share makes the page public: add --auth USER:PASSWORD (or --auth-file), "
                     "or pass --share-without-login to share it with anyone who has the link")
    return args


def logins(auth: list[str], auth_file: Path | None) -> list[tuple[str, str]]:
    """(user, password) pairs from --auth values and the lines of --auth-file; ValueError names a bad one."""
    lines = list(auth)
    if auth_file is not None:
        try:
            lines += [line.strip() for line in auth_file.read_text().splitlines() if line.strip()]
        except OSError as e:
            raise ValueError(f"cannot read --auth-file {auth_file}: {e.strerror}") from e
    pairs = [tuple(line.split(":", 1)) for line in lines]
    for line, pair in zip(lines, pairs):
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"a login must be USER:PASSWORD with neither empty, not {line.split(':', 1)[0]!r}:...")
    return pairs


def api_keys(keys: list[str], key_file: Path | None) -> tuple[str, ...]:
    """The API keys of --server-api-key values and the lines of --server-api-key-file; ValueError names a problem."""
    if key_file is not None:
        try:
            keys = keys + [line.strip() for line in key_file.read_text().splitlines() if line.strip()]
        except OSError as e:
            raise ValueError(f"cannot read --server-api-key-file {key_file}: {e.strerror}") from e
    if any(not key.strip() for key in keys):
        raise ValueError("--server-api-key cannot be empty")
    return tuple(keys)


def main(argv: list[str] | None = None) -> int:
    """Load the model, then serve the page until Ctrl-C (or run the terminal client)."""
    args = parse_args(argv)
    if args.api_base:
        options = {"api_key": args.api_key or os.environ.get("OPENAI_API_KEY")}
        where = "served by an OpenAI-compatible server"  # its address stays off the page
    else:
        options = {"cpu_only": args.cpu_only, "quantization": args.quantization}
        where = "on the CPU" if args.cpu_only else "on this machine"
    print(f"Loading {args.checkpoint_path} ({args.api_base or where})...", file=sys.stderr, flush=True)
    try:
        store = Store(args.data_dir)
        # the terminal chat keeps its screen: there only warnings reach the console, everything reaches the file
        log_to(store.folder / LOG_FILE, console_level=logging.WARNING if args.cli else logging.INFO)
        start = time.monotonic()
        backend = load_backend(args.checkpoint_path, api_base=args.api_base, **options)
    except ChatError as e:
        log.error("could not start: %s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    log.info("loaded %s as %s (%s) in %.1f s", backend.name, backend.family.title, backend.quantization,
             time.monotonic() - start)
    try:
        voices = None if args.api_only else voices_for(backend, args.tts_model)  # the API speaks no replies
        if voices is not None and args.voice is not None:
            voices.get(args.voice)  # a voice that is not there is refused now; its model loads before the first reply
    except ChatError as e:
        log.error("could not start: %s", e)
        print(f"error: {e}", file=sys.stderr)
        backend.close()
        return 1
    try:
        if args.cli:
            from app.cli import run_cli
            from app.recorder import SoundDeviceRecorder, SoundDeviceSpeaker

            return run_cli(backend, recorder=SoundDeviceRecorder(), tools=args.tools, word_model=args.word_model,
                           store=store, voices=voices, voice=args.voice, speaker=SoundDeviceSpeaker())
        path = Path(args.checkpoint_path)
        shown = f"{path.parent.name}/{path.name}" if path.is_file() else path.name  # a yaml: its folder says more
        model = f"Model: **{shown}** ({backend.family.title}), {where}."
        return serve(args, backend, store, model, voices)
    finally:
        backend.close()


def voices_for(backend, tts_model: str | None) -> Voices:
    """The voices replies can be spoken in: the backend's own talker's, else the text-to-speech model's (chat.tts,
    imported only for a backend without a talker: its language tools take seconds to import)."""
    if backend.voices:
        def load_talker() -> None:
            backend.talker()

        return Voices(backend.voices, load_talker)
    from chat.tts import CURATED_VOICES, KokoroSpeech

    return Voices(CURATED_VOICES, lambda: KokoroSpeech(tts_model) if tts_model else KokoroSpeech())


def log_to(path: Path, console_level: int) -> None:
    """Send the app's log records (loggers chat.* and app.*) to path and, from console_level up, to stderr."""
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setLevel(console_level)
    for handler in (to_file, to_console):
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for name in ("chat", "app", "launch"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the libraries' own records stay with their own settings
        for handler in (to_file, to_console):
            logger.addHandler(handler)


def serve(args: argparse.Namespace, backend, store: Store, description: str, voices) -> int:
    """Serve the page and the API (or the API alone) until interrupted; exit code 1 when --share could not make its
    link, or the API alone was asked for where it must stay off."""
    from app.api import ApiOptions, OpenAIApi

    off = why_off(args.api_keys, args.share, args.server_name)  # never with --api-only (parse_args refuses it)
    api = None if off else OpenAIApi(backend, ApiOptions(args.api_keys, max_upload_mb=args.max_upload_mb))
    if off:
        print(f"note: the OpenAI-compatible API is off: {off}", file=sys.stderr)
    else:
        log.info("OpenAI-compatible API at http://%s:%d/v1 (%s)", args.server_name, args.server_port,
                 "keys required" if args.api_keys else "no key: loopback only")
    if args.api_only:
        import uvicorn

        uvicorn.run(api.asgi(), host=args.server_name, port=args.server_port, log_level="warning")
        return 0
    from app.web import CSS, THEME, build_demo, freeze_startup_objects, launch

    demo = build_demo(backend, store, description=description, concurrency=args.concurrency, tools=args.tools,
                      word_model=args.word_model, voices=voices, voice=args.voice)
    launch(
        demo, store, api, server_name=args.server_name, server_port=args.server_port, share=args.share,
        inbrowser=args.inbrowser, auth=args.logins or None, max_file_size=f"{args.max_upload_mb}mb", theme=THEME,
        css=CSS, prevent_thread_lock=True,
    )
    if args.share and demo.share_url is None:
        # gradio only warns when the tunnel fails; a person who asked for a public link must not miss that
        print("error: the public share link could not be made (no internet, or gradio's share service is unreachable). "
              "Run without --share to serve on this machine only.", file=sys.stderr)
        demo.close()
        return 1
    freeze_startup_objects()
    demo.block_thread()  # until Ctrl-C
    return 0


if __name__ == "__main__":
    sys.exit(main())
