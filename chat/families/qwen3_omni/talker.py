"""Qwen3-Omni's own voice: its talker (MoE, with a code predictor for the residual codebooks) and code2wav, loaded
from the checkpoint folder beside the thinker, speaking while the thinker still writes.

The talker is transformers' Qwen3OmniMoeTalkerForConditionalGeneration driven one step at a time, as
Qwen3OmniMoeForConditionalGeneration.generate(return_audio=True) drives it for one reply, except that each step reads
the next reply token as soon as the thinker has forwarded it instead of after the whole reply: the prefill is the
prompt's user turns and the assistant start (with the first reply token), each later step adds one entry of the rest
of the reply, then tts_eos, then tts_pad. The code predictor is run by hand too (generate's fifteen-token
code_predictor.generate per step is mostly overhead); both sample with the logits processors generate builds.

code2wav is causal, so the audio streams exactly (to float error) as the one-shot decode of all the codes:
- its pre_transformer (sliding-window attention) runs once per code with a KV cache, which keeps the window;
- its convolutions (causal convs; causal transposed convs, the decoder's looking one input frame ahead and dropping
  one at the end) reach a bounded number of codes back (conv_reach_codes: 11 for the real checkpoint), so each chunk
  is decoded from the transformer's outputs with that many codes of left context and only its new samples kept.
A decode of n codes gives n * 1920 - 555 samples (the lookahead: 23 ms at 24 kHz), so each chunk ends 23 ms short of
its last code; the rest comes with the next chunk. Chunks hold 4 codes first (297 ms of audio), then as many codes
as were decoded before, up to 16 (4, 4, 8, 16, 16, ...): each chunk is due before the audio already yielded has
played whenever the talker keeps up with real time (12.5 codes a second; 74 ms a code for the second chunk), and later
chunks re-decode less context.
generate itself decodes in 300-code pieces with 25 codes of context (chunked_decode): up to 300 codes (24 s) that is
the one-shot decode and equals this; beyond, generate's own audio differs from the one-shot decode at each 24-s seam
(25 codes cannot cover the transformer's reach), and this stays equal to the one-shot decode.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch
import transformers
from transformers import (
    LogitsProcessorList,
    PretrainedConfig,
    Qwen3OmniMoeCode2Wav,
    Qwen3OmniMoeConfig,
    Qwen3OmniMoeTalkerForConditionalGeneration,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicCache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeCausalConvNet,
    Qwen3OmniMoeCausalTransConvNet,
)

from chat.errors import BackendError, SettingsError
from chat.families.base import LoadOptions, LocalModel
from chat.families.qwen3_omni.family import FAMILY, MODEL_TYPE
from chat.speech import Talker, ThinkerStep, ThinkerStream

SAMPLE_RATE = 24_000  # Hz: 12.5 codes a second, 1920 samples each (code2wav's upsampling); no config file names it
DEFAULT_VOICE = "ethan"  # generate's default speaker
# generate()'s talker defaults (talker_top_k, ...); its code predictor samples with top-k 50, top-p 0.8, temperature 1
TOP_K, TOP_P, TEMPERATURE, REPETITION_PENALTY = 50, 1.0, 0.9, 1.05
PREDICTOR_TOP_K, PREDICTOR_TOP_P = 50, 0.8
MAX_NEW_TOKENS = 4096  # talker_max_new_tokens: at most 4095 codes, 328 s of speech at 12.5 codes a second
SUPPRESSED_TAIL = 1024  # generate forbids the talker's last 1024 ids (codec control ids) but its end
FIRST_CHUNK_CODES = 4  # codes (80 ms of speech each) before the first chunk: 4 * 1920 - 555 samples, 297 ms of audio
MAX_CHUNK_CODES = 16  # later chunks: as many codes as decoded before, up to 16 (1.28 s of audio)
WAIT_S = 0.05  # how often a talker waiting for the thinker's next token looks at cancel
ASSISTANT_PREFIX = 3  # <|im_start|>assistant\n: the assistant turn's tokens before its text
TTS_PADS = 4  # tts_pad entries generate puts between the assistant prefix and tts_bos
CONVERSION = get_checkpoint_conversion_mapping(MODEL_TYPE)  # the per-expert weights fused, as the full model loads


class Qwen3OmniTalker(Talker):
    """Qwen3-Omni's talker and code2wav, unquantized in the thinker's dtype (bf16 on a GPU, fp32 on a CPU): 3.5B
    parameters (6.6 GiB in bf16), of which 0.45B run per code (MoE), small beside the 30B thinker; their codes
    steer every sample."""

    def __init__(self, checkpoint: str, options: LoadOptions, thinker: LocalModel) -> None:
        config = Qwen3OmniMoeConfig.from_pretrained(checkpoint)
        self.config, self.device = config, _device(options, thinker)
        talker_class = Qwen3OmniMoeTalkerForConditionalGeneration
        if get_checkpoint_conversion_mapping(talker_class.__name__) is None:  # transformers maps only the full model
            register_checkpoint_conversion_mapping(talker_class.__name__, CONVERSION)
        placed = {"dtype": options.dtype, "device_map": {"": self.device}}
        self.talker = _load(talker_class, checkpoint, config=config.talker_config, **placed)
        self.code2wav = _load(Qwen3OmniMoeCode2Wav, checkpoint, config=config.code2wav_config,
                              key_mapping={r"^code2wav\.": ""}, **placed)
        talker_config = config.talker_config
        self.sample_rate = SAMPLE_RATE
        self.speakers = {name.lower(): code for name, code in talker_config.speaker_id.items()}
        self.voices = _voices(talker_config.speaker_id)
        self.hidden_layers = (0, talker_config.accept_hidden_layer)
        self.max_new_tokens = MAX_NEW_TOKENS
        thinker_config = config.thinker_config
        self.speech_token_ids = torch.tensor([thinker_config.audio_token_id, thinker_config.image_token_id,
                                              thinker_config.video_token_id])
        vocab = talker_config.text_config.vocab_size
        self.suppressed = [i for i in range(vocab - SUPPRESSED_TAIL, vocab) if i != talker_config.codec_eos_token_id]
        embed = thinker.model.get_input_embeddings()
        special = torch.tensor([config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id])
        with torch.no_grad():
            rows = self._project(embed(special.to(embed.weight.device)))
        self.tts_bos, self.tts_eos, self.tts_pad = rows
        self.samples_per_code = int(self.code2wav.total_upsample)
        self.context_codes = conv_reach_codes(self.code2wav)

    @classmethod
    def voices_of(cls, checkpoint: str) -> tuple[str, ...]:
        """The speakers config.json's talker_config lists, the default first; none for a thinker-only checkpoint."""
        config = PretrainedConfig.get_config_dict(checkpoint)[0]
        talker = config.get("talker_config") if config.get("enable_audio_output", True) else None
        return _voices(talker.get("speaker_id") or {}) if talker else ()

    def speak(self, thinker: ThinkerStream, voice: str, cancel: threading.Event, greedy: bool = False
              ) -> Iterator[np.ndarray]:
        """The reply's audio, each chunk as soon as code2wav has decoded it (see the module's docstring); raises
        SettingsError at once for a voice the checkpoint lacks."""
        speaker = self.speakers.get(voice.lower())
        if speaker is None:
            raise SettingsError(f"{FAMILY.title} has no voice {voice!r}; its voices: {', '.join(self.voices)}.")
        return self._speak(thinker, speaker, cancel, greedy)

    def _speak(self, thinker: ThinkerStream, speaker: int, cancel: threading.Event, greedy: bool
               ) -> Iterator[np.ndarray]:
        """speak() once the voice is known, so a wrong one fails at the call rather than at the first chunk."""
        decoder = _Decoder(self)
        with torch.no_grad():
            for frame in self.frames(thinker, speaker, cancel, greedy):
                yield from decoder.add(frame)
            if not cancel.is_set():
                yield from decoder.finish()

    def frames(self, thinker: ThinkerStream, speaker: int, cancel: threading.Event, greedy: bool
               ) -> Iterator[torch.Tensor]:
        """Each code frame (num_code_groups,) as talker.generate makes it: the first codebook from the talker, the
        others from the code predictor; ends at the talker's end code (whose frame generate never makes either),
        at max_new_tokens, or within one step of cancel."""
        texts = _TextEntries(self, thinker, cancel)
        head = texts.prefix(ASSISTANT_PREFIX + 1)
        if head is None:  # cancelled, or a reply of one token: generate has no first text to speak either
            return
        hidden, logits, cache = self._prefill(thinker, head, speaker)
        generated = torch.empty((1, 0), dtype=torch.long, device=self.device)
        processors = self._processors(greedy)
        while not cancel.is_set():
            code = _choose(processors, generated, logits, greedy)
            generated = torch.cat([generated, code.view(1, 1)], dim=1)
            if int(code) == self.config.talker_config.codec_eos_token_id or generated.shape[1] >= self.max_new_tokens:
                return
            frame, codec_embeds = self._residuals(hidden, code, greedy)
            yield frame
            text = texts.next()
            if text is None:
                return
            hidden, logits = self._step(codec_embeds + text, cache)

    def _prefill(self, thinker: ThinkerStream, head: torch.Tensor, speaker: int
                 ) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:
        """The talker's first forward: the prompt's user turns, then the assistant start with the voice's codec
        ids and the first reply token; returns the last position's hidden state and logits, and the cache."""
        talker_config = self.config.talker_config
        codec_ids = torch.tensor([talker_config.codec_nothink_id, talker_config.codec_think_bos_id,
                                  talker_config.codec_think_eos_id, speaker, talker_config.codec_pad_id,
                                  talker_config.codec_bos_id], device=self.device)
        codec = torch.cat([head.new_zeros(ASSISTANT_PREFIX, head.shape[-1]),
                           self.talker.get_input_embeddings()(codec_ids)])
        text = torch.cat([head[:ASSISTANT_PREFIX], self.tts_pad.expand(TTS_PADS, -1), self.tts_bos[None],
                          head[ASSISTANT_PREFIX:]])
        inputs = torch.cat([self._user_parts(thinker), text + codec])[None]
        cache = DynamicCache(config=talker_config.text_config)
        hidden, logits = self._step(inputs, cache)
        return hidden, logits, cache

    def _user_parts(self, thinker: ThinkerStream) -> torch.Tensor:
        """generate's talker input for the prompt's user turns (n_user, talker hidden): each token whose turn's
        <|im_start|> is followed by the user role, its audio tokens from the thinker's accept_hidden_layer through
        hidden_projection, its text from the embeddings through text_projection."""
        ids = thinker.prompt_ids.to(self.device)
        positions = torch.arange(len(ids), device=self.device)
        starts = torch.where(ids == self.config.im_start_token_id, positions, -1).cummax(0).values.clamp_min(0)
        user = ids[(starts + 1).clamp_max(len(ids) - 1)] == self.config.user_token_id
        speech = torch.isin(ids, self.speech_token_ids.to(self.device))
        out = torch.empty(int(user.sum()), self.talker.config.text_config.hidden_size, dtype=self.talker.dtype,
                          device=self.device)
        heard, read = speech[user], ~speech[user]
        if heard.any():
            accept = _rows(thinker.prompt_hidden[self.hidden_layers[1]], user & speech)
            out[heard] = self.talker.hidden_projection(accept.to(self.device, self.talker.dtype))
        out[read] = self._project(_rows(thinker.prompt_hidden[0], user & ~speech))
        return out

    def _project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Thinker token embeddings as the talker reads text: text_projection in the talker's dtype."""
        return self.talker.text_projection(embeddings.to(self.device, self.talker.dtype))

    def _step(self, inputs_embeds: torch.Tensor, cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
        """One talker forward (1, n, hidden) at the positions after the cache's: the last position's hidden state
        (1, 1, hidden) and float32 logits (1, vocab). The app's prompts hold audio but no image or video, for which
        generate's 3D positions (get_rope_index) are the plain ones, the same on all four rows."""
        past = cache.get_seq_length()
        positions = torch.arange(past, past + inputs_embeds.shape[1], device=self.device).view(1, 1, -1)
        out = self.talker.model(inputs_embeds=inputs_embeds, position_ids=positions.expand(4, 1, -1),
                                past_key_values=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1:]
        return hidden, self.talker.codec_head(hidden)[:, -1].float()

    def _residuals(self, hidden: torch.Tensor, code: torch.Tensor, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The code predictor's residual codes after the talker's code, as talker.prepare_inputs_for_generation
        makes them (from the talker's last hidden state and the code's embedding): the frame (num_code_groups,),
        and the sum of its codes' embeddings (1, 1, hidden) the talker reads next."""
        predictor = self.talker.code_predictor
        processors = LogitsProcessorList() if greedy else LogitsProcessorList(
            [TopKLogitsWarper(PREDICTOR_TOP_K), TopPLogitsWarper(PREDICTOR_TOP_P)])
        codes, embeds = [code.view(1)], [self.talker.get_input_embeddings()(code.view(1, 1))]
        inputs, cache = torch.cat([hidden, embeds[0]], dim=1), DynamicCache(config=predictor.config)
        for group in range(self.config.talker_config.num_code_groups - 1):
            out = predictor.model(inputs_embeds=inputs, past_key_values=cache, use_cache=True)
            logits = predictor.lm_head[group](out.last_hidden_state[:, -1]).float()
            codes.append(_choose(processors, torch.cat(codes)[None], logits, greedy).view(1))
            inputs = predictor.model.get_input_embeddings()[group](codes[-1].view(1, 1))
            embeds.append(inputs)
        return torch.cat(codes), torch.cat(embeds, dim=1).sum(1, keepdim=True)

    def _processors(self, greedy: bool) -> LogitsProcessorList:
        """generate's talker processors: repetition penalty over the codes so far, the codec control ids
        suppressed, then temperature, top-k (and top-p below 1) when sampling."""
        processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(REPETITION_PENALTY),
                                          SuppressTokensLogitsProcessor(self.suppressed, device=self.device)])
        if not greedy:
            processors += [TemperatureLogitsWarper(TEMPERATURE), TopKLogitsWarper(TOP_K)]
            if TOP_P < 1.0:
                processors.append(TopPLogitsWarper(TOP_P))
        return processors

    def vocode(self, frames: torch.Tensor) -> torch.Tensor:
        """code2wav's convolutions over pre_transformer outputs (1, n, hidden): its forward after the transformer,
        (1, 1, n * samples_per_code - lookahead) samples in [-1, 1]."""
        hidden = frames.permute(0, 2, 1)
        for blocks in self.code2wav.upsample:
            for block in blocks:
                hidden = block(hidden)
        for block in self.code2wav.decoder:
            hidden = block(hidden)
        return hidden.clamp(min=-1, max=1)


