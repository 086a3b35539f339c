"""The prompt renderer, on Qwen2-Audio's: audio parts in prompt order, long clips as labelled parts, history fitting."""

import pytest

from chat import Conversation, PromptTooLongError, get_family
from chat.audio import SAMPLE_RATE
from chat.conversation import ASSISTANT
from tests.conftest import numbered_clip

QWEN2_AUDIO = get_family("qwen2-audio").renderer


def test_audio_parts_follow_the_prompt_order():
    c = Conversation()
    c.add_user("q1", [numbered_clip(1), numbered_clip(2)])
    c.add_assistant("a1")
    c.add_user("q2", [numbered_clip(3)])
    prompt = QWEN2_AUDIO.render(c)
    assert [(p.number, p.index) for p in prompt.audio_parts] == [(1, 0), (2, 0), (3, 0)]
    assert prompt.text.count("<|AUDIO|>") == 3 and prompt.n_dropped_turns == 0


def test_a_long_clip_is_sent_as_labelled_parts():
    c = Conversation()
    c.add_user("Summarise.", [numbered_clip(1), numbered_clip(2, seconds=70.0)])
    prompt = QWEN2_AUDIO.render(c)
    assert "Audio 1: <|audio_bos|>" in prompt.text
    for part in (1, 2, 3):
        assert f"Audio 2 (part {part} of 3): <|audio_bos|><|AUDIO|><|audio_eos|>\n" in prompt.text
    assert [(p.number, p.index) for p in prompt.audio_parts] == [(1, 0), (2, 0), (2, 1), (2, 2)]
    assert sum(len(p.samples) for p in prompt.audio_parts[1:]) == 70 * SAMPLE_RATE


def test_history_is_dropped_oldest_first_and_clips_keep_their_numbers():
    c = Conversation()
    for k in range(4):
        c.add_user(f"question {k}", [numbered_clip(k, seconds=10.0)])
        c.add_assistant(f"answer {k}")
    c.add_user("Compare Audio 4 and Audio 5.", [numbered_clip(4, seconds=10.0)])
    full = QWEN2_AUDIO.render(c)
    budget = 3 * 250 + 400  # room for about three 10-s clips (250 audio tokens each) and their text
    fitted = QWEN2_AUDIO.render(c, max_tokens=budget)
    assert full.n_dropped_turns == 0 and fitted.n_dropped_turns == 2
    assert [p.number for p in fitted.audio_parts] == [3, 4, 5]
    assert "question 0" not in fitted.text and fitted.text.startswith("<|im_start|>system\n")
    assert "Audio 3: <|audio_bos|>" in fitted.text and "Compare Audio 4 and Audio 5." in fitted.text


def test_the_current_turn_is_never_dropped():
    c = Conversation()
    c.add_user("old")
    c.add_assistant("reply")
    c.add_user("Listen.", [numbered_clip(1, seconds=60.0)])
    with pytest.raises(PromptTooLongError, match="This turn alone needs about 1\\d{3} tokens .* holds 500"):
        QWEN2_AUDIO.render(c, max_tokens=500)


def test_unknown_family_lists_the_valid_ones():
    with pytest.raises(ValueError, match="qwen2-audio, qwen-audio-chat"):
        get_family("whisper")


def test_failed_replies_with_no_text_are_left_out():
    c = Conversation()
    c.add_user("hi")
    c.add_assistant("", status="failed", note="GPU out of memory")
    assert QWEN2_AUDIO.render(c).text.count(f"<|im_start|>{ASSISTANT}") == 1
