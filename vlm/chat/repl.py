"""The `vlm chat` terminal loop over a `VideoChat`: /commands, streamed answers, errors reported and survived."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, TextIO

from vlm.chat.session import ContextOverflowError, NoVideoError, VideoChat

log = logging.getLogger(__name__)

REPL_HELP = """commands:
  /video PATH   load another video (or image); starts a new conversation
  /reset        forget the conversation, keep the video
  /help         this text
  /quit         leave (end of input, Ctrl-D, leaves too)
anything else is a question about the video"""


def repl(chat: VideoChat, stdin: TextIO | None = None, stdout: TextIO | None = None,
         read_line: Callable[[str], str] | None = None) -> int:
    """The `vlm chat` loop: read a line, run a /command or stream the answer. Returns an exit code.

    Lines come from `read_line(prompt)` (default: `input` on a terminal, for line editing) or `stdin`.
    """
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if read_line is None:
        interactive = stdin is sys.stdin and stdin.isatty()

        def read_line(prompt: str) -> str:
            if interactive:
                return input(prompt)
            stdout.write(prompt)
            stdout.flush()
            line = stdin.readline()
            if not line:
                raise EOFError
            return line

    def say(text: str = "") -> None:
        stdout.write(text + "\n")
        stdout.flush()

    if chat.clip is not None:
        say(f"[{chat.media_type}: {chat.clip.source}, {len(chat.clip)} frame(s), {chat.num_visual_tokens} visual tokens]")
    say("type a question, or /help")
    while True:
        try:
            line = read_line("you> ").strip()
        except EOFError:
            say()
            return 0
        except KeyboardInterrupt:
            say()
            return 130
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return 0
        if command == "/help":
            say(REPL_HELP)
        elif command == "/reset":
            chat.reset()
            say("[conversation cleared; the video is still loaded]")
        elif command == "/video":
            if not argument.strip():
                say("usage: /video PATH")
                continue
            try:
                clip = chat.load_video(Path(argument.strip()).expanduser())
            except (OSError, ValueError, RuntimeError) as e:  # VideoDecodeError names the path
                say(f"error: {type(e).__name__}: {e}")
                continue
            say(f"[{chat.media_type}: {clip.source}, {len(clip)} frame(s), {chat.num_visual_tokens} visual tokens]")
        elif command.startswith("/"):
            say(f"unknown command {command}; /help lists them")
        else:
            _answer(chat, line, stdout)
        stdout.flush()


def _answer(chat: VideoChat, question: str, stdout: TextIO) -> None:
    """Stream one answer; errors are reported and the loop goes on; Ctrl-C stops the answer, not the session."""
    try:
        pieces = chat.ask(question, stream=True)
    except KeyboardInterrupt:
        stdout.write("[interrupted]\n")
        return
    except NoVideoError:
        stdout.write("error: no video loaded: use /video PATH\n")
        return
    except ContextOverflowError as e:
        message = str(e).replace("reset()", "/reset").replace("(num_frames=...)", "(vlm chat --frames N)")
        stdout.write(f"error: {message}\n")
        return
    except Exception as e:  # noqa: BLE001  (a REPL reports and goes on)
        log.debug("ask failed", exc_info=True)
        stdout.write(f"error: {type(e).__name__}: {e}\n")
        return
    stdout.write("bot> ")
    stdout.flush()
    try:
        for piece in pieces:
            stdout.write(piece)
            stdout.flush()
    except KeyboardInterrupt:
        pieces.close()  # type: ignore[union-attr]
        stdout.write(" [interrupted]")
    except Exception as e:  # noqa: BLE001
        log.debug("generation failed", exc_info=True)
        stdout.write(f"\nerror: {type(e).__name__}: {e}")
    stdout.write("\n")
    stdout.flush()