class _TextEntries:
    """The assistant turn's text as the talker reads it, one projected entry at a time: the prompt's tokens from
    the last <|im_start|>assistant on, then each reply token as the thinker forwards it, then tts_eos, then tts_pad
    for ever. The stream is read in a thread of its own, so a talker waiting for the thinker still sees cancel."""

    def __init__(self, talker: Qwen3OmniTalker, thinker: ThinkerStream, cancel: threading.Event) -> None:
        self.talker, self.cancel = talker, cancel
        config, ids = talker.config, thinker.prompt_ids
        starts = ((ids[:-1] == config.im_start_token_id) & (ids[1:] == config.assistant_token_id)).nonzero()
        start = int(starts[-1, 0])
        self.pending = list(talker._project(thinker.prompt_hidden[0][start:]))
        self.steps: queue.Queue[ThinkerStep | None] = queue.Queue()
        self.ended = False  # the thinker's stream has ended, and tts_eos has been read
        threading.Thread(target=self._read, args=(thinker,), name="qwen3-omni-talker-text", daemon=True).start()

    def _read(self, thinker: ThinkerStream) -> None:
        for step in thinker.steps():
            self.steps.put(step)
        self.steps.put(None)

    def prefix(self, n: int) -> torch.Tensor | None:
        """The first n entries (n, hidden), waiting for the thinker as needed; None if it ends first or cancel."""
        while len(self.pending) < n:
            step = self._wait()
            if step is None:
                return None
            self.pending.append(self._entry(step))
        head, self.pending = self.pending[:n], self.pending[n:]
        return torch.stack(head)

    def next(self) -> torch.Tensor | None:
        """The next entry (hidden,), waiting for the thinker as needed; None on cancel."""
        if self.pending:
            return self.pending.pop(0)
        if self.ended:
            return self.talker.tts_pad
        step = self._wait()
        if step is None:
            if self.cancel.is_set():
                return None
            self.ended = True
            return self.talker.tts_eos
        return self._entry(step)

    def _wait(self) -> ThinkerStep | None:
        """The thinker's next step, or None when its stream ends or cancel is set."""
        while not self.cancel.is_set():
            try:
                return self.steps.get(timeout=WAIT_S)
            except queue.Empty:
                continue
        return None

    def _entry(self, step: ThinkerStep) -> torch.Tensor:
        return self.talker._project(step.hidden[0][None])[0]


