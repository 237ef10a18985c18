"""VideoChat: a multi-turn chat session about one video (or image), for notebooks and the `vlm chat` command.

    chat = VideoChat.from_pretrained("runs/quickstart/final")
    chat.load_video("clip.mp4", num_frames=8)          # decoded, encoded and prefilled once
    chat.ask("What happens in the video?")              # -> the answer; the turn is kept in the history
    for piece in chat.ask("And then?", stream=True):    # text pieces as they are generated
        print(piece, end="")
    chat.reset()                                        # forget the turns, keep the video

How a session reuses work. The video is run through the tower and the connector once per `load_video`, and
the system prompt + visual tokens are prefilled into a KV cache right away. Each `ask` renders the whole
conversation with the model's chat template, compares its token ids with the ids whose keys/values are in the
cache, crops the cache back to the longest common prefix, and prefills only the rest (normally the end-of-turn
tokens of the previous answer, the new user turn and the assistant header). The result is the same as running
the full conversation from scratch, which is what `reuse_cache=False` does (the re-encode-every-turn baseline
that LLaVA's and VideoLLaMA2's demos use).

Text-only chat: by default `ask` before `load_video` is an error (`NoVideoError`), because a video model asked
about "the video" with none loaded gives confident nonsense. `VideoChat(model, require_video=False)` allows
plain text chat until a video is loaded. Loading a video starts a new conversation.

Instruction-aware connectors (e.g. an InstructBLIP-style Q-Former) condition the visual tokens on the first
question, exactly as in training: for them the tower still runs once per video, and the connector runs again
whenever the first question of the conversation changes (after `reset`).
"""

from vlm.chat.generation import GenerationSettings, LoadStats, StreamDecoder, TurnStats
from vlm.chat.repl import REPL_HELP, repl
from vlm.chat.session import ContextOverflowError, NoVideoError, VideoChat
