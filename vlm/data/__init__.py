"""Data formats the framework reads: LLaVA-style conversations and the MVBench multiple-choice layout."""

from vlm.data.conversation import (
    ConversationSample,
    DataFormatError,
    MediaPathError,
    TemplateMismatchError,
    Turn,
    load_conversations,
    parse_record,
    read_records,
    record_problems,
    resolve_media,
)
from vlm.data.mvbench import OFFICIAL_TASKS, MCQItem, MVBenchTask, load_mvbench, load_task, load_tasks
