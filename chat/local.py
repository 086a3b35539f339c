"""The local backend: any family's checkpoint through transformers, quantized for a consumer GPU, streamed."""

import contextlib
import gc
import json
import queue
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    BitsAndBytesConfig,
    Cache,
    FineGrainedFP8Config,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)
from transformers.utils import cached_file

from chat.backend import QUANTIZATIONS, Backend, Stats
from chat.errors import BackendError, ChatError, SettingsError
from chat.families import (
    DEFAULT_FAMILY, Family, LoadOptions, config_of_file, family_for_config, load_model, load_talker, talker_voices,
)
from chat.prompts import AudioPart, Prompt
from chat.settings import GenerationSettings
from chat.speech import SpeechChunk, Talker, ThinkerStep, ThinkerStream

# Parts' features kept for later turns: a 30-s part's 128 mel bins x 3000 frames in fp32 take 1.5 MB (SALMONN's
# 3 MB), a 300-s part of the Omni families 15 MB; 256 MB holds the clips of a long conversation
MAX_CACHED_FEATURES_MB = 256
GENERATION_THREAD = "local-backend-generate"
TALKER_THREAD = "local-backend-talker"
BYTES_PER_MB = 2**20
FP8_COMPUTE_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with FP8 tensor cores
MEMORY_HINT = "Try --quantization 4bit, fewer or shorter clips, or a lower max_new_tokens."
POLL_S = 0.1  # how often a reply waiting for its next text or audio looks whether it was stopped
SPEECH_ENDED = object()  # what a talker's thread puts on a reply's queue after its last audio

# bitsandbytes warns on every 8-bit matmul that it casts bf16/fp32 activations to fp16, which it must.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


@dataclass
class KeyValueCache:
    """The attention keys and values of the last reply's tokens: the next turn of the same conversation
    starts from them, so its history (clips included) is neither encoded nor prefilled again."""

    token_ids: torch.Tensor  # (n_cached,) the tokens whose keys and values the cache holds, in order
    part_keys: list[tuple[str, int]]  # AudioPart.key of each run of audio tokens, in order
    cache: Cache
    position_encoding: object  # what the keys' positions were encoded with (LocalModel.position_encoding)
    # the thinker's hidden states of those tokens at the talker's layers, layer → (n_cached, hidden_size), if the
    # reply was spoken: a spoken next turn reuses the cache only with them, since its talker reads them all
    hidden: dict[int, torch.Tensor] | None = None