class _Decoder:
    """code2wav over code frames as they come: the transformer once per frame (its KV cache keeps the sliding
    window), the convolutions per chunk over the chunk and context_codes transformer outputs before it."""

    def __init__(self, talker: Qwen3OmniTalker) -> None:
        self.talker, self.code2wav = talker, talker.code2wav
        self.cache = DynamicCache(config=self.code2wav.config)
        self.outputs: list[torch.Tensor] = []  # the transformer's (1, 1, hidden) per code, from code `first` on
        self.first = 0  # the code of outputs[0]
        self.n_codes = 0
        self.n_heard = 0  # samples yielded
        self.due = FIRST_CHUNK_CODES  # n_codes at which the next chunk is decoded

    def add(self, frame: torch.Tensor) -> Iterator[np.ndarray]:
        """Take the next code frame (num_code_groups,); yields a chunk of audio when one is due."""
        embeds = self.code2wav.code_embedding(frame.view(1, -1, 1) + self.code2wav.code_offset).mean(1)
        positions = torch.tensor([[self.n_codes]], device=embeds.device)
        out = self.code2wav.pre_transformer(inputs_embeds=embeds, position_ids=positions,
                                            past_key_values=self.cache, use_cache=True)
        self.outputs.append(out.last_hidden_state)
        self.n_codes += 1
        if self.n_codes >= self.due:
            yield from self._decode()
            self.due = self.n_codes + min(self.n_codes, MAX_CHUNK_CODES)

    def finish(self) -> Iterator[np.ndarray]:
        """The rest of the audio once the talker has ended."""
        if self.outputs:
            yield from self._decode()

    def _decode(self) -> Iterator[np.ndarray]:
        """The samples after n_heard that the codes so far determine, decoded from context_codes codes before."""
        per_code = self.talker.samples_per_code
        start = max(self.n_heard // per_code - self.talker.context_codes, 0)
        self.outputs, self.first = self.outputs[start - self.first:], start
        audio = self.talker.vocode(torch.cat(self.outputs, dim=1))[0, 0, self.n_heard - start * per_code:]
        if len(audio):
            self.n_heard += len(audio)
            yield audio.float().cpu().numpy()


def conv_reach_codes(code2wav: Qwen3OmniMoeCode2Wav) -> int:
    """How many codes back code2wav's convolutions (after its transformer) reach, summed in the order they run at
    the rate so far (frames a code is at that point): a causal conv reaches kernel_size - 1 of its frames, a causal
    transposed conv under one input frame (kernel - 1 - left_pad of its output frames). 10.1, so 11, for the real
    checkpoint."""
    reach, rate = 0.0, 1
    for module in [*code2wav.upsample.modules(), *code2wav.decoder.modules()]:
        if isinstance(module, Qwen3OmniMoeCausalTransConvNet):
            rate *= module.conv.stride[0]
            reach += (module.conv.kernel_size[0] - 1 - module.left_pad) / rate
        elif isinstance(module, Qwen3OmniMoeCausalConvNet):
            reach += (module.kernel_size - module.stride) / rate
    return math.ceil(reach)


def _rows(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of a prompt's hidden states that mask selects, taken where the thinker keeps them."""
    return hidden[mask.to(hidden.device)]


def _choose(processors: LogitsProcessorList, history: torch.Tensor, logits: torch.Tensor, greedy: bool
            ) -> torch.Tensor:
    """The next token (0-d), as generate picks it from float32 logits (1, vocab)."""
    scores = processors(history, logits)
    if greedy:
        return scores.argmax(-1)[0]
    return torch.multinomial(scores.softmax(-1), 1)[0, 0]


def _load(cls: type, checkpoint: str, **kwargs) -> torch.nn.Module:
    """One part of the full model from the checkpoint's tensors of it, the others left on disk unreported
    (transformers would list each of the thinker's thousands as unexpected); a missing one is an error."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(checkpoint, output_loading_info=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if missing := sorted(info["missing_keys"]):
        raise BackendError(f"{checkpoint} lacks {len(missing)} of {cls.__name__}'s weights, e.g. {missing[0]}; "
                           f"{FAMILY.title}'s voice needs the full checkpoint folder.")
    return model.eval()


def _voices(speaker_id: dict[str, int]) -> tuple[str, ...]:
    """The speakers by name, the default (generate's) first, the others in the config's order."""
    names = sorted(speaker_id, key=lambda name: name.lower() != DEFAULT_VOICE)
    return tuple(name.title() for name in names)


def _device(options: LoadOptions, thinker: LocalModel) -> torch.device:
    """Where the talker and code2wav go: the device the options name, else (a map over several) the thinker's
    embeddings' (its first)."""
    device_map = options.device_map
    if isinstance(device_map, str) and device_map not in ("auto", "sequential", "balanced", "balanced_low_0"):
        return torch.device(device_map)
    return thinker.model.get_input_embeddings().weight.device
