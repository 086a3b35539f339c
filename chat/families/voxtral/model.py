"""Voxtral loaded and run with transformers 5 and mistral-common: the family of chat/families/voxtral/family.py."""

import numpy as np
import torch
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, SpecialTokens, TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from transformers import VoxtralForConditionalGeneration, WhisperFeatureExtractor
from transformers.utils import cached_file

from chat.audio import SAMPLE_RATE
from chat.families.base import LoadOptions, LocalModel
from chat.families.voxtral.family import openai_messages
from chat.openai_content import audio_content
from chat.prompts import Prompt

TOKENIZER_FILE = "tekken.json"


# A one-sample clip: mistral-common decodes a clip only to count its tokens, padding it to a 30-s multiple, so this
# stands for any part (at most 30 s) in the ids, without writing every part of the history as a wav on every
# turn; what the model hears is the part's own mel features.
PART_PLACEHOLDER = audio_content(np.zeros(1, dtype=np.float32))


class MistralText:
    """Decoding for the streamer: the control tokens of a tool call ([TOOL_CALLS], [CALL_ID], [ARGS]) stay in the
    text, written as themselves, where the family's reader finds them; the other control tokens are no text."""

    def __init__(self, tokenizer: MistralTokenizer) -> None:
        self.tekken = tokenizer.instruct_tokenizer.tokenizer
        self.call_tokens = set()
        for token in (SpecialTokens.tool_calls, SpecialTokens.call_id, SpecialTokens.args):
            try:
                self.call_tokens.add(self.tekken.get_special_token(token.value))
            except ValueError:  # an older tokenizer without [CALL_ID] or [ARGS]
                pass

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **_) -> str:
        """Text of ids; with skip_special_tokens, control tokens other than a call's are left out."""
        if skip_special_tokens:
            ids = [i for i in ids if not self.tekken.is_special(i) or i in self.call_tokens]
        return self.tekken.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)


class VoxtralModel(LocalModel):
    """VoxtralForConditionalGeneration, mistral-common's tokenizer, and the 128-bin Whisper mel of each part."""

    def __init__(self, checkpoint: str, options: LoadOptions) -> None:
        self.model = VoxtralForConditionalGeneration.from_pretrained(
            checkpoint, dtype=options.dtype, device_map=options.device_map,
            quantization_config=options.quantization_config,
        ).eval()
        self.mistral = MistralTokenizer.from_file(cached_file(checkpoint, TOKENIZER_FILE))
        self.tokenizer = MistralText(self.mistral)
        self.feature_extractor = WhisperFeatureExtractor.from_pretrained(checkpoint)
        self.audio_token_id = self.model.config.audio_token_id
        self.context_tokens = self.model.config.text_config.max_position_embeddings
        self.stop_ids = [self.tokenizer.tekken.eos_id]

    def token_ids(self, prompt: Prompt) -> list[int]:
        """mistral-common's ids of the prompt's messages and tools: it writes Voxtral's prompt as it was trained."""
        system_role = not prompt.audio_parts or self.tokenizer.tekken.version >= TokenizerVersion.v13
        messages = openai_messages(prompt, lambda part: PART_PLACEHOLDER, system_role)
        request = ChatCompletionRequest.from_openai(messages=messages,
                                                    tools=list(prompt.tools) or None)
        return self.mistral.encode_chat_completion(request).tokens

    def features(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        """The 128-bin log-mel of the part padded to 30 s, as Voxtral's processor makes it."""
        out = self.feature_extractor(samples, sampling_rate=SAMPLE_RATE, padding="max_length", return_tensors="pt")
        return {"input_features": out["input_features"][0]}
