"""The request bodies `vlm serve` accepts (OpenAI's chat-completions shape, with vLLM's video content parts) and
how one becomes a conversation: the video's url, the earlier turns and the question."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from vlm.data.conversation import Turn


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MediaURL(_Strict):
    url: str
    detail: str | None = None  # OpenAI's image detail hint: accepted, not used


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: MediaURL


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: MediaURL


Part = Annotated[Union[TextPart, VideoPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    n: Literal[1] = 1  # one answer per request
    user: str | None = None


class FramesRequest(_Strict):
    url: str


@dataclass
class Conversation:
    """A request as the session sees it."""

    media_url: str | None
    media_type: str | None  # "video" | "image"
    history: list[Turn]  # the turns before the question
    question: str
    settings: dict[str, Any]


def _text(message: Message) -> str:
    if isinstance(message.content, str):
        return message.content
    return "\n".join(p.text for p in message.content if isinstance(p, TextPart))


def to_conversation(req: ChatRequest) -> Conversation:
    """Split a request into media, history and question; ValueError (a 400) names what is wrong."""
    media: list[tuple[int, str, str]] = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            media += [(i, "video", p.video_url.url) if isinstance(p, VideoPart) else (i, "image", p.image_url.url)
                      for p in m.content if not isinstance(p, TextPart)]
    if len(media) > 1:
        raise ValueError(f"messages: {len(media)} video/image parts; a conversation is about one video or image")
    first_user = next((i for i, m in enumerate(req.messages) if m.role == "user"), None)
    if media and media[0][0] != first_user:
        raise ValueError(f"messages[{media[0][0]}]: the video/image part must be in the first user message")
    if media and req.messages[media[0][0]].role != "user":
        raise ValueError(f"messages[{media[0][0]}]: only a user message can carry a video or image")
    last = req.messages[-1]
    if last.role != "user":
        raise ValueError(f"messages[{len(req.messages) - 1}]: the last message must be the user's question, "
                         f"not {last.role!r}")
    question = _text(last).strip()
    if not question:
        raise ValueError(f"messages[{len(req.messages) - 1}]: the question has no text")
    history = [Turn(m.role, _text(m)) for m in req.messages[:-1]]
    settings = {"max_new_tokens": req.max_completion_tokens or req.max_tokens, "temperature": req.temperature,
                "top_p": req.top_p, "top_k": req.top_k, "seed": req.seed}
    return Conversation(media[0][2] if media else None, media[0][1] if media else None, history, question, settings)