class LocalBackend(Backend):
    """A checkpoint of any family, from a hub id or a folder; the family is read from the checkpoint's config.json."""

    def __init__(
        self,
        model: str = DEFAULT_FAMILY.example_checkpoint,
        quantization: str | None = None,  # "4bit" (the default on a GPU), "8bit" or "none" (the default on a CPU)
        device: str | None = None,  # e.g. "cuda:1"; None spreads over the GPUs as needed
        cpu_only: bool = False,
    ) -> None:
        on_gpu = torch.cuda.is_available() and not cpu_only and not (device or "").startswith("cpu")
        quantization = quantization or ("4bit" if on_gpu else "none")
        if quantization not in QUANTIZATIONS:
            raise SettingsError(f"Unknown quantization {quantization!r}; choose one of: {', '.join(QUANTIZATIONS)}.")
        self.quantization = quantization
        if cpu_only or not (device or on_gpu):
            device_map = "cpu"
        else:
            # "sequential" fills the first GPU before the next; "auto" would spread a model that fits on
            # one GPU across all of them, which users found slows single-user decoding
            device_map = device or "sequential"
        folder = Path(model).expanduser()
        model = str(folder) if folder.exists() else model
        self.name = model
        self.family: Family = family_for_config(_read_config(model), model)
        options = LoadOptions(torch.bfloat16 if on_gpu else torch.float32, device_map,
                              _quantization_config(quantization, self.family.unquantized_modules))
        try:
            self.loaded = load_model(self.family, model, options)
            self.voices = talker_voices(self.family, model)
        except torch.cuda.OutOfMemoryError as e:
            raise BackendError(
                f"The GPU has too little free memory for {model} with --quantization {quantization}. Use "
                "--quantization 4bit, close other programs that use the GPU, or run with --cpu-only."
            ) from e
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise BackendError(f"Could not load {model} as {self.family.title}: {e}") from e
        self.model, self.tokenizer = self.loaded.model, self.loaded.tokenizer
        self.context_tokens = self.loaded.context_tokens
        self._features_cache: OrderedDict[tuple[str, int], dict[str, torch.Tensor]] = OrderedDict()
        self._cache_lock = threading.Lock()
        # the next turn of the same conversation starts from it; taken by one reply at a time, under _cache_lock
        self.last_reply: KeyValueCache | None = None
        self._load_options = options
        self._talker: Talker | None = None  # loaded the first time a reply is spoken
        self._talker_lock = threading.Lock()

    @property
    def default_settings(self) -> GenerationSettings:
        """The checkpoint's own sampling defaults where it states them (SALMONN's yaml), else its family's."""
        return self.loaded.settings or self.family.settings

    def count_prompt_tokens(self, prompt: Prompt) -> int:
        """Exact: the length of the model's own token ids of the prompt."""
        return len(self.loaded.token_ids(prompt))

    def prepare(self, prompt: Prompt, last_reply: KeyValueCache | None = None) -> dict[str, torch.Tensor]:
        """The model's inputs: the prompt's token ids and the audio features of the parts the forward pass reads.

        With last_reply, its attention cache cut to the prefix its tokens share with the prompt is passed
        as past_key_values, and only the parts after the cut are encoded: a turn costs the same however
        many clips the history holds. Each part's features are computed once and cached.
        """
        return self._inputs(prompt, self.loaded.token_ids(prompt), last_reply)

    def _inputs(self, prompt: Prompt, token_ids: list[int],
                last_reply: KeyValueCache | None) -> dict[str, torch.Tensor]:
        """prepare() of the prompt's token_ids."""
        # (n_tokens,); through numpy, which reads a long list of ints several times faster than torch.tensor
        ids = torch.from_numpy(np.array(token_ids, dtype=np.int64))
        runs = audio_runs(ids, self.loaded.audio_token_id)
        if [end - start for start, end in runs] != [part.n_audio_tokens for part in prompt.audio_parts]:
            raise BackendError(
                f"The prompt's audio tokens ({len(runs)} runs) do not match its {len(prompt.audio_parts)} audio "
                "parts; remove the model's audio tokens from your message."
            )
        inputs: dict[str, torch.Tensor] = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}
        n_reused = 0
        if last_reply is not None:
            n_reused = reusable_prefix(last_reply, ids, runs, [part.key for part in prompt.audio_parts])
        if n_reused:
            last_reply.cache.crop(n_reused - last_reply.cache.get_seq_length())  # negative: how many to remove
            inputs["past_key_values"] = last_reply.cache
        elif (cache := self.loaded.new_cache()) is not None:
            inputs["past_key_values"] = cache
        new_parts = [part for part, (start, _) in zip(prompt.audio_parts, runs) if start >= n_reused]
        if new_parts:
            features = [self._features(part) for part in new_parts]
            inputs |= {name: stacked([part[name] for part in features]) for name in features[0]}
        return {name: value.to(self.model.device) if name != "past_key_values" else value
                for name, value in inputs.items()}

    def talker(self) -> Talker:
        """The family's talker of this checkpoint, loaded the first time it is asked for (a voice switched on)."""
        with self._talker_lock:
            if self._talker is None:
                try:
                    self._talker = load_talker(self.family, self.name, self._load_options, self.loaded)
                except torch.cuda.OutOfMemoryError as e:
                    raise BackendError(f"The GPU has too little free memory for {self.family.title}'s voice beside its "
                                       "thinker. Turn the voice off, or use --quantization 4bit.") from e
                except (OSError, ValueError, RuntimeError, KeyError) as e:
                    raise BackendError(f"Could not load the voice of {self.name}: {e}") from e
            return self._talker

    def execute(
        self, prompt: Prompt, settings: GenerationSettings, stats: Stats, cancel: threading.Event,
        voice: str | None = None,
    ) -> Iterator[str | SpeechChunk]:
        """Stream the reply (and with a voice, its talker's audio) from worker threads that stop within one token of
        cancel or of the caller leaving."""
        talker = self.talker() if voice is not None else None
        token_ids = self.loaded.token_ids(prompt)
        n_prompt = stats.n_prompt_tokens = len(token_ids)
        with self._cache_lock:
            last_reply, self.last_reply = self.last_reply, None
        position_encoding = self.loaded.position_encoding(n_prompt)
        if last_reply is not None and last_reply.position_encoding != position_encoding:
            last_reply = None
        if talker is not None and last_reply is not None and last_reply.hidden is None:
            last_reply = None  # the talker reads the whole prompt's hidden states, which a silent reply did not keep
        try:
            inputs = self._inputs(prompt, token_ids, last_reply)
        except Exception as e:
            with self._cache_lock:  # a turn that fails before generating leaves the cache to the next one
                self.last_reply = self.last_reply or last_reply
            if isinstance(e, ChatError):
                raise
            raise reply_error(e) from e
        if "past_key_values" in inputs:
            stats.n_reused_prompt_tokens = inputs["past_key_values"].get_seq_length()
        part_keys = [part.key for part in prompt.audio_parts]
        finished = threading.Event()  # set when the caller stops listening or stops the reply, however it leaves
        out: queue.Queue = queue.Queue()  # the reply's text, and its audio with a voice, as both are made
        streamer = QueueStreamer(out, self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[Exception] = []
        listener = None
        if talker is not None:
            kept = {layer: hidden[: stats.n_reused_prompt_tokens] for layer, hidden in (last_reply.hidden or {}).items()
                    } if "past_key_values" in inputs and last_reply is not None else {}
            listener = ThinkerListener(self.model, prompt, torch.tensor(token_ids), kept, talker.hidden_layers)

        class CountOrStop(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
                stats.n_tokens = input_ids.shape[1] - n_prompt
                stats.first_token()
                stop = cancel.is_set() or finished.is_set()
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        def generate() -> None:
            try:
                if settings.seed is not None:
                    torch.manual_seed(settings.seed)
                speaking = {} if listener is None else {"output_hidden_states": list(listener.layers)}
                with listener or contextlib.nullcontext():
                    result = self.model.generate(
                        **inputs, **generate_kwargs(settings, self.loaded.stop_ids), **speaking,
                        return_dict_in_generate=True, streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([CountOrStop()]),
                    )
                n_cached = result.past_key_values.get_seq_length()
                with self._cache_lock:
                    self.last_reply = KeyValueCache(
                        result.sequences[0, :n_cached], part_keys, result.past_key_values, position_encoding,
                        None if listener is None else listener.hidden())
            except Exception as e:
                errors.append(e)
                streamer.end()  # wake the consumer, which then raises the error
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()  # give the next, perhaps shorter, turn its chance

        def speak() -> None:
            try:
                while not listener.ready.wait(POLL_S):  # the talker starts from the prompt's hidden states
                    if finished.is_set():
                        return
                for samples in talker.speak(listener.stream, voice, finished, greedy=settings.temperature == 0):
                    out.put(SpeechChunk(samples, talker.sample_rate))
            except Exception as e:
                out.put(e)
            finally:
                out.put(SPEECH_ENDED)

        on_cuda = self.model.device.type == "cuda"
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(self.model.device)
        thread = threading.Thread(target=generate, name=GENERATION_THREAD, daemon=True)
        thread.start()
        voice_thread = None
        if talker is not None:
            voice_thread = threading.Thread(target=speak, name=TALKER_THREAD, daemon=True)
            voice_thread.start()
        try:
            yield from merged(out, streamer.stop_signal, 1 + (talker is not None), cancel, finished)
            thread.join()
            if errors:
                raise reply_error(errors[0]) from errors[0]
        finally:
            # The queue is unbounded, so no worker blocks on it: once they see `finished` at their next step they
            # return, and joining them is enough.
            finished.set()
            thread.join()
            if voice_thread is not None:
                voice_thread.join()
            if on_cuda:
                stats.peak_gpu_memory_mb = torch.cuda.max_memory_allocated(self.model.device) / BYTES_PER_MB

    def close(self) -> None:
        """Free the model's memory (GPU memory included)."""
        self.model = self.loaded = self.last_reply = None
        self._features_cache.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _features(self, part: AudioPart) -> dict[str, torch.Tensor]:
        """The audio inputs of one part (LocalModel.features), computed once per clip part."""
        key = part.key
        with self._cache_lock:
            if key in self._features_cache:
                self._features_cache.move_to_end(key)
                return self._features_cache[key]
        value = self.loaded.features(part.samples)
        with self._cache_lock:
            self._features_cache[key] = value
            while sum(map(_n_bytes, self._features_cache.values())) > MAX_CACHED_FEATURES_MB * BYTES_PER_MB:
                self._features_cache.popitem(last=False)
        return value


class QueueStreamer(TextIteratorStreamer):
    """transformers' streamer of a reply's words, put on a queue that a talker's audio shares."""

    def __init__(self, out: queue.Queue, tokenizer, **kwargs) -> None:
        super().__init__(tokenizer, **kwargs)
        self.text_queue = out


def merged(out: queue.Queue, text_ended: object, n_sources: int, cancel: threading.Event,
           finished: threading.Event) -> Iterator[str | SpeechChunk]:
    """The text and audio on a reply's queue, in the order they were made, until each source has ended; sets
    finished as soon as cancel is, so the talker stops with the thinker."""
    while n_sources:
        try:
            item = out.get(timeout=POLL_S)
        except queue.Empty:
            if cancel.is_set():
                finished.set()
            continue
        if item is text_ended or item is SPEECH_ENDED:
            n_sources -= 1
        elif isinstance(item, Exception):
            raise BackendError(f"The voice failed while speaking: {type(item).__name__}: {item}") from item
        elif item:
            yield item


class ThinkerListener:
    """Hooks on the thinker during one spoken reply's generate(): it fills the talker's ThinkerStream with the
    prompt's hidden states (those a cached earlier turn kept, then the prefill's) and each reply token's as the
    thinker forwards it. Only the generate thread's forwards count: a model may serve two replies at once."""

    def __init__(self, model: torch.nn.Module, prompt: Prompt, prompt_ids: torch.Tensor,
                 kept: dict[int, torch.Tensor], layers: tuple[int, ...]) -> None:
        self.model, self.prompt, self.prompt_ids, self.kept, self.layers = model, prompt, prompt_ids, kept, layers
        self.stream: ThinkerStream | None = None
        self.ready = threading.Event()  # set once the prefill made the stream
        self._steps: list[dict[int, torch.Tensor]] = []
        self._thread: threading.Thread | None = None
        self._handles: list = []

    def __enter__(self) -> "ThinkerListener":
        self._thread = threading.current_thread()
        self._handles = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.model.register_forward_hook(self._after, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        if self.stream is None:  # generate failed before its first forward: the talker still waits
            self.stream = ThinkerStream(self.prompt, self.prompt_ids, {})
            self.ready.set()
        self.stream.end()

    def hidden(self) -> dict[int, torch.Tensor]:
        """The talker's layers of every forwarded token (the prompt's and the reply's but its last), for the cache."""
        return {layer: torch.cat([self.stream.prompt_hidden[layer], *(step[layer][None] for step in self._steps)])
                for layer in self.layers}

    def _before(self, module, args, kwargs) -> None:
        if threading.current_thread() is self._thread:
            self._input_ids = kwargs["input_ids"]

    def _after(self, module, args, kwargs, output) -> None:
        if threading.current_thread() is not self._thread:
            return
        hidden = {layer: output.hidden_states[layer][0] for layer in self.layers}  # (n_new, hidden_size) each
        if self.stream is None:
            prompt_hidden = {layer: torch.cat([self.kept[layer], hidden[layer]]) if self.kept else hidden[layer]
                             for layer in self.layers}
            self.stream = ThinkerStream(self.prompt, self.prompt_ids, prompt_hidden)
            self.ready.set()
            return
        step = {layer: hidden[layer][-1] for layer in self.layers}
        self._steps.append(step)
        self.stream.put(ThinkerStep(int(self._input_ids[0, -1]), step))


def _n_bytes(features: dict[str, torch.Tensor]) -> int:
    return sum(tensor.nbytes for tensor in features.values())


def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(n_parts, ...) of the parts' inputs, zero-padded at the end of their last dimension to the longest: a family
    whose parts are not padded to the window (Qwen3-Omni) masks the padding out with its feature_attention_mask."""
    longest = max(tensor.shape[-1] for tensor in tensors)
    return torch.stack([torch.nn.functional.pad(tensor, (0, longest - tensor.shape[-1])) for tensor in tensors])


def audio_runs(ids: torch.Tensor, audio_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each run of audio tokens in ids, in order: one run per audio part."""
    is_audio = ids == audio_token_id
    follows_audio = torch.cat([is_audio.new_zeros(1), is_audio[:-1]])
    precedes_audio = torch.cat([is_audio[1:], is_audio.new_zeros(1)])
    starts = (is_audio & ~follows_audio).nonzero()[:, 0].tolist()
    ends = ((is_audio & ~precedes_audio).nonzero()[:, 0] + 1).tolist()
    return list(zip(starts, ends))


def reusable_prefix(
    last_reply: KeyValueCache, ids: torch.Tensor, runs: list[tuple[int, int]], part_keys: list[tuple[str, int]]
) -> int:
    """How many of ids the last reply's cache holds: the common prefix of equal token ids and, since every clip's
    audio tokens share one id, the same clip parts behind them. The cut never falls inside a clip's audio tokens
    and leaves at least one token to compute."""
    cached = last_reply.token_ids[: last_reply.cache.get_seq_length()].to(ids.device)  # what the cache still holds
    n = min(len(cached), len(ids) - 1)
    differs = (cached[:n] != ids[:n]).nonzero()
    n = int(differs[0]) if len(differs) else n
    for k, (start, end) in enumerate(runs):
        if start >= n:
            break
        same_part = k < len(last_reply.part_keys) and last_reply.part_keys[k] == part_keys[k]
        if not same_part or n < end:
            return start  # another clip behind the same ids, or a cut inside this clip: encode it whole again
    return n


def generate_kwargs(settings: GenerationSettings, stop_ids: list[int]) -> dict:
    """transformers generate() arguments for the sampling settings; temperature 0 means greedy."""
    kwargs = {"max_new_tokens": settings.max_new_tokens, "repetition_penalty": settings.repetition_penalty,
              "eos_token_id": stop_ids}
    if settings.temperature == 0:
        # None clears sampling values a checkpoint's generation_config may set, which greedy ignores
        return kwargs | {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return kwargs | {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
                     "top_k": settings.top_k}  # top_k 0 turns the filter off in transformers too


def reply_error(error: Exception) -> BackendError:
    """A failure inside generate() as a message a person can act on."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return BackendError(f"The GPU ran out of memory while replying ({str(error).splitlines()[0]}). {MEMORY_HINT}")
    if "CUDA" in str(error):
        return BackendError(f"The GPU failed while replying ({error}). Try again; if it repeats, restart the app.")
    return BackendError(f"The model failed while replying: {type(error).__name__}: {error}")


def _read_config(model: str) -> dict:
    """The checkpoint's config.json (from the folder, the hub or its cache), or the config of a checkpoint named by
    one file of a family's own kind (SALMONN's decode yaml); raises BackendError naming what to do."""
    exists = Path(model).exists()
    if exists and Path(model).is_file():
        return config_of_file(Path(model))
    try:
        path = Path(model) / "config.json" if exists else Path(cached_file(model, "config.json"))
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        if not exists and not model.startswith((".", "/", "~")) and model.count("/") == 1:  # a hub id
            raise BackendError(
                f"Cannot find the model {model}: it is not a folder here and could not be loaded from the Hugging Face "
                f"hub or its local cache ({str(e).splitlines()[0]}). Download it on a machine with internet "
                f"(`hf download {model}`) or point -c/--checkpoint-path at a folder that holds it."
            ) from e
        if not exists:
            raise BackendError(
                f"There is no model folder {model}. Point -c/--checkpoint-path at a folder with the checkpoint "
                "(config.json, weights, processor files), or give a hub id such as "
                f"{DEFAULT_FAMILY.example_checkpoint}."
            ) from e
        raise BackendError(f"{model} does not hold a usable checkpoint: {str(e).splitlines()[0]}") from e


def _fp8_config(unquantized_modules: tuple[str, ...]) -> FineGrainedFP8Config:
    """FP8 weights and activations, which need FP8 tensor cores: on an older GPU transformers would quietly keep
    bf16."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < FP8_COMPUTE_CAPABILITY:
        found = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
        raise BackendError(f"--quantization fp8 needs a GPU of compute capability 8.9 or newer (RTX 40xx, L4, H100); "
                           f"found {found}. Use --quantization 4bit.")
    return FineGrainedFP8Config(modules_to_not_convert=list(unquantized_modules))


def _quantization_config(quantization: str, unquantized_modules: tuple[str, ...]) -> object | None:
    """bitsandbytes settings for "4bit" (NF4, double quantization, bf16 compute) or "8bit", transformers' fine-grained
    FP8 for "fp8"; None for "none"."""
    if quantization == "none":
        return None
    if quantization == "fp8":
        return _fp8_config(unquantized_modules)
    try:
        import bitsandbytes  # noqa: F401
        from transformers.integrations.bitsandbytes import validate_bnb_backend_availability

        validate_bnb_backend_availability(raise_exception=True)
    except (ImportError, RuntimeError) as e:
        raise BackendError(
            f"{quantization} quantization needs bitsandbytes, which cannot run here ({str(e).splitlines()[0]}). "
            "Install it (`pip install -U bitsandbytes`) or start with --quantization none."
        ) from e
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(unquantized_modules))
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=list(unquantized_modules),
    )
