"""The instruction text of the generated conversations: caption requests, the multiple-choice prompt, and where
the <video> placeholder goes."""

from __future__ import annotations

CAPTION_REQUESTS = (
    "Describe what happens in the video.",
    "What is happening in this video?",
    "Give a short description of the video.",
    "Describe the video in one or two sentences.",
    "Summarize the events of this clip in order.",
    "What do you see in this clip? Describe it briefly.",
    "Write a caption for this video.",
    "Explain what the objects in the video do.",
)
MCQ_INSTRUCTIONS = (
    "Answer with the option's letter from the given choices directly.",
    "Answer with the option's letter from the given choices directly.",
    "Only give the best option.",
    "Answer with the letter of the correct option.",
)


def format_mcq(question: str, candidates: list[str], style: int = 0, instruction: str = MCQ_INSTRUCTIONS[0]) -> str:
    """The multiple-choice prompt in the benchmark's style: question, '(A) ...' lines, an instruction."""
    options = "\n".join(f"({'ABCDEFGH'[i]}) {c}" for i, c in enumerate(candidates))
    if style == 0:
        return f"Question: {question}\nOptions:\n{options}\n{instruction}"
    return f"{question}\n{options}\n{instruction}"


def with_video(text: str, video_first: bool) -> str:
    """Put the single <video> placeholder at the start or the end of the first human turn."""
    return f"<video>\n{text}" if video_first else f"{text}\n<video>"
