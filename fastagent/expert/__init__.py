"""Expert trajectories for exploration-enriched fine-tuning (the ML-Agent paper's first component).

Modules:
    ideas      candidate improvement ideas per task, each an edit the scripted expert can make
    diversity  sentence embeddings (all-MiniLM-L6-v2 from its PyPI wheel; TF-IDF without it) and
               farthest-point selection of the most mutually diverse ideas
    teacher    a client for any OpenAI-compatible chat endpoint, and a teacher-driven expert
    scripted   the scripted expert: real edits, real runs in the sandbox pool, real scores
    __main__   `python -m fastagent.expert`: N episodes in parallel, resumable, summary, ShareGPT export
"""


def generate_expert_data(cfg, out_path, **kwargs):
    """Run the scripted expert into a trajectory file (see fastagent.expert.generate); resumes."""
    from fastagent.expert.generate import generate_expert_data as run
    return run(cfg, out_path, **kwargs)
