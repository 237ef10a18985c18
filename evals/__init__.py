"""Evaluation harnesses for video language models (docs/EVALUATION.md).

    evals.mcq        multiple-choice QA over the MVBench layout, protocol profiles in evals.profiles
    evals.openqa     open-ended QA, judged by evals.judges (exact / contains / MiniLM / OpenAI-compatible HTTP)
    evals.retrieval  text-video retrieval metrics and a dual encoder on frozen tower features
    evals.classify   action classification with multi-view testing and a linear probe
    evals.results    the results schema shared by all harnesses; evals.report renders them
    evals.interface  what a model must implement to be evaluated (VideoLLM does; so can any other model)
"""
