"""Qwen2.5-Omni's own voice: its talker and token2wav, loaded from the checkpoint folder beside the thinker.

The talker is transformers' Qwen2_5OmniTalkerForConditionalGeneration driven one step at a time, as
Qwen2_5OmniForConditionalGeneration.generate(return_audio=True) drives it for one reply, except that each step reads
the thinker's reply token as soon as the thinker has forwarded it instead of after the whole reply: the talker's
codes equal generate's exactly.

token2wav (DiT then BigVGAN) decodes the codes in chunks as they come, the way Qwen's own streaming does it
(Qwen2Code2wav.process_chunk in vllm-project/vllm, vllm/model_executor/models/qwen2_code2wav_dit.py at commit
7bd0c488ce7096abe5a07be6c4bd5be576be440d; written anew here): each chunk of CHUNK_BLOCKS DiT blocks is solved by the
ODE on a window of PAST_BLOCKS blocks before it and FUTURE_BLOCKS after it, from the initial noise of those same
positions in one fixed noise table, and only the chunk's own frames are kept; BigVGAN then vocodes each stretch of mel
with VOCODER_CONTEXT_FRAMES of mel on either side and keeps the middle.

What equals the one-shot decode. The DiT is not causal: some layers attend one block ahead, others one or two back,
and each of the ODE's 36 evaluations widens that again, so a frame of the one-shot mel depends on the codes up to
36 blocks (8.6 s) ahead. A window of one block ahead is Qwen's trade (audio after 36 codes, not after 460); so
- a reply whose mel fits the first window (its codes end before the first chunk is due) decodes in one window
  and equals generate's audio to float error (given generate's noise is this noise table's first frames);
- a longer reply's mel differs from the one-shot mel near and after the first chunk's end: a decode Qwen
  designed and the checkpoint was trained for, not an error to hide, and the tests measure it;
- BigVGAN's chunking is exact (to float error) where its context covers its receptive field.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator

import numpy as np
import torch
from safetensors import safe_open
from transformers import (
    LogitsProcessorList,
    Qwen2_5OmniConfig,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicCache
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniTalkerForConditionalGeneration,
    Qwen2_5OmniToken2WavModel,
    RungeKutta4ODESolver,
)
from transformers.utils import cached_file

from chat.errors import BackendError, SettingsError
from chat.families.base import LoadOptions, LocalModel
from chat.families.qwen2_5_omni.family import FAMILY, SAMPLES_PER_FRAME
from chat.speech import Talker, ThinkerStream

SAMPLE_RATE = 24_000  # Hz of token2wav's audio: 100 mel frames a second, 240 samples each
DEFAULT_VOICE = "Chelsie"  # generate's default speaker
# generate()'s talker defaults
TOP_K, TOP_P, TEMPERATURE, REPETITION_PENALTY = 40, 0.8, 0.9, 1.05
MAX_NEW_CODES = 4096  # talker_max_new_tokens: 82 s of speech at 50 codes a second
# token2wav's defaults in generate: ODE time points (9 RK4 steps of 4 evaluations), classifier-free guidance, sway
ODE_STEPS, GUIDANCE_SCALE, SWAY_COEFFICIENT = 10, 0.5, -1.0
# Qwen's streaming at 50 codes a second (its 50hz settings, in DiT blocks of the config's block_size mel frames)
CHUNK_BLOCKS = 2  # mel a chunk adds: 48 frames (0.48 s) at the real block size of 24
PAST_BLOCKS = 2  # solved with it before the chunk
FUTURE_BLOCKS = 1  # and after it: the first chunk waits for (2 + 1) * 24 frames = 36 codes (0.72 s of speech)
VOCODER_CONTEXT_FRAMES = 20  # mel frames BigVGAN sees on each side of the stretch it vocodes (0.2 s)
NOISE_SEED = 0  # the ODE's initial noise: one table, each frame's noise fixed by its position alone
SPEECH_TOKENS = ("audio_token_index", "image_token_index", "video_token_index")  # zeroed in the talker's input
CHECKPOINT_INDEX, CHECKPOINT_FILE, SPEAKERS_FILE = "model.safetensors.index.json", "model.safetensors", "spk_dict.pt"


class _Cancelled(Exception):
    """cancel was set while token2wav decoded a chunk."""


class Qwen2_5OmniTalker(Talker):
    """Qwen2.5-Omni's talker and token2wav; the talker in the thinker's dtype, token2wav in fp32 as transformers
    insists (its DiT's ODE drifts in bf16)."""

    hidden_layers = (0, -1)  # generate reads the embeddings and the last layer of each thinker position

    def __init__(self, checkpoint: str, options: LoadOptions, thinker: LocalModel) -> None:
        config = Qwen2_5OmniConfig.from_pretrained(checkpoint)
        self.device = _device(options, thinker)
        weights = _weight_files(checkpoint)
        self.talker = _load(Qwen2_5OmniTalkerForConditionalGeneration, config.talker_config, "talker.", weights,
                            options.dtype, self.device)
        self.token2wav = _load(Qwen2_5OmniToken2WavModel, config.token2wav_config, "token2wav.", weights,
                               torch.float32, self.device)
        self.dit, self.vocoder = self.token2wav.code2wav_dit_model, self.token2wav.code2wav_bigvgan_model
        self.sample_rate = getattr(config.token2wav_config, "sample_rate", SAMPLE_RATE)
        self.speakers: dict[str, dict] = torch.load(cached_file(checkpoint, SPEAKERS_FILE), weights_only=True)
        self.voices = self.voices_of(checkpoint)
        self.speech_token_ids = [getattr(config.thinker_config, name) for name in SPEECH_TOKENS]
        talker = self.talker
        self.end_codes = [talker.codec_pad_token, talker.codec_eos_token]  # generate's [8292, 8294] in the real one
        self.max_new_codes = MAX_NEW_CODES
        self._speaking = threading.Lock()
        embed = thinker.model.get_input_embeddings()
        text_ids = [talker.text_eos_token, talker.text_pad_token, *(s["bos_token"] for s in self.speakers.values())]
        with torch.no_grad():
            rows = embed(torch.tensor(text_ids, device=embed.weight.device)).to(self.device)
        self.text_eos, self.text_pad = rows[0], rows[1]
        self.voice_bos = dict(zip(self.speakers, rows[2:]))
        self.hop = math.prod(self.vocoder.config.upsample_rates)  # audio samples a mel frame becomes
        frames = MAX_NEW_CODES * self.dit.repeats
        generator = torch.Generator().manual_seed(NOISE_SEED)
        self.noise = torch.randn(1, frames, self.dit.mel_dim, generator=generator).to(self.device)

    @classmethod
    def voices_of(cls, checkpoint: str) -> tuple[str, ...]:
        """The voices of spk_dict.pt, the default first; none for a checkpoint saved without it (thinker only)."""
        path = cached_file(checkpoint, SPEAKERS_FILE, _raise_exceptions_for_missing_entries=False)
        if path is None:
            return ()
        return tuple(sorted(torch.load(path, weights_only=True), key=lambda name: name != DEFAULT_VOICE))

    def speak(self, thinker: ThinkerStream, voice: str, cancel: threading.Event, greedy: bool = False
              ) -> Iterator[np.ndarray]:
        """The reply's audio, each chunk as soon as token2wav has decoded it; the talker runs one code per thinker
        token (waiting for the thinker when ahead), the decoder one chunk per CHUNK_BLOCKS blocks of codes."""
        if voice not in self.speakers:
            raise SettingsError(f"{FAMILY.title} has no voice {voice!r}; its voices: {', '.join(self.voices)}.")
        decoder = _Decoder(self, self.speakers[voice], cancel)
        try:
            # one reply speaks at a time (another waits its turn): transformers' talker keeps its rope deltas on
            # the module, and this one its cache on the instance
            with self._speaking, torch.no_grad():
                for code in self.codes(thinker, voice, cancel, greedy):
                    yield from decoder.add(code)
                if not cancel.is_set():
                    yield from decoder.finish()
        except _Cancelled:
            return

    def codes(self, thinker: ThinkerStream, voice: str, cancel: threading.Event, greedy: bool) -> Iterator[int]:
        """The talker's codes as generate's talker.generate makes them (its end code left out): a prefill of the
        prompt, the voice's bos and the first reply token, then one step per code, each reading the next reply
        token's hidden states, then the text end, then text padding."""
        steps = thinker.steps()
        first = next(steps, None)
        if first is None or cancel.is_set():  # a reply of one token: generate has nothing to speak either
            return
        history = self._prompt_codes(len(thinker.prompt_ids))
        logits = self._prefill(thinker, first.token_id, self._reply_part(first.hidden), voice)
        replies = self._reply_parts(steps)
        while not cancel.is_set():
            code = self._choose(history, logits, greedy)
            if code in self.end_codes:
                return
            yield code
            history = torch.cat([history, history.new_tensor([[code]])], dim=1)
            if history.shape[1] - len(thinker.prompt_ids) - 2 == self.max_new_codes:
                return
            part = next(replies)
            out = self.talker(input_ids=history[:, -1:], attention_mask=torch.ones_like(history),
                              past_key_values=self.cache, thinker_reply_part=part[None, None], use_cache=True)
            logits = out.logits[:, -1]

    def _prompt_codes(self, n_prompt: int) -> torch.Tensor:
        """generate's talker input ids: a mask code per prompt token, then pad and bos (1, n_prompt + 2); the
        repetition penalty reads them."""
        talker = self.talker
        ids = [talker.codec_mask_token] * n_prompt + [talker.codec_pad_token, talker.codec_bos_token]
        return torch.tensor([ids], device=self.device)

    def _prefill(self, thinker: ThinkerStream, first_token: int, first_part: torch.Tensor, voice: str
                 ) -> torch.Tensor:
        """The talker's first forward, on the prompt's hidden states plus its embeddings (speech tokens' embeddings
        zeroed, as generate does), the voice's bos embedding and the first reply token; returns its last logits."""
        ids = thinker.prompt_ids.to(self.device)
        embeds = thinker.prompt_hidden[0].to(self.device)
        embeds = embeds.masked_fill(torch.isin(ids, ids.new_tensor(self.speech_token_ids))[:, None], 0)
        prompt = thinker.prompt_hidden[-1].to(self.device) + embeds
        inputs_embeds = torch.cat([prompt, self.voice_bos[voice][None], first_part[None]])[None]
        text_ids = torch.cat([ids, ids.new_tensor([self.speakers[voice]["bos_token"], first_token])])[None]
        frames = [-(-len(part.samples) // SAMPLES_PER_FRAME) for part in thinker.prompt.audio_parts]
        self.cache = DynamicCache(config=self.talker.config)
        out = self.talker(inputs_embeds=inputs_embeds, input_text_ids=text_ids,
                          attention_mask=torch.ones_like(text_ids), past_key_values=self.cache, use_cache=True,
                          audio_feature_lengths=torch.tensor(frames, device=self.device) if frames else None)
        return out.logits[:, -1]

    def _reply_part(self, hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        """What the talker reads of one reply token: its last hidden state plus its embedding (hidden_size,)."""
        return hidden[-1].to(self.device) + hidden[0].to(self.device)

    def _reply_parts(self, steps: Iterator) -> Iterator[torch.Tensor]:
        """Each later reply token's part as the thinker forwards it, then the text end, then padding for ever."""
        for step in steps:
            yield self._reply_part(step.hidden)
        yield self.text_eos
        while True:
            yield self.text_pad

    def _choose(self, history: torch.Tensor, logits: torch.Tensor, greedy: bool) -> int:
        """The next code, with the logits processors generate builds for the talker (repetition penalty, the bos
        code suppressed, then temperature, top-k and top-p when sampling)."""
        processors = LogitsProcessorList([
            RepetitionPenaltyLogitsProcessor(REPETITION_PENALTY),
            SuppressTokensLogitsProcessor([self.talker.codec_bos_token], device=logits.device),
        ])
        if not greedy:
            processors += [TemperatureLogitsWarper(TEMPERATURE), TopKLogitsWarper(TOP_K), TopPLogitsWarper(TOP_P)]
        scores = processors(history, logits.float())
        if greedy:
            return int(scores.argmax(-1))
        return int(torch.multinomial(scores.softmax(-1), 1))

    def mel(self, codes: torch.Tensor, start: int, speaker: dict, cancel: threading.Event) -> torch.Tensor:
        """The DiT's mel (n_frames, mel_dim) of codes (1, n_codes) whose first frame is frame start of the reply:
        Qwen2_5OmniToken2WavDiTModel.sample's ODE, from this table's noise at those frames instead of fresh noise."""
        codes = codes.masked_fill(codes >= self.dit.text_embed.codec_embed.num_embeddings, 0)  # as Qwen's does
        n_frames = codes.shape[1] * self.dit.repeats
        cond = speaker["cond"].to(self.device).float()[:, None].repeat(1, n_frames, 1)
        ref_mel = speaker["ref_mel"].to(self.device).float()

        def velocity(time: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
            if cancel.is_set():
                raise _Cancelled
            out = self.dit(hidden_states=state, quantized_code=codes, speaker_embedding=cond,
                           condition_vector=ref_mel, time_step=time, apply_cfg=True)
            guided, unguided = torch.chunk(out, 2, dim=0)
            return guided + (guided - unguided) * GUIDANCE_SCALE

        times = torch.linspace(0, 1, ODE_STEPS, device=self.device, dtype=cond.dtype)
        times += SWAY_COEFFICIENT * (torch.cos(torch.pi / 2 * times) - 1 + times)
        noise = self.noise[:, start:start + n_frames]
        return RungeKutta4ODESolver(function=velocity, initial_value=noise).integrate(times)[-1, 0]

    def vocode(self, mel: torch.Tensor) -> np.ndarray:
        """BigVGAN's audio of mel (n_frames, mel_dim): n_frames * hop samples."""
        return self.vocoder(mel.T[None]).reshape(-1).float().numpy()


class _Decoder:
    """token2wav over codes as they come: a DiT chunk when its window's codes are all there, then the audio of
    the mel whose right context BigVGAN has (frames are mel frames, repeats per code)."""

    def __init__(self, talker: Qwen2_5OmniTalker, speaker: dict, cancel: threading.Event) -> None:
        self.talker, self.speaker, self.cancel = talker, speaker, cancel
        block = talker.dit.config.block_size
        self.chunk, self.past, self.future = CHUNK_BLOCKS * block, PAST_BLOCKS * block, FUTURE_BLOCKS * block
        self.repeats = talker.dit.repeats
        self.codes: list[int] = []
        self.mels: list[torch.Tensor] = []  # each chunk's frames, in order
        self.n_mel = 0  # frames of final mel
        self.n_heard = 0  # frames whose audio was yielded

    def add(self, code: int) -> Iterator[np.ndarray]:
        """Take the next code; yields the audio it completes, if any."""
        self.codes.append(code)
        if len(self.codes) * self.repeats >= self.n_mel + self.chunk + self.future:
            self._solve(self.n_mel + self.chunk)
            yield from self._vocode(self.n_mel - VOCODER_CONTEXT_FRAMES)

    def finish(self) -> Iterator[np.ndarray]:
        """The rest of the audio once the talker has ended."""
        end = len(self.codes) * self.repeats
        if self.n_mel < end:
            self._solve(end)
        yield from self._vocode(end)

    def _solve(self, end: int) -> None:
        """The mel of frames n_mel..end, solved on a window of the blocks around them that the codes cover."""
        start = max(self.n_mel - self.past, 0)
        stop = min(end + self.future, len(self.codes) * self.repeats)
        codes = torch.tensor([self.codes[start // self.repeats:stop // self.repeats]], device=self.talker.device)
        mel = self.talker.mel(codes, start, self.speaker, self.cancel)
        self.mels.append(mel[self.n_mel - start:end - start])
        self.n_mel = end

    def _vocode(self, end: int) -> Iterator[np.ndarray]:
        """The audio of frames n_heard..end, vocoded with up to VOCODER_CONTEXT_FRAMES of mel on each side."""
        if end <= self.n_heard:
            return
        mel = torch.cat(self.mels)
        self.mels = [mel]
        first = max(self.n_heard - VOCODER_CONTEXT_FRAMES, 0)
        audio = self.talker.vocode(mel[first:min(end + VOCODER_CONTEXT_FRAMES, self.n_mel)])
        hop = self.talker.hop
        yield audio[(self.n_heard - first) * hop:(end - first) * hop]
        self.n_heard = end


def _device(options: LoadOptions, thinker: LocalModel) -> torch.device:
    """Where the talker goes: the device the options name, else (a map over several) the thinker's first."""
    device_map = options.device_map
    if isinstance(device_map, str) and device_map not in ("auto", "sequential", "balanced", "balanced_low_0"):
        return torch.device(device_map)
    return thinker.model.get_input_embeddings().weight.device


def _weight_files(checkpoint: str) -> dict[str, str]:
    """Each tensor name → the safetensors file (a local path) that holds it, from the index of a sharded
    checkpoint or the one file of an unsharded one."""
    index = cached_file(checkpoint, CHECKPOINT_INDEX, _raise_exceptions_for_missing_entries=False)
    if index is None:
        path = cached_file(checkpoint, CHECKPOINT_FILE)
        with safe_open(path, "pt") as file:
            return dict.fromkeys(file.keys(), path)
    with open(index) as file:
        weight_map: dict[str, str] = json.load(file)["weight_map"]
    wanted = {shard for name, shard in weight_map.items() if name.startswith(("talker.", "token2wav."))}
    paths = {shard: cached_file(checkpoint, shard) for shard in wanted}
    return {name: paths[shard] for name, shard in weight_map.items() if shard in paths}


def _load(cls: type, config: object, prefix: str, weights: dict[str, str], dtype: torch.dtype,
          device: torch.device) -> torch.nn.Module:
    """One part of the full model from its own tensors only (the thinker's stay on disk), in dtype on device."""
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    files: dict[str, list[str]] = {}
    for name, path in weights.items():
        if name.startswith(prefix):
            files.setdefault(path, []).append(name)
    state = {}
    for path, names in files.items():
        with safe_open(path, "pt", device=str(device)) as file:
            state |= {name.removeprefix(prefix): file.get_tensor(name) for name in names}
    missing, _ = model.load_state_dict(state, strict=False)
    if missing := set(missing) & {name for name, _ in model.named_parameters()}:
        raise BackendError(f"The checkpoint lacks {len(missing)} of {prefix.rstrip('.')}'s weights, e.g. "
                           f"{sorted(missing)[0]}; the voice needs the full Qwen2.5-Omni folder.")
    return model.eval()
