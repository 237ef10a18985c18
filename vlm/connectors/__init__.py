"""Connectors (visual features -> LLM-width tokens) and token reducers; importing registers them all."""

from vlm.connectors.base import (
    CONNECTORS,
    REDUCERS,
    Connector,
    Instruction,
    TokenReducer,
    VisualTokens,
    build_connector,
    register_connector,
    register_reducer,
)
from vlm.connectors.mlp import MLPConnector
from vlm.connectors.qformer import QFormerConnector
from vlm.connectors.reduce import DiffPrune, Pool2d, TokenMerge, check_reducer_chain
from vlm.connectors.stc import STCConnector
from vlm.connectors.words import WordSlots
